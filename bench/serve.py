"""
bench/serve.py -- the retrieval server (python server.py) under load, on loopback only: queries/s and latency
percentiles with many concurrent clients, against the same BM25 index called in-process (the baseline: what the
HTTP layer costs), plus the time to build the index from scratch.

What is timed:
  build     BM25Search over the corpus into a fresh temporary index folder (tokenize + index + save)
  inproc    BM25Search.search on the served index, one batch at a time, in this process
  server    `clients` threads, each with its own keep-alive connection, sending `requests` POST /retrieve in all
            (`batch` queries each, topk 3) to a server subprocess on 127.0.0.1; stops early at `time_limit_s`
  burst     `burst_clients` clients (200) start at once, each sending `burst_requests` (20) requests of one query
            on a new connection each, as HTTPSearch does (burst_keepalive=1: one keep-alive session a client), to the
            same server: connection resets and other errors, answers that differ from the same query searched alone
            in-process, p50/p99 and the wall time; stops early at `time_limit_s`. The target: 0 resets, every answer
            equal to the query alone.
  slow      `slow_clients` (64) clients each send one byte of an endless request head every `slow_every_s` (5 s) for
            `slow_s` (40 s; the server cuts each off at its --timeout_s, 30 s, and it connects again) while a normal
            client sends one query every `normal_every_s` through HTTPSearch (deadline 10 s, no retry): how
            many it got answered, how many within 2 s, its p50/max latency. The target: all, each within 2 s. Every
            slow socket is closed at the end.
  lock      the `server` load, and RL's shape: `ranks` (8) clients each sending requests of `rank_queries` (48
            prompts x 5 samples / 8 ranks = 30) queries, each on three servers: the default (no lock: the workers
            call BM25 at once), --max_batch 512 (requests that wait are searched in one call, as e5 does) and
            --max_batch 1 (one request a call, in order: serial, as behind the old lock): queries/s, p50 and p99.
Queries are corpus titles with a word of their first sentence (every one has hits). Server and clients share the
machine: pin both with taskset to compare runs.

    python bench/serve.py                                  # the 10k Wikipedia summaries (data.py builds them)
    python bench/serve.py clients=32 requests=2000 batch=8
    python bench/serve.py corpus=PATH/wiki-18.jsonl         # any FlashRAG corpus JSONL
    python bench/serve.py burst_clients=0                  # without the burst
    python bench/serve.py burst_keepalive=1                # the burst with one keep-alive session a client
    python bench/serve.py slow_clients=0 lock=0            # without the slow-clients and the lock phases

Ends with one JSON line.
"""
import json
import os
import random
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import requests  # noqa: E402

from server import HTTPSearch  # noqa: E402
from config import cli, read_corpus, read_key_values  # noqa: E402
import tools  # noqa: E402


@dataclass
class Args:
    corpus: str = "data/wiki/corpus.jsonl"  # corpus JSONL served (the Wikipedia summaries are built when missing)
    clients: int = 8  # concurrent client threads, each with its own keep-alive connection
    requests: int = 400  # POST /retrieve requests in all
    batch: int = 1  # queries per request
    topk: int = 3  # passages per query
    time_limit_s: float = 60.0  # the server part stops early after this long
    seed: int = 0  # seed of the queries
    burst_clients: int = 200  # clients of the burst, started at once (0 = no burst)
    burst_requests: int = 20  # one-query requests per burst client
    burst_keepalive: int = 0  # 1: each burst client keeps one session; 0: a new connection a request, as HTTPSearch
    slow_clients: int = 64  # clients sending one byte every slow_every_s, never a whole request (0 = no slow phase)
    slow_every_s: float = 5.0  # seconds between a slow client's bytes
    slow_s: float = 40.0  # length of the slow phase: past the server's 30 s deadline, so slow clients come back
    normal_every_s: float = 0.5  # seconds between the normal client's queries during the slow phase
    lock: int = 1  # 1: the lock phase (two more servers: --max_batch 512 and --max_batch 1)
    ranks: int = 8  # the lock phase's RL shape: clients, as the ranks of torchrun ...
    rank_queries: int = 30  # ... each sending this many queries a request (48 prompts x 5 samples / 8 ranks)


def make_queries(docs, n, seed):
    rng = random.Random(seed)
    out = []
    for d in rng.choices(docs, k=n):
        title, _, text = d["contents"].partition("\n")
        words = text.split()[:12]
        out.append(f"{title} {rng.choice(words) if words else ''}".strip())
    return out


def percentile(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))] if xs else 0.0


def load(url, batches, clients, topk, time_limit_s):
    """(latencies_s, wall_s, queries answered): batches sent by `clients` threads until done or out of time."""
    deadline = time.time() + time_limit_s
    sessions = {}

    def one(batch):
        if time.time() > deadline:
            return None
        session = sessions.setdefault(threading.get_ident(), requests.Session())  # keep-alive per client
        t0 = time.perf_counter()
        r = session.post(url, json={"queries": batch, "topk": topk, "return_scores": True}, timeout=30)
        r.raise_for_status()
        assert len(r.json()["result"]) == len(batch)
        return time.perf_counter() - t0, len(batch)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        done = [x for x in pool.map(one, batches) if x is not None]
    return [x[0] for x in done], time.perf_counter() - t0, sum(x[1] for x in done)


def burst(url, queries, clients, per_client, topk, time_limit_s, keepalive=True):
    """Every client starts at once and sends its share of `queries` one by one, on its own keep-alive session (or
    a new connection each, keepalive False).
    Returns {"answers": [(query, doc ids)], "latencies", "resets", "errors", "wall_s"}."""
    deadline = time.time() + time_limit_s
    start, lock = threading.Barrier(clients), threading.Lock()
    out = {"answers": [], "latencies": [], "resets": 0, "errors": []}

    def client(c):
        start.wait()
        with requests.Session() as session:
            if not keepalive:
                session.headers["Connection"] = "close"
            for query in queries[c * per_client:(c + 1) * per_client]:
                if time.time() > deadline:
                    return
                t0 = time.perf_counter()
                try:
                    r = session.post(url, json={"queries": [query], "topk": topk}, timeout=max(1.0, deadline -
                                                                                               time.time()))
                    r.raise_for_status()
                    ids = [d["id"] for d in r.json()["result"][0]]
                except requests.ConnectionError:  # reset or refused: what an overflowing accept queue does
                    with lock:
                        out["resets"] += 1
                    continue
                except (requests.RequestException, ValueError, KeyError) as e:
                    with lock:
                        out["errors"].append(f"{type(e).__name__}: {e}")
                    continue
                with lock:
                    out["latencies"].append(time.perf_counter() - t0)
                    out["answers"].append((query, ids))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out["wall_s"] = time.perf_counter() - t0
    return out


def slow_phase(url, args, queries):
    """The normal client's latencies (None: failed) while slow clients trickle; and how many connections they made."""
    from test_serve import port_of, trickle
    stop, made = threading.Event(), []
    slow = threading.Thread(target=lambda: made.append(trickle(port_of(url), args["slow_clients"],
                                                              args["slow_every_s"], stop)))
    slow.start()
    client, latencies, t_end = HTTPSearch(url, timeout_s=10, retries=0), [], time.time() + args["slow_s"]
    try:
        time.sleep(min(2.0, args["slow_s"]))  # every slow client connected first
        for query in queries:
            if time.time() > t_end:
                break
            t0 = time.perf_counter()
            try:
                client([query], k=args["topk"])
                latencies.append(time.perf_counter() - t0)
            except tools.ToolError:
                latencies.append(None)
            time.sleep(args["normal_every_s"])
    finally:
        stop.set()
        slow.join()
    return latencies, made[0]


def compare_lock(urls, args, docs):
    """queries/s, p50 and p99 of each server in `urls` ({name: url}), under the `server` load and under RL's shape
    (ranks x rank_queries, 10 requests a rank)."""
    out = {}
    for shape, clients, batch, n in (("server", args["clients"], args["batch"], args["requests"]),
                                     ("ranks", args["ranks"], args["rank_queries"], 10 * args["ranks"])):
        queries = make_queries(docs, n * batch, args["seed"] + 3)
        batches = [queries[i:i + batch] for i in range(0, len(queries), batch)]
        for name, where in urls.items():
            latencies, wall_s, answered = load(where, batches, clients, args["topk"], args["time_limit_s"])
            out[f"{shape}_{name}"] = {"clients": clients, "batch": batch, "queries_per_s": answered / wall_s,
                                      "p50_ms": 1000 * percentile(latencies, 50),
                                      "p99_ms": 1000 * percentile(latencies, 99)}
    return out


def main(argv=None):
    args = read_key_values(Args, sys.argv[1:] if argv is None else argv, "config")
    if not os.path.exists(args["corpus"]):
        import data
        print("wiki corpus docs:", data.build_wiki_corpus(args["corpus"]))
    docs = read_corpus(args["corpus"])
    with tempfile.TemporaryDirectory() as tmp:  # a fresh build, leaving the cached index alone
        t0 = time.perf_counter()
        tools.BM25Search(args["corpus"], index_dir=os.path.join(tmp, "index"))
        build_s = time.perf_counter() - t0
    queries = make_queries(docs, args["requests"] * args["batch"], args["seed"])
    batches = [queries[i:i + args["batch"]] for i in range(0, len(queries), args["batch"])]

    local = tools.BM25Search(args["corpus"], mmap=True)  # also builds the cache the server will load
    t0 = time.perf_counter()
    for batch in batches:
        local.search(batch, args["topk"])
    inproc_qps = len(queries) / (time.perf_counter() - t0)

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    from test_serve import start_server, stop_server  # the server tests' own start and stop, not a copy
    n_burst = args["burst_clients"] * args["burst_requests"]
    burst_queries = make_queries(docs, n_burst, args["seed"] + 1)
    proc, url = start_server(args["corpus"])
    modes = (("batched", "512"), ("serial", "1")) if args["lock"] else ()
    others = {name: start_server(args["corpus"], "--max_batch", n) for name, n in modes}
    slow_queries = make_queries(docs, int(args["slow_s"] / args["normal_every_s"]) + 1, args["seed"] + 2)
    try:
        latencies, wall_s, answered = load(url, batches, args["clients"], args["topk"], args["time_limit_s"])
        b = burst(url, burst_queries, args["burst_clients"], args["burst_requests"], args["topk"],
                  args["time_limit_s"], bool(args["burst_keepalive"])) if n_burst else None
        slow, made = slow_phase(url, args, slow_queries) if args["slow_clients"] else (None, 0)
        lock = compare_lock({"direct": url, **{name: u for name, (_, u) in others.items()}}, args, docs) \
            if args["lock"] else None
    finally:
        for p in [proc] + [p for p, _ in others.values()]:
            stop_server(p)
    result = {"bench": "serve", "corpus": args["corpus"], "docs": len(docs), "index_build_s": build_s,
              "clients": args["clients"], "batch": args["batch"], "topk": args["topk"], "requests": len(latencies),
              "queries_per_s": answered / wall_s, "p50_ms": 1000 * percentile(latencies, 50),
              "p99_ms": 1000 * percentile(latencies, 99), "inproc_queries_per_s": inproc_qps}
    print(f"{len(docs)} docs, index built in {build_s:.2f}s; server: {result['queries_per_s']:.0f} queries/s, "
          f"p50 {result['p50_ms']:.1f} ms, p99 {result['p99_ms']:.1f} ms ({args['clients']} clients, "
          f"{args['batch']} per request); in-process: {inproc_qps:.0f} queries/s")
    if b:
        alone = {q: [local.docs[i]["id"] for i in local.search([q], args["topk"])[0][0]] for q, _ in b["answers"]}
        wrong = sum(ids != alone[q] for q, ids in b["answers"])
        result["burst"] = {"clients": args["burst_clients"], "keepalive": args["burst_keepalive"], "requests": n_burst,
                           "answered": len(b["answers"]),
                           "resets": b["resets"], "errors": len(b["errors"]), "wrong_answers": wrong,
                           "p50_ms": 1000 * percentile(b["latencies"], 50),
                           "p99_ms": 1000 * percentile(b["latencies"], 99), "wall_s": b["wall_s"]}
        print(f"burst: {args['burst_clients']} clients x {args['burst_requests']} requests at once "
              f"({'keep-alive' if args['burst_keepalive'] else 'a new connection each'}): "
              f"{len(b['answers'])} of {n_burst} answered, {b['resets']} resets, {len(b['errors'])} other errors"
              f"{' (' + b['errors'][0] + ')' if b['errors'] else ''}, {wrong} answers differ from the query alone; "
              f"p50 {result['burst']['p50_ms']:.1f} ms, p99 {result['burst']['p99_ms']:.1f} ms, {b['wall_s']:.1f}s")
    if slow is not None:
        answered = [t for t in slow if t is not None]
        result["slow"] = {"slow_clients": args["slow_clients"], "every_s": args["slow_every_s"], "s": args["slow_s"],
                          "connections": made, "queries": len(slow), "answered": len(answered),
                          "within_2s": sum(t <= 2 for t in answered), "p50_ms": 1000 * percentile(answered, 50),
                          "max_ms": 1000 * max(answered, default=0)}
        print(f"slow: {args['slow_clients']} clients sending a byte every {args['slow_every_s']:g}s for "
              f"{args['slow_s']:g}s ({made} connections): a normal client got {len(answered)} of {len(slow)} "
              f"answered, {result['slow']['within_2s']} within 2 s; p50 {result['slow']['p50_ms']:.1f} ms, max "
              f"{result['slow']['max_ms']:.1f} ms")
    if lock:
        result["lock"] = lock
        for shape, r in lock.items():
            print(f"{shape}: {r['clients']} clients x {r['batch']} queries a request: {r['queries_per_s']:.0f} "
                  f"queries/s, p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms")
    print(json.dumps(result))


if __name__ == "__main__":
    cli(main)

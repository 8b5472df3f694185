"""The retrieval server (server.py): a real subprocess on 127.0.0.1, queried by the project's own client,
by rollout.py and by eval.py, next to the same BM25 index used in-process.

    .venv/bin/python -m pytest -q tests/test_serve.py
"""
import json
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from server import Batcher, DenseSearch, HTTPSearch, request_size
import config
import tools

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start_server(corpus, *extra, timeout_s=60):
    """(process, url): `python server.py` on a free loopback port; the URL is read from its output."""
    proc = subprocess.Popen([sys.executable, "server.py", "--corpus", corpus, "--port", "0", *extra],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = queue.Queue()  # a reader thread, so a silent server cannot block the test past its deadline
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    deadline, seen = time.time() + timeout_s, []
    while time.time() < deadline and proc.poll() is None:
        try:
            seen.append(lines.get(timeout=0.5))
        except queue.Empty:
            continue
        if "http://" in seen[-1]:
            proc.lines = lines  # what the server prints later (its stderr too), for the tests that read it
            return proc, seen[-1].split()[-1]
    proc.kill()
    raise RuntimeError(f"server did not start within {timeout_s}s: {''.join(seen)}")


def stop_server(proc):
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def port_of(url):
    return int(url.split(":")[2].split("/")[0])


def trickle(port, clients, every_s, stop):
    """`clients` slow clients of 127.0.0.1:port, each sending one byte of an endless request head every `every_s`
    until `stop` is set; a client the server closes connects again. Returns how many connections were made; every
    socket is closed at the end."""
    head = b"POST /retrieve HTTP/1.1\r\n" + b"X-Slow: 1\r\n" * 100000
    conns = [[socket.create_connection(("127.0.0.1", port), timeout=5), 0] for _ in range(clients)]
    made = clients
    try:
        while not stop.wait(every_s):
            for conn in conns:
                try:
                    conn[0].send(head[conn[1]:conn[1] + 1])
                    conn[1] += 1
                except OSError:  # closed by the server: a slow client comes back
                    conn[0].close()
                    conn[0], conn[1] = socket.create_connection(("127.0.0.1", port), timeout=5), 0
                    made += 1
    finally:
        for conn in conns:
            conn[0].close()
    return made


@pytest.fixture(scope="module")
def corpus(tiny_cfg):
    path = os.path.join(tiny_cfg.run.data_dir, "corpus.jsonl")
    tools.BM25Search(path)  # the index is built here first, so the server only loads it (no two builders race)
    return path


@pytest.fixture(scope="module")
def server(corpus):
    proc, url = start_server(corpus)
    yield url
    stop_server(proc)


QUERIES = ["Ada Brun", "born in", "which company", "", "zzzz unknown words", "?!"]


def test_server_answers_the_project_client_like_the_in_process_index(server, corpus):
    local = tools.BM25Search(corpus)
    for k in (1, 3):
        assert HTTPSearch(server, timeout_s=5)(QUERIES, k=k) == local(QUERIES, k=k)


def test_reply_has_the_search_r1_shape_with_and_without_scores(server, corpus):
    docs = {d["id"]: d["contents"] for d in config.read_corpus(corpus)}
    reply = requests.post(server, json={"queries": ["born", "city", "Ada Brun"], "topk": 2,
                                        "return_scores": True}).json()
    assert [len(row) for row in reply["result"]] == [2, 2, 0]  # no name of this world: nothing, not 2 of score 0
    for hit in reply["result"][0]:
        assert set(hit) == {"document", "score"} and docs[hit["document"]["id"]] == hit["document"]["contents"]
    scores = [hit["score"] for hit in reply["result"][0]]
    assert scores == sorted(scores, reverse=True)
    bare = requests.post(server, json={"queries": ["born"], "topk": 2}).json()
    assert bare["result"][0] == [hit["document"] for hit in reply["result"][0]]


@pytest.mark.parametrize("body, message", [
    (b"not json", "Expecting value"),
    (b"\x80\x80", "codec"),
    (b"[1, 2]", "JSON object"),
    (b'{"topk": 2}', "'queries' must be a list of strings"),
    (b'{"queries": ["a", 3]}', "'queries' must be a list of strings"),
    (b'{"queries": ["a"], "topk": 0}', "'topk' must be an integer"),
    (b'{"queries": ["a"], "topk": "3"}', "'topk' must be an integer"),
    (b'{"queries": ["a"], "topk": 1000}', "'topk' must be an integer"),
    (json.dumps({"queries": ["a"] * 2000}).encode(), "at most 1024 queries"),
])
def test_a_malformed_request_is_a_400_with_its_reason_and_the_server_lives_on(server, body, message):
    r = requests.post(server, data=body, timeout=5)
    assert r.status_code == 400 and message in r.json()["error"]
    assert requests.post(server, json={"queries": ["Ada Brun"], "topk": 1}, timeout=5).status_code == 200


def test_an_oversized_body_is_refused_with_413_unread(server):
    r = requests.post(server, data=b"x" * (2 << 20), timeout=10)
    assert r.status_code == 413 and "bytes" in r.json()["error"]
    assert requests.get(server.replace("/retrieve", "/health"), timeout=5).json()["retriever"] == "bm25"


def test_unknown_paths_are_404(server):
    assert requests.get(server, timeout=5).status_code == 404
    assert requests.post(server.replace("/retrieve", "/search"), json={}, timeout=5).status_code == 404


@pytest.mark.parametrize("max_batch", [None, "64"])
def test_many_concurrent_clients_get_their_own_answers(server, corpus, max_batch):
    """The workers call BM25 at once (the default), or the requests that wait are searched in one call (--max_batch,
    e5's default): either way each request gets its own rows, at its own topk, the same as its queries alone."""
    local = tools.BM25Search(corpus)
    proc, url = start_server(corpus, "--max_batch", max_batch) if max_batch else (None, server)
    batches = [[f"{q} {i}" for q in QUERIES[:1 + i % 3]] for i in range(48)]
    try:
        with ThreadPoolExecutor(16) as pool:  # 16 clients, each with its own connection, 48 requests in flight
            answers = list(pool.map(lambda i: HTTPSearch(url, timeout_s=10, retries=0)(batches[i], k=1 + i % 3),
                                    range(48)))
    finally:
        if proc:
            stop_server(proc)
    assert answers == [local(qs, k=1 + i % 3) for i, qs in enumerate(batches)]


def test_requests_that_wait_are_searched_together_and_split_back():
    release, calls = threading.Event(), []

    def search(queries, k):
        calls.append((list(queries), k))
        release.wait(5)  # the first call holds the retriever while the others queue
        return [[len(q)] for q in queries], [[float(k)] for _ in queries]
    for max_batch, want_calls in ((512, 3), (1, 5)):  # 1: one request a call, as behind a lock
        batcher, release, calls = Batcher(search, max_batch), threading.Event(), []
        with ThreadPoolExecutor(5) as pool:
            first = pool.submit(batcher, ["a"], 2)
            time.sleep(0.2)
            rest = [pool.submit(batcher, ["b" * n, "c"], 2 if n < 4 else 3) for n in range(1, 5)]
            time.sleep(0.2)
            release.set()
            assert first.result() == ([[1]], [[2.0]])
            assert [r.result() for r in rest] == [([[n], [1]], [[k], [k]]) for n, k in ((1, 2.), (2, 2.), (3, 2.),
                                                                                         (4, 3.))]
        assert len(calls) == want_calls  # 512: the first, then the waiting ones in one call per topk


def test_a_retrieval_failure_is_a_500_for_its_call_and_the_batcher_lives_on():
    def search(queries, k):
        if "boom" in queries:
            raise RuntimeError("encoder failed")
        return [[0] for _ in queries], [[1.0] for _ in queries]
    batcher = Batcher(search)
    with pytest.raises(RuntimeError, match="encoder failed"):
        batcher(["boom"], 1)
    assert batcher(["fine"], 1) == ([[0]], [[1.0]])


def test_a_burst_of_clients_on_few_workers_gets_every_answer_and_no_reset(corpus):
    """100 clients connect at once to a server with 4 workers, each sending 3 requests on a keep-alive session:
    the listen backlog holds the burst, and a worker closes its connection after a reply while others wait."""
    local = tools.BM25Search(corpus)
    proc, url = start_server(corpus, "--workers", "4", "--timeout_s", "5")
    start = threading.Barrier(100)

    def client(i):
        start.wait()
        with requests.Session() as session:
            out = []
            for j in range(3):
                queries = [f"{QUERIES[(i + j) % 3]} {i}"]
                reply = session.post(url, json={"queries": queries, "topk": 2}, timeout=60)
                out.append((queries, [d["contents"] for d in reply.json()["result"][0]]))
            return out
    try:
        with ThreadPoolExecutor(100) as pool:
            answers = [a for client_answers in pool.map(client, range(100)) for a in client_answers]
    finally:
        stop_server(proc)
    assert len(answers) == 300 and all(got == local(queries, k=2)[0] for queries, got in answers)


def test_a_client_that_stalls_mid_body_holds_no_worker_and_is_cut_off_at_its_deadline(corpus):
    proc, url = start_server(corpus, "--workers", "1", "--timeout_s", "1")
    try:
        with socket.create_connection(("127.0.0.1", port_of(url)), timeout=10) as stalled:
            t0 = time.time()
            stalled.sendall(b"POST /retrieve HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"queries\": ")
            reply = requests.post(url, json={"queries": ["Ada Brun"], "topk": 1}, timeout=10)  # the one worker
            assert reply.status_code == 200 and time.time() - t0 < 0.8  # answered at once, not after the timeout
            assert stalled.recv(100) == b"" and 0.8 < time.time() - t0 < 3  # closed at its deadline, nothing sent
        assert requests.get(url.replace("/retrieve", "/health"), timeout=5).json()["cut"] == 1
    finally:
        stop_server(proc)


def test_slow_clients_more_than_the_workers_do_not_starve_a_normal_client(corpus):
    """40 clients each send one byte every 0.5 s to a server of 4 workers: each one's deadline (2 s) cuts it off,
    it comes back, and meanwhile a normal client gets every answer, each within 2 s."""
    proc, url = start_server(corpus, "--workers", "4", "--timeout_s", "2")
    stop, made = threading.Event(), []
    slow = threading.Thread(target=lambda: made.append(trickle(port_of(url), 40, 0.5, stop)))
    slow.start()
    try:
        time.sleep(1.0)  # every slow client connected and sending
        client, latencies = HTTPSearch(url, timeout_s=2, retries=0), []
        for i in range(8):
            t0 = time.time()
            assert client([f"{QUERIES[i % 3]} {i}"], k=1)
            latencies.append(time.time() - t0)
            time.sleep(0.4)
    finally:
        stop.set()
        slow.join()
        stop_server(proc)
    assert max(latencies) < 2 and made[0] > 40  # answered throughout, and the slow clients were cut and came back


@pytest.mark.parametrize("data, size", [
    (b"POST /retrieve HTTP/1.1\r\nContent-Length: 3\r\n\r\nab", None),  # the body is not all in: wait
    (b"POST /retrieve HTTP/1.1\r\nContent-Length: 3\r\n\r\nabcGET", 49),  # whole; the rest is the next request's
    (b"POST /retrieve HTTP/1.1\ncontent-length: 3\n\nabc", 46),  # bare line feeds, as http.server reads them
    (b"POST /retrieve HTTP/1.1\r\nContent-Length: -5\r\n\r\n", 47),  # refused at the end of its headers ...
    (b"POST /retrieve HTTP/1.1\r\nContent-Length: 99\r\n\r\n", 47),  # ... as is a body over max_bytes
    (b"POST /retrieve HTTP/1.1\r\nHost: x", None),
])
def test_a_request_is_whole_when_its_headers_and_body_are_in(data, size):
    assert request_size(data, max_bytes=10) == size


def test_negative_content_length_is_a_400_that_says_so(server):
    with socket.create_connection(("127.0.0.1", port_of(server)), timeout=5) as sock:
        sock.sendall(b"POST /retrieve HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n")
        reply = sock.makefile("rb").read().decode()
    assert reply.startswith("HTTP/1.1 400") and "a Content-Length from 0 to" in reply


def test_a_busy_port_is_one_line_and_exit_status_1(server, corpus):
    r = subprocess.run([sys.executable, "server.py", "--corpus", corpus, "--port", str(port_of(server))],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "cannot listen on 127.0.0.1" in r.stderr and "address already in use" in r.stderr.lower()


def test_clients_that_hang_up_before_their_reply_leave_no_traceback(corpus):
    """Clients send a whole request and reset the connection at once (a killed rollout), while the one worker is
    busy: no traceback on the server's console, and it answers the next client."""
    proc, url = start_server(corpus, "--workers", "1", "--timeout_s", "1")
    body = json.dumps({"queries": ["Ada Brun born"] * 200, "topk": 3}).encode()
    request = b"POST /retrieve HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    try:
        with socket.create_connection(("127.0.0.1", port_of(url)), timeout=10) as stalled:
            stalled.sendall(request[:30])  # on a pool that reads in its workers, this holds the one worker
            for _ in range(20):
                with socket.create_connection(("127.0.0.1", port_of(url)), timeout=10) as gone:
                    gone.sendall(request)
                    gone.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")  # close = reset
            time.sleep(1.5)
        assert requests.post(url, json={"queries": ["Ada Brun"], "topk": 1}, timeout=10).status_code == 200
    finally:
        stop_server(proc)
    output = []
    while not proc.lines.empty():
        output.append(proc.lines.get())
    assert not any("Traceback" in line or "Error" in line for line in output), "".join(output)


def test_missing_corpus_and_dense_without_faiss_fail_in_one_line(tmp_path, corpus):
    r = subprocess.run([sys.executable, "server.py", "--corpus", str(tmp_path / "none.jsonl")], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    missing = str(tmp_path / "none.jsonl")
    assert r.returncode == 2 and r.stderr.strip() == f"server.py: serve: no corpus file {missing!r}"
    try:
        import faiss  # noqa: F401
        pytest.skip("faiss is installed: the dense retriever would load an encoder")
    except ImportError:
        pass
    r = subprocess.run([sys.executable, "server.py", "--corpus", corpus, "--retriever", "e5"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "pip install faiss-cpu" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_e5_on_cuda_keeps_one_thread_calling_the_gpu(corpus):
    """faiss's GPU indexes take one calling thread: --max_batch 0 (the workers call at once) is refused up front."""
    r = subprocess.run([sys.executable, "server.py", "--corpus", corpus, "--retriever", "e5",
                        "--device", "cuda", "--max_batch", "0"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.strip().endswith("needs --max_batch >= 1 (one thread calls the GPU)")


# -----------------------------------------------------------------------------
# rollout.py and eval.py with env.tool=http: the same episodes as with the in-process index

def test_rollout_through_the_server_equals_rollout_with_the_local_index(server, corpus, tiny_base, tiny_cfg):
    from data import load_qa
    from rollout import rollout
    from test_rollout import agent as biased_agent  # the tiny model with a bias towards actions
    model, tok = biased_agent.__wrapped__(tiny_base)
    env = tools.EnvConfig(max_new_tokens=96, max_actions=2, obs_max_tokens=40, tool="http", url=server)
    questions = load_qa(f"{tiny_cfg.run.data_dir}/test.jsonl")[:4]
    remote = tools.SearchEnv(tools.make_tool(env), tok, env)
    local = tools.SearchEnv(tools.BM25Search(corpus), tok, env)
    got, want = rollout(model, tok, questions, env, remote), rollout(model, tok, questions, env, local)
    assert remote.calls > 0 and remote.failures == 0 and remote.calls == local.calls
    assert [e.ids for e in got] == [e.ids for e in want] and [e.mask for e in got] == [e.mask for e in want]


def test_eval_through_the_server_scores_like_the_local_index(server, tiny_root, tiny_base):
    import eval as ev
    argv = ["--config", "configs/tiny.yaml", f"run.data_dir={tiny_root}/data", f"run.runs_dir={tiny_root}/runs",
            "run.name=servetest", f"init={tiny_base}", "limit=6", "mode=workflow", "workflow=fixed",
            "env.max_new_tokens=24"]
    remote = ev.main(argv + ["env.tool=http", f"env.url={server}", "tag=http"])
    local = ev.main(argv + ["tag=bm25"])
    assert remote["real_calls"] > 0 and remote["tool_failures"] == 0
    assert {k: remote[k] for k in ("em", "f1", "real_calls", "gen_tokens")} == \
           {k: local[k] for k in ("em", "f1", "real_calls", "gen_tokens")}


# -----------------------------------------------------------------------------
# The dense retriever (optional: runs where faiss is installed)

@pytest.fixture(scope="module")
def encoder(tiny_base, tmp_path_factory):
    """A small random BERT with the tiny world's tokenizer: the e5 code path without a hub download."""
    pytest.importorskip("faiss")
    from transformers import AutoTokenizer, BertConfig, BertModel
    import torch
    path = str(tmp_path_factory.mktemp("encoder"))
    tok = AutoTokenizer.from_pretrained(tiny_base)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=128, max_position_embeddings=512)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_dense_server_answers_like_the_in_process_dense_index(encoder, corpus, tmp_path):
    small = str(tmp_path / "corpus.jsonl")  # 40 documents: a random encoder is slow enough on one core
    docs = config.read_corpus(corpus)[:40]
    with open(small, "w") as f:
        f.writelines(json.dumps(d) + "\n" for d in docs)
    local = DenseSearch(small, encoder)
    assert os.path.exists(f"{small}.{os.path.basename(encoder)}.faiss")  # cached for the server to load
    texts = [d["contents"] for d in docs[:10]]
    idx, scores = local.search(texts, 3)
    assert sum(row[0] == i for i, row in enumerate(idx)) >= 8  # a document's own text finds it (mean pooling)
    assert all(row == sorted(row, reverse=True) and -1.001 <= row[0] <= 1.001 for row in scores)  # cosines
    proc, url = start_server(small, "--retriever", "e5", "--model", encoder)
    try:
        reply = requests.post(url, json={"queries": texts, "topk": 3, "return_scores": True}, timeout=30).json()
        assert [[hit["document"]["id"] for hit in row] for row in reply["result"]] == \
               [[docs[i]["id"] for i in row] for row in idx]
        with ThreadPoolExecutor(10) as pool:  # one query a request, at once: batched by the server, split back
            alone = list(pool.map(lambda t: requests.post(url, json={"queries": [t], "topk": 3}, timeout=30), texts))
        assert [[hit["id"] for hit in r.json()["result"][0]] for r in alone] == [[docs[i]["id"] for i in row]
                                                                                 for row in idx]
    finally:
        stop_server(proc)


def test_a_prebuilt_index_is_served_as_is_and_one_of_another_corpus_is_one_line(encoder, corpus, tmp_path):
    """--index (Search-R1's e5_Flat.index for wiki-18.jsonl): the server searches that file and encodes no passage
    (it writes no cache of its own); an index whose size is not the corpus's stops the server in one line."""
    docs = config.read_corpus(corpus)[:30]
    small = str(tmp_path / "wiki-18.jsonl")
    with open(small, "w") as f:
        f.writelines(json.dumps(d) + "\n" for d in docs)
    local = DenseSearch(small, encoder)
    prebuilt = str(tmp_path / "e5_Flat.index")
    os.replace(f"{small}.{os.path.basename(encoder)}.faiss", prebuilt)
    texts = [d["contents"] for d in docs[:5]]
    proc, url = start_server(small, "--retriever", "e5", "--model", encoder, "--index", prebuilt)
    try:
        reply = requests.post(url, json={"queries": texts, "topk": 2}, timeout=30).json()
        assert [[hit["id"] for hit in row] for row in reply["result"]] == \
               [[docs[i]["id"] for i in row] for row in local.search(texts, 2)[0]]
    finally:
        stop_server(proc)
    assert sorted(os.listdir(tmp_path)) == ["e5_Flat.index", "wiki-18.jsonl"]  # no cache encoded beside it
    with open(small, "w") as f:  # the corpus changed under the index
        f.writelines(json.dumps(d) + "\n" for d in docs[:20])
    r = subprocess.run([sys.executable, "server.py", "--corpus", small, "--retriever", "e5", "--model", encoder,
                        "--index", prebuilt, "--port", "0"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "holds 30 vectors" in r.stderr and "20 rows" in r.stderr

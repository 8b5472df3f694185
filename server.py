"""
server.py -- the retrieval server, and the client every stage uses for it (env.tool=http).

    python server.py --corpus data/wiki/corpus.jsonl --port 8000     # then env.tool=http everywhere
    python server.py --corpus ... --workers 32 --timeout_s 30         # worker threads, per-request deadline
    python server.py --retriever e5 --corpus wiki-18.jsonl --index e5_Flat.index --device cuda   # the paper's

The Search-R1 / FlashRAG wire format, the one HTTPSearch reads, over any corpus JSONL:
    POST /retrieve {"queries": ["...", ...], "topk": 3, "return_scores": true}
    -> {"result": [[{"document": {"id": "12", "contents": "Title\\ntext"}, "score": 7.1}, ...], ...]}
       (return_scores false: the documents alone, as Search-R1 does);
    GET /health -> {"docs", "retriever", "cut", "dropped"} (the last two: PoolServer's counts).
bm25 (default): BM25Search, its index built once and cached beside the corpus, loaded memory-mapped.
e5: an e5-style encoder (mean pooling, "query: " / "passage: " prefixes, unit vectors) and a faiss exact
inner-product (Flat) index; needs faiss (`pip install faiss-cpu`, or faiss-gpu: an optional extra). The paper's
retriever over wiki-18 is Search-R1's prebuilt e5-base-v2 Flat index, so nothing encodes 21M passages here:
    huggingface-cli download PeterJinGo/wiki-18-e5-index part_aa part_ab --repo-type dataset --local-dir wiki18
    huggingface-cli download PeterJinGo/wiki-18-corpus wiki-18.jsonl.gz --repo-type dataset --local-dir wiki18
    cat wiki18/part_* > wiki18/e5_Flat.index && gzip -d wiki18/wiki-18.jsonl.gz
    python server.py --retriever e5 --corpus wiki18/wiki-18.jsonl --index wiki18/e5_Flat.index --device cuda
--device cuda puts the encoder on the GPU (fp16, as Search-R1 does) and, where faiss-gpu is installed, the index
on every visible GPU (fp16, sharded; CUDA_VISIBLE_DEVICES picks them), else faiss searches on the CPU.
Without --index, the corpus is encoded once (on --device) and the index cached beside it.
Connections: one front thread reads each request in full (headers and body) before a worker takes it, so clients
that send slowly or not at all hold no worker; one deadline, --timeout_s from a connection's opening or its
previous reply, closes a connection whose request is not complete by then ("cut"). --workers threads answer
complete requests; a client gone before its reply is counted ("dropped"), never a traceback.
Retrieval, with no lock: bm25 is called from the workers at once (bm25s only reads its index: the same answers
from 8 threads as alone, and a batch of queries costs bm25s no less per query than one). e5 goes through a Batcher:
one thread calls the retriever, and the requests that queue meanwhile are searched together in its next call
(--max_batch queries at most): one encoder forward and one pass of faiss over the index for all of them, what a
GPU wants, and what an exact (Flat) index on the CPU needs (each search reads every vector); faiss's GPU indexes
also take one calling thread only (faiss's wiki, "Threads and asynchronous calls"), so e5 on cuda refuses 0.
--max_batch 1: one request a call, in order of arrival; 0: the workers call the retriever directly.
A body over --max_bytes is refused with 413, anything malformed with 400 and a JSON {"error"}; a failure inside
retrieval is a 500 with its message (for every request searched in that call), and the server keeps serving.
Not here: reranking, building approximate (HNSW/IVF) indexes, chunked request bodies, Expect: 100-continue
(answered only once the body is in: a client that waits for it sends its body after its own wait); the corpus is
held in memory (wiki-18's 21M rows: tens of GB of RAM).

The client, HTTPSearch, is tools.make_tool's env.tool=http: one deadline per call, retries with backoff.
"""
import http.client
import io
import json
import os
import re
import time
import urllib.parse

from config import ConfigError, RunError, backoff, cli, read_corpus
from tools import BM25Search, ToolError

# -----------------------------------------------------------------------------
# The client: a Search-R1 / FlashRAG retrieval server as a search tool, `tool(queries) -> [[passage, ...], ...]`

class HTTPSearch:
    """Client of a Search-R1 / FlashRAG retrieval server: POST {url} {"queries", "topk", "return_scores"}.

    The reply is {"result": [[{"document": {"contents": ...}, "score": ...}, ...], ...]} (Search-R1) or
    [[{"contents": ...}, ...], ...]. One call has one deadline, `timeout_s`, for everything: connecting, sending and
    reading the whole reply, retries and their exponential backoff included, so a server that trickles its reply
    a byte at a time costs at most timeout_s (a per-read timeout never fires on it). Then ToolError, naming the URL
    and the cause of the last try.
    """

    def __init__(self, url, timeout_s=10.0, retries=2, backoff_s=0.5):
        self.url, self.timeout_s, self.retries, self.backoff_s = url, timeout_s, retries, backoff_s

    def __call__(self, queries, k=2):
        deadline = time.monotonic() + self.timeout_s
        body = json.dumps({"queries": list(queries), "topk": k, "return_scores": True}).encode()
        error, tries = None, 0
        for tries in backoff(self.retries, self.backoff_s, deadline):
            try:
                return self._passages(json.loads(post(self.url, body, deadline)), len(queries))
            except (OSError, http.client.HTTPException, ValueError) as e:
                error = e
        cause = failure_cause(error)
        detail = f" ({error})" if str(error) != cause else ""
        raise ToolError(f"retrieval server {self.url} failed after {tries} tr{'ies' if tries > 1 else 'y'} "
                        f"within {self.timeout_s:g}s: {cause}{detail}", cause)

    @staticmethod
    def _passages(reply, n):
        rows = reply.get("result") if isinstance(reply, dict) else reply
        if not isinstance(rows, list) or len(rows) != n:
            raise ValueError(f"malformed reply: expected a list of {n} results")
        out = []
        for row in rows:
            passages = []
            for hit in row if isinstance(row, list) else []:
                doc = hit.get("document", hit) if isinstance(hit, dict) else {}
                if isinstance(doc, dict) and isinstance(doc.get("contents"), str):
                    passages.append(doc["contents"])
            out.append(passages)
        return out


class HTTPStatusError(OSError):
    """A reply whose status is not 2xx."""

    def __init__(self, status):
        super().__init__(f"HTTP {status}")
        self.status = status


def post(url, body, deadline):
    """POST a JSON body and return the reply's body, all of it done by `deadline` (time.monotonic()) or
    TimeoutError: every socket operation waits only for the time left, so no way of answering slowly can stretch
    the call. One connection per call (Connection: close)."""
    import socket
    parts = urllib.parse.urlsplit(url)
    host, https = parts.hostname, parts.scheme == "https"

    def left():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("deadline passed")
        return remaining
    with socket.create_connection((host, parts.port or (443 if https else 80)), timeout=left()) as sock:
        if https:
            import ssl
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=host)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        head = (f"POST {target} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
        sock.settimeout(left())
        sock.sendall(head.encode() + body)
        reply = http.client.HTTPResponse(_DeadlineReader(sock, left))
        reply.begin()  # the status line and headers, then the body: Content-Length, chunked or up to the close
        data = reply.read()
    if not 200 <= reply.status < 300:
        raise HTTPStatusError(reply.status)
    return data


class _DeadlineReader(io.RawIOBase):
    """A socket's reads for http.client, each one waiting only for the time left (`left()`)."""

    def __init__(self, sock, left):
        self.sock, self.left = sock, left

    def readable(self):
        return True

    def readinto(self, buffer):
        self.sock.settimeout(self.left())
        return self.sock.recv_into(buffer)

    def makefile(self, mode):
        return io.BufferedReader(self)


def failure_cause(error):
    """The short cause of a failed HTTP search, as a person would say it."""
    if isinstance(error, HTTPStatusError):
        return f"HTTP {error.status}"
    if isinstance(error, TimeoutError):  # socket.timeout is TimeoutError
        return "timeout"
    if isinstance(error, ConnectionRefusedError):
        return "connection refused"
    if isinstance(error, (OSError, http.client.HTTPException)):
        return "connection failed"
    if isinstance(error, ValueError):  # json's JSONDecodeError and a UnicodeDecodeError are ValueErrors
        return "bad JSON" if "malformed reply" not in str(error) else "malformed reply"
    return type(error).__name__


# -----------------------------------------------------------------------------
# The server

class DenseSearch:
    """e5-style dense retrieval: mean-pooled unit embeddings, exact inner-product search with faiss."""

    def __init__(self, corpus_path, model_name="intfloat/e5-base-v2", batch_size=64, device="cpu", index_path=None):
        import faiss
        import torch
        from transformers import AutoModel, AutoTokenizer
        self.torch, self.device, self.batch_size = torch, device, batch_size
        self.docs = read_corpus(corpus_path)
        path = index_path or f"{corpus_path}.{os.path.basename(model_name.rstrip('/'))}.faiss"
        built = index_path or (os.path.exists(path) and os.path.getmtime(path) > os.path.getmtime(corpus_path))
        if built:
            self.index = faiss.read_index(path)
            if self.index.ntotal != len(self.docs):  # vector i is row i: another corpus's index answers garbage
                raise ConfigError(f"serve: index {path} holds {self.index.ntotal} vectors, corpus {corpus_path} "
                                  f"{len(self.docs)} rows: they must come from the same corpus")
        self.tokenizer = AutoTokenizer.from_pretrained(model_name)
        dtype = torch.float16 if str(device).startswith("cuda") else torch.float32
        self.model = AutoModel.from_pretrained(model_name, dtype=dtype).to(device).eval()
        if not built:
            vectors = self.encode(["passage: " + d["contents"] for d in self.docs])
            self.index = faiss.IndexFlatIP(vectors.shape[1])
            self.index.add(vectors)
            faiss.write_index(self.index, path + ".tmp")
            os.replace(path + ".tmp", path)
        self.faiss_gpus = faiss.get_num_gpus() if str(device).startswith("cuda") else 0  # faiss-cpu: 0
        if self.faiss_gpus:
            options = faiss.GpuMultipleClonerOptions()
            options.useFloat16, options.shard = True, True  # wiki-18's 21M x 768 fp32 vectors are 64 GB
            self.index = faiss.index_cpu_to_all_gpus(self.index, co=options)

    def encode(self, texts):
        """(n, d) float32 numpy of unit vectors: the mean of the last hidden states over real tokens."""
        out = []
        with self.torch.no_grad():
            for i in range(0, len(texts), self.batch_size):
                batch = self.tokenizer(texts[i:i + self.batch_size], padding=True, truncation=True, max_length=256,
                                       return_tensors="pt").to(self.device)
                hidden = self.model(**batch).last_hidden_state.float()  # (B, T, d)
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
                pooled = (hidden * mask).sum(1) / mask.sum(1)
                out.append(self.torch.nn.functional.normalize(pooled, dim=-1).cpu())
        return self.torch.cat(out).numpy()

    def search(self, queries, k):
        scores, idx = self.index.search(self.encode(["query: " + q for q in queries]), k)
        return idx.tolist(), scores.tolist()


class Batcher:
    """search(queries, k) for many threads through one: the requests that wait while a search runs are searched
    together in the next call (at most max_batch queries, a request never split), each reply its own rows."""

    def __init__(self, search, max_batch=512):
        import queue
        import threading
        self.search, self.max_batch, self.jobs = search, max_batch, queue.Queue()
        threading.Thread(target=self.run, daemon=True).start()

    def __call__(self, queries, k):
        import threading
        job = {"queries": queries, "k": k, "done": threading.Event()}
        self.jobs.put(job)
        job["done"].wait()
        if "error" in job:
            raise job["error"]
        return job["idx"], job["scores"]

    def run(self):
        import queue
        while True:
            jobs = [self.jobs.get()]
            while sum(len(j["queries"]) for j in jobs) < self.max_batch:
                try:
                    jobs.append(self.jobs.get_nowait())
                except queue.Empty:
                    break
            for k in {j["k"] for j in jobs}:  # one call per topk, so each query gets exactly its own top k
                same = [j for j in jobs if j["k"] == k]
                try:
                    idx, scores = self.search([q for j in same for q in j["queries"]], k)
                except Exception as e:  # every request of this call answers with it (a 500); the thread lives on
                    for j in same:
                        j["error"] = e
                    idx = scores = []
                start = 0
                for j in same:
                    n = len(j["queries"])
                    j["idx"], j["scores"] = idx[start:start + n], scores[start:start + n]
                    start += n
                    j["done"].set()


def check_request(body, max_queries, max_topk):
    """(queries, topk, return_scores) of a decoded /retrieve body, or ValueError with what is wrong."""
    if not isinstance(body, dict):
        raise ValueError("body must be a JSON object")
    queries, topk = body.get("queries"), body.get("topk", 3)
    if not isinstance(queries, list) or not all(isinstance(q, str) for q in queries):
        raise ValueError("'queries' must be a list of strings")
    if len(queries) > max_queries:
        raise ValueError(f"at most {max_queries} queries per request, got {len(queries)}")
    if not isinstance(topk, int) or isinstance(topk, bool) or not 1 <= topk <= max_topk:
        raise ValueError(f"'topk' must be an integer from 1 to {max_topk}")
    return queries, topk, bool(body.get("return_scores", False))


def make_handler(retriever, docs, name, max_bytes=1 << 20, max_queries=1024, max_topk=100):
    """The request handler class, bound to one retriever: search(queries, k) -> (indices, scores), called from
    several worker threads at once (a Batcher makes any retriever safe for that).
    It answers one request that PoolServer has read in full: from memory, into memory."""
    from http.server import BaseHTTPRequestHandler

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: a client's requests reuse one connection

        def setup(self):
            self.connection, data = self.request
            self.rfile, self.wfile = io.BytesIO(data), io.BytesIO()

        def handle(self):  # one request: the next one on this connection is the front's to read
            self.handle_one_request()

        def finish(self):  # the worker sends wfile's bytes
            pass

        def reply(self, code, obj):
            data = json.dumps(obj, ensure_ascii=False).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path != "/health":
                return self.reply(404, {"error": "GET /health or POST /retrieve"})
            self.reply(200, {"docs": len(docs), "retriever": name, **self.server.counts})

        def do_POST(self):
            if self.path != "/retrieve":
                return self.reply(404, {"error": "POST /retrieve"})
            try:
                size = int(self.headers.get("Content-Length", ""))
            except ValueError:
                size = None
            if size is None or size < 0:
                self.close_connection = True  # where the body ends is unknown: this connection cannot be reused
                return self.reply(411 if "Content-Length" not in self.headers else 400,
                                  {"error": f"a Content-Length from 0 to {max_bytes} is required"})
            if size > max_bytes:
                self.close_connection = True  # the body is not read: this connection cannot be reused
                return self.reply(413, {"error": f"request body over {max_bytes} bytes"})
            try:
                queries, topk, with_scores = check_request(json.loads(self.rfile.read(size)), max_queries, max_topk)
            except ValueError as e:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
                return self.reply(400, {"error": str(e)})
            k = min(topk, len(docs))
            try:
                idx, scores = retriever(queries, k) if queries and k else ([[]] * len(queries),) * 2
            except Exception as e:  # a retrieval failure answers this request, the server lives on
                return self.reply(500, {"error": f"{type(e).__name__}: {e}"})
            result = []
            for n, row in enumerate(idx):
                hits = [docs[i] for i in row]
                result.append([{"document": d, "score": float(s)} for d, s in zip(hits, scores[n])]
                              if with_scores else hits)
            self.reply(200, {"result": result})

        def log_message(self, *args):  # one line per request would drown the console under load
            pass

    return Handler


def request_size(data, max_bytes, max_head=1 << 16):
    """Bytes of the first whole request in `data` (headers and body), or None while it is incomplete. A request
    whose headers outgrow max_head, or whose Content-Length is not one from 0 to max_bytes, is whole at the end of
    its headers: the handler refuses it without its body."""
    blank = re.search(rb"\r?\n\r?\n", data)  # the blank line after the headers (http.server takes bare LFs too)
    if not blank:
        return len(data) if len(data) > max_head else None
    found = re.search(rb"\ncontent-length:[ \t]*([0-9]+)[ \t]*\r?\n", data[:blank.end()], re.IGNORECASE)
    size = int(found.group(1)) if found and int(found.group(1)) <= max_bytes else 0
    return blank.end() + size if len(data) >= blank.end() + size else None


class PoolServer:
    """A listening socket, one front thread (serve_forever) and `workers` threads.

    The front owns every connection that is not being answered: a selector reads what each client sends until its
    request is whole (request_size), then a worker takes it; so a client that trickles, stalls or idles holds no
    worker, however many there are. One deadline per request: timeout_s after the connection opened or its previous
    reply was sent, an incomplete request is closed. A worker runs the handler, sends the reply (bounded by
    timeout_s as a whole: sendall's timeout) and gives a keep-alive connection back to the front."""

    def __init__(self, address, handler, workers=32, timeout_s=30.0, max_bytes=1 << 20):
        import queue
        import socket
        import threading
        self.socket = socket.create_server(address, backlog=1024)  # a burst waits in the backlog, never reset
        self.socket.setblocking(False)
        self.server_address = self.socket.getsockname()
        self.handler, self.timeout_s, self.max_bytes = handler, timeout_s, max_bytes
        self.whole, self.returned = queue.Queue(), queue.Queue()  # requests for the workers; connections back
        self.wake, self.waker = socket.socketpair()  # a worker's byte wakes the front to take a connection back
        self.counts, self.count_lock = {"cut": 0, "dropped": 0}, threading.Lock()
        for _ in range(workers):  # daemon threads: serve_forever's end ends the server
            threading.Thread(target=self.work, daemon=True).start()

    def serve_forever(self):
        import selectors
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.socket, selectors.EVENT_READ)
        self.selector.register(self.wake, selectors.EVENT_READ)
        self.open = {}  # connection -> [address, bytes received, deadline]
        while True:
            first = min((c[2] for c in self.open.values()), default=time.monotonic() + 1)
            for key, _ in self.selector.select(max(0.0, first - time.monotonic())):
                if key.fileobj is self.socket:
                    self.accept()
                elif key.fileobj is self.wake:
                    self.wake.recv(4096)
                    while not self.returned.empty():
                        self.watch(*self.returned.get())
                else:
                    self.receive(key.fileobj)
            now = time.monotonic()
            for sock in [s for s, c in self.open.items() if c[2] <= now]:
                self.count("cut", bool(self.open[sock][1]))  # an idle keep-alive connection is closed, not cut
                self.selector.unregister(sock)
                del self.open[sock]
                self.close(sock)

    def accept(self):
        while True:
            try:
                sock, address = self.socket.accept()
            except BlockingIOError:
                return
            except OSError:  # out of file descriptors: the rest wait in the backlog until some close
                time.sleep(0.05)
                return
            self.watch(sock, address, b"")

    def watch(self, sock, address, data):
        """Read this connection's next request (data: what it sent already), due timeout_s from now."""
        import selectors
        sock.setblocking(False)
        self.open[sock] = [address, data, time.monotonic() + self.timeout_s]
        self.selector.register(sock, selectors.EVENT_READ)
        self.hand_over(sock)

    def receive(self, sock):
        try:
            data = sock.recv(1 << 16)
        except OSError:  # reset by the client
            data = b""
        if not data:  # the client hung up
            self.selector.unregister(sock)
            del self.open[sock]
            return self.close(sock)
        self.open[sock][1] += data
        self.hand_over(sock)

    def hand_over(self, sock):
        address, data, _ = self.open[sock]
        size = request_size(data, self.max_bytes)
        if size is not None:
            self.selector.unregister(sock)
            del self.open[sock]
            self.whole.put((sock, address, data))

    def work(self):
        while True:
            sock, address, data = self.whole.get()
            try:
                handler = self.handler((sock, data), address, self)
                sock.settimeout(self.timeout_s)  # the whole reply: a client that does not read it is cut off
                sock.sendall(handler.wfile.getvalue())
            except OSError:  # the client left (reset, broken pipe) or would not take its reply in time
                self.count("dropped")
                self.close(sock)
                continue
            except Exception:  # a bug in the handler: its traceback, and the worker lives on
                import traceback
                traceback.print_exc()
                self.close(sock)
                continue
            if handler.close_connection:
                self.close(sock)
            else:  # keep-alive: the front reads the next request, with what the client sent past this one
                self.returned.put((sock, address, handler.rfile.read()))
                self.waker.send(b"\0")

    def count(self, what, n=1):
        with self.count_lock:
            self.counts[what] += n

    @staticmethod
    def close(sock):
        import socket
        try:
            sock.shutdown(socket.SHUT_WR)  # the reply goes out before the close, even with unread input
        except OSError:
            pass
        sock.close()

    def server_close(self):
        self.socket.close()


def serve(argv=None):
    """Listen, build or load the index, then serve until interrupted; prints the URL and the index size."""
    import argparse
    ap = argparse.ArgumentParser(prog="python server.py", description="Search-R1-style retrieval server")
    ap.add_argument("--corpus", required=True, help="corpus JSONL with {'id', 'contents'} rows")
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    ap.add_argument("--port", type=int, default=8000, help="0 = any free port (the URL printed says which)")
    ap.add_argument("--retriever", default="bm25", choices=["bm25", "e5"],
                    help="bm25 (index cached beside the corpus) or e5 (dense: an encoder and faiss)")
    ap.add_argument("--model", default="intfloat/e5-base-v2", help="encoder for --retriever e5")
    ap.add_argument("--index", default=None, help="a prebuilt faiss index of the corpus for --retriever e5 "
                    "(Search-R1's e5_Flat.index for wiki-18.jsonl); default: encode the corpus once, cache it")
    ap.add_argument("--device", default="cpu", help="encoder device for --retriever e5 (cuda: faiss-gpu too)")
    ap.add_argument("--max_bytes", type=int, default=1 << 20, help="largest request body (bigger: 413)")
    ap.add_argument("--workers", type=int, default=32, help="threads answering whole requests")
    ap.add_argument("--max_batch", type=int, default=None, help="most queries searched in one retriever call, "
                    "for the requests that wait (0: each worker calls the retriever; default: 0 for bm25, 512 for e5)")
    ap.add_argument("--timeout_s", type=float, default=30.0,
                    help="a request not whole this long after its connection opened (or its previous reply) "
                         "is closed; also the bound on sending a reply")
    args = ap.parse_args(argv)
    if min(args.workers, args.max_bytes) < 1 or (args.max_batch or 0) < 0 or args.timeout_s <= 0:
        raise ConfigError("serve: --workers and --max_bytes must be >= 1, --max_batch >= 0, --timeout_s > 0")
    if not os.path.exists(args.corpus):
        raise ConfigError(f"serve: no corpus file {args.corpus!r}")
    if args.index and not os.path.isfile(args.index):
        raise ConfigError(f"serve: no index file {args.index!r}")
    max_batch = args.max_batch if args.max_batch is not None else 512 if args.retriever == "e5" else 0
    if args.retriever == "e5" and args.device.startswith("cuda") and max_batch == 0:
        raise ConfigError("serve: --retriever e5 on cuda needs --max_batch >= 1 (one thread calls the GPU)")
    t0 = time.time()
    server = listen(args)  # before the index loads: a busy port fails at once, not after minutes of loading
    if args.retriever == "bm25":
        tool = BM25Search(args.corpus, mmap=True)
        size, where = _dir_bytes(args.corpus + ".bm25"), ""
    else:
        try:
            tool = DenseSearch(args.corpus, args.model, device=args.device, index_path=args.index)
        except ImportError as e:
            raise ConfigError(f"serve: --retriever e5 needs faiss and transformers ({e}); pip install faiss-cpu")
        size = tool.index.ntotal * tool.index.d * 4
        where = f", faiss on {tool.faiss_gpus} GPU(s)" if tool.faiss_gpus else ", faiss on the CPU"
    retriever = Batcher(tool.search, max_batch) if max_batch else tool.search
    server.handler = make_handler(retriever, tool.docs, args.retriever, args.max_bytes)
    host, port = server.server_address[:2]
    print(f"serve: {args.retriever} over {len(tool.docs)} docs, index {size / 2**20:.1f} MiB{where}, "
          f"ready in {time.time() - t0:.1f}s", flush=True)
    print(f"serve: http://{host}:{port}/retrieve", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def listen(args):
    """The PoolServer on --host:--port, or a one-line RunError in the OS's words (a port in use: errno 98)."""
    try:
        return PoolServer((args.host, args.port), None, args.workers, args.timeout_s, args.max_bytes)
    except OSError as e:
        import errno
        hint = " (another server? pick another --port, or 0 for any free one)" if e.errno == errno.EADDRINUSE else ""
        cause = os.strerror(e.errno) if (e.errno or 0) > 0 else "the host name does not resolve"  # < 0: getaddrinfo
        raise RunError(f"serve: cannot listen on {args.host}:{args.port}: {cause}{hint}")


def _dir_bytes(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


if __name__ == "__main__":
    cli(serve)

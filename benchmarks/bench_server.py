"""Many users at once: the nanodb server against the server a user would write, under concurrent clients.

    python benchmarks/bench_server.py                        # 1M x 512, 1/8/32/128 clients, 10 s each
    python benchmarks/bench_server.py --rows 100000 --seconds 4   # a quick run
    python benchmarks/bench_server.py --reuse DIR --mixed --servers nanodb --parts api --clients 1,32
                                    # each query its own k and filters (nanodb only: faiss has no filters)

The database holds `--rows` random unit vectors (added through the Python API) of a ViT-B-32 with random
weights, labelled /photos/YEAR/N.jpg or .png (8 years, one item in 5 a PNG) for the filters. Both servers run in their own process on 127.0.0.1 and answer text queries (k=10), timed from an
asyncio client (httpx) keeping N requests in flight, one server at a time:

* nanodb: `start_server` (the HTTP API): queries arriving together share one text-tower pass and one
  search pass (nanodb/search/batcher.py);
* the reference: FastAPI + faiss IndexFlatIP (float32 copies of the same vectors) + open_clip's text
  tower, one query per request (as clip-retrieval's back end works).

Then vector queries through the Python API from N threads: NanoDB.search against faiss `index.search`
with one query a call. Reports queries/s, p50 and p99 latency for each. With `--mixed`, query i asks for
its own k and filters (`mixed`): one pass answers them all (VectorIndex.search_each).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

MODEL = "ViT-B-32"
K = 10
HEADER = "| server | clients | queries/s | p50 ms | p99 ms |\n|---|---:|---:|---:|---:|"
TIMEOUT_S = 120  # an HTTP request unanswered this long is given up
YEARS = 8  # the folders /photos/2016 .. /photos/2023
MIXED_K = (1, 5, 10, 20, 50, 100)
MIXED_FILTERS = ({}, {"folder": "/photos/2019"}, {"types": ["png"]}, {"folder": "photos"}, {"folder": "2021"})
WORDS = ("dog", "beach", "red car", "snow", "city at night", "a cat on a sofa", "mountains", "birthday cake",
         "old bridge", "children playing", "sunset", "a bowl of fruit", "train station", "forest path")

NANODB_SERVER = """
import sys, time
from nanodb import NanoDB
from nanodb.interfaces.server import start_server
db = NanoDB(sys.argv[1], read_only=True)
db.search(text="warm up", k=1)
start_server(db, "127.0.0.1", int(sys.argv[2]))
print("ready", flush=True)
time.sleep(1e9)
"""

# The server a user would write: one query per request, faiss for the search, open_clip for the text.
REFERENCE_SERVER = """
import sys
import faiss, numpy as np, open_clip, torch, uvicorn
from fastapi import FastAPI
model, _, _ = open_clip.create_model_and_transforms("{model}", pretrained=None)
model.eval()
tokenizer = open_clip.get_tokenizer("{model}")
index = faiss.IndexFlatIP(512)
index.add(np.load(sys.argv[1], mmap_mode="r").astype(np.float32))
app = FastAPI()

@app.get("/search")
def search(q: str, k: int = 10):
    with torch.no_grad():
        v = model.encode_text(tokenizer([q]))
    v = torch.nn.functional.normalize(v, dim=-1).numpy().astype(np.float32)
    scores, ids = index.search(v, k)
    return {{"results": [{{"index": int(i), "similarity": float(s)}} for i, s in zip(ids[0], scores[0])]}}

search("warm up")
print("ready", flush=True)
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(code: str, *args: str) -> tuple[subprocess.Popen, str]:
    """A server process started from `code`, once it prints "ready"; (process, base url)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", code, *args, str(port)], stdout=subprocess.PIPE, text=True)
    if proc.stdout.readline().strip() != "ready":
        raise SystemExit("a server did not start")
    return proc, f"http://127.0.0.1:{port}"


def summary(spans: list[tuple[float, float]], start: float, stop: float) -> tuple[float, float, float]:
    """(queries/s, p50 ms, p99 ms) of the queries (sent, answered) answered from `start` on; none is sent
    after `stop`, and those in flight then are waited for (counted over the time until the last answer)."""
    answered = [(t0, t1) for t0, t1 in spans if t1 >= start]
    if not answered:
        return 0.0, float("nan"), float("nan")
    ms = np.array([t1 - t0 for t0, t1 in answered]) * 1000
    qps = len(answered) / (max(stop, max(t1 for _, t1 in answered)) - start)
    return qps, float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def mixed(i: int) -> tuple[int, dict]:
    """Query i's k and filters with --mixed: six k from 1 to 100, five filters (none, a folder, a type,
    broad and selective folder names), in turn, so queries arriving together differ."""
    return MIXED_K[i % len(MIXED_K)], MIXED_FILTERS[i % len(MIXED_FILTERS)]


async def http_load(url: str, clients: int, seconds: float, warmup: float = 1.0,
                    vary: bool = False) -> tuple[float, float, float]:
    """`clients` requests always in flight for warmup + seconds; the latencies of those sent after warmup.
    `vary`: each request its own k and filters (`mixed`)."""
    import httpx

    spans: list[tuple[float, float]] = []
    start = time.perf_counter()
    measure_from, stop = start + warmup, start + warmup + seconds

    async def client(n: int, http: httpx.AsyncClient) -> None:
        i = n
        while (t0 := time.perf_counter()) < stop:
            try:
                k, filters = mixed(i) if vary else (K, {})
                params = {"q": f"{WORDS[i % len(WORDS)]} {i}", "k": k, "folder": filters.get("folder"),
                          "type": filters.get("types")}
                r = await http.get(url, params={n: v for n, v in params.items() if v is not None})
                r.raise_for_status()
            except httpx.TimeoutException:  # counted with its time so far: the p99 shows it
                print(f"  a request timed out after {TIMEOUT_S} s", flush=True)
            spans.append((t0, time.perf_counter()))
            i += clients

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(limits=limits, timeout=TIMEOUT_S) as http:
        await asyncio.gather(*(client(n, http) for n in range(clients)))
    return summary(spans, measure_from, stop)


def thread_load(search, clients: int, seconds: float, dim: int) -> tuple[float, float, float]:
    """`clients` threads each calling search(query vector, i) for `seconds` (i: the query's number)."""
    rng = np.random.default_rng(1)
    queries = rng.standard_normal((256, dim)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    spans: list[tuple[float, float]] = []
    start = time.perf_counter()
    stop = start + seconds

    def client(n: int) -> None:
        i = n
        while (t0 := time.perf_counter()) < stop:
            search(queries[i % len(queries)], i)
            spans.append((t0, time.perf_counter()))
            i += clients

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return summary(spans, start, stop)


def build(work: Path, rows: int) -> tuple[Path, Path]:
    """The nanodb database and the same vectors as a .npy file for the reference."""
    from nanodb import NanoDB

    db_path, npy = work / "db", work / "vectors.npy"
    rng = np.random.default_rng(0)
    vectors = np.lib.format.open_memmap(npy, "w+", np.float32, (rows, 512))
    with NanoDB(db_path, MODEL, "none") as db:
        for lo in range(0, rows, 100_000):
            chunk = rng.standard_normal((min(100_000, rows - lo), 512)).astype(np.float32)
            chunk /= np.linalg.norm(chunk, axis=1, keepdims=True)
            vectors[lo : lo + len(chunk)] = chunk
            db.add(chunk, paths=[f"/photos/{2016 + i % YEARS}/{i}.{'png' if i % 5 == 0 else 'jpg'}"
                                 for i in range(lo, lo + len(chunk))])
        db.save()
    vectors.flush()
    return db_path, npy


def row(name: str, clients: int, result: tuple[float, float, float]) -> str:
    qps, p50, p99 = result
    return f"| {name} | {clients} | {qps:,.0f} | {p50:,.1f} | {p99:,.1f} |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--seconds", type=float, default=10.0, help="timed seconds per server and client count")
    ap.add_argument("--clients", default="1,8,32,128")
    ap.add_argument("--parts", default="http,api", help="http (text queries to the servers), api (vector queries)")
    ap.add_argument("--reuse", metavar="DIR", help="the folder of an earlier run: its database and vectors, not rebuilt")
    ap.add_argument("--mixed", action="store_true", help="each query its own k and filters (see `mixed`)")
    ap.add_argument("--servers", default="nanodb,reference",
                    help="nanodb, reference (the FastAPI + faiss server; faiss in the api part)")
    args = ap.parse_args()
    levels = [int(c) for c in args.clients.split(",")]
    if args.reuse:
        db_path, npy = Path(args.reuse) / "db", Path(args.reuse) / "vectors.npy"
    else:
        work = Path(tempfile.mkdtemp(prefix="bench-server-"))
        t0 = time.perf_counter()
        db_path, npy = build(work, args.rows)
        print(f"built {args.rows:,} rows in {work} in {time.perf_counter() - t0:.0f} s", flush=True)
    print(f"load average {os.getloadavg()}", flush=True)
    servers = args.servers.split(",")
    if "http" in args.parts:
        http_part(db_path, npy, levels, args.seconds, servers, args.mixed)
    if "api" in args.parts:
        api_part(db_path, npy, levels, args.seconds, servers, args.mixed)
    print(f"\nload average at the end {os.getloadavg()}")


def http_part(db_path: Path, npy: Path, levels: list[int], seconds: float, which: list[str], vary: bool) -> None:
    rows = len(np.load(npy, mmap_mode="r"))
    asked = "k and filters mixed" if vary else f"k={K}"
    print(f"\nText queries over HTTP, {asked}, {rows:,} x 512\n{HEADER}", flush=True)
    servers = [("nanodb (batched)", NANODB_SERVER, (str(db_path),), "/api/search/text")] * ("nanodb" in which)
    servers += [("FastAPI + faiss IndexFlatIP + open_clip", REFERENCE_SERVER.format(model=MODEL), (str(npy),),
                 "/search")] * ("reference" in which)
    running = []
    try:
        for name, code, server_args, route in servers:
            proc, url = serve(code, *server_args)
            running.append((name, proc, url + route))
        for clients in levels:
            for name, _, url in running:  # one server loaded at a time, the other idle
                print(row(name, clients, asyncio.run(http_load(url, clients, seconds, vary=vary))), flush=True)
    finally:
        for _, proc, _ in running:
            proc.terminate()
            proc.wait()


def api_part(db_path: Path, npy: Path, levels: list[int], seconds: float, which: list[str], vary: bool) -> None:
    asked = "k and filters mixed" if vary else f"k={K}"
    print(f"\nVector queries through the Python API from N threads, {asked}\n{HEADER}", flush=True)
    from nanodb import NanoDB

    def search(db, q, i):
        k, filters = mixed(i) if vary else (K, {})
        return db.search(q, k, **filters)

    if "nanodb" in which:
        with NanoDB(db_path, read_only=True) as db:
            search(db, np.ones(512, np.float32), 1)  # the filter columns, derived once
            for clients in levels:
                print(row("NanoDB.search", clients, thread_load(lambda q, i: search(db, q, i), clients, seconds, 512)),
                      flush=True)
    if "reference" not in which:
        return
    import faiss

    index = faiss.IndexFlatIP(512)
    index.add(np.load(npy, mmap_mode="r"))
    for clients in levels:
        print(row("faiss IndexFlatIP.search", clients,
                  thread_load(lambda q, i: index.search(q[None], K), clients, seconds, 512)), flush=True)


if __name__ == "__main__":
    main()

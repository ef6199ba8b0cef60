"""Exact k-NN search speed: nanodb against faiss, usearch, torch and NumPy, side by side in one run.

    python benchmarks/bench_search.py                  # CPU: N in 100K, 1M; dim 512 and 768
    python benchmarks/bench_search.py --sizes 1000000 --dims 512
    python benchmarks/bench_search.py --sizes 10000000 --dims 512 --no-peers
    python benchmarks/bench_search.py --gpu            # nanodb's CuPy path against torch (and faiss-gpu)

Vectors are random unit vectors stored as float16. Every method's results are checked against a
float64 brute-force top k (recall@k). Prints one markdown table: single-query latency (median, p99),
batch-of-64 throughput, and the effective GB/s read against a large array copy measured in the same
run; then, for nanodb, each pass of a single query: bytes read, GB/s and % of the copy bandwidth.
Peers (the `bench` extra): faiss IndexFlatIP (float32) and IndexScalarQuantizer QT_fp16, usearch
exact search on float16, torch bfloat16 mv/mm + topk, NumPy float32 matmul.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanodb.storage.index import VectorIndex, fast_pass  # noqa: E402

GB = 1e9


def random_index(n: int, dim: int, backend: str, seed: int = 0) -> VectorIndex:
    """An index of n random unit vectors, generated in chunks so no float32 copy of all N exists, and
    appended at once, so the index allocates its rows once."""
    rng = np.random.default_rng(seed)
    rows = np.empty((n, dim), np.float16)
    for lo in range(0, n, 100_000):
        x = rng.standard_normal((min(n, lo + 100_000) - lo, dim), dtype=np.float32)
        rows[lo : lo + len(x)] = x / np.linalg.norm(x, axis=1, keepdims=True)
    index = VectorIndex(dim, backend)
    index.append(rows)
    return index


def unit_queries(n: int, dim: int, seed: int) -> np.ndarray:
    q = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def reference_top_k(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Float64 brute force, in chunks, ties to the lower index."""
    q64 = queries.astype(np.float64)
    scores = np.concatenate([vectors[lo : lo + 65536].astype(np.float64) @ q64.T for lo in range(0, len(vectors), 65536)])
    return np.array([np.lexsort((np.arange(len(s)), -s))[:k] for s in scores.T])


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)]))


def timed(fn, reps: int) -> np.ndarray:
    fn(0)  # warm up: thread pools, scratch buffers, page faults
    out = []
    for r in range(reps):
        t = time.perf_counter()
        fn(r)
        out.append(time.perf_counter() - t)
    return np.array(out)


# Untimed rest after each call: OpenBLAS (NumPy) keeps its worker threads spinning for up to 2**28
# cycles (~0.1 s) after a product, and OpenMP runtimes (faiss, torch) spin too; without the rest,
# whichever method runs next shares the cores with those spinning threads (measured: nanodb's single
# query took 57 ms right after NumPy's matmul, 28 ms after a rest).
REST_S = 0.25


def interleaved(fns, reps: int, rest: float = REST_S) -> list[np.ndarray]:
    """Seconds of fns[i](r) for r in range(reps), the functions taking turns (after one warm-up each),
    each call starting on idle cores (`rest` seconds after the previous one)."""
    for fn in fns:
        fn(0)
    out = [[] for _ in fns]
    for r in range(reps):
        for fn, times in zip(fns, out):
            time.sleep(rest)
            t = time.perf_counter()
            fn(r)
            times.append(time.perf_counter() - t)
    return [np.array(t) for t in out]


def copy_bandwidth(gpu: bool) -> float:
    """GB/s of a 1 GiB array copy, counting bytes read plus bytes written."""
    if gpu:
        import cupy as cp

        src = cp.ones(1 << 28, cp.float32)
        dst = cp.empty_like(src)
        cp.copyto(dst, src)
        start, end = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        for _ in range(10):
            cp.copyto(dst, src)
        end.record()
        end.synchronize()
        return 10 * 2 * src.nbytes / (cp.cuda.get_elapsed_time(start, end) / 1e3) / GB
    src = np.ones(1 << 28, np.float32)
    dst = np.empty_like(src)
    t = timed(lambda _: np.copyto(dst, src), 5)
    return 2 * src.nbytes / np.median(t) / GB


class Method:
    """One search implementation: name, bytes it reads per query, and search(queries, k) -> indices."""

    def __init__(self, name: str, bytes_per_query: int, search):
        self.name, self.bytes_per_query, self.search = name, bytes_per_query, search


def cpu_methods(index: VectorIndex, peers: bool) -> list[Method]:
    n, dim = index.count, index.dim
    methods = [Method(f"nanodb ({fast_pass(dim)} + exact)", n * (dim + 4), lambda q, k: index.search(q, k)[0])]
    if not peers:
        return methods
    need = n * dim * (4 + 2 + 2 + 2)  # faiss float32 (shared with NumPy), faiss fp16, usearch fp16, torch bf16
    if need > psutil.virtual_memory().available * 0.8:
        print(f"# skipping the peers at N={n}, dim={dim}: {need / GB:.1f} GB does not fit", file=sys.stderr)
        return methods
    import faiss
    import torch
    from usearch.index import MetricKind
    from usearch.index import search as usearch_search

    flat = faiss.IndexFlatIP(dim)
    sq = faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
    for lo in range(0, n, 100_000):
        rows = index.vectors[lo : lo + 100_000].astype(np.float32)
        flat.add(rows)
        sq.add(rows)
    rows32 = faiss.rev_swig_ptr(flat.get_xb(), n * dim).reshape(n, dim)  # faiss's own float32 copy
    rows16 = index.vectors
    rows_bf16 = torch.empty((n, dim), dtype=torch.bfloat16)
    for lo in range(0, n, 100_000):
        rows_bf16[lo : lo + 100_000] = torch.from_numpy(index.vectors[lo : lo + 100_000])

    def numpy_search(q, k):
        scores = q @ rows32.T
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
        return np.take_along_axis(part, order, axis=1)

    def torch_search(q, k):
        qb = torch.from_numpy(q).to(torch.bfloat16)
        scores = torch.mv(rows_bf16, qb[0])[None] if len(q) == 1 else (rows_bf16 @ qb.T).T
        return torch.topk(scores, k, dim=1).indices.numpy()

    def usearch_exact(q, k):
        keys = usearch_search(rows16, q.astype(np.float16), k, MetricKind.IP, exact=True).keys
        return np.asarray(keys).reshape(len(q), -1)

    methods += [
        Method("faiss IndexFlatIP float32", n * dim * 4, lambda q, k: flat.search(q, k)[1]),
        Method("faiss IndexScalarQuantizer fp16", n * dim * 2, lambda q, k: sq.search(q, k)[1]),
        Method("usearch exact float16", n * dim * 2, usearch_exact),
        Method("torch bfloat16 mv/mm + topk", n * dim * 2, torch_search),
        Method("numpy float32 matmul", n * dim * 4, numpy_search),
    ]
    return methods


def pass_table(index: VectorIndex, queries: np.ndarray, k: int, bandwidth: float) -> list[str]:
    """nanodb's passes for single queries: median seconds, bytes read, GB/s, % of the copy bandwidth."""
    runs = []
    for q in queries:
        stats: dict = {}
        index.search(q[None], k, stats)
        runs.append(stats)
    fast_s = float(np.median([r["fast_s"] for r in runs]))
    exact_s = float(np.median([r["exact_s"] for r in runs]))
    rescored = float(np.median([r["rescored"] for r in runs]))
    n, dim = index.count, index.dim
    fast_bytes = n * (dim + 4) if runs[0]["fast_pass"].startswith("int8") else n * dim * 2
    exact_bytes = rescored * dim * 2
    return [
        f"| {n:,} | {dim} | fast: {runs[0]['fast_pass']} | {fast_s * 1e3:.2f} | {fast_bytes / 1e6:,.0f} MB | "
        f"{fast_bytes / fast_s / GB:.1f} | {100 * fast_bytes / fast_s / GB / bandwidth:.0f}% |",
        f"| {n:,} | {dim} | exact: float64 of {rescored:,.0f} candidates | {exact_s * 1e3:.2f} | "
        f"{exact_bytes / 1e6:,.2f} MB | {exact_bytes / exact_s / GB:.2f} | - |",
    ]


def gpu_methods(index: VectorIndex) -> list[Method]:
    import cupy as cp
    import torch

    n, dim = index.count, index.dim
    rows = torch.from_numpy(index.vectors).cuda()  # the same float16 rows on the device (a copy beside nanodb's)

    def torch_search(q, k):
        scores = rows @ torch.from_numpy(q).to("cuda", torch.float16).T
        return torch.topk(scores, k, dim=0).indices.T.cpu().numpy()

    methods = [
        Method("nanodb cupy float16", n * dim * 2, lambda q, k: index.search(q, k)[0]),
        Method("torch fp16 matmul+topk", n * dim * 2, torch_search),
    ]
    try:
        import faiss

        resources = faiss.StandardGpuResources()
        flat = faiss.GpuIndexFlatIP(resources, dim)
        for lo in range(0, n, 100_000):
            flat.add(index.vectors[lo : lo + 100_000].astype(np.float32))
        methods.append(Method("faiss GpuIndexFlatIP float32", n * dim * 4, lambda q, k: flat.search(q, k)[1]))
    except (ImportError, AttributeError):
        print("# faiss-gpu not installed: skipping it", file=sys.stderr)
    cp.cuda.Device().synchronize()
    return methods


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--dims", type=int, nargs="+", default=[512, 768])
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--gpu", action="store_true", help="benchmark the CuPy backend on a CUDA GPU")
    ap.add_argument("--no-peers", action="store_true", help="nanodb only")
    ap.add_argument("--rest", type=float, default=REST_S,
                    help="untimed seconds between calls, so no library's spinning threads are still busy")
    args = ap.parse_args(argv)

    bandwidth = copy_bandwidth(args.gpu)
    vm = psutil.virtual_memory()
    print(f"# {platform.processor() or platform.machine()}, {psutil.cpu_count()} CPUs, {vm.total / 2**30:.0f} GiB RAM, "
          f"load average {' '.join(f'{x:.1f}' for x in psutil.getloadavg())}")
    print(f"# {'device' if args.gpu else 'memory'} copy bandwidth (read + write): {bandwidth:.1f} GB/s")
    print()
    print(f"| method | N | dim | recall@{args.k} | 1 query median ms | p99 ms | GB/s read | % of copy | "
          f"batch-{args.batch} queries/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    passes: list[str] = []
    for dim in args.dims:
        for n in args.sizes:
            index = random_index(n, dim, "cupy" if args.gpu else "numpy")
            methods = gpu_methods(index) if args.gpu else cpu_methods(index, not args.no_peers)
            check = unit_queries(8, dim, seed=1)
            truth = reference_top_k(index.vectors, check, args.k)
            single_reps = max(20, min(100, int(2e10 / (n * dim))))
            singles = unit_queries(single_reps + 1, dim, seed=2)
            batch = unit_queries(args.batch, dim, seed=3)
            batch_reps = 5 if n * dim <= 1e8 else 3
            # interleaved: query r runs on every method in turn, so all of them see the same load
            recalls = [recall(m.search(check, args.k), truth) for m in methods]
            lat = interleaved([lambda r, m=m: m.search(singles[r : r + 1], args.k) for m in methods], single_reps,
                              args.rest)
            thr = interleaved([lambda r, m=m: m.search(batch, args.k) for m in methods], batch_reps, args.rest)
            for m, rec, ml, mt in zip(methods, recalls, lat, thr):
                med = float(np.median(ml))
                gbs = m.bytes_per_query / med / GB
                print(f"| {m.name} | {n:,} | {dim} | {rec:.3f} | {med * 1e3:.2f} | {np.percentile(ml, 99) * 1e3:.2f} | "
                      f"{gbs:.1f} | {100 * gbs / bandwidth:.0f}% | {args.batch / np.median(mt):,.0f} |", flush=True)
            if not args.gpu:
                passes += pass_table(index, singles[:single_reps], args.k, bandwidth)
            del methods, index
    if passes:
        print()
        print("nanodb's passes, single query (median): the fast pass reads every row once, the exact pass the candidates")
        print()
        print("| N | dim | pass | ms | bytes read | GB/s | % of copy |")
        print("|---|---|---|---|---|---|---|")
        print("\n".join(passes))
    print()
    print(f"# load average at the end {' '.join(f'{x:.1f}' for x in psutil.getloadavg())}")


if __name__ == "__main__":
    main()

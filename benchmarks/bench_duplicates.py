"""Near-duplicates: the self-join behind `nanodb duplicates` / NanoDB.near_duplicates, time and memory.

    python benchmarks/bench_duplicates.py                                  # N in 100K, 1M; dim 512
    python benchmarks/bench_duplicates.py --sizes 1000000 --budget 300     # at most ~300 s of joining per N

N random unit vectors (float16, in a VectorIndex as a database holds them), 1% of them planted as
near-copies of others (similarity ~0.97-0.99) and 0.1% as exact copies, joined at --threshold 0.95 in
blocks of --block queries (nanodb.search.duplicates.similar_components, the code NanoDB runs). When the
whole join would outlast --budget seconds (estimated from its first 4 blocks), only its first blocks of
queries run and the whole is extrapolated from them (marked ~) in proportion to the (query, row) pairs
scored: the join queries each row against the rows from its block on, so the first blocks score the
most rows each (the budget is approximate: the estimate from 4 blocks can be low). Checked: every planted pair in
the joined rows is found, and for 64 sampled rows a float64 brute force over all N rows finds no
partner at or above the threshold that the join left out of the row's group.

Memory: the process's resident size sampled every 5 ms during the join, less the size before it (the
index itself: 1.5 bytes x dim per row); the peak RSS of the process is printed too.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanodb.search.duplicates import BLOCK_ROWS, similar_components  # noqa: E402
from nanodb.storage.index import VectorIndex, fast_pass  # noqa: E402


def planted_index(n: int, dim: int, seed: int = 0) -> tuple[VectorIndex, np.ndarray]:
    """n random unit rows, generated in chunks (no float32 copy of all N), with 1% near-copies and 0.1%
    exact copies of random earlier rows; returns the index and the planted (copy, original) pairs."""
    rng = np.random.default_rng(seed)
    rows = np.empty((n, dim), np.float16)
    for lo in range(0, n, 100_000):
        x = rng.standard_normal((min(n, lo + 100_000) - lo, dim), dtype=np.float32)
        rows[lo : lo + len(x)] = x / np.linalg.norm(x, axis=1, keepdims=True)
    copies = rng.choice(np.arange(n // 2, n), size=n // 100 + n // 1000, replace=False)
    originals = rng.integers(0, n // 2, size=len(copies))
    noise = rng.uniform(0.1, 0.2, size=(len(copies), 1)) / np.sqrt(dim)  # similarity ~0.98-0.995
    near = rows[originals].astype(np.float32) + noise * rng.standard_normal((len(copies), dim), dtype=np.float32)
    near[n // 100 :] = rows[originals[n // 100 :]]  # exact copies
    rows[copies] = near / np.linalg.norm(near, axis=1, keepdims=True)
    index = VectorIndex(dim, "numpy")
    index.append(rows)
    return index, np.stack([copies, originals], axis=1)


class PeakRss:
    """The largest resident size seen while it runs, sampled in a thread."""

    def __init__(self, every: float = 0.005):
        self.process, self.every, self.peak = psutil.Process(), every, 0
        self.stop = threading.Event()

    def __enter__(self):
        self.start = self.process.memory_info().rss
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()
        return self

    def sample(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.every)

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def run(n: int, dim: int, threshold: float, block: int, budget: float) -> dict:
    t0 = time.perf_counter()
    index, planted = planted_index(n, dim)
    built = time.perf_counter() - t0
    vectors, live = index.vectors, np.arange(n)
    # the cost of the first blocks, to size the run: a whole join or its first blocks within the budget
    probe = 4 * block
    t = time.perf_counter()
    similar_components(vectors, live, threshold, index.search, block, queried=probe)
    per_query = (time.perf_counter() - t) / probe
    work = lambda m: m * n - m * m / 2  # noqa: E731  (query, row) pairs scored by the first m queries
    whole = per_query * work(n) / n
    m = n if whole <= budget else int(min(n, max(probe, budget / per_query)))
    m = -(-m // block) * block if m < n else n
    cpu0, t = time.process_time(), time.perf_counter()
    with PeakRss() as rss:
        groups = similar_components(vectors, live, threshold, index.search, block, queried=m)
    seconds, cpu = time.perf_counter() - t, time.process_time() - cpu0
    estimate = seconds * work(n) / work(m)
    # checks: planted pairs among the rows joined; a sampled float64 brute force
    group_of = np.full(n, -1)
    for g, rows in enumerate(groups):
        group_of[rows] = g
    joined = planted[np.minimum(planted[:, 0], planted[:, 1]) < m]  # found by the query of the earlier row
    missed = int(np.sum((group_of[joined[:, 0]] < 0) | (group_of[joined[:, 0]] != group_of[joined[:, 1]])))
    rng = np.random.default_rng(1)
    sample = np.concatenate([rng.choice(m, 32, replace=False), joined[:32, 1]])
    bad = 0
    for lo in range(0, n, 100_000):
        chunk = vectors[lo : lo + 100_000].astype(np.float64) @ vectors[sample].astype(np.float64).T
        for j, s in zip(*np.nonzero(chunk >= threshold)):
            a, b = int(sample[s]), lo + int(j)
            bad += a != b and (group_of[a] < 0 or group_of[a] != group_of[b])
    return dict(n=n, dim=dim, built=built, rows_joined=m, seconds=seconds, cpu=cpu, estimate=estimate,
                groups=len(groups), items=int(sum(len(g) for g in groups)), planted=len(joined), missed=missed,
                brute_force_misses=bad, extra_mb=(rss.peak - rss.start) / 2**20, rss_mb=rss.start / 2**20,
                maxrss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--threshold", type=float, default=0.95)
    ap.add_argument("--block", type=int, default=BLOCK_ROWS)
    ap.add_argument("--budget", type=float, default=300, help="seconds of joining per size at most (~)")
    args = ap.parse_args()
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()}, "
          f"fast pass: {fast_pass(args.dim)}, block {args.block}, threshold {args.threshold}")
    print("| N | rows joined | join s | CPU s | whole join s | groups (items) | planted missed | brute-force misses "
          "| join memory MB | index RSS MB |")
    print("|---|---:|---:|---:|---:|---|---:|---:|---:|---:|")
    for n in args.sizes:
        r = run(n, args.dim, args.threshold, args.block, args.budget)
        whole = f"{r['seconds']:,.1f}" if r["rows_joined"] == n else f"~{r['estimate']:,.0f}"
        print(f"| {n:,} | {r['rows_joined']:,} | {r['seconds']:,.1f} | {r['cpu']:,.1f} | {whole} | "
              f"{r['groups']:,} ({r['items']:,}) | {r['missed']} of {r['planted']:,} | {r['brute_force_misses']} | "
              f"{r['extra_mb']:,.0f} | {r['rss_mb']:,.0f} |", flush=True)
        print(f"#   built in {r['built']:.1f} s; load {os.getloadavg()}; peak RSS of the process {r['maxrss_mb']:,.0f} MB",
              flush=True)


if __name__ == "__main__":
    main()

"""Opening, searching and saving a database as it grows: open time, search time, resident memory.

    python benchmarks/bench_db.py                          # N in 10K, 100K, 1M; ViT-S-32 (dim 384)
    python benchmarks/bench_db.py --model ViT-B-32 --sizes 1000000 3000000 10000000 --dir /tmp

Databases are built with NanoDB.add() on random unit vectors (random model weights: no download) in
a temporary folder, 1M at a time: add, save, close, reopen (so the builder holds at most 1M unsaved
rows; the rest is mapped). In a fresh child process: open = NanoDB(path, read_only=True) (the page
cache is warm: the files were just written; the vectors and compact copy are mapped, not read), RSS
after opening, the first search by vector and RSS after it (the compact copy is then resident: it is
scanned by every search; the float16 rows only where candidates are rescored), then the median of 5
searches with other random queries, run once the background threads started by opening (timed from
opening) have finished: the checksum check of big files and the copy of the compact copy's codes
into memory (searched through the mapping until then). Autosave = save() after adding 1,000 items, which must not grow
with N.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanodb import NanoDB  # noqa: E402


def random_units(rng, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def grow(path: Path, opts: dict, target: int, rng) -> None:
    """Add random unit vectors until `target`, saving and reopening every 1M (memory stays bounded)."""
    while True:
        with NanoDB(path, **opts) as db:
            if len(db) >= target:
                return
            chunk = min(target, len(db) + 1_000_000)
            while len(db) < chunk:
                db.add(random_units(rng, min(100_000, chunk - len(db)), db.dim))
            db.save()


def open_and_search(path: str) -> dict:
    """Run in a fresh process: open time, resident memory, first and later search times.

    torch (the search kernels) is imported first: a fixed start-up cost of the process, not of opening."""
    import torch  # noqa: F401

    process = psutil.Process()
    before = process.memory_info().rss
    t0 = time.perf_counter()
    db = NanoDB(path, read_only=True)
    t1 = time.perf_counter()
    rss_open = process.memory_info().rss - before
    rng = np.random.default_rng(1)
    db.search(random_units(rng, 1, db.dim)[0], 10)
    t2 = time.perf_counter()
    rss_search = process.memory_info().rss - before
    db.store.checks.wait()  # the big files' checksums, verified in the background from opening on
    checked_s = time.perf_counter() - t1
    while not db.store.index.codes_read:  # the compact copy, read ahead in the background
        time.sleep(0.01)
    codes_read_s = time.perf_counter() - t1
    times = []
    for _ in range(5):
        q = random_units(rng, 1, db.dim)[0]
        t = time.perf_counter()
        db.search(q, 10)
        times.append(time.perf_counter() - t)
    return {"open_s": t1 - t0, "first_search_s": t2 - t1, "search_s": float(np.median(times)),
            "rss_open": rss_open, "rss_search": rss_search, "checked_s": checked_s,
            "codes_read_s": codes_read_s, "n": len(db)}


def measure_open(path: Path) -> dict:
    code = f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import bench_db; " \
           f"print(json.dumps(bench_db.open_and_search({str(path)!r})))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--model", default=None, help="model name (default: configs/test.yaml, ViT-S-32)")
    ap.add_argument("--dir", default=None, help="where to build the databases (default: a temporary folder)")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    opts = {"config": "test"} | ({"model": args.model, "pretrained": "none"} if args.model else {})

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "db"
        with NanoDB(path, **opts) as db:
            print(f"# {db.spec.describe()}, dim {db.dim}")
        print()
        print("| N | open s | RSS after open GB | first search s | search s (median of 5) | RSS after search GB "
              "| checksums verified after s | codes read ahead after s | autosave after 1,000 adds s |")
        print("|---|---|---|---|---|---|---|---|---|")
        for n in sorted(args.sizes):
            grow(path, opts, n, rng)
            opened = measure_open(path)
            with NanoDB(path, **opts) as db:
                db.add(random_units(rng, 1000, db.dim))
                t = time.perf_counter()
                db.save()
                save_s = time.perf_counter() - t
            print(f"| {opened['n']:,} | {opened['open_s']:.3f} | {opened['rss_open'] / 1e9:.2f} | "
                  f"{opened['first_search_s']:.3f} | {opened['search_s']:.3f} | {opened['rss_search'] / 1e9:.2f} | "
                  f"{opened['checked_s']:.1f} | {opened['codes_read_s']:.1f} | {save_s:.3f} |", flush=True)


if __name__ == "__main__":
    main()

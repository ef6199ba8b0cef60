"""Opening and saving a database as it grows: open time, autosave time, resident bytes per vector.

    python benchmarks/bench_db.py                          # N in 10K, 100K, 1M; ViT-S-32 (dim 384)
    python benchmarks/bench_db.py --model ViT-B-32         # dim 512

Databases are built with NanoDB.add() on random unit vectors (random model weights: no download) in
a temporary folder. Open = NanoDB(path, read_only=True) until its first search by vector returns
(the page cache is warm: the files were just written). Autosave = save() after adding 1,000 items,
which must not grow with N. Resident bytes per vector are measured in a fresh child process.
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


def grow(db: NanoDB, target: int, rng) -> None:
    while len(db) < target:
        db.add(random_units(rng, min(100_000, target - len(db)), db.dim))
    db.save()


def open_and_search(path: str) -> dict:
    """Run in a fresh process: open time, first-search time and resident memory of the open database.

    torch (the search kernels) is imported first: a fixed start-up cost of the process, not of opening."""
    import torch  # noqa: F401

    before = psutil.Process().memory_info().rss
    t0 = time.perf_counter()
    db = NanoDB(path, read_only=True)
    t1 = time.perf_counter()
    db.index.search(np.ones((1, db.dim), np.float32) / np.sqrt(db.dim), 10)
    t2 = time.perf_counter()
    rss = psutil.Process().memory_info().rss - before
    return {"open_s": t1 - t0, "first_search_s": t2 - t1, "rss_bytes": rss, "n": len(db)}


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
        db = NanoDB(path, **opts)
        print(f"# {db.spec.describe()}, dim {db.dim}")
        print()
        print("| N | open s | first search s | autosave after 1,000 adds s | resident bytes / vector |")
        print("|---|---|---|---|---|")
        for n in sorted(args.sizes):
            grow(db, n, rng)
            db.close()
            del db  # free its memory before the child process opens the database
            opened = measure_open(path)
            db = NanoDB(path, **opts)
            db.add(random_units(rng, 1000, db.dim))
            t = time.perf_counter()
            db.save()
            save_s = time.perf_counter() - t
            print(f"| {opened['n']:,} | {opened['open_s']:.3f} | {opened['first_search_s']:.3f} | {save_s:.3f} | "
                  f"{opened['rss_bytes'] / opened['n']:,.0f} |", flush=True)
        db.close()


if __name__ == "__main__":
    main()

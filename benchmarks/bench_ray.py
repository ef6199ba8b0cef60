"""nanodb on Ray, on this machine: ingestion with 1, 2 and 4 CLIP actors against the local pipeline;
the coordinator's append rate; sharded search latency and merge overhead against one process; and a
projection for 8 GPU nodes from those figures.

    RAY_USAGE_STATS_ENABLED=0 python benchmarks/bench_ray.py --images 96 --rows 200000

Ray runs as one local instance (`ray.init`, logical CPUs = 2 + actors, so actors and decode tasks
always have a slot); on one machine every actor shares its cores, so the actor rows measure the
overhead of the distributed path more than its scaling. Random weights: no download.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from helpers import DATA as SHARED  # noqa: E402

from nanodb import NanoDB  # noqa: E402
from nanodb.cluster import RayOptions  # noqa: E402
from nanodb.media.record import FileRecord  # noqa: E402
from nanodb.search.sharded import merge_top_k  # noqa: E402

DATA = SHARED / "coco-val2017" / "images"


def link_tree(n: int, root: Path) -> Path:
    root.mkdir(parents=True)
    for f in sorted(DATA.glob("*.jpg"))[:n]:
        os.symlink(f, root / f.name)
    return root


def scan_rate(tree: Path, model: str, batch: int, ray=None) -> tuple[float, float]:
    """(images/s of a first scan with model and workers warm, seconds to start them)."""
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        with NanoDB(Path(tmp) / "db", model, "none", batch_size=batch, ray=ray, follow_symlinks=True) as db:
            if ray is None:  # warm the decode pool and the model, as the Ray path starts its actors
                db.scan(next(tree.iterdir()))
            else:
                stage = db.cluster.embed_stage(db.model_config, db.model.pixel_transform,
                                               db.settings.max_image_pixels, batch)
                stage.start()
            warm = time.perf_counter() - t0
            report = db.scan(tree)
            return report.added / report.seconds, warm


def append_rate(model: str, n: int, batch: int, autosave_every: int) -> float:
    """Items/s the coordinator appends (add_files + an autosave every `autosave_every`), no model run."""
    rng = np.random.default_rng(0)
    files = [FileRecord(path=f"/nas/photos/{i:08d}.jpg", size=100_000 + i, mtime=1.7e9 + i, hash=rng.bytes(16))
             for i in range(n)]
    with tempfile.TemporaryDirectory() as tmp:
        with NanoDB(Path(tmp) / "db", model, "none") as db:
            vectors = rng.standard_normal((n, db.dim)).astype(np.float32)
            start = time.perf_counter()
            for lo in range(0, n, batch):
                db.store.add_files(files[lo:lo + batch], vectors[lo:lo + batch])
                if db.unsaved >= autosave_every:
                    db.save()
            db.save()
            return n / (time.perf_counter() - start)


def search_latency(rows: int, shard_counts: list[int], queries: int, k: int, repeat: int) -> list[tuple]:
    """(shards, ms per single query, ms per batch of `queries`, merge ms of that batch) rows."""
    rng = np.random.default_rng(1)
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "db"
        with NanoDB(path, "ViT-S-32", "none") as db:
            db.add(rng.standard_normal((rows, db.dim)).astype(np.float32))
            db.save()
            dim = db.dim
        q = rng.standard_normal((queries, dim)).astype(np.float32)
        q /= np.linalg.norm(q, axis=1, keepdims=True)

        def timed(db) -> tuple[float, float]:
            db.search(q[0], k=k), db.search(q, k=k)  # warm (and, sharded, build the shards)
            one = min(_ms(lambda: db.search(q[i % queries], k=k)) for i in range(repeat))
            many = min(_ms(lambda: db.search(q, k=k)) for _ in range(max(1, repeat // 10)))
            return one, many

        with NanoDB(path, read_only=True) as db:
            out.append(("1 process", *timed(db), 0.0))
        for shards in shard_counts:
            opts = RayOptions(address="local", shards=shards, object_store_memory=400 * 2**20)
            with NanoDB(path, read_only=True, ray=opts) as db:
                one, many = timed(db)
                fake = [(np.sort(rng.integers(0, rows, (queries, k))), rng.random((queries, k))) for _ in range(shards)]
                merge = min(_ms(lambda: merge_top_k(fake, k)) for _ in range(20))
                out.append((f"{shards} shards", one, many, merge))
    return out


def _ms(fn) -> float:
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1000


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=96)
    p.add_argument("--model", default="ViT-S-32")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--actors", type=int, nargs="*", default=[1, 2, 4])
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--shards", type=int, nargs="*", default=[1, 2, 4])
    p.add_argument("--queries", type=int, default=100)
    p.add_argument("--append", type=int, default=100_000)
    args = p.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    print(f"# {platform.node()}: {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}, ray {ray.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        tree = link_tree(args.images, Path(tmp) / "photos")
        print(f"\n## ingestion, {args.images} COCO photos, {args.model} random weights, batch {args.batch}")
        print("| path | images/s | start (s) |\n|---|---:|---:|")
        rate, warm = scan_rate(tree, args.model, args.batch)
        print(f"| local pipeline | {rate:.1f} | {warm:.1f} |")
        per_actor = {}
        for n in args.actors:
            ray.init(num_cpus=2 + n, include_dashboard=False, object_store_memory=200 * 2**20,
                     logging_level="WARNING")
            try:
                rate, warm = scan_rate(tree, args.model, args.batch, RayOptions(address="local", clip_actors=n))
            finally:
                ray.shutdown()
            per_actor[n] = rate
            print(f"| Ray, {n} CLIP actor(s) | {rate:.1f} | {warm:.1f} |")

    rate = append_rate(args.model, args.append, args.batch * 2, 1000)
    print(f"\n## coordinator append rate (add_files, batches of {args.batch * 2}, autosave every 1000, {args.model})")
    print(f"{rate:,.0f} items/s")

    print(f"\n## search, {args.rows:,} rows, k=10; a batch is {args.queries} queries")
    print("| served by | ms / query | ms / batch | merge ms / batch |\n|---|---:|---:|---:|")
    for name, one, many, merge in search_latency(args.rows, args.shards, args.queries, 10, 50):
        print(f"| {name} | {one:.2f} | {many:.1f} | {merge:.2f} |")
    print(f"\n# projection inputs: per-actor {per_actor.get(1, 0):.1f} images/s (CPU, this machine), "
          f"coordinator append {rate:,.0f} items/s")


if __name__ == "__main__":
    main()

"""A sharded database on Ray, on this machine: the coordinator's memory while a 3-shard database grows
(it must stay flat: the items live in the shards), shard and merge latency against one process,
ingestion images/s of a sharded scan against a local one, and a projection to 100M and 1B vectors from
the measured per-shard figures.

    RAY_USAGE_STATS_ENABLED=0 python benchmarks/bench_ray.py --grow 100000 500000 1000000 2000000

Ray runs as one local instance (`ray.init`) with its shard actors as separate processes; the
coordinator's memory is this process's resident set (VmRSS, and its peak VmHWM), the shards' the sum of
their actor processes'. Vectors are random, 512-d (ViT-B-32's width), added through the Python API in
batches of 10,000. Random weights: no download.
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
from nanodb.search.request import SearchRequest  # noqa: E402
from nanodb.search.sharded import merge_results  # noqa: E402

DATA = SHARED / "coco-val2017" / "images"
DIM = 512
BATCH = 10_000


def rss_mb(pid: int | str = "self") -> tuple[float, float]:
    """(resident MiB now, peak resident MiB) of a process, from /proc."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def shard_pids(db: NanoDB) -> list[int]:
    import ray

    return ray.get([a.__ray_call__.remote(lambda self: os.getpid()) for a in db.store.actors])


def unit(rng, n: int) -> np.ndarray:
    v = rng.standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def grow(path: Path, sizes: list[int]) -> list[tuple]:
    """Rows (items, coordinator MiB, coordinator peak MiB, shards MiB, add items/s) as the database grows."""
    rng = np.random.default_rng(0)
    rows, done = [], 0
    with NanoDB(path, "ViT-B-32", "none", ray=RayOptions(address="local", shards=3)) as db:
        pids = shard_pids(db)
        for size in sizes:
            start = time.perf_counter()
            while done < size:
                n = min(BATCH, size - done)
                db.add(unit(rng, n), paths=[f"/laion/{i:09d}.jpg" for i in range(done, done + n)])
                done += n
            db.save()
            rate = (size - rows[-1][0] if rows else size) / (time.perf_counter() - start)
            now, peak = rss_mb()
            shards = sum(rss_mb(p)[0] for p in pids)
            rows.append((size, now, peak, shards, rate))
            print(f"| {size:,} | {now:,.0f} | {peak:,.0f} | {shards:,.0f} | {rate:,.0f} |", flush=True)
    return rows


def latency(path: Path, local_path: Path, k: int, repeat: int, batch: int) -> list[tuple]:
    """(served by, ms per query p50, ms per batch, merge ms per batch) for the sharded and a local database."""
    rng = np.random.default_rng(1)
    queries = unit(rng, batch)
    out = []

    def timed(db):
        db.search(queries[0], k=k), db.search(queries, k=k)  # warm
        one = sorted(_ms(lambda i=i: db.search(queries[i % batch], k=k)) for i in range(repeat))[repeat // 2]
        many = min(_ms(lambda: db.search(queries, k=k)) for _ in range(3))
        return one, many

    with NanoDB(local_path, read_only=True) as db:
        out.append(("one process", *timed(db), 0.0))
    with NanoDB(path, read_only=True, ray=RayOptions(address="local")) as db:
        one, many = timed(db)
        parts = db.store.each_shard("search", SearchRequest(vectors=queries, k=k, query=0).checked(k))
        merge = min(_ms(lambda: merge_results(parts, k, db.store.shards)) for _ in range(20))
        out.append((f"{db.store.shards} shards", one, many, merge))
    return out


def copy_to_local(path: Path, local_path: Path) -> None:
    """The sharded database's items in one local database (the same vectors and paths)."""
    with NanoDB(path, read_only=True, ray=RayOptions(address="local")) as sharded, \
            NanoDB(local_path, "ViT-B-32", "none") as local:
        vectors, paths = [], []
        for item in sharded:
            vectors.append(item.vector)
            paths.append(item.path)
            if len(vectors) == BATCH:
                local.add(np.stack(vectors).astype(np.float32), paths=paths)
                vectors, paths = [], []
        if vectors:
            local.add(np.stack(vectors).astype(np.float32), paths=paths)
        local.save()


def scan_rates(images: int, batch: int) -> list[tuple]:
    """(database, images/s) of a first scan of `images` COCO photos with ViT-B-32: local, and sharded
    over 3 shards with 1 CLIP actor (the model and the actors warm)."""
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "photos"
        tree.mkdir()
        for f in sorted(DATA.glob("*.jpg"))[:images]:
            os.symlink(f, tree / f.name)
        warm = Path(tmp) / "warm"
        warm.mkdir()
        for f in sorted(DATA.glob("*.jpg"))[images:images + batch]:
            os.symlink(f, warm / f.name)
        for name, ray in [("local", None), ("3 shards, 1 CLIP actor", RayOptions(address="local", shards=3,
                                                                                    clip_actors=1))]:
            with NanoDB(Path(tmp) / name, "ViT-B-32", "none", batch_size=batch, ray=ray, follow_symlinks=True) as db:
                db.scan(warm)
                report = db.scan(tree)
                out.append((name, report.added / report.seconds))
    return out


def projection(per_item_bytes: float, ms_per_million: float, overhead_ms: float, batch_gain: float) -> None:
    """On paper: nodes, memory, single-query latency and queries/s for 100M and 1B vectors."""
    node_ram_gb, node_cores, usable = 256, 32, 0.7
    items_per_node = usable * node_ram_gb * 2**30 / per_item_bytes
    exact_rows = (100 - overhead_ms) / ms_per_million * node_cores * 1e6  # per node, for a query under 100 ms
    print(f"\n## projection (on paper): nodes of {node_ram_gb} GiB and {node_cores} cores, {usable:.0%} of RAM for "
          f"shards; {per_item_bytes:,.0f} B/item in a shard and {ms_per_million:.1f} ms per million rows per core "
          f"(single query) measured here, {batch_gain:.2f}x that rate per query in batches of 64; fan-out + merge "
          f"overhead {overhead_ms:.1f} ms")
    print("| vectors | nodes (memory) | shard RAM / node | exact query | batched queries/s | nodes for < 100 ms |")
    print("|---|---:|---:|---:|---:|---:|")
    for total in (100e6, 1e9):
        nodes = int(np.ceil(total / items_per_node))
        per_node = total / nodes
        scan_ms = per_node / 1e6 * ms_per_million / node_cores
        # batched: one pass over a node's rows serves a batch of 64 queries, `batch_gain` x the one-by-one rate
        print(f"| {total:,.0f} | {nodes} | {per_node * per_item_bytes / 2**30:,.0f} GiB | {scan_ms + overhead_ms:,.0f} ms "
              f"| {1000 / scan_ms * batch_gain:,.1f} | {int(np.ceil(total / exact_rows))} |")
    print(f"\nExact search stays under 100 ms while each node holds at most {exact_rows / 1e6:,.0f} M rows "
          f"({node_cores} cores); a cluster sized by memory ({items_per_node / 1e6:,.0f} M rows a node) passes "
          f"100 ms beyond that, where an approximate index (IVF-PQ, as clip-retrieval serves LAION-5B) is needed, "
          f"or {items_per_node / exact_rows:.1f}x the nodes.")


def _ms(fn) -> float:
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1000


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grow", type=int, nargs="+", default=[100_000, 500_000, 1_000_000, 2_000_000])
    p.add_argument("--images", type=int, default=128)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeat", type=int, default=30)
    p.add_argument("--dir", default=None, help="where the databases go (default: a temporary folder)")
    args = p.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    print(f"# {platform.node()}: {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}, ray {ray.__version__}")
    ray.init(num_cpus=3, include_dashboard=False, object_store_memory=1 << 30, logging_level="WARNING")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path, local_path = Path(tmp) / "sharded", Path(tmp) / "local"
        print("\n## a 3-shard database grows (items added through the Python API, saved at each size)")
        print("| items | coordinator MiB | coordinator peak MiB | 3 shards MiB | items/s added |")
        print("|---:|---:|---:|---:|---:|")
        grown = grow(path, args.grow)
        copy_to_local(path, local_path)
        rows = args.grow[-1]
        print(f"\n## search at {rows:,} x {DIM}, k=10: single queries (p50 of {args.repeat}) and a batch of 64")
        print("| served by | ms / query | ms / batch of 64 | merge ms / batch |\n|---|---:|---:|---:|")
        lat = latency(path, local_path, 10, args.repeat, 64)
        for name, one, many, merge in lat:
            print(f"| {name} | {one:.1f} | {many:.1f} | {merge:.2f} |")
    print(f"\n## ingestion: {args.images} COCO photos, ViT-B-32 random weights, batch {args.batch}")
    print("| database | images/s |\n|---|---:|")
    for name, rate in scan_rates(args.images, args.batch):
        print(f"| {name} | {rate:.1f} |")
    per_item = (grown[-1][3] - grown[0][3]) * 2**20 / (rows - grown[0][0])  # marginal: without the processes' own
    local_one = lat[0][1]
    sharded_one = lat[1][1]
    ms_per_million = local_one / (rows / 1e6) * min(2, os.cpu_count() or 1)  # per core: this machine's cores
    batch_gain = local_one / (lat[0][2] / 64)
    projection(per_item, ms_per_million, max(1.0, sharded_one - local_one), batch_gain)
    ray.shutdown()


if __name__ == "__main__":
    main()

"""What search filters cost beside the unfiltered query (issue 24): folder substring, folder prefix,
types, date range and combined, selective and broad, at several database sizes.

    python benchmarks/bench_filters.py                              # N in 100K, 1M; dim 512
    python benchmarks/bench_filters.py --sizes 5000000 --dir /tmp

Databases are built through the Python API (ItemStore.append: random unit vectors, paths such as
/photos/2019/phone/holiday/img_N.jpg, a modification time spread over 2010-2029), 1M at a time: append,
save, close, reopen, so the builder holds at most 1M unsaved rows. Then each configuration runs the
same 12 random queries (k=10) through NanoDB.search, interleaved (query by query, every configuration
in turn, so a change of load on a shared machine hits them alike), and the median is printed with
its ratio to the unfiltered median. Twice: in the session that built the database, and after reopening
it (read-only, once the background copy of the compact codes into memory is done). The first filtered
search of each session derives the filter columns (storage.columns.store_columns): timed apart.
Every filtered result is checked against the filter (each result's path and time with os.path), and,
up to 1M rows (--exact-up-to), the results of the first query against a float64 brute force over the
allowed rows.

With --peers (faiss-cpu, the `bench` extra), the reopened session also times faiss IndexFlatIP (float32
copies of the rows, up to 1M rows) on the same queries, each filter given as an IDSelectorBitmap of the
same allowed rows (made once, untimed: faiss has no filters of its own to resolve).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanodb import NanoDB  # noqa: E402
from nanodb.media.record import FileRecord  # noqa: E402
from nanodb.search.local import RowFilter, allowed_rows  # noqa: E402
from nanodb.search.request import Filters  # noqa: E402
from nanodb.storage.columns import store_columns  # noqa: E402

YEARS = range(2010, 2030)
EVENTS = ["holiday"] + [f"event{j:02d}" for j in range(49)]  # "holiday": 1 in 50
EXTENSIONS = (["jpg"] * 14) + (["png"] * 2) + (["heic"] * 3) + ["gif"]  # jpg 70%, png 10%, heic 15%, gif 5%
FIRST, LAST = datetime(2010, 1, 1).timestamp(), datetime(2029, 12, 31).timestamp()
CONFIGS = {  # name: filters
    "unfiltered": {},
    "folder 'holiday' (substring, selective)": dict(folder="holiday"),
    "folder 'phone' (substring, broad)": dict(folder="phone"),
    "folder '/photos/2019' (prefix, selective)": dict(folder="/photos/2019"),
    "folder '/photos' (prefix, broad)": dict(folder="/photos"),
    "types png (selective)": dict(types=["png"]),
    "types jpg (broad)": dict(types=["jpg"]),
    "date June 2019 (selective)": dict(since="2019-06-01", until="2019-06-30"),
    "date since 2015 (broad)": dict(since="2015-01-01"),
    "combined holiday + jpg + since 2015": dict(folder="holiday", types=["jpg"], since="2015-01-01"),
    "combined phone + jpg/heic + since 2012": dict(folder="phone", types=["jpg", "heic"], since="2012-01-01"),
}
QUERIES = 12
K = 10
# Untimed rest after each faiss search: its OpenMP threads keep spinning a while after a search, and
# would share the cores with the nanodb search that follows (see bench_search.py's REST_S).
PEER_REST_S = 0.25


def records(rng, first: int, n: int) -> list[FileRecord]:
    years = rng.choice(YEARS, n)
    kinds = rng.choice(["phone", "camera"], n)
    events = rng.choice(EVENTS, n)
    exts = rng.choice(EXTENSIONS, n)
    mtimes = rng.uniform(FIRST, LAST, n)
    return [FileRecord(path=f"/photos/{y}/{c}/{e}/img_{first + i}.{x}", hash=rng.bytes(16), mtime=float(t))
            for i, (y, c, e, x, t) in enumerate(zip(years, kinds, events, exts, mtimes))]


def random_units(rng, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def grow(path: Path, target: int, rng) -> None:
    """Append until `target` rows, saving and reopening every 1M (memory stays bounded)."""
    while True:
        with NanoDB(path, config="test", model="ViT-B-32") as db:
            if len(db) >= target:
                return
            chunk = min(target, len(db) + 1_000_000)
            while len(db) < chunk:
                n = min(100_000, chunk - len(db))
                db.store.append(random_units(rng, n, db.dim), records(rng, len(db), n))
            db.save()


def allowed(db: NanoDB, filters: dict) -> np.ndarray:
    """The live rows the filters allow (the search's own row mask)."""
    with db.store.lock:
        mask = allowed_rows(db.store, RowFilter.of(Filters(**filters)))
    live = ~db.store.index.dead
    return live if mask is None else live & mask


def check(db: NanoDB, filters: dict, results, query: np.ndarray, exact: bool) -> None:
    """Every result passes the filters (tested on its path and time with os.path); with `exact`, the
    results are the float64 brute force's top k over the allowed rows."""
    where = RowFilter.of(Filters(**filters))
    for r in results:
        mtime = db.store.item(r.index).mtime
        assert where.folder is None or where.allows_folder(os.path.dirname(r.path)), (filters, r.path)
        assert where.types is None or os.path.splitext(r.path)[1][1:].lower() in where.types, (filters, r.path)
        assert (where.since or -np.inf) <= mtime < (where.until or np.inf), (filters, r.path)
    if exact:
        rows = np.flatnonzero(allowed(db, filters))
        q = query.astype(np.float64)
        scores = np.concatenate([db.vectors[rows[a : a + 65536]].astype(np.float64) @ q
                                 for a in range(0, len(rows), 65536)] or [np.zeros(0)])
        best = rows[np.lexsort((rows, -scores))[:K]]
        assert [r.index for r in results] == best.tolist(), filters


def faiss_peer(db: NanoDB):
    """faiss IndexFlatIP over float32 copies of the rows, and a search function taking a row mask."""
    import faiss

    index = faiss.IndexFlatIP(db.dim)
    for a in range(0, db.store.rows, 100_000):
        index.add(np.ascontiguousarray(db.vectors[a : a + 100_000], np.float32))
    selectors = {}

    def search(q: np.ndarray, name: str, mask: np.ndarray | None):
        if mask is not None and name not in selectors:
            bitmap = np.packbits(mask, bitorder="little")
            selectors[name] = (bitmap, faiss.IDSelectorBitmap(len(mask), faiss.swig_ptr(bitmap)))
        params = None if mask is None else faiss.SearchParameters(sel=selectors[name][1])
        return index.search(q[None], K, params=params)

    return search


def measure(db: NanoDB, label: str, n: int, rng, exact_up_to: int, peer=None) -> list[str]:
    queries = random_units(rng, QUERIES, db.dim)
    peer_times = {name: [] for name in CONFIGS}
    db.search(queries[0], K)  # warm up: thread pools, scratch buffers, the mapped codes' pages
    t = time.perf_counter()
    store_columns(db.store)  # what the first filtered search of a session does first
    derive = time.perf_counter() - t
    masks = {name: (allowed(db, filters) if filters else None) for name, filters in CONFIGS.items()}
    for name in CONFIGS if peer is not None else ():  # its selectors made and its threads started, untimed
        peer(queries[0], name, masks[name])
    times = {name: [] for name in CONFIGS}
    for qi, q in enumerate(queries):
        for name, filters in CONFIGS.items():
            t = time.perf_counter()
            results = db.search(q, K, **filters)
            times[name].append(time.perf_counter() - t)
            check(db, filters, results, q, exact=qi == 0 and n <= exact_up_to)
            if peer is not None:
                t = time.perf_counter()
                peer(q, name, masks[name])
                peer_times[name].append(time.perf_counter() - t)
                time.sleep(PEER_REST_S)
    base = np.median(times["unfiltered"])
    rows = []
    for name in CONFIGS:
        median = np.median(times[name])
        share = 1.0 if masks[name] is None else float(masks[name].mean())
        peer_ms = f"{np.median(peer_times[name]) * 1e3:.1f}" if peer is not None else ""
        rows.append(f"| {n:,} | {label} | {name} | {share:.1%} | {median * 1e3:.1f} | {median / base:.2f}x | {peer_ms} |")
    rows.append(f"| {n:,} | {label} | deriving the filter columns (the first filtered search) | | {derive * 1e3:.0f} | | |")
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--dir", default=None, help="where the databases are built (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the databases built")
    parser.add_argument("--peers", action="store_true", help="also time faiss IndexFlatIP (up to 1M rows)")
    parser.add_argument("--exact-up-to", type=int, default=1_000_000,
                        help="check results against a float64 brute force up to this many rows")
    args = parser.parse_args(argv)
    print(f"# {platform.machine()}, {os.cpu_count()} CPUs, load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print("\n| N | session | filter | rows allowed | median ms | x unfiltered | faiss flat ms |\n|---|---|---|---|---|---|---|")
    for n in args.sizes:
        rng = np.random.default_rng(n)
        root = Path(tempfile.mkdtemp(prefix="nanodb-filters-", dir=args.dir))
        try:
            t = time.perf_counter()
            grow(root / "db", n, rng)
            built = time.perf_counter() - t
            with NanoDB(root / "db", config="test", model="ViT-B-32") as db:  # the building session's state
                db.store.append(random_units(rng, 1000, db.dim), records(rng, n, 1000))
                print("\n".join(measure(db, "built", n, rng, args.exact_up_to)), flush=True)
            with NanoDB(root / "db", config="test", model="ViT-B-32", read_only=True) as db:
                while not db.store.index.codes_read:
                    time.sleep(0.2)
                peer = faiss_peer(db) if args.peers and n <= 1_000_000 else None
                print("\n".join(measure(db, "reopened", n, rng, args.exact_up_to, peer)), flush=True)
            print(f"<!-- {n:,}: built in {built:.0f} s -->", flush=True)
        finally:
            if not args.keep:
                shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Sharded search on a Ray cluster: shard actors each hold a contiguous range of the vectors, every
shard answers the same SearchRequest within its rows, and the per-shard top k are merged so results
equal one process's exact search: same items, same order, ties to the lower index.
"""

from __future__ import annotations

import numpy as np

from nanodb.search.local import RowFilter, allowed_rows, allowed_top, answer
from nanodb.search.request import SearchRequest, SearchResults
from nanodb.storage.columns import store_columns
from nanodb.storage.index import VectorIndex
from nanodb.storage.store import ItemStore


class SearchShard:
    """A Ray actor holding rows [offset, offset + n) of the vectors, in RAM or on its GPU."""

    def __init__(self, vectors: np.ndarray, dead: np.ndarray, offset: int, backend: str):
        self.offset = offset
        self.index = VectorIndex(vectors.shape[1], backend)
        self.append(vectors, dead)

    def append(self, vectors: np.ndarray, dead: np.ndarray) -> None:
        start = self.index.append(vectors)
        if dead.any():
            self.index.delete(start + np.flatnonzero(dead))

    def delete(self, rows: np.ndarray) -> None:
        """Delete by global row index."""
        self.index.delete(np.asarray(rows) - self.offset)

    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Global row indices and float64 scores of this shard's top k among the rows `allowed` (a mask
        over this shard's rows; None: all) allows. The scores are recomputed the way the index's exact
        pass computes them, so the merge orders candidates of different shards exactly as one index would."""
        queries = np.array(queries, np.float32)  # Ray hands over a read-only view of its object store
        indices, _ = allowed_top(self.index, queries, k, allowed)
        q64 = queries.astype(np.float64)
        rows = self.index.vectors[indices].astype(np.float64)  # (Q, k, dim)
        scores = (rows * q64[:, None, :]).sum(axis=2)
        return indices + self.offset, scores


def merge_top_k(parts: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-shard (indices, float64 scores) -> the overall top k, best first, ties to the lower index."""
    indices = np.concatenate([p[0] for p in parts], axis=1)
    scores = np.concatenate([p[1] for p in parts], axis=1)
    order = np.lexsort((indices, -scores), axis=1)[:, :k]
    return np.take_along_axis(indices, order, axis=1), np.take_along_axis(scores, order, axis=1).astype(np.float32)


class ShardedSearch:
    """The store's vectors split over `shards` actors, kept in step with the store: new rows go to the
    last shard, deletions to the shards that hold them, a compaction (renumbered rows) rebuilds all."""

    def __init__(self, store: ItemStore, shards: int, gpus: float = 0):
        import ray

        self.store = store
        self.shards = shards
        self.actor = ray.remote(SearchShard).options(num_cpus=0, num_gpus=gpus, scheduling_strategy="SPREAD")
        self.backend = "auto" if gpus else "numpy"
        self.actors: list = []
        self.bounds: list[int] = []  # first row of each shard, then the row count
        self.dead = np.zeros(0, bool)
        self.generation = -1

    def _dead_mask(self) -> np.ndarray:
        dead = np.ones(self.store.rows, bool)
        dead[self.store.live_rows()] = False
        return dead

    def _build(self) -> None:
        import ray

        self.stop()
        rows, vectors, dead = self.store.rows, self.store.vectors, self._dead_mask()
        self.bounds = [rows * s // self.shards for s in range(self.shards + 1)]
        self.actors = [
            self.actor.remote(vectors[lo:hi].copy(), dead[lo:hi], lo, self.backend)
            for lo, hi in zip(self.bounds, self.bounds[1:])
        ]
        ray.get([a.__ray_ready__.remote() for a in self.actors])
        self.dead, self.generation = dead, self.store.manifest.generation

    def sync(self) -> None:
        """Bring the shards up to the store's rows and deletions (the caller holds the store's lock)."""
        import ray

        store, synced = self.store, self.bounds[-1] if self.bounds else -1
        grown_last = store.rows - (self.bounds[-2] if len(self.bounds) > 1 else 0)
        if (store.manifest.generation != self.generation or store.rows < synced
                or grown_last > 2 * store.rows // self.shards + 1024):  # renumbered, or the last shard too big
            self._build()
            return
        if store.rows == synced and len(store) == synced - int(self.dead.sum()):
            return
        dead = self._dead_mask()
        calls = []
        gone = np.flatnonzero(dead[:synced] & ~self.dead)
        for a, lo, hi in zip(self.actors, self.bounds, self.bounds[1:]):
            mine = gone[(gone >= lo) & (gone < hi)]
            if len(mine):
                calls.append(a.delete.remote(mine))
        if store.rows > synced:
            calls.append(self.actors[-1].append.remote(store.vectors[synced:].copy(), dead[synced:]))
            self.bounds[-1] = store.rows
        ray.get(calls)
        self.dead = dead

    def top_rows(self, queries: np.ndarray, n: int, allowed: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Like search.local.allowed_top over all the shards: (indices, float32 scores), each (Q, n').
        Each shard gets its slice of the `allowed` mask and returns its own exact top n."""
        import ray

        queries = np.ascontiguousarray(np.asarray(queries, np.float32).reshape(-1, self.store.dim))
        slices = [None if allowed is None else allowed[lo:hi] for lo, hi in zip(self.bounds, self.bounds[1:])]
        parts = ray.get([a.search.remote(queries, n, part) for a, part in zip(self.actors, slices)])
        return merge_top_k(parts, n)

    def search(self, request: SearchRequest) -> list[SearchResults]:
        """The local searcher's answer, served by the shards: each keeps the rows the filters allow; the
        duplicates of a file's content are collapsed after the exact merge (asking for more as needed)."""
        where = RowFilter.of(request.filters)
        if where:
            store_columns(self.store)  # derived on first use, not under the lock: writers go on meanwhile
        with self.store.lock:  # indices and the paths they name come from one state
            self.sync()
            allowed = allowed_rows(self.store, where)
            return answer(request, self.store, lambda queries, n: self.top_rows(queries, n, allowed))

    def stop(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)
        self.actors, self.bounds = [], []

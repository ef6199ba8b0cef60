"""nanodb on a Ray cluster: connecting, the CLIP actors of a distributed scan, and sharded search.

The database stays with one process (this one): it walks, skips unchanged files, appends and saves.
A scan's decoding and embedding run on the cluster (pipeline.ray_ingest); a search fans out to actors
that each hold a contiguous range of the vectors, and the per-shard top k are merged so results
equal one process's exact search: same items, same order, ties to the lower index.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from nanodb.model.clip import ModelConfig, load_model
from nanodb.pipeline.ray_ingest import RayEmbedStage, RayStageOptions
from nanodb.search.local import RowFilter, allowed_rows, allowed_top, answer
from nanodb.search.request import SearchRequest, SearchResults
from nanodb.storage.index import VectorIndex
from nanodb.storage.store import ItemStore

log = logging.getLogger(__name__)

INSTALL_HINT = "running on a Ray cluster needs Ray, an optional extra: pip install 'nanodb[ray]'"


@dataclass
class RayOptions:
    """Where and how to use a Ray cluster. `address`: 'auto', 'HOST:PORT', 'ray://HOST:PORT', or
    'local' (start Ray on this machine). `clip_actors`: default one per GPU of the cluster, else 1.
    `actor_cpus`: CPUs per CLIP actor on the CPU path. `shards`: default one per node.
    `shard_gpus`: GPUs per shard actor (its vectors then live on the GPU, with CuPy)."""

    address: str = "auto"
    clip_actors: int | None = None
    actor_cpus: int = 1
    decode_cpus: float = 1
    shards: int | None = None
    shard_gpus: float = 0
    object_store_memory: int | None = None  # for 'local' only


def import_ray():
    try:
        import ray
    except ImportError:
        raise ValueError(INSTALL_HINT) from None
    return ray


class RayCluster:
    """This process's use of a Ray cluster: connects on first need; `close` ends only what it started."""

    def __init__(self, options: RayOptions | str):
        self.options = RayOptions(options) if isinstance(options, str) else options
        self.ray = import_ray()  # fail at once, with how to install it
        self._connected_here = False
        self._stages: list[RayEmbedStage] = []
        self._searches: list[ShardedSearch] = []

    def connect(self) -> None:
        ray = self.ray
        if ray.is_initialized():
            return
        o = self.options
        if o.address == "local":
            ray.init(include_dashboard=False, object_store_memory=o.object_store_memory, logging_level=logging.WARNING)
        else:
            ray.init(address=o.address, logging_level=logging.WARNING)
        self._connected_here = True

    def resources(self) -> dict[str, float]:
        self.connect()
        return self.ray.cluster_resources()

    def embed_stage(self, model: ModelConfig, transform, max_pixels: int, batch_size: int) -> RayEmbedStage:
        """The decode + CLIP stage of scans: CLIP actors running `model` (on GPUs where the cluster has them),
        started once and kept for later scans (as the local decode pool is)."""
        if self._stages:
            return self._stages[0]
        o = self.options
        gpus = int(self.resources().get("GPU", 0))
        actors = o.clip_actors or max(1, gpus)
        resources: dict[str, Any] = {"num_gpus": 1, "num_cpus": 1} if gpus else {"num_cpus": o.actor_cpus}
        factory = functools.partial(actor_model, model, o.actor_cpus)
        stage = RayEmbedStage(factory, transform, max_pixels, RayStageOptions(
            actors=actors, batch_size=batch_size, actor_resources=resources, decode_cpus=o.decode_cpus))
        self._stages.append(stage)
        return stage

    def sharded_search(self, store: ItemStore) -> ShardedSearch:
        self.connect()
        shards = self.options.shards or max(1, sum(1 for n in self.ray.nodes() if n["Alive"]))
        search = ShardedSearch(store, shards, self.options.shard_gpus)
        self._searches.append(search)
        return search

    def close(self) -> None:
        if not self.ray.is_initialized():
            return
        for stage in self._stages:
            stage.stop()
        for search in self._searches:
            search.stop()
        self._stages, self._searches = [], []
        if self._connected_here:
            self.ray.shutdown()
            self._connected_here = False


def actor_model(model: ModelConfig, threads: int):
    """The model of one CLIP actor (its own process: it may set its torch thread count); its device,
    precision and backend are resolved there, on the actor's own hardware."""
    import torch

    torch.set_num_threads(max(1, threads))
    return load_model(model)


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
        with self.store.lock:  # indices and the paths they name come from one state
            self.sync()
            allowed = allowed_rows(self.store, where)
            return answer(request, self.store, lambda queries, n: self.top_rows(queries, n, allowed))

    def stop(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)
        self.actors, self.bounds = [], []

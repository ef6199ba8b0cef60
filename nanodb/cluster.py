"""nanodb on a Ray cluster: connecting, the CLIP actors of a distributed scan, and the shard actors of
sharded search (search.sharded). It composes the pipeline's Ray stage and the search layer, above both.

The database stays with one process (this one): it walks, skips unchanged files, appends and saves.
A scan's decoding and embedding run on the cluster (pipeline.ray_ingest); a search fans out to shards.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any

from nanodb.model.clip import ModelConfig, load_model
from nanodb.pipeline.ray_ingest import RayEmbedStage, RayStageOptions
from nanodb.search.sharded import ShardedSearch
from nanodb.storage.store import ItemStore

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

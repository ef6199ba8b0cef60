"""nanodb on a Ray cluster: connecting, the CLIP actors of a distributed scan, and the shard actors of
a sharded database (search.sharded). It composes the pipeline's Ray stage and the search layer.

A scan's decoding and embedding run on the cluster (pipeline.ray_ingest). A database made with
`shards` keeps its items in shard actors, each owning a store folder (search.sharded.ShardedStore);
without, the database stays a local folder of this process.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nanodb.model.clip import ModelConfig, load_model
from nanodb.pipeline.ray_ingest import RayEmbedStage, RayStageOptions
from nanodb.search.sharded import ShardedStore
from nanodb.storage.cluster_manifest import is_sharded
from nanodb.storage.format import MANIFEST, DatabaseError, Manifest

INSTALL_HINT = "running on a Ray cluster needs Ray, an optional extra: pip install 'nanodb[ray]'"


@dataclass
class RayOptions:
    """Where and how to use a Ray cluster. `address`: 'auto', 'HOST:PORT', 'ray://HOST:PORT', or
    'local' (start Ray on this machine). `clip_actors`: default one per GPU of the cluster, else 1.
    `actor_cpus`: CPUs per CLIP actor on the CPU path. `shards`: a new database is made of this many
    shards (None: a local database). `shard_dir`: where the shards' folders are, on each node's own disk
    (None: inside the database folder, which every node must then reach: a shared filesystem).
    `shard_gpus`: GPUs per shard actor."""

    address: str = "auto"
    clip_actors: int | None = None
    actor_cpus: int = 1
    decode_cpus: float = 1
    shards: int | None = None
    shard_dir: str | None = None
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

    def sharded_store(self, root: Path, read_only: bool, new_model: Callable[[], Manifest],
                      compact_dead_fraction: float) -> ShardedStore | None:
        """The shards of the database at `root`: a sharded one's, reconnected; a new one's, made when
        `shards` is set (`new_model()` gives its model's manifest); None for a local database."""
        o = self.options
        if is_sharded(root):
            return ShardedStore.open(root, read_only=read_only, compact_dead_fraction=compact_dead_fraction,
                                     gpus=o.shard_gpus)
        if not o.shards or (root / MANIFEST).exists():
            return None
        if read_only:
            raise DatabaseError(f"no nanodb database at {root}")
        return ShardedStore.create(root, new_model(), o.shards, o.shard_dir,
                                   compact_dead_fraction=compact_dead_fraction, gpus=o.shard_gpus)

    def close(self) -> None:
        if not self.ray.is_initialized():
            return
        for stage in self._stages:
            stage.stop()
        self._stages = []
        if self._connected_here:
            self.ray.shutdown()
            self._connected_here = False


def actor_model(model: ModelConfig, threads: int):
    """The model of one CLIP actor (its own process: it may set its torch thread count); its device,
    precision and backend are resolved there, on the actor's own hardware."""
    import torch

    torch.set_num_threads(max(1, threads))
    return load_model(model)

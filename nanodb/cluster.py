"""nanodb on a Ray cluster: connecting, the CLIP actors of a distributed scan, and the shard actors of
a sharded database (search.sharded). It composes the pipeline's Ray stage and the search layer.

A scan's decoding and embedding run on the cluster (pipeline.ray_ingest). A database made with
`shards` keeps its items in shard actors, each owning a store folder (search.sharded.ShardedStore);
without, the database stays a local folder of this process.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nanodb.media.sandbox import DecodeLimits
from nanodb.model.clip import ModelConfig, load_model
from nanodb.pipeline.ray_ingest import RayEmbedStage, RayStageOptions
from nanodb.search.sharded import ShardedStore
from nanodb.storage.cluster_manifest import is_sharded
from nanodb.storage.format import MANIFEST, DatabaseError, Manifest

INSTALL_HINT = "running on a Ray cluster needs Ray, an optional extra: pip install 'nanodb[ray]'"
JOIN_TIMEOUT_S = 30.0  # how long joining a cluster may take before it fails, naming the address


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
    join_timeout_s: float = JOIN_TIMEOUT_S
    # checked while joining a cluster: True gives the join up (the command line's stop signal)
    stop_joining: Callable[[], bool] | None = None


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
        self._stage_lock = threading.Lock()

    def connect(self) -> None:
        """Start a new Ray on this machine ('local': never a cluster a stale address file names), or join
        the cluster at the address: one that cannot be reached, or does not answer within
        `join_timeout_s`, fails with one line naming it. Ray's own SIGTERM handler is taken back off: the
        program's signal handlers stay as they were."""
        ray = self.ray
        if ray.is_initialized():
            return
        o = self.options
        kept = _signal_handlers()
        try:
            if o.address == "local":
                ray.init(address="local", include_dashboard=False, object_store_memory=o.object_store_memory,
                         logging_level=logging.WARNING)
            else:
                self._join(o.address)
        finally:
            for signum, handler in kept.items():
                signal.signal(signum, handler)
        self._connected_here = True

    def _join(self, address: str) -> None:
        """ray.init(address) in a thread of its own, waited for here in short steps: Ray's connection
        loop ignores signals and may retry for minutes, this wait does neither."""
        target = cluster_address(address)
        deadline = time.monotonic() + self.options.join_timeout_s
        if target is not None:
            reachable(target, address, self.options.join_timeout_s)
        outcome: list[BaseException | None] = []

        def join() -> None:
            ray_worker = logging.getLogger("ray._private.worker")
            ray_worker.addFilter(not_setting_sigterm)  # as meant: the program keeps its own handler
            try:
                self.ray.init(address=address, logging_level=logging.WARNING)
                outcome.append(None)
            except BaseException as e:  # handed to the waiting thread
                outcome.append(e)
            finally:
                ray_worker.removeFilter(not_setting_sigterm)

        named = address if target is None or target == address else f"{address} ({target})"
        joining = threading.Thread(target=join, name="nanodb-ray-join", daemon=True)
        joining.start()
        while joining.is_alive():
            joining.join(0.1)
            if self.options.stop_joining is not None and self.options.stop_joining():
                raise ValueError(f"stopped while joining the Ray cluster at {named}")
            if time.monotonic() > deadline and joining.is_alive():
                raise ValueError(f"the Ray cluster at {named} did not answer within "
                                 f"{self.options.join_timeout_s:g} s")
        if outcome and outcome[0] is not None:
            error = outcome[0]
            why = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ValueError(f"cannot join the Ray cluster at {named}: {why}") from None

    def resources(self) -> dict[str, float]:
        self.connect()
        return self.ray.cluster_resources()

    def embed_stage(self, model: ModelConfig, transform, max_pixels: int, batch_size: int,
                    limits: DecodeLimits | None = None) -> RayEmbedStage:
        """The decode + CLIP stage of scans: CLIP actors running `model` (on GPUs where the cluster has them),
        started once and shared by every scan, later or concurrent (as the local decode pool is): two
        scans at once with a stage each would hold twice the CPUs, leaving none to decode. `limits`: each
        decode's time and memory limit, as in the local decode workers."""
        with self._stage_lock:
            return self._stages[0] if self._stages else self._new_stage(model, transform, max_pixels, batch_size,
                                                                         limits)

    def _new_stage(self, model: ModelConfig, transform, max_pixels: int, batch_size: int,
                   limits: DecodeLimits | None) -> RayEmbedStage:
        o = self.options
        gpus = int(self.resources().get("GPU", 0))
        actors = o.clip_actors or max(1, gpus)
        resources: dict[str, Any] = {"num_gpus": 1, "num_cpus": 1} if gpus else {"num_cpus": o.actor_cpus}
        factory = functools.partial(actor_model, model, o.actor_cpus)
        stage = RayEmbedStage(factory, transform, max_pixels, RayStageOptions(
            actors=actors, batch_size=batch_size, actor_resources=resources, decode_cpus=o.decode_cpus,
            limits=limits))
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


def not_setting_sigterm(record: logging.LogRecord) -> bool:
    """A log filter: drops Ray's warning that a join outside the main thread leaves SIGTERM's handler alone."""
    return "SIGTERM handler is not set" not in record.getMessage()


def _signal_handlers() -> dict[int, Any]:
    """The stop signals' handlers now (Ray's init replaces SIGTERM's in the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT) if signal.getsignal(s) is not None}


def cluster_address(address: str) -> str | None:
    """The HOST:PORT that ray.init(address) would connect to: the address itself, or for 'auto'
    RAY_ADDRESS, else the address file the last `ray start` on this machine left in Ray's temporary
    folder ($RAY_TMPDIR, else $TMPDIR, else /tmp, then ray/ray_current_cluster). None: not known here."""
    if address.startswith("ray://"):
        return address[len("ray://"):]
    if address != "auto":
        return address
    if os.environ.get("RAY_ADDRESS"):
        return cluster_address(os.environ["RAY_ADDRESS"]) if os.environ["RAY_ADDRESS"] != "auto" else None
    temp = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
    try:
        with open(os.path.join(temp, "ray", "ray_current_cluster")) as f:
            return f.read().strip() or None
    except OSError:
        return None


def reachable(target: str, address: str, timeout: float) -> None:
    """Fail at once, naming the address, where nothing listens at HOST:PORT (a cluster gone)."""
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        return  # ray.init says what is wrong with it
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=min(timeout, 10.0)).close()
    except OSError as e:
        named = address if target == address else f"{address} ({target})"
        why = e.strerror or type(e).__name__
        raise ValueError(f"cannot reach the Ray cluster at {named}: {why.lower()} (is Ray running there? "
                         f"--ray local starts a new one on this machine)") from None

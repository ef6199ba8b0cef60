"""Stages 2 and 3 on a Ray cluster: Ray tasks read and decode batches of files on any node, a pool of
CLIP actors embeds them, and the (records, vectors) batches stream back to the one process that owns
the database, whose walker, unchanged-file skip and appender stay as in a local scan. Files come back
as their FileRecords: the pixels stay on the node that decoded them.

Each file is decoded under the same time and memory limits as in the local decode workers: in a limited
worker process (media.sandbox) that the Ray task keeps for its later tasks; a decoder bomb costs its own
file, at most the time limit, and is skipped with the reason.

Ray retries a task whose worker or node died (and rebuilds a lost decoded batch from its lineage);
an actor is restarted elsewhere and its call retried. A batch still failing after that is sent again
up to `attempts` times, then its files are reported as failed. A batch's records and vectors travel in
one object, so they cannot misalign, and each item of a path (a photo's one, a video's frames) is passed
on at most once, so nothing is appended twice. Ray is imported only when the stage starts: this module
imports without it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from nanodb.pipeline.decode import DecodedImage, DecodeFailure, decode_media, decode_tar
from nanodb.pipeline.sink import EmbeddingModel

from nanodb.media.opener import ImageRejected
from nanodb.media.remote import is_tar_name, split_member
from nanodb.media.sandbox import TOO_MUCH_MEMORY, DecodeLimits, DecodeSandbox
from nanodb.media.video import preload_video_libraries

log = logging.getLogger(__name__)


# The limited decode worker of this Ray worker process (kept for its later tasks), and its limits.
_sandbox: tuple[DecodeLimits, DecodeSandbox] | None = None


def decode_limited(limits: DecodeLimits | None, path: str, transform, max_pixels: int, *file_and_metadata):
    """One file's items, decoded in this Ray worker's limited decode process (without `limits`: here)."""
    global _sandbox
    if limits is None:
        return decode_media(path, transform, max_pixels, *file_and_metadata)
    if _sandbox is None or _sandbox[0] != limits:
        _sandbox = (limits, DecodeSandbox(1, limits, preload_video_libraries))
    try:
        result = _sandbox[1].run(decode_media, path, transform, max_pixels, *file_and_metadata)
    except ImageRejected as e:  # past the time limit (its worker was replaced), or the memory limit
        return DecodeFailure(path, str(e))
    if isinstance(result, DecodeFailure) and result.reason == TOO_MUCH_MEMORY:
        return DecodeFailure(path, limits.too_big)
    return result


def decode_batch(paths: list[str], transform, max_pixels: int,
                 limits: DecodeLimits | None = None) -> list[DecodedImage | DecodeFailure]:
    """A Ray task: read and decode files, where they are visible to every node (a shared folder), or
    objects behind URLs (read on the node), or a tar shard (a batch of its own: read in one pass here,
    every member decoded under the limits)."""
    decoded = [decode_tar(p, transform, max_pixels, functools.partial(decode_limited, limits)) if is_tar_name(p)
               else decode_limited(limits, p, transform, max_pixels) for p in paths]
    return [d for one in decoded for d in ([one] if isinstance(one, DecodeFailure) else one)]  # a video's frames


def passed_on(paths: list[str], records: list) -> list[int]:
    """The positions of the records to pass on from a batch of `paths` that came back: each item of a
    path sent once, however often it came back (a photo's one item; a video's frames, told apart by
    their hashes), nothing of a path not sent."""
    sent, seen, keep = set(paths), set(), []
    for i, r in enumerate(records):
        split = split_member(r.path)
        if (r.path in sent or (split is not None and split[0] in sent)) and (r.path, r.hash) not in seen:
            seen.add((r.path, r.hash))
            keep.append(i)
    return keep


class ClipWorker:
    """A Ray actor: builds the model once from `model_factory` (on its GPU where it has one), then
    embeds decoded batches. Returns (records, failures, vectors), the records in the vectors' order."""

    def __init__(self, model_factory: Callable[[], EmbeddingModel]):
        self.model = model_factory()

    def ready(self) -> bool:
        return True

    def embed(self, decoded: list[DecodedImage | DecodeFailure]):
        images = [d for d in decoded if isinstance(d, DecodedImage)]
        failures = [(d.path, d.reason) for d in decoded if isinstance(d, DecodeFailure)]
        step = 256  # a tar shard's members come as one batch: embedded a slice at a time
        vectors = np.concatenate([self.model.encode_pixels(np.stack([d.pixels for d in images[i:i + step]]))
                                  for i in range(0, len(images), step)]) if images else None
        return [d.record for d in images], failures, vectors


@dataclass
class RayStageOptions:
    """How the stage uses the cluster. `actor_resources` are Ray resources per CLIP actor, e.g.
    {"num_gpus": 1} on GPU nodes or {"num_cpus": 4} for the CPU path."""

    actors: int = 1
    batch_size: int = 32
    actor_resources: dict[str, Any] | None = None
    decode_cpus: float = 1
    in_flight_per_actor: int = 2  # batches queued at each actor, so it never waits for the next one
    task_retries: int = 3  # Ray's own retries of a decode task or an actor call
    attempts: int = 3  # whole-batch resubmissions after Ray gave up
    limits: DecodeLimits | None = None  # each decode's time and memory limit (None: none)


class RayEmbedStage:
    """Replaces the local decode pool and CLIP stage of a ScanPipeline (its `remote` stage)."""

    def __init__(self, model_factory: Callable[[], EmbeddingModel], transform, max_pixels: int,
                 options: RayStageOptions):
        self.factory = model_factory
        self.transform = transform
        self.max_pixels = max_pixels
        self.options = options
        self.actors: list = []
        self._decode = None

    async def start(self) -> None:
        """Start the CLIP actors (the cluster is already connected), once however many scans share the
        stage, and wait until their models load (without holding up the event loop)."""
        import ray

        o = self.options
        if not self.actors:
            self._decode = ray.remote(num_cpus=o.decode_cpus, max_retries=o.task_retries)(decode_batch)
            actor = ray.remote(ClipWorker).options(
                max_restarts=-1, max_task_retries=o.task_retries, scheduling_strategy="SPREAD",
                **(o.actor_resources or {"num_cpus": 1})
            )
            self.actors = [actor.remote(self.factory) for _ in range(o.actors)]
        await asyncio.gather(*(a.ready.remote() for a in self.actors))

    def stop(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)
        self.actors = []

    async def run(self, inbox: asyncio.Queue, outbox: asyncio.Queue, report, running: asyncio.Event,
                  remember_failure: Callable[[str, int, float, str], None] | None = None) -> None:
        """Consumes FoundFiles (None ends the stream); emits (records, vectors) batches, then None. A file
        that failed to decode is passed to `remember_failure` (path, size, mtime, reason), as the local
        decode stage does (a batch the cluster itself failed is not: it is tried again at the next scan)."""
        await self.start()
        load = [0] * len(self.actors)
        slots = asyncio.Semaphore(len(self.actors) * self.options.in_flight_per_actor)

        async def one(files: list) -> None:
            paths = [f.path for f in files]
            try:
                records, failures, vectors, decoded = await self._embed(paths, load)
                found = {f.path: f for f in files}
                if len(paths) == 1 and is_tar_name(paths[0]):  # a shard: its members are the files found
                    tar = paths[0]
                    report.tar_members.setdefault(tar, set())
                    for path in dict.fromkeys([r.path for r in records] + [p for p, _ in failures]):
                        if path == tar:  # damaged partway: the tar itself is the failure
                            report.count_found(path)
                        else:
                            report.count_member(tar, path)
                for path, reason in failures:
                    report.fail(path, reason)
                    if decoded and remember_failure is not None and (f := found.get(path)) is not None:
                        remember_failure(f.path, f.size, f.mtime, reason)
                keep = passed_on(paths, records)
                report.count_embedded(records[i] for i in keep)
                if keep:
                    await outbox.put(([records[i] for i in keep], vectors[keep]))
            finally:
                slots.release()

        nothing = object()
        waiting: Any = nothing  # a file taken from the inbox that starts the next batch (a tar shard, or None)
        # a TaskGroup: a batch that fails stops the scan with its error, never silently (its files unsaved)
        try:
            async with asyncio.TaskGroup() as batches:
                while (f := await inbox.get() if waiting is nothing else waiting) is not None:
                    waiting = nothing
                    await running.wait()
                    await slots.acquire()
                    batch = [f]  # and whatever else arrived while this waited for a slot; a tar shard alone
                    while not is_tar_name(f.path) and len(batch) < self.options.batch_size and not inbox.empty():
                        if (g := inbox.get_nowait()) is None or is_tar_name(g.path):
                            waiting = g
                            break
                        batch.append(g)
                    batches.create_task(one(batch))
        except ExceptionGroup as group:  # the first failure as itself
            raise group.exceptions[0] from None
        await outbox.put(None)

    async def _embed(self, paths: list[str], load: list[int]):
        """One batch through decode + CLIP on the least busy actor; resent on failure, then failed.
        Returns (records, failures, vectors, whether it was decoded: False when the cluster failed it)."""
        import ray

        error: Exception | None = None
        for _ in range(self.options.attempts):
            i = min(range(len(load)), key=load.__getitem__)
            load[i] += 1
            try:
                decoded = self._decode.remote(paths, self.transform, self.max_pixels, self.options.limits)
                return (*await self.actors[i].embed.remote(decoded), True)
            except ray.exceptions.RayError as e:
                error = e
                log.warning("a batch of %d files failed on the cluster, sending it again: %s",
                            len(paths), str(e).splitlines()[0])
            finally:
                load[i] -= 1
        reason = f"failed on the Ray cluster: {str(error).splitlines()[0]}"
        return [], [(p, reason) for p in paths], None, False

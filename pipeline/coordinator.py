"""The asyncio coordinator: walker (or a folder watcher's feed) -> decode pool -> CLIP stage -> index
appender, joined by bounded queues so memory stays flat however large the folder, and every stage runs
while the others wait."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Iterator
from itertools import islice

from nanodb.pipeline.append import IndexAppender
from nanodb.pipeline.decode import REMOTE_VIDEO, DecodeFailure, HeldBytes, ImageDecodePool, stored_image
from nanodb.pipeline.embed import ClipStage
from nanodb.pipeline.report import ScanReport
from nanodb.pipeline.sink import EmbeddingModel, IndexSink
from nanodb.pipeline.sources import SourceLister, is_source, shard_pattern
from nanodb.pipeline.walk import DirectoryWalker, FoundFile

from nanodb.media.opener import FileBytes, ImageRejected
from nanodb.media.paths import absolute_path, is_image_name, is_indexed_name, printable
from nanodb.media.remote import TarBroken, is_tar_name, member_path, open_tar, split_member, tar_members

log = logging.getLogger(__name__)


class ScanPipeline:
    """Runs one scan of `roots` into `sink`, or, given a `feed`, indexes the FoundFiles put on it until
    it yields None (a folder watcher keeps one running for as long as it watches).

    A rescan drops the items of files gone from its folders. Stages wait while `running` is clear
    (pause); in-flight work finishes first.
    """

    def __init__(self, sink: IndexSink, model: EmbeddingModel | Callable[[], EmbeddingModel], roots,
                 decode_pool: ImageDecodePool, batch_size: int, *, excludes=None,
                 autosave_every: int | None = None, report: ScanReport | None = None,
                 feed: asyncio.Queue | None = None, running: asyncio.Event | None = None, remote=None,
                 follow_symlinks: bool = False, retry_failed: bool = False, index_paired_raw: bool = False,
                 model_name: str = ""):
        """`model`: the model, or a function that returns it, called only once an image needs embedding
        (the decode pool, likewise, starts its workers on the first file to decode). `remote`: a stage
        that decodes and embeds elsewhere (a Ray cluster) instead of the pool and the CLIP stage.
        `retry_failed`: decode again the files that failed before, changed or not. `index_paired_raw`:
        index a camera RAW file beside its JPEG too (by default the pair is one item, the JPEG). `model_name`:
        the model's, in the status line while it loads."""
        kwargs = {"excludes": tuple(excludes)} if excludes is not None else {}
        roots = [os.fspath(r) for r in roots]
        # URL prefixes and tar shards (pipeline.sources) beside the local folders (the walker's)
        self.sources = SourceLister([r for r in roots if is_source(r)], **kwargs,
                                    indexed=lambda tar: tar in self.indexed_members())
        self.walker = DirectoryWalker([r for r in roots if not is_source(r)], skip_dirs=(str(sink.path),),
                                      follow_symlinks=follow_symlinks, index_paired_raw=index_paired_raw,
                                      **kwargs)
        self.retry_failed = retry_failed
        self.sink = sink
        self.pool = decode_pool
        self.feed = feed
        self.report = report or ScanReport()
        if running is None:
            running = asyncio.Event()
            running.set()
        self.running = running
        get_model = (lambda: model) if hasattr(model, "encode_pixels") else model
        self.clip = ClipStage(get_model, batch_size, self.report, running, is_known=sink.has_content)
        self.model_name = model_name
        self._starting = asyncio.Lock()
        self.appender = IndexAppender(sink, self.report, autosave_every)
        # A stage that decodes and embeds elsewhere (pipeline.ray_ingest.RayEmbedStage) instead of the
        # local decode pool and CLIP stage: `run(found, embedded, report, running, remember_failure)`.
        self.remote = remote
        self.queue_size = max(64, 4 * batch_size)
        self._indexed_members: dict[str, list[str]] | None = None  # tar -> its indexed members' paths

    async def run(self) -> ScanReport:
        found: asyncio.Queue = asyncio.Queue(self.queue_size)
        decoded: asyncio.Queue = asyncio.Queue(self.queue_size)
        embedded: asyncio.Queue = asyncio.Queue(4)
        self.report.queues.update(found=found, decoded=decoded, embedded=embedded)
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._walk(found) if self.feed is None else self._follow(self.feed, found))
                if self.remote is not None:
                    tg.create_task(self.remote.run(found, embedded, self.report, self.running,
                                                   self.sink.remember_failure))
                else:
                    tg.create_task(self._decode(found, decoded))
                    tg.create_task(self.clip.run(decoded, embedded))
                tg.create_task(self.appender.run(embedded))
        except ExceptionGroup as group:  # the first failure as itself (it cancelled the other stages)
            raise group.exceptions[0] from None
        finally:
            self.report.finished = time.monotonic()
            self.report.log_unlogged()
        self.report.dropped += self._drop_missing_members()
        return self.report

    async def _follow(self, feed: asyncio.Queue, outbox: asyncio.Queue) -> None:
        """The watch mode's first stage: files a watcher saw change, instead of a walk."""
        while (f := await feed.get()) is not None:
            await self._offer([f], outbox)
            self.report.changed()
        await outbox.put(None)

    async def _offer(self, files: list[FoundFile], outbox: asyncio.Queue) -> None:
        """Count found files and pass them on, except those indexed with the same size and mtime, or that
        failed with them before (a broken file would load the model at every rescan). The sink is asked
        once for the whole chunk. A tar shard is unchanged when its indexed members are (they keep the
        tar's size and mtime): skipped whole; else its members are the files found, counted as it is read."""
        first = {f.path: members[0] for f in files
                 if is_tar_name(f.path) and (members := self.indexed_members().get(f.path))}
        stats = [(f.path, f.size, f.mtime) for f in files]
        unchanged = self.sink.unchanged_files([(first.get(p, p), size, mtime) for p, size, mtime in stats])
        failed = set() if self.retry_failed else self.sink.failed_before(
            s for s in stats if first.get(s[0], s[0]) not in unchanged)
        for f in files:
            if f.path in first and first[f.path] in unchanged:
                members = self.indexed_members()[f.path]
                for path in members:
                    self.report.count_found(path)
                self.report.unchanged += len(members)
            elif is_tar_name(f.path) and f.path not in failed:
                await outbox.put(f)
            elif f.path in failed:
                self.report.count_found(f.path)
                self.report.failed_before += 1
            elif f.path in unchanged:
                self.report.count_found(f.path)
                self.report.unchanged += 1
            else:
                self.report.count_found(f.path)
                await outbox.put(f)

    def indexed_members(self) -> dict[str, list[str]]:
        """tar shard -> the paths of its indexed members (read from the sink once a scan)."""
        if self._indexed_members is None:
            self._indexed_members = {}
            for p in self.sink.indexed_paths():
                if (split := split_member(p)) is not None:
                    self._indexed_members.setdefault(split[0], []).append(p)
        return self._indexed_members

    def _take_walk_problems(self, problems: list[str]) -> None:
        for walker in (self.walker, self.sources):
            for problem in walker.problems:
                # found, and skipped: the summary's counts add up to the files found
                self.report.count_found(problem.path)
                self.report.failures.append((problem.path, problem.reason))
                problems.append(problem.path)
            walker.problems.clear()
        self.report.raw_left_out = self.walker.raw_left_out
        self.report.tars_left_out = self.walker.tars_left_out
        if self.walker.tar_ends:
            self.report.tar_shards = shard_pattern(self.walker.tar_ends[0], self.walker.tar_ends[-1])

    def _vanished_roots(self) -> list[str]:
        """Scanned folders (or files) that were deleted and have indexed items: the rescan drops
        their items, without an error. Deleted means gone from a folder that is still there; a folder
        whose parent is gone too (an unplugged disk) loses nothing."""
        roots = [absolute_path(r) for r in self.walker.roots]
        missing = [r for r in roots if not os.path.lexists(r) and os.path.isdir(os.path.dirname(r))]
        if not missing:
            return []
        indexed = self.sink.indexed_paths()
        return [r for r in missing if any(p == r or p.startswith(r + os.sep) for p in indexed)]

    async def _walk(self, outbox: asyncio.Queue) -> None:
        vanished = self._vanished_roots()
        self.walker.roots = [r for r in self.walker.roots if absolute_path(r) not in vanished]
        if vanished:
            self.report.dropped += self.sink.forget(vanished)
            log.info("%s gone: its items are dropped", ", ".join(map(printable, vanished)))
        seen: set[str] = set()
        problems: list[str] = []
        await self._offer_all(iter(self.walker), outbox, seen, problems)
        self.report.dropped += self._drop_missing(seen, problems)
        if self.sources.args:
            await self._offer_all(iter(self.sources), outbox, seen, problems)
            self.report.dropped += self._drop_missing_objects(seen)
        self.report.walking = False
        self.report.changed()
        await outbox.put(None)

    async def _offer_all(self, found: Iterator[FoundFile], outbox: asyncio.Queue, seen: set[str],
                         problems: list[str]) -> None:
        """Offer what a walk or a listing finds, in chunks of 256 read off the event loop; the paths go
        into `seen`, those it could not read into `problems`."""
        while chunk := await asyncio.to_thread(lambda: list(islice(found, 256))):
            self._take_walk_problems(problems)
            seen.update(f.path for f in chunk)
            await self._offer(chunk, outbox)
            self.report.changed()
        self._take_walk_problems(problems)

    def _drop_missing(self, seen: set[str], problems: list[str]) -> int:
        """Forget indexed files under the scanned folders that the walk did not find and that no longer
        exist, except below a folder it could not read (an unmounted disk loses nothing)."""
        folders = [absolute_path(r) for r in self.walker.roots]
        folders = [r + os.sep for r in folders if os.path.isdir(r)]
        blind = tuple(p.rstrip(os.sep) + os.sep for p in problems) + tuple(problems)
        gone = [
            p for p in self.sink.indexed_paths()
            if p.startswith(tuple(folders)) and p not in seen and not p.startswith(blind)
            and split_member(p) is None and not os.path.lexists(p)
        ]
        return self.sink.forget(gone) if gone else 0

    def _drop_missing_objects(self, seen: set[str]) -> int:
        """Forget the indexed objects under the URL prefixes listed that the listing did not find, and the
        members of named tar shards that no longer exist."""
        prefixes = tuple(p + "/" for p in self.sources.prefixes)
        whole = set(self.sources.prefixes)
        gone = [p for p in self.sink.indexed_paths()
                if (p in whole or p.startswith(prefixes)) and p not in seen and split_member(p) is None]
        for tar in self.sources.gone_tars:
            gone.extend(self.indexed_members().get(tar, []))
            log.info("%s removed: its items are dropped", printable(tar))
        self.report.tars_removed += len(self.sources.gone_tars)
        return self.sink.forget(gone) if gone else 0

    def _drop_missing_members(self) -> int:
        """Forget the indexed members of the tar shards read by this scan that are no longer in them
        (a shard rewritten); a shard damaged partway (a failure of its own) loses nothing."""
        broken = {path for path, _ in self.report.failures}
        gone = [p for tar, found in self.report.tar_members.items() if tar not in broken
                for p in self.indexed_members().get(tar, []) if p not in found]
        return self.sink.forget(gone) if gone else 0

    async def _decode(self, inbox: asyncio.Queue, outbox: asyncio.Queue) -> None:
        slots = asyncio.Semaphore(self.pool.workers * 4)
        tasks: set[asyncio.Task] = set()

        async def decode_one(f: FoundFile) -> None:
            try:
                # until the workers run (they need the model), a file whose bytes are stored is not decoded:
                # a rescan that finds a file renamed or copied loads no model
                known = None if self.pool.started else await asyncio.to_thread(
                    stored_image, f.path, self.sink.metadata_of_content)
                if known is not None:
                    await outbox.put(known)
                    return
                decoded = await self._decode_file(f.path)
                if isinstance(decoded, DecodeFailure):  # with the size and mtime it was found with
                    self.sink.remember_failure(f.path, f.size, f.mtime, decoded.reason)
                    await outbox.put(decoded)
                else:  # an image's one item, or a video's frames
                    for item in decoded:
                        await outbox.put(item)
            finally:  # only once passed on: a slot bounds the decoded images held, not just those decoding
                slots.release()

        def start(task: asyncio.Task) -> None:
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        try:
            while (f := await inbox.get()) is not None:
                await self.running.wait()
                if is_tar_name(f.path):
                    await self._read_tar(f, slots, start, outbox)
                    continue
                await slots.acquire()
                start(asyncio.create_task(decode_one(f)))
            await asyncio.gather(*tasks)
        finally:  # a cancelled scan (Ctrl-C, `cancel`) leaves no decode running on behind it
            for task in tasks:
                task.cancel()
        await outbox.put(None)

    async def _decode_file(self, path: str, file: FileBytes | None = None, metadata: dict | None = None):
        """pool.decode, the model and the workers started first, the status saying which it waits for."""
        if not self.pool.started:
            async with self._starting:
                if not self.pool.started:
                    with self.report.waiting_for(f"loading the model {self.model_name}".rstrip()):
                        await asyncio.to_thread(self.clip.get_model)  # the workers need its pixel transform
                    with self.report.waiting_for("starting the decode workers"):
                        await asyncio.to_thread(self.pool.start)
        return await self.pool.decode(path, file, metadata)

    async def _read_tar(self, tar: FoundFile, slots: asyncio.Semaphore, start, outbox: asyncio.Queue) -> None:
        """A tar shard read in one pass here, its image members' bytes handed to the decode pool one by
        one (bounded by `slots`, as files are) with their sample's caption and JSON."""
        async def fail(path: str, size: int, mtime: float, reason: str) -> None:
            self.sink.remember_failure(path, size, mtime, reason)
            await outbox.put(DecodeFailure(path, reason))

        async def decode_member(path: str, file: FileBytes, metadata: dict) -> None:
            try:
                decoded = await self._decode_file(path, file, metadata)
                for item in [decoded] if isinstance(decoded, DecodeFailure) else decoded:
                    if isinstance(item, DecodeFailure):
                        self.sink.remember_failure(item.path, file.size, file.mtime, item.reason)
                    await outbox.put(item)
            finally:
                held.give(len(file.data))
                slots.release()

        held = HeldBytes(2 * self.pool.max_member_bytes)  # members read and not decoded yet: bounded in bytes too
        try:
            f, size, mtime = await asyncio.to_thread(open_tar, tar.path)
        except ImageRejected as e:
            self.report.count_found(tar.path)
            await fail(tar.path, tar.size, tar.mtime, str(e))
            return
        members = tar_members(tar.path, f, is_indexed_name, self.pool.max_member_bytes)
        try:
            self.report.tar_members.setdefault(tar.path, set())
            while (m := await asyncio.to_thread(next, members, None)) is not None:
                path = member_path(tar.path, m.name)
                self.report.count_member(tar.path, path)
                if not self.retry_failed and self.sink.failed_before([(path, size, mtime)]):
                    self.report.failed_before += 1
                elif m.data is None or not is_image_name(m.name):
                    await fail(path, size, mtime, m.reason or REMOTE_VIDEO)
                else:
                    await self.running.wait()
                    await held.take(len(m.data))
                    await slots.acquire()
                    start(asyncio.create_task(decode_member(path, FileBytes(m.data, size, mtime), m.metadata)))
                self.report.changed()
        except TarBroken as e:
            self.report.count_found(tar.path)
            await fail(tar.path, size, mtime, str(e))
        finally:
            await asyncio.to_thread(f.close)

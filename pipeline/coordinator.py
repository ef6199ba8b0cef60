"""The asyncio coordinator: walker (or a folder watcher's feed) -> decode pool -> CLIP stage -> index
appender, joined by bounded queues so memory stays flat however large the folder, and every stage runs
while the others wait."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import islice

from nanodb.pipeline.append import IndexAppender
from nanodb.pipeline.decode import ImageDecodePool
from nanodb.pipeline.embed import ClipStage
from nanodb.pipeline.sink import EmbeddingModel, IndexSink
from nanodb.pipeline.walk import DirectoryWalker, FoundFile

from nanodb.media.paths import absolute_path, printable

log = logging.getLogger(__name__)


@dataclass
class ScanReport:
    """Live counters of a scan (read by progress displays while it runs) and its final summary."""

    found: int = 0  # image files found by the walker so far
    unchanged: int = 0  # already indexed with the same size and mtime: not decoded again
    added: int = 0
    updated: int = 0  # changed files, re-embedded
    dropped: int = 0  # indexed files gone from a rescanned folder
    embedded: int = 0  # images run through the model (a file identical to an indexed one is not)
    failures: list[tuple[str, str]] = field(default_factory=list)
    walking: bool = True
    started: float = field(default_factory=time.monotonic)  # the scan's wall time counts from here
    finished: float | None = None
    on_change: Callable[[ScanReport], None] | None = field(default=None, repr=False)
    queues: dict[str, asyncio.Queue] = field(default_factory=dict, repr=False)  # for the status line

    @property
    def failed(self) -> int:
        return len(self.failures)

    @property
    def done(self) -> int:
        return self.unchanged + self.added + self.updated + self.failed

    @property
    def seconds(self) -> float:
        return (self.finished or time.monotonic()) - self.started

    def fail(self, path: str, reason: str) -> None:
        log.warning("skipped %s: %s", printable(path), reason)
        self.failures.append((path, reason))
        self.changed()

    def changed(self) -> None:
        if self.on_change:
            self.on_change(self)

    @property
    def rate(self) -> float:
        """Images embedded per second of the scan's wall time."""
        return self.embedded / self.seconds if self.seconds > 0 else 0.0

    def status(self) -> str:
        """One line for a live display: files done/total, images/s, errors, ETA, queue depths."""
        total = f"{self.found}{'+' if self.walking else ''}"
        left = self.found - self.done
        eta = f", ETA {_duration(left / self.rate)}" if left > 0 and self.rate > 0 else ""
        queues = " ".join(f"{name} {q.qsize()}" for name, q in self.queues.items())
        return (
            f"{self.done}/{total} files, {self.rate:.1f} images/s, {self.failed} errors{eta}"
            + (f", queued: {queues}" if queues and self.finished is None else "")
        )

    def summary(self) -> str:
        """One line: files found, wall time since the scan started, what happened to them, and the rate
        of images embedded (only when some were)."""
        dropped = f", {self.dropped} gone" if self.dropped else ""
        rate = f" ({_count(self.embedded, 'image')} embedded, {self.rate:.1f}/s)" if self.embedded else ""
        return (
            f"scanned {_count(self.found, 'image')} in {self.seconds:.1f}s: {self.added} added, "
            f"{self.updated} updated, {self.unchanged} unchanged{dropped}, {self.failed} skipped{rate}"
        )


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


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
                 follow_symlinks: bool = False):
        """`model`: the model, or a function that returns it, called only once an image needs embedding
        (the decode pool, likewise, starts its workers on the first file to decode). `remote`: a stage
        that decodes and embeds elsewhere (a Ray cluster) instead of the pool and the CLIP stage."""
        kwargs = {"excludes": tuple(excludes)} if excludes is not None else {}
        self.walker = DirectoryWalker([str(r) for r in roots], skip_dirs=(str(sink.path),),
                                      follow_symlinks=follow_symlinks, **kwargs)
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
        self.appender = IndexAppender(sink, self.report, autosave_every)
        # A stage that decodes and embeds elsewhere (pipeline.ray_ingest.RayEmbedStage) instead of the
        # local decode pool and CLIP stage: `run(found, embedded, report, running)`.
        self.remote = remote
        self.queue_size = max(64, 4 * batch_size)

    async def run(self) -> ScanReport:
        found: asyncio.Queue = asyncio.Queue(self.queue_size)
        decoded: asyncio.Queue = asyncio.Queue(self.queue_size)
        embedded: asyncio.Queue = asyncio.Queue(4)
        self.report.queues.update(found=found, decoded=decoded, embedded=embedded)
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._walk(found) if self.feed is None else self._follow(self.feed, found))
                if self.remote is not None:
                    tg.create_task(self.remote.run(found, embedded, self.report, self.running))
                else:
                    tg.create_task(self._decode(found, decoded))
                    tg.create_task(self.clip.run(decoded, embedded))
                tg.create_task(self.appender.run(embedded))
        except ExceptionGroup as group:  # the first failure as itself (it cancelled the other stages)
            raise group.exceptions[0] from None
        finally:
            self.report.finished = time.monotonic()
        return self.report

    async def _follow(self, feed: asyncio.Queue, outbox: asyncio.Queue) -> None:
        """The watch mode's first stage: files a watcher saw change, instead of a walk."""
        while (f := await feed.get()) is not None:
            await self._offer(f, outbox)
            self.report.changed()
        await outbox.put(None)

    async def _offer(self, f: FoundFile, outbox: asyncio.Queue) -> None:
        """Count a found file and pass it on, unless it is indexed with the same size and mtime."""
        self.report.found += 1
        if self.sink.is_unchanged(f.path, f.size, f.mtime):
            self.report.unchanged += 1
        else:
            await outbox.put(f)

    def _take_walk_problems(self, problems: list[str]) -> None:
        for problem in self.walker.problems:
            self.report.failures.append((problem.path, problem.reason))
            problems.append(problem.path)
        self.walker.problems.clear()

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
        files = iter(self.walker)
        seen: set[str] = set()
        problems: list[str] = []
        while chunk := await asyncio.to_thread(lambda: list(islice(files, 256))):
            self._take_walk_problems(problems)
            for f in chunk:
                seen.add(f.path)
                await self._offer(f, outbox)
            self.report.changed()
        self._take_walk_problems(problems)
        self.report.dropped += self._drop_missing(seen, problems)
        self.report.walking = False
        self.report.changed()
        await outbox.put(None)

    def _drop_missing(self, seen: set[str], problems: list[str]) -> int:
        """Forget indexed files under the scanned folders that the walk did not find and that no longer
        exist, except below a folder it could not read (an unmounted disk loses nothing)."""
        folders = [absolute_path(r) for r in self.walker.roots]
        folders = [r + os.sep for r in folders if os.path.isdir(r)]
        blind = tuple(p.rstrip(os.sep) + os.sep for p in problems) + tuple(problems)
        gone = [
            p for p in self.sink.indexed_paths()
            if p.startswith(tuple(folders)) and p not in seen and not p.startswith(blind)
            and not os.path.lexists(p)
        ]
        return self.sink.forget(gone) if gone else 0

    async def _decode(self, inbox: asyncio.Queue, outbox: asyncio.Queue) -> None:
        slots = asyncio.Semaphore(self.pool.workers * 4)
        tasks: set[asyncio.Task] = set()

        async def decode_one(f: FoundFile) -> None:
            try:
                await outbox.put(await self.pool.decode(f.path))
            finally:  # only once passed on: a slot bounds the decoded images held, not just those decoding
                slots.release()

        while (f := await inbox.get()) is not None:
            await self.running.wait()
            await slots.acquire()
            task = asyncio.create_task(decode_one(f))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.gather(*tasks)
        await outbox.put(None)


def progress_bar(report: ScanReport):
    """A tqdm bar that follows a scan's counters (the caller closes it)."""
    from tqdm import tqdm

    bar = tqdm(total=0, unit="img", desc="scanning", dynamic_ncols=True, disable=None)

    def show(r: ScanReport) -> None:
        bar.total = r.found
        bar.n = r.done
        bar.set_postfix(added=r.added, skipped=r.failed, refresh=False)
        bar.refresh()

    report.on_change = show
    return bar

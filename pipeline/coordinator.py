"""The asyncio coordinator: walker -> decode pool -> CLIP stage -> index appender, joined by bounded
queues so memory stays flat however large the folder, and every stage runs while the others wait."""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from itertools import islice
from typing import Callable

from pipeline.append import IndexAppender
from pipeline.decode import DecodeFailure, ImageDecodePool, decode_file
from pipeline.embed import ClipStage
from pipeline.walk import DirectoryWalker, FoundFile, printable

log = logging.getLogger(__name__)


@dataclass
class ScanReport:
    """Live counters of a scan (read by progress displays while it runs) and its final summary."""

    found: int = 0  # image files found by the walker so far
    unchanged: int = 0  # already indexed with the same size and mtime: not decoded again
    added: int = 0
    updated: int = 0  # changed files, re-embedded
    failures: list[tuple[str, str]] = field(default_factory=list)
    walking: bool = True
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None
    on_change: Callable[["ScanReport"], None] | None = field(default=None, repr=False)

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

    def summary(self) -> str:
        rate = (self.added + self.updated) / self.seconds if self.seconds > 0 else 0.0
        return (
            f"scanned {self.found} images in {self.seconds:.1f}s: {self.added} added, {self.updated} updated, "
            f"{self.unchanged} unchanged, {self.failed} skipped ({rate:.1f} images/s)"
        )


class ScanPipeline:
    """Runs one scan of `roots` into `db`."""

    def __init__(self, db, roots, decode_pool: ImageDecodePool, batch_size: int, *,
                 excludes=None, autosave_every: int | None = None, report: ScanReport | None = None):
        kwargs = {"excludes": tuple(excludes)} if excludes is not None else {}
        self.walker = DirectoryWalker([str(r) for r in roots], skip_dirs=(str(db.path),), **kwargs)
        self.db = db
        self.pool = decode_pool
        self.report = report or ScanReport()
        self.clip = ClipStage(db.model, batch_size, self.report)
        self.appender = IndexAppender(db, self.report, autosave_every)
        self.queue_size = max(64, 4 * batch_size)

    async def run(self) -> ScanReport:
        found: asyncio.Queue = asyncio.Queue(self.queue_size)
        decoded: asyncio.Queue = asyncio.Queue(self.queue_size)
        embedded: asyncio.Queue = asyncio.Queue(4)
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._walk(found))
                tg.create_task(self._decode(found, decoded))
                tg.create_task(self.clip.run(decoded, embedded))
                tg.create_task(self.appender.run(embedded))
        finally:
            self.report.finished = time.monotonic()
        return self.report

    async def _walk(self, outbox: asyncio.Queue) -> None:
        files = iter(self.walker)
        while chunk := await asyncio.to_thread(lambda: list(islice(files, 256))):
            for problem in self.walker.problems:
                self.report.failures.append((problem.path, problem.reason))
            self.walker.problems.clear()
            for f in chunk:
                self.report.found += 1
                if self.db._is_unchanged(f):
                    self.report.unchanged += 1
                else:
                    await outbox.put(f)
            self.report.changed()
        for problem in self.walker.problems:
            self.report.failures.append((problem.path, problem.reason))
        self.report.walking = False
        self.report.changed()
        await outbox.put(None)

    async def _decode(self, inbox: asyncio.Queue, outbox: asyncio.Queue) -> None:
        loop = asyncio.get_running_loop()
        slots = asyncio.Semaphore(self.pool.workers * 4)
        tasks: set[asyncio.Task] = set()

        async def decode_one(f: FoundFile) -> None:
            try:
                result = await loop.run_in_executor(self.pool.executor, decode_file, f.path)
            except BrokenProcessPool:
                self.pool.restart()
                result = DecodeFailure(f.path, "the decoder process crashed on this file")
            finally:
                slots.release()
            await outbox.put(result)

        while (f := await inbox.get()) is not None:
            await slots.acquire()
            task = asyncio.create_task(decode_one(f))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.gather(*tasks)
        await outbox.put(None)

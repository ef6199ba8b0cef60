"""Background ingestion for the CLI and the console: scans and folder watches run as asyncio tasks
beside the prompt, with a periodic autosave, pause/resume, and a one-line status."""

from __future__ import annotations

import asyncio
import logging
import os
import time

from nanodb.database import NanoDB
from nanodb.pipeline.report import ScanReport
from nanodb.pipeline.sources import is_source
from nanodb.pipeline.watch import FolderWatcher

log = logging.getLogger(__name__)


class IngestService:
    """Owns the ingestion tasks of one database. Queries go straight to `db` meanwhile: they see
    whatever is indexed so far."""

    def __init__(self, db: NanoDB, excludes: list[str] | None = None, retry_failed: bool = False):
        """`retry_failed`: scans decode again the files that failed before, changed or not."""
        self.db = db
        self.excludes = excludes
        self.retry_failed = retry_failed
        self.running = asyncio.Event()  # cleared while paused
        self.running.set()
        self.scans: list[tuple[str, ScanReport, asyncio.Task]] = []
        self.watcher: FolderWatcher | None = None
        self.watch_report: ScanReport | None = None
        self._tasks: set[asyncio.Task] = set()
        self._last_save = time.monotonic()
        self._autosaver = asyncio.get_running_loop().create_task(self._autosave())

    def _keep(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ------------------------------------------------------------------ starting work
    def scan(self, path: str, on_done=None) -> asyncio.Task:
        """Scan a folder or file in the background; `on_done(report)` is called when it ends."""
        if not is_source(path) and not os.path.exists(os.path.expanduser(path)) and not self.db.indexed_under(path):
            raise ValueError(f"no such file or folder: {path}")  # a folder gone since its scan is rescanned
        report = ScanReport()
        task = self._keep(self._scan(path, report, on_done))
        self.scans.append((path, report, task))
        return task

    async def _scan(self, path: str, report: ScanReport, on_done) -> ScanReport:
        try:
            await self.db.scan_async(path, excludes=self.excludes, report=report, running=self.running,
                                     retry_failed=self.retry_failed)
        except Exception as e:  # e.g. a failed autosave: report it, the console and other tasks go on
            log.error("scan of %s stopped: %s", path, e)
            raise
        if on_done:
            on_done(report)
        return report

    def watch(self, folders: list[str], on_ready=None) -> asyncio.Task:
        """Scan `folders`, then index what changes in them until stopped."""
        if self.watcher is not None:
            raise ValueError("already watching; give every --watch folder at start")
        feed: asyncio.Queue = asyncio.Queue(256)
        self.watcher = self.db.watcher(folders, feed, excludes=self.excludes)
        self.watcher.start()  # before the first scan, so changes during it are not missed
        return self._keep(self._watch(folders, feed, on_ready))

    async def _watch(self, folders: list[str], feed: asyncio.Queue, on_ready) -> None:
        try:
            for folder in folders:
                await self.scan(folder, on_ready)
            self.watch_report = ScanReport(walking=False)
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self.db.scan_async(excludes=self.excludes, report=self.watch_report, feed=feed,
                                                  running=self.running))
                tg.create_task(self.watcher.run())
        except Exception as e:  # logged, not raised: queries and the other tasks go on
            log.error("watching %s stopped: %s", ", ".join(folders), e)
        finally:
            self.watcher.stop()

    async def _autosave(self) -> None:
        """Save at least every `autosave_seconds` while changes are pending (with autosave on)."""
        while True:
            await asyncio.sleep(1.0)
            if not self.db.autosave:
                continue
            if self.db.unsaved and time.monotonic() - self._last_save >= self.db.settings.autosave_seconds:
                try:
                    await asyncio.to_thread(self.db.save)
                except Exception as e:  # e.g. a full disk: report and try again later, keep running
                    log.error("autosave failed: %s", e)
                self._last_save = time.monotonic()

    # ------------------------------------------------------------------ control
    def pause(self) -> None:
        self.running.clear()

    def resume(self) -> None:
        self.running.set()

    async def cancel_scans(self) -> list[tuple[str, ScanReport]]:
        """Stop the running scans (a watch whose first scan this stops ends too): in-flight batches are
        dropped, what was appended stays (saved by the next save). Returns the scans stopped."""
        running = [(path, report, task) for path, report, task in self.scans if not task.done()]
        for _, _, task in running:
            task.cancel()
        await asyncio.gather(*(task for _, _, task in running), return_exceptions=True)
        return [(path, report) for path, report, _ in running]

    @property
    def scanning(self) -> bool:
        """Whether a scan runs now (a watch's first scans included; not the watch itself)."""
        return any(not task.done() for _, _, task in self.scans)

    async def wait_scans(self) -> None:
        await asyncio.gather(*(task for _, _, task in self.scans), return_exceptions=True)

    async def wait(self) -> None:
        """Until every scan and watch ends (a watch ends only when cancelled)."""
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def stop(self) -> None:
        """Cancel everything: in-flight batches are dropped, what was appended stays (save after)."""
        tasks = [*self._tasks, self._autosaver]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.watcher is not None:
            self.watcher.stop()

    # ------------------------------------------------------------------ status
    def status(self, width: int | None = None) -> str:
        """One line: what runs, files done/total, images/s, errors, ETA, queue depths. Given a `width`
        it is too long for, the queue depths go first, then the middle of the scans' paths, so that the
        counts, the ETA and the items stay readable."""
        line = self._status(queues=True, path_width=None)
        if width is None or len(line) <= width:
            return line
        line = self._status(queues=False, path_width=None)
        longest = max((len(path) for path, _, task in self.scans if not task.done()), default=0)
        for path_width in range(longest - 1, 15, -1):  # the longest paths first, to 16 characters at least
            if len(line) <= width:
                break
            line = self._status(queues=False, path_width=path_width)
        return line

    def _status(self, queues: bool, path_width: int | None) -> str:
        parts = []
        waiting = any(report.waiting for _, report, task in self.scans if not task.done())
        if (loading := self.db.model_loading_for) is not None and not waiting:  # a first query waits for it
            parts.append(f"loading the model {self.db.spec.name} ({loading:.0f}s)")  # (a scan's line says so)
        for path, report, task in self.scans:
            if not task.done():
                parts.append(f"scan {_elided(path, path_width)}: {report.status(queues)}")
        if self.watcher is not None:
            w = self.watch_report
            done = f", {w.added + w.updated} embedded, {w.failed} errors" if w else ", first scan"
            parts.append(f"watching {len(self.watcher.roots)} folder(s): {len(self.watcher.pending)} settling, "
                         f"{self.watcher.changes} changes{done}")
        if not self.running.is_set():
            parts.append("PAUSED")
        parts.append(f"{len(self.db)} items, {self.db.unsaved} unsaved")
        return " | ".join(parts)


def _elided(text: str, width: int | None) -> str:
    """`text` cut to `width` characters in the middle (a path's start and its last folders both say
    which it is)."""
    if width is None or len(text) <= width:
        return text
    tail = (width - 1) // 2
    return text[: width - 1 - tail] + "…" + text[len(text) - tail:]

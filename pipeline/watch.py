"""Stage 1 of the watch mode, the folder watcher: turns watchdog events into database changes.

New and modified files are handed to the scan pipeline (through `feed`) once their size and mtime
have been stable for `settle_seconds`, so a file still being copied is indexed once, complete.
Deletions drop items; renames and moves, of files or folders, re-point items to their new path
without re-embedding. A move that arrives as a delete then a create (another filesystem, some sync
tools) is caught by content hash: a file whose exact bytes are known reuses the stored vector.

Events are applied on the event loop thread, the thread the pipeline's appender also runs on, so a
file deleted while it is being embedded is never left behind in the database.

Each change is logged at INFO, one line (`watch: indexing PATH`, `watch: removed PATH`, `watch: moved A
-> B`), for a program that shows what a watch does (the command line does, without a console).
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
import time
from dataclasses import dataclass

from nanodb.pipeline.sink import IndexSink
from nanodb.pipeline.walk import DirectoryWalker, FoundFile, has_rendering_beside
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from nanodb.media.opener import ImageRejected, read_image_file
from nanodb.media.paths import (
    DEFAULT_EXCLUDES,
    OUTSIDE_ROOTS,
    absolute_path,
    is_excluded,
    is_indexed_name,
    leads_inside,
    printable,
    resolved_roots,
)
from nanodb.media.record import FileRecord, content_hash
from nanodb.media.video import is_video_name

log = logging.getLogger(__name__)

TICK_S = 0.2  # how often pending files are checked for having settled


@dataclass
class _Pending:
    signature: tuple[int, int] | None  # (size, mtime_ns) when last looked at
    since: float  # when that signature was first seen


class _Forward(FileSystemEventHandler):
    """Runs in watchdog's thread: passes every event to the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, events: asyncio.Queue):
        self.loop = loop
        self.events = events

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type not in ("opened", "closed_no_write"):
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class FolderWatcher:
    """Keeps `sink` in step with `roots` (folders) while running; see the module docstring."""

    def __init__(self, sink: IndexSink, roots, feed: asyncio.Queue, *, settle_seconds: float, excludes=None,
                 follow_symlinks: bool = False, index_paired_raw: bool = False):
        """`follow_symlinks`: also index files reached through symlinks that lead outside `roots`.
        `index_paired_raw`: also index a camera RAW file that has a JPEG, HEIF or export beside it when
        it settles (by default the walk's rule: the pair is one item, the JPEG). Items already indexed stay:
        a JPEG that arrives after its RAW settled and was indexed (an export, later) is indexed too."""
        self.sink = sink
        self.index_paired_raw = index_paired_raw
        self.roots = [absolute_path(r) for r in roots]
        self.follow_symlinks = follow_symlinks
        self.feed = feed
        self.settle_seconds = settle_seconds
        self.excludes = tuple(DEFAULT_EXCLUDES if excludes is None else excludes)
        self.pending: dict[str, _Pending] = {}
        self.changes = 0  # events applied, for the status line
        self._events: asyncio.Queue = asyncio.Queue()
        self._observer = None
        self._walks: set[asyncio.Task] = set()  # folders moved in, being looked through

    def start(self) -> None:
        """Start receiving events (they queue up until run(), so none is lost during a first scan)."""
        for root in self.roots:
            if not os.path.isdir(root):
                raise ValueError(f"cannot watch {root}: not a folder")
        self._observer = Observer()
        handler = _Forward(asyncio.get_running_loop(), self._events)
        for root in self.roots:
            self._observer.schedule(handler, root, recursive=True)
        self._observer.start()

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join()
            self._observer = None

    async def run(self) -> None:
        """Apply events and hand settled files on, until cancelled."""
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._apply_events())
            tg.create_task(self._settle())

    # ------------------------------------------------------------------ which paths count
    def _watched(self, path: str) -> bool:
        """Inside a watched folder, not in the database folder, no excluded name on the way."""
        db_dir = str(self.sink.path) + os.sep
        if path.startswith(db_dir):
            return False
        for root in self.roots:
            if path.startswith(root + os.sep):
                return not is_excluded(path[len(root) + 1 :].split(os.sep), path, self.excludes)
        return False

    def _wanted_file(self, path: str) -> bool:
        return is_indexed_name(path) and self._watched(path)

    # ------------------------------------------------------------------ events
    async def _apply_events(self) -> None:
        while True:
            event = await self._events.get()
            try:
                await self._apply(event)
            except Exception as e:  # one odd event must not stop a watch that runs for days
                log.warning("could not apply %s on %s: %s", event.event_type, event.src_path, e)

    async def _apply(self, event: FileSystemEvent) -> None:
        src = os.fsdecode(event.src_path)
        kind = event.event_type
        if kind == "moved":
            dest = os.fsdecode(event.dest_path)
            if event.is_directory:
                self._move_folder(src, dest)
            else:
                self._move_file(src, dest)
        elif kind == "deleted":
            self.pending.pop(src, None)
            if event.is_directory:
                self._drop_pending_under(src)
            self._forget(src)
        elif event.is_directory:
            if kind == "created" and self._watched(src):
                await self._mark_folder(src)  # a folder moved in from outside arrives whole
        elif self._wanted_file(src):
            self._mark(src)
        elif kind == "created":
            self._note_folder_link(src)

    def _note_folder_link(self, path: str) -> None:
        """A symlink to a folder out of the watched folders (its event is a file's): not followed, one
        line, as a walk reports it (a link to a file gets its line once it settles)."""
        if not self.follow_symlinks and self._watched(path) and os.path.islink(path) and os.path.isdir(path) \
                and not leads_inside(path, resolved_roots(self.roots)):
            log.warning("skipped %s: %s", printable(path), OUTSIDE_ROOTS)

    def _forget(self, path: str) -> None:
        """Drop the items of a file, or of the files under a folder, gone from the watched folders."""
        if dropped := self.sink.forget([path]):
            self.changes += dropped
            log.info("watch: removed %s%s", printable(path), f" ({dropped} items)" if dropped > 1 else "")

    def _mark(self, path: str) -> None:
        self.pending.setdefault(path, _Pending(None, time.monotonic()))

    async def _mark_folder(self, folder: str) -> None:
        walker = DirectoryWalker([folder], excludes=self.excludes, skip_dirs=(str(self.sink.path),),
                                 follow_symlinks=self.follow_symlinks, bounds=tuple(self.roots),
                                 index_paired_raw=self.index_paired_raw)
        for found in await asyncio.to_thread(list, walker):
            self._mark(found.path)

    def _drop_pending_under(self, folder: str) -> None:
        for p in [p for p in self.pending if p.startswith(folder + os.sep)]:
            del self.pending[p]

    def _move_file(self, src: str, dest: str) -> None:
        self.pending.pop(src, None)
        if not self._wanted_file(dest):
            self._forget(src)  # moved out of the watched folders, or renamed away
            self._note_folder_link(dest)
        elif self.sink.move_paths([(src, dest)]):
            self.changes += 1
            log.info("watch: moved %s -> %s", printable(src), printable(dest))
        else:
            self._mark(dest)  # not indexed yet (or still in flight): index it under its new name

    def _move_folder(self, src: str, dest: str) -> None:
        self._drop_pending_under(src)
        if not self._watched(dest):
            self._forget(src)
            return
        if moved := self.sink.move_folder(src, dest):
            self.changes += moved
            log.info("watch: moved %s -> %s (%d items)", printable(src), printable(dest), moved)
        # Files of the folder that were not indexed yet: look at them under their new path.
        walk = asyncio.get_running_loop().create_task(self._mark_folder(dest))
        self._walks.add(walk)
        walk.add_done_callback(self._walks.discard)

    # ------------------------------------------------------------------ settling
    async def _settle(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            now = time.monotonic()
            ready = []
            for path, p in list(self.pending.items()):
                try:
                    st = os.stat(path)
                except OSError:
                    del self.pending[path]  # gone again; its delete event does the rest
                    continue
                signature = (st.st_size, st.st_mtime_ns)
                if signature != p.signature:
                    p.signature, p.since = signature, now
                elif now - p.since >= self.settle_seconds:
                    del self.pending[path]
                    if self._indexable(path, st):
                        ready.append(FoundFile(path, st.st_size, st.st_mtime))
            for found in ready:
                try:
                    await self._hand_on(found)
                except Exception as e:  # e.g. a database error: report it, keep watching
                    log.error("could not index %s: %s", found.path, e)

    def _indexable(self, path: str, st: os.stat_result) -> bool:
        """A settled file is read only if it is a regular file (a FIFO would block its reader) reached
        without a symlink out of the watched folders (unless those are followed), else one line; and not
        a camera RAW file beside its JPEG (unless pairs are indexed both), as the walk leaves it out."""
        if not stat.S_ISREG(st.st_mode):
            reason = "not a regular file"
        elif not self.follow_symlinks and not leads_inside(path, resolved_roots(self.roots)):
            reason = OUTSIDE_ROOTS
        elif not self.index_paired_raw and has_rendering_beside(path):
            log.info("left out %s: its camera's rendering beside it is indexed", printable(path))
            return False
        else:
            return True
        log.warning("skipped %s: %s", printable(path), reason)
        return False

    async def _hand_on(self, found: FoundFile) -> None:
        """Index a settled file: skip it if unchanged, reuse a known vector for known bytes, else embed."""
        if self.sink.unchanged_files([(found.path, found.size, found.mtime)]):
            return
        # a video is not read whole here (its items are its frames, whose hashes only its decode gives)
        digest = None if is_video_name(found.path) else await asyncio.to_thread(_hash_file, found.path)
        if digest is not None and os.path.exists(found.path):  # not deleted while hashing
            known = FileRecord(path=found.path, size=found.size, mtime=found.mtime, hash=digest)
            if self.sink.add_known_file(known) is not None:
                self.changes += 1
                log.info("watch: indexed %s (its content was indexed already)", printable(found.path))
                return
        self.changes += 1
        log.info("watch: indexing %s", printable(found.path))
        await self.feed.put(found)


def _hash_file(path: str) -> bytes | None:
    """The content hash decode workers store for these bytes, read as they read them; None if the
    opener refuses the file (unreadable, empty, too large, not a regular file)."""
    try:
        return content_hash(read_image_file(path).data)
    except ImageRejected:
        return None

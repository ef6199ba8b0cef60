"""A scan's report: the live counters that progress displays read while it runs, and its summary line."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from nanodb.media.paths import printable
from nanodb.media.record import FileRecord
from nanodb.media.remote import split_member
from nanodb.media.video import is_video_frame, is_video_name

log = logging.getLogger(__name__)

MEMBER_LINES = 10  # skipped members of one tar shard logged one by one; the others in one line at the scan's end


@dataclass
class ScanReport:
    """Live counters of a scan (read by progress displays while it runs) and its final summary."""

    found: int = 0  # files found by the walker so far (photos and videos), those it could not read too
    videos_found: int = 0  # of which videos
    unchanged: int = 0  # already indexed with the same size and mtime: not decoded again
    added: int = 0
    updated: int = 0  # changed files, re-embedded
    dropped: int = 0  # indexed files gone from a rescanned folder
    embedded: int = 0  # images run through the model, video frames included (an indexed file's copy is not)
    frames_embedded: int = 0  # of which video frames
    failed_before: int = 0  # failed to decode at an earlier scan and unchanged since: not tried again
    raw_left_out: int = 0  # camera RAW files beside their JPEG, HEIF or export: the pair is one item
    tars_left_out: int = 0  # tar files in the scanned folders: read only when named (`tar_shards`)
    tar_shards: str = ""  # a scan argument that names them
    tars_removed: int = 0  # named tar shards gone since they were indexed: their items are dropped
    int8_checked: int = 0  # int8 vectors also computed in floating point to check them (pipeline/fidelity.py)
    int8_min_cosine: float | None = None  # the lowest cosine those checks saw (None: no check)
    int8_reembedded: int = 0  # images re-embedded in floating point after a check fell short
    failures: list[tuple[str, str]] = field(default_factory=list)
    # the image members found in each tar shard read by this scan (its indexed members not among them are
    # dropped, unless the tar is among the failures: damaged partway)
    tar_members: dict[str, set[str]] = field(default_factory=dict, repr=False)
    walking: bool = True
    waiting: str | None = None  # what the scan waits for before its first decode (the model's load...)
    waiting_since: float = 0.0
    started: float = field(default_factory=time.monotonic)  # the scan's wall time counts from here
    finished: float | None = None
    on_change: Callable[[ScanReport], None] | None = field(default=None, repr=False)
    queues: dict[str, asyncio.Queue] = field(default_factory=dict, repr=False)  # for the status line
    _member_lines: dict[str, int] = field(default_factory=dict, repr=False)  # tar -> its failed members logged
    _unlogged: dict[str, Counter] = field(default_factory=dict, repr=False)  # tar -> reasons of those not logged

    @property
    def failed(self) -> int:
        return len(self.failures)

    @property
    def done(self) -> int:
        return self.unchanged + self.added + self.updated + self.failed + self.failed_before

    @property
    def seconds(self) -> float:
        return (self.finished or time.monotonic()) - self.started

    def fail(self, path: str, reason: str) -> None:
        """Count a skipped file, with one log line; past MEMBER_LINES members of one tar shard, the rest of
        its members are counted only, and logged in one line at the scan's end (log_unlogged)."""
        shard = split_member(path)
        if shard is not None and self._member_lines.get(shard[0], 0) >= MEMBER_LINES:
            self._unlogged.setdefault(shard[0], Counter())[reason] += 1
        else:
            if shard is not None:
                self._member_lines[shard[0]] = self._member_lines.get(shard[0], 0) + 1
            log.warning("skipped %s: %s", printable(path), reason)
        self.failures.append((path, reason))
        self.changed()

    def log_unlogged(self) -> None:
        """One line for each tar shard with members skipped past its first MEMBER_LINES: how many, and why."""
        for tar, reasons in self._unlogged.items():
            why = "; ".join(f"{n} {reason}" for reason, n in reasons.most_common(3))
            others = sum(reasons.values()) - sum(n for _, n in reasons.most_common(3))
            log.warning("skipped %d more members of %s, not logged one by one: %s%s", sum(reasons.values()),
                        printable(tar), why, f"; {others} for other reasons" if others else "")
        self._unlogged.clear()

    def count_found(self, path: str) -> None:
        """Count a file the walker found (or could not read)."""
        self.found += 1
        self.videos_found += is_video_name(path)

    def count_member(self, tar: str, path: str) -> None:
        """Count an image member `path` of tar shard `tar` found (it is one file of the summary)."""
        self.tar_members.setdefault(tar, set()).add(path)
        self.count_found(path)

    def count_embedded(self, records: Iterable[FileRecord]) -> None:
        """Count items run through the model: a photo's image or a video's frame each."""
        for record in records:
            self.embedded += 1
            self.frames_embedded += is_video_frame(record.path, record.metadata)

    def int8_check(self, images: int, cosine: float, reembedded: int) -> None:
        """Count a fidelity check of `images` int8 vectors whose lowest cosine was `cosine`."""
        self.int8_checked += images
        self.int8_min_cosine = cosine if self.int8_min_cosine is None else min(cosine, self.int8_min_cosine)
        self.int8_reembedded += reembedded

    def changed(self) -> None:
        if self.on_change:
            self.on_change(self)

    @contextlib.contextmanager
    def waiting_for(self, what: str) -> Iterator[None]:
        """While the block runs, the status says that the scan waits for `what`, and for how long."""
        self.waiting, self.waiting_since = what, time.monotonic()
        self.changed()
        try:
            yield
        finally:
            self.waiting = None
            self.changed()

    @property
    def waiting_line(self) -> str | None:
        """`WHAT (Ns)` while the scan waits for something, else None."""
        return None if self.waiting is None else f"{self.waiting} ({time.monotonic() - self.waiting_since:.0f}s)"

    @property
    def rate(self) -> float:
        """Images (video frames included) embedded per second of the scan's wall time."""
        return self.embedded / self.seconds if self.seconds > 0 else 0.0

    def status(self, queues: bool = True) -> str:
        """One line for a live display: files done/total, images/s, errors, ETA, queue depths. Until the
        walk ends the total is unknown (`650+`), so the ETA says it is counting rather than guess."""
        total = f"{self.found}{'+' if self.walking else ''}"
        left = self.found - self.done
        eta = (", ETA: counting files" if self.walking else
               f", ETA {_duration(left / self.rate)}" if left > 0 and self.rate > 0 else "")
        depths = " ".join(f"{name} {q.qsize()}" for name, q in self.queues.items())
        doing = self.waiting_line or f"{self.rate:.1f} images/s"
        return (
            f"{self.done}/{total} files, {doing}, {self.failed} errors{eta}"
            + (f", queued: {depths}" if queues and depths and self.finished is None else "")
        )

    def summary(self) -> str:
        """One line: files found (photos and videos apart when there are videos), wall time since the scan
        started, what happened to them (those counts add up to the files found), the images and video
        frames embedded and their rate (only when some were); then, after a
        semicolon, what is not among the files found (items of files gone, RAW files of a pair) and the
        int8 fidelity checks."""
        counts = [f"{self.added} added", f"{self.updated} updated", f"{self.unchanged} unchanged",
                  f"{self.failed} skipped"]
        if self.failed_before:
            counts.append(f"{self.failed_before} failed before (unchanged: not retried)")
        if self.found > self.done:  # a scan stopped before its end
            counts.append(f"{self.found - self.done} not done")
        images, frames = self.embedded - self.frames_embedded, self.frames_embedded
        embedded = " and ".join([_count(images, "image")] * bool(images or not frames)
                                + [_count(frames, "video frame")] * bool(frames))
        rate = f" ({embedded} embedded, {self.rate:.1f}/s)" if self.embedded else ""
        removed = f" ({_count(self.tars_removed, 'removed tar shard')})" if self.tars_removed else ""
        asides = [f"dropped {_count(self.dropped, 'gone file')}{removed}"] if self.dropped or removed else []
        if self.raw_left_out:
            asides.append(f"{_count(self.raw_left_out, 'RAW pair')}: JPEG/export only")
        if self.int8_checked:
            asides.append(f"int8 checked on {_count(self.int8_checked, 'image')}: lowest cosine "
                          f"{self.int8_min_cosine:.4f} to floating point"
                          + (f", {self.int8_reembedded} re-embedded in it" if self.int8_reembedded else ""))
        if self.tars_left_out:
            e_g = "e.g. " if self.tars_left_out > 1 and "{" not in self.tar_shards else ""
            asides.append(f"{_count(self.tars_left_out, 'tar file')} left out (a folder scan reads photos and "
                          f"videos; name webdataset shards to read them: {e_g}--scan '{self.tar_shards}')")
        found = (f"{_count(self.found - self.videos_found, 'photo')} and {_count(self.videos_found, 'video')}"
                 if self.videos_found else _count(self.found, "file"))
        return (f"scanned {found} in {self.seconds:.1f}s: {', '.join(counts)}{rate}"
                + "".join(f"; {aside}" for aside in asides))


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def progress_bar(report: ScanReport):
    """A tqdm bar that follows a scan's counters (the caller closes it)."""
    from tqdm import tqdm

    bar = tqdm(total=0, unit="img", desc="scanning", dynamic_ncols=True, disable=None)

    def show(r: ScanReport) -> None:
        bar.set_description(r.waiting or "scanning", refresh=False)
        bar.total = r.found
        bar.n = r.done
        bar.set_postfix(added=r.added, skipped=r.failed, refresh=False)
        bar.refresh()

    report.on_change = show
    return bar

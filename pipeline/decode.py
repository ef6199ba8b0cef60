"""Stage 2, the decode pool: worker processes read, hash, decode and resize images to model input.

Workers return uint8 pixels already resized and cropped by the model's own transforms (a quarter of
the bytes of normalised floats); the CLIP stage scales and normalises whole batches at once. A worker
that dies (a decoder crash) costs only the file that killed it: the files in flight with it are
retried one at a time in a separate process. Given `limits`, each worker limits itself (media.sandbox):
a decode past the time limit ends its worker, one past the memory limit fails, and the file is
skipped with the reason ('took too long to decode', 'needs too much memory').

Workers start from loky's fixed entry point, not from the program's main module: multiprocessing's
'spawn' would re-run a user's unguarded script (`db.scan(...)` at its top level) in every worker.
"""

from __future__ import annotations

import asyncio
import os
import threading
import warnings
from collections.abc import Callable
from concurrent.futures import Executor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

import numpy as np

from nanodb.media import sandbox
from nanodb.media.opener import (
    DEFAULT_MAX_PIXELS,
    FileBytes,
    ImageRejected,
    model_pixels,
    open_image,
    read_image_file,
)
from nanodb.media.paths import is_image_name, is_indexed_name, is_url
from nanodb.media.record import FileRecord, content_hash
from nanodb.media.remote import (
    MAX_MEMBER_BYTES,
    TarBroken,
    is_tar_name,
    member_path,
    open_tar,
    read_remote_bytes,
    tar_members,
)
from nanodb.media.sandbox import TOO_MUCH_MEMORY, DecodeLimits
from nanodb.media.video import TIME_KEY, frame_hash, is_video_name, preload_video_libraries, read_video_frames


@dataclass
class DecodedImage:
    record: FileRecord  # what the sink stores of the file, passed on once the pixels are embedded
    pixels: np.ndarray | None  # (H, W, 3) uint8, the model's input size; None: its bytes are stored already


@dataclass
class DecodeFailure:
    path: str
    reason: str


CLOSE_WAIT_S = 5.0  # close() waits this long for a pool's workers to stop, then lets the program go on


class DecodeWorkersFailed(RuntimeError):
    """The decode worker processes could not start: the scan stops, no file is counted as skipped."""


def decode_file(path: str, transform, max_pixels: int, file: FileBytes | None = None,
                metadata: dict | None = None) -> DecodedImage | DecodeFailure:
    """Read one file (or object: a URL) and turn it into model-input pixels; any failure becomes a
    DecodeFailure. Given `file`, its bytes were read already (a tar shard's member), with `metadata`."""
    try:
        if file is None:
            file = read_remote_bytes(path) if is_url(path) else read_image_file(path)
        image = open_image(file.data, max_pixels, getattr(transform, "draft_size", None))
        pixels = model_pixels(image, transform)
    except ImageRejected as e:
        return DecodeFailure(path, str(e))
    except MemoryError:
        return DecodeFailure(path, TOO_MUCH_MEMORY)
    except Exception as e:  # a transform can fail on an odd image too; the scan must go on
        return DecodeFailure(path, f"cannot decode ({type(e).__name__}: {e})")
    taken = image.info.get("taken")  # the EXIF date, kept with the item (the web UI shows it)
    metadata = {**(metadata or {}), **({"taken": taken} if taken else {})}
    record = FileRecord(path=path, size=file.size, mtime=file.mtime, hash=content_hash(file.data),
                        metadata=metadata or None)
    return DecodedImage(record, pixels)


def decode_video(path: str, transform, max_pixels: int) -> list[DecodedImage] | DecodeFailure:
    """A video's frames at its scene changes (media.video), each a DecodedImage of its own: the video's
    path, size and mtime, a hash of its own (derived from the video's and its time) and {"time": seconds}."""
    try:
        video = read_video_frames(path, max_pixels)
        frames = [(t, model_pixels(image, transform)) for t, image in video.frames]
    except ImageRejected as e:
        return DecodeFailure(path, str(e))
    except MemoryError:
        return DecodeFailure(path, TOO_MUCH_MEMORY)
    except Exception as e:
        return DecodeFailure(path, f"cannot decode ({type(e).__name__}: {e})")
    return [DecodedImage(FileRecord(path=path, size=video.size, mtime=video.mtime, hash=frame_hash(video.hash, t),
                                    metadata={TIME_KEY: round(t, 3)}), pixels) for t, pixels in frames]


STORED_IMAGE_MAX_BYTES = 64 << 20  # a larger file is not read in the scan's process by stored_image


def stored_image(path: str, metadata_of_content: Callable[[bytes], dict | None]) -> DecodedImage | None:
    """A local image file whose exact bytes are stored, as a DecodedImage without pixels, with the stored
    item's metadata (`metadata_of_content(hash)`: the same bytes have the same EXIF date); None for any
    other file. Its bytes are read and hashed, never decoded (here, in the scan's own process): a rescan
    that finds a file renamed or copied needs no decode worker and no model."""
    if is_url(path) or not is_image_name(path):
        return None
    try:
        file = read_image_file(path, STORED_IMAGE_MAX_BYTES)
    except ImageRejected:  # a decode worker reads it again, and says why
        return None
    digest = content_hash(file.data)
    metadata = metadata_of_content(digest)
    if metadata is None:
        return None
    return DecodedImage(FileRecord(path=path, size=file.size, mtime=file.mtime, hash=digest,
                                   metadata=metadata or None), None)


REMOTE_VIDEO = "videos are read from local folders only (not from URLs or tar shards)"


def decode_media(path: str, transform, max_pixels: int, file: FileBytes | None = None,
                 metadata: dict | None = None) -> list[DecodedImage | DecodeFailure] | DecodeFailure:
    """Any indexed file's items: an image's one, a video's frames (decode_video), a tar shard's members
    (decode_tar). Given `file`, the bytes of a tar's member `path`, read already."""
    if is_video_name(path):
        return DecodeFailure(path, REMOTE_VIDEO) if file is not None or is_url(path) else \
            decode_video(path, transform, max_pixels)
    if file is None and is_tar_name(path):
        return decode_tar(path, transform, max_pixels)
    decoded = decode_file(path, transform, max_pixels, file, metadata)
    return decoded if isinstance(decoded, DecodeFailure) else [decoded]


def decode_tar(tar: str, transform, max_pixels: int,
               decode: Callable | None = None) -> list[DecodedImage | DecodeFailure]:
    """A tar shard's members, read in one pass here (a Ray task's whole shard) and each decoded by
    `decode` (default decode_media; a Ray task's decodes under the limits): each image member an item
    (`<tar>#<member>`, the tar's size and mtime, its sample's caption and JSON as metadata), each
    refused member a failure; a shard damaged partway: the members before the damage, then one failure
    for the tar."""
    out: list[DecodedImage | DecodeFailure] = []
    try:
        f, size, mtime = open_tar(tar)
    except ImageRejected as e:
        return [DecodeFailure(tar, str(e))]
    with f:
        try:
            for m in tar_members(tar, f, is_indexed_name):
                path = member_path(tar, m.name)
                if m.data is None:
                    out.append(DecodeFailure(path, m.reason or "unreadable"))
                else:
                    one = (decode or decode_media)(path, transform, max_pixels, FileBytes(m.data, size, mtime),
                                                   m.metadata)
                    out.extend([one] if isinstance(one, DecodeFailure) else one)
        except TarBroken as e:
            out.append(DecodeFailure(tar, str(e)))
    return out


# The pixel transform, pixel limit and decode limits of a decode worker process, set by its initializer.
_worker_args: tuple = ()
_worker_limits: DecodeLimits | None = None


def _init_worker(transform, max_pixels: int, parent: int, limits: DecodeLimits | None) -> None:
    from PIL import Image

    global _worker_args, _worker_limits
    _worker_args = (transform, max_pixels)
    _worker_limits = limits
    # This worker's own process: open_image refuses large images itself, so Pillow's warning is noise.
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
    sandbox.ignore_terminal_interrupt()
    sandbox.exit_with_parent(parent)
    preload_video_libraries()  # FFmpeg's libraries mapped before the memory limit: not counted in it
    if limits is not None:
        sandbox.limit_this_process(limits)


def _decode_in_worker(path: str, file: FileBytes | None = None,
                      metadata: dict | None = None) -> list[DecodedImage | DecodeFailure] | DecodeFailure:
    if _worker_limits is None:
        return decode_media(path, *_worker_args, file, metadata)
    result = sandbox.run_limited(_worker_limits, decode_media, path, *_worker_args, file, metadata)
    if isinstance(result, DecodeFailure) and result.reason == TOO_MUCH_MEMORY:
        return DecodeFailure(path, _worker_limits.too_big)
    return result


def _ready() -> bool:
    """A worker answers once started and initialised."""
    return True


class HeldBytes:
    """The bytes of tar members a scan holds at once (read from the shard, not decoded yet): a member is
    taken only once it fits under `limit` beside those held (one alone always fits). One taker waits at a
    time (the shard's reader); the decodes give back."""

    def __init__(self, limit: int):
        self.limit = limit
        self.held = 0
        self._given = asyncio.Event()

    async def take(self, size: int) -> None:
        while self.held and self.held + size > self.limit:
            self._given.clear()
            await self._given.wait()
        self.held += size

    def give(self, size: int) -> None:
        self.held -= size
        self._given.set()


class ImageDecodePool:
    """A pool of decode processes (spawned fresh, so no CUDA or thread state is forked), started on
    the first decode. `transform` may be given as `get_transform`, called only then: a scan that
    finds nothing to decode needs no model. `limits`: each decode's time and memory limit (None: none)."""

    def __init__(self, transform=None, workers: int = 1, max_pixels: int = DEFAULT_MAX_PIXELS, *,
                 get_transform: Callable[[], Any] | None = None, limits: DecodeLimits | None = None):
        self.workers = workers
        self._max_pixels = max_pixels
        self._limits = limits
        self._get_transform = get_transform or (lambda: transform)
        self._executor: Executor | None = None
        self._solo: Executor | None = None
        self._alone = threading.Lock()
        self._starting = threading.Lock()
        self._closed = False

    @property
    def started(self) -> bool:
        """Whether the workers run (the model's pixel transform, which they need, is loaded then)."""
        return self._executor is not None

    def start(self) -> None:
        """Start the workers now (else the first decode does): the model's pixel transform is needed."""
        self._ready_executor("_executor", self.workers)

    def _start(self, workers: int) -> Executor:
        """Start `workers` processes and wait until one answers: one that cannot start is an error."""
        from loky import ProcessPoolExecutor

        initargs = (self._get_transform(), self._max_pixels, os.getpid(), self._limits)
        executor = ProcessPoolExecutor(workers, initializer=_init_worker, initargs=initargs)
        try:
            with sandbox.interrupt_blocked_in_children():
                started = executor.submit(_ready)
            started.result()
        except Exception as e:
            executor.shutdown(wait=False, kill_workers=True)
            why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DecodeWorkersFailed(f"the image decode worker processes could not start ({why})") from e
        return executor

    @property
    def max_member_bytes(self) -> int:
        """The largest tar member a scan reads for these workers: MAX_MEMBER_BYTES, or a quarter of their
        memory limit if less (a worker holds a member's bytes twice as it receives them, and decodes them)."""
        return MAX_MEMBER_BYTES if self._limits is None else min(MAX_MEMBER_BYTES, self._limits.memory_mb << 18)

    def _ready_executor(self, name: str, workers: int) -> Executor:
        with self._starting:
            if self._closed:
                raise DecodeWorkersFailed("the image decode pool is closed")
            if getattr(self, name) is None:
                executor = self._start(workers)
                setattr(self, name, executor)
                if self._closed:  # closed while starting (close takes no lock): stop what started
                    executor.shutdown(wait=False, kill_workers=True)
                    raise DecodeWorkersFailed("the image decode pool is closed")
                return executor
            return getattr(self, name)

    async def decode(self, path: str, file: FileBytes | None = None,
                     metadata: dict | None = None) -> list[DecodedImage | DecodeFailure] | DecodeFailure:
        """Decode one file in a worker (an image: one item, a video: its frames; an object behind a URL
        is read there too); a worker crash is pinned on the file that caused it. Given `file`: the bytes
        of a tar shard's member `path` (read by the scan, in one pass over the shard), with `metadata`."""
        loop = asyncio.get_running_loop()
        executor = self._executor or await loop.run_in_executor(None, self._ready_executor, "_executor", self.workers)
        try:
            with sandbox.interrupt_blocked_in_children():  # a worker that timed out idle starts again here
                future = executor.submit(_decode_in_worker, path, file, metadata)
            # shielded: a cancelled scan leaves the pool's future alone (close() ends the work), as loky's
            # shutdown, failing the futures it still holds, breaks on one cancelled meanwhile
            return await asyncio.shield(asyncio.wrap_future(future))
        except BrokenProcessPool:  # some worker died: every file in flight lands here
            self._replace(executor)
        return await loop.run_in_executor(None, self._decode_alone, path, file, metadata)

    def decode_now(self, paths: list[str]) -> list[list[DecodedImage | DecodeFailure] | DecodeFailure]:
        """Decode files from synchronous code (NanoDB.add), in the workers and within the limits a scan's
        decodes have, the results in the order of `paths`; a worker's death is pinned on its file as a
        scan's is (the files in flight with it are decoded again alone)."""
        executor = self._executor or self._ready_executor("_executor", self.workers)
        with sandbox.interrupt_blocked_in_children():
            futures = [executor.submit(_decode_in_worker, path) for path in paths]
        results = []
        for path, future in zip(paths, futures):
            try:
                results.append(future.result())
            except BrokenProcessPool:
                self._replace(executor)
                results.append(self._decode_alone(path))
        return results

    def _decode_alone(self, path: str, file: FileBytes | None = None,
                      metadata: dict | None = None) -> list[DecodedImage | DecodeFailure] | DecodeFailure:
        with self._alone:
            solo = self._ready_executor("_solo", 1)
            try:
                with sandbox.interrupt_blocked_in_children():
                    future = solo.submit(_decode_in_worker, path, file, metadata)
                return future.result()
            except BrokenProcessPool as e:  # a crash, or the time limit's alarm
                self._replace(solo)
                return DecodeFailure(path, sandbox.why_worker_died(e, self._limits))

    def _replace(self, broken: Executor) -> None:
        """Drop a pool whose worker died (once, however many of its files report it); the next use
        starts fresh workers."""
        with self._starting:
            for name in ("_executor", "_solo"):
                if getattr(self, name) is broken:
                    broken.shutdown(wait=False, kill_workers=True)
                    setattr(self, name, None)

    def close(self) -> None:
        """Stop the workers for good, waiting at most CLOSE_WAIT_S for each pool: a worker stuck in a
        decoder, or a pool a signal broke, must not hold up the program's exit."""
        # No lock: a start in progress holds it while the model loads. Set first, so that either this
        # sees a pool that has just started or the start sees this flag (and stops it).
        self._closed = True
        executors = [e for e in (self._executor, self._solo) if e is not None]
        self._executor = self._solo = None
        for executor in executors:
            stopper = threading.Thread(target=executor.shutdown, kwargs={"wait": True, "kill_workers": True},
                                       name="nanodb-decode-shutdown", daemon=True)
            stopper.start()
            stopper.join(CLOSE_WAIT_S)

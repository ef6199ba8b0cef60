"""Stage 2, the decode pool: worker processes read, hash, decode and resize images to model input.

Workers return uint8 pixels already resized and cropped by the model's own transforms (a quarter of
the bytes of normalised floats); the CLIP stage scales and normalises whole batches at once. A worker
that dies (a decoder crash) costs only the file that killed it: the files in flight with it are
retried one at a time in a separate process.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import threading
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

import numpy as np

from pipeline.imaging import ImageRejected, content_hash, model_pixels, open_image, read_image_file

log = logging.getLogger(__name__)


@dataclass
class DecodedImage:
    path: str
    size: int
    mtime: float
    hash: bytes
    pixels: np.ndarray  # (H, W, 3) uint8, the model's input size


@dataclass
class DecodeFailure:
    path: str
    reason: str


def decode_file(path: str, transform, max_pixels: int) -> DecodedImage | DecodeFailure:
    """Read one file and turn it into model-input pixels; any failure becomes a DecodeFailure."""
    try:
        file = read_image_file(path)
        pixels = model_pixels(open_image(file.data, max_pixels, getattr(transform, "draft_size", None)), transform)
    except ImageRejected as e:
        return DecodeFailure(path, str(e))
    except Exception as e:  # a transform can fail on an odd image too; the scan must go on
        return DecodeFailure(path, f"cannot decode ({type(e).__name__}: {e})")
    return DecodedImage(path, file.size, file.mtime, content_hash(file.data), pixels)


# The pixel transform and pixel limit of a decode worker process, set once by its initializer.
_worker_args: tuple = ()


def _init_worker(transform, max_pixels: int, parent: int) -> None:
    from PIL import Image

    global _worker_args
    _worker_args = (transform, max_pixels)
    # This worker's own process: open_image refuses large images itself, so Pillow's warning is noise.
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()


def _decode_in_worker(path: str) -> DecodedImage | DecodeFailure:
    return decode_file(path, *_worker_args)


def _exit_with_parent(parent: int) -> None:
    """A worker whose scan was killed (kill -9) is not told; without this it would wait, holding
    its memory, forever."""
    while os.getppid() == parent:
        time.sleep(1)
    os._exit(0)


class ImageDecodePool:
    """A pool of decode processes (spawned, so no CUDA or thread state is forked)."""

    def __init__(self, transform, workers: int, max_pixels: int):
        self.workers = workers
        self._args = (transform, max_pixels, os.getpid())
        self._executor: ProcessPoolExecutor | None = None
        self._solo: ProcessPoolExecutor | None = None
        self._alone = threading.Lock()

    def _start(self, workers: int) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker, initargs=self._args
        )

    @property
    def executor(self) -> ProcessPoolExecutor:
        if self._executor is None:
            self._executor = self._start(self.workers)
        return self._executor

    @property
    def solo(self) -> ProcessPoolExecutor:
        """A one-process pool for retrying, one by one, the files in flight when a worker died."""
        if self._solo is None:
            self._solo = self._start(1)
        return self._solo

    async def decode(self, path: str) -> DecodedImage | DecodeFailure:
        """Decode one file in a worker; a worker crash is pinned on the file that caused it."""
        loop = asyncio.get_running_loop()
        executor = self.executor
        try:
            return await loop.run_in_executor(executor, _decode_in_worker, path)
        except BrokenProcessPool:  # some worker died: every file in flight lands here
            self._replace(executor)
        return await loop.run_in_executor(None, self._decode_alone, path)

    def _decode_alone(self, path: str) -> DecodedImage | DecodeFailure:
        with self._alone:
            solo = self.solo
            try:
                return solo.submit(_decode_in_worker, path).result()
            except BrokenProcessPool:
                self._replace(solo)
                return DecodeFailure(path, "the decoder process crashed on this file")

    def _replace(self, broken: ProcessPoolExecutor) -> None:
        """Drop a pool whose worker died (once, however many of its files report it); the next use
        starts fresh workers."""
        for name in ("_executor", "_solo"):
            if getattr(self, name) is broken:
                broken.shutdown(wait=False, cancel_futures=True)
                setattr(self, name, None)

    def close(self) -> None:
        for name in ("_executor", "_solo"):
            if (executor := getattr(self, name)) is not None:
                executor.shutdown(wait=True, cancel_futures=True)
                setattr(self, name, None)

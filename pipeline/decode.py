"""Stage 2, the decode pool: worker processes read, hash, decode and resize images to model input.

Workers return uint8 pixels already resized and cropped by the model's own transforms (a quarter of
the bytes of normalised floats); the CLIP stage scales and normalises whole batches at once.
"""

from __future__ import annotations

import hashlib
import io
import logging
import multiprocessing
import os
import stat
import sys
import threading
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

MAX_FILE_BYTES = 1 << 30  # no real photo is larger; reading such a file whole would hurt
# Resizing the short side to the model's input multiplies the pixels by the aspect ratio: a 1x100000
# strip (a small file) would become gigabytes. Real panoramas stay far below this.
MAX_ASPECT_RATIO = 200
DRAFT_MARGIN = 2  # a JPEG decodes at reduced scale down to this multiple of the model's input size


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


def to_rgb(image):
    """First frame, EXIF orientation applied, as 8-bit RGB (16-bit, CMYK, palette and alpha handled)."""
    from PIL import Image, ImageOps

    if getattr(image, "n_frames", 1) > 1:
        image.seek(0)
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        image = Image.fromarray((np.asarray(image, np.float64) / 256).clip(0, 255).astype(np.uint8))
    elif image.mode == "F":
        image = Image.fromarray(np.asarray(image).clip(0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
    return image.convert("RGB")


@dataclass(frozen=True)
class ResizeCenterCrop:
    """open_clip's usual pixel steps (torchvision Resize of the short side, CenterCrop, RGB) in plain
    Pillow, with torchvision's arithmetic, pixel for pixel: so decode workers need not import torch,
    which would cost each of them about 500 MB."""

    short_side: int
    crop: tuple[int, int]  # (height, width), at most short_side
    resample: int  # a PIL.Image.Resampling filter

    def __call__(self, image):
        w, h = image.size
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(self.short_side * long / short)
        new_w, new_h = (self.short_side, new_long) if w <= h else (new_long, self.short_side)
        if (new_w, new_h) != (w, h):
            image = image.resize((new_w, new_h), self.resample)
        crop_h, crop_w = self.crop
        if (crop_w, crop_h) != (new_w, new_h):
            top, left = int(round((new_h - crop_h) / 2.0)), int(round((new_w - crop_w) / 2.0))
            image = image.crop((left, top, left + crop_w, top + crop_h))
        return image if image.mode == "RGB" else image.convert("RGB")

    def draft(self, image) -> None:
        """Before loading: let a JPEG decode at 1/2, 1/4 or 1/8 scale (DCT scaling) while both sides
        stay at least twice `short_side`; the resize above then goes exactly to the model's input.
        A 12-megapixel photo decodes ~6x faster; the margin keeps vectors within cosine 0.998 of a
        full decode (at 1x, 0.996), and a photo under twice the input size decodes in full."""
        if image.format == "JPEG":
            image.draft("RGB", (DRAFT_MARGIN * self.short_side,) * 2)


_transform = None


def _init_worker(transform, max_pixels: int) -> None:
    from PIL import Image

    global _transform
    _transform = transform
    Image.MAX_IMAGE_PIXELS = max_pixels
    warnings.simplefilter("error", Image.DecompressionBombWarning)  # skip bombs, do not just warn
    if "torch" in sys.modules:  # a torchvision transform: one thread per worker, the pool is the parallelism
        sys.modules["torch"].set_num_threads(1)


def _init_pool_worker(transform, max_pixels: int) -> None:
    _init_worker(transform, max_pixels)
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()


def _exit_with_parent(parent: int) -> None:
    """A worker whose scan was killed (kill -9) is not told; without this it would wait, holding
    its memory, forever."""
    while os.getppid() == parent:
        time.sleep(1)
    os._exit(0)


def decode_file(path: str) -> DecodedImage | DecodeFailure:
    """Read one file and turn it into model-input pixels; any failure becomes a DecodeFailure."""
    from PIL import Image, UnidentifiedImageError

    try:
        # Non-blocking, then checked: a file swapped for a FIFO since the walk must not hang the worker.
        with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                return DecodeFailure(path, "not a regular file")
            if st.st_size == 0:
                return DecodeFailure(path, "empty file")
            if st.st_size > MAX_FILE_BYTES:
                return DecodeFailure(path, f"file too large ({st.st_size >> 20} MiB)")
            data = f.read()
    except OSError as e:
        return DecodeFailure(path, f"unreadable: {e.strerror or e}")
    try:
        with Image.open(io.BytesIO(data)) as image:
            w, h = image.size
            if w * h > Image.MAX_IMAGE_PIXELS:
                return DecodeFailure(path, f"image too large ({w}x{h} pixels, decompression bomb?)")
            if max(w, h) > MAX_ASPECT_RATIO * min(w, h):
                return DecodeFailure(path, f"absurd dimensions ({w}x{h} pixels)")
            if isinstance(_transform, ResizeCenterCrop):
                _transform.draft(image)
            image.load()
            pixels = np.asarray(_transform(to_rgb(image)), np.uint8)
    except UnidentifiedImageError:
        return DecodeFailure(path, "not an image (or an unsupported format)")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        return DecodeFailure(path, f"image too large ({e})")
    except Exception as e:  # a broken file can make a decoder raise anything; the scan must go on
        return DecodeFailure(path, f"corrupt or truncated image ({type(e).__name__}: {e})")
    return DecodedImage(path, st.st_size, st.st_mtime, hashlib.blake2b(data, digest_size=16).digest(), pixels)


class ImageDecodePool:
    """A pool of decode processes (spawned, so no CUDA or thread state is forked)."""

    def __init__(self, transform, workers: int, max_pixels: int):
        self.workers = workers
        self._args = (transform, max_pixels)
        self._executor: ProcessPoolExecutor | None = None
        self._solo: ProcessPoolExecutor | None = None

    def _start(self, workers: int) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_pool_worker, initargs=self._args
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

    def replace(self, broken: ProcessPoolExecutor) -> None:
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

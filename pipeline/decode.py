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
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

MAX_FILE_BYTES = 1 << 30  # no real photo is larger; reading such a file whole would hurt


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


_transform = None


def _init_worker(transform, max_pixels: int) -> None:
    from PIL import Image

    global _transform
    _transform = transform
    Image.MAX_IMAGE_PIXELS = max_pixels
    warnings.simplefilter("error", Image.DecompressionBombWarning)  # skip bombs, do not just warn
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass


def decode_file(path: str) -> DecodedImage | DecodeFailure:
    """Read one file and turn it into model-input pixels; any failure becomes a DecodeFailure."""
    from PIL import Image, UnidentifiedImageError

    try:
        st = os.stat(path)
        if st.st_size == 0:
            return DecodeFailure(path, "empty file")
        if st.st_size > MAX_FILE_BYTES:
            return DecodeFailure(path, f"file too large ({st.st_size >> 20} MiB)")
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return DecodeFailure(path, f"unreadable: {e.strerror or e}")
    try:
        with Image.open(io.BytesIO(data)) as image:
            w, h = image.size
            if w * h > Image.MAX_IMAGE_PIXELS:
                return DecodeFailure(path, f"image too large ({w}x{h} pixels, decompression bomb?)")
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

"""int8 in a scan: calibration on a sample spread over the scan, and fidelity checks while it runs.

A quantized tower is only as good as its calibration photos: calibrated on one folder of faces, a
tower can drift on the street photos that follow. So the CLIP stage (embed.py) runs floating point
until it has a sample of CALIBRATION_IMAGES images from SPREAD_FOLDERS folders (or SPREAD_IMAGES
images of fewer), calibrates on it, and then holds its int8 batches back CHECK_EVERY at a time: once
CHECK_EVERY are held (or no image follows soon), CHECKED_PER_BATCH images of each held batch, spread over
it, run in floating point too, in one pass. If one of them falls below MIN_COSINE, the held batches are
re-embedded in floating point, and the model is calibrated once more on the wider sample, or, at a
second miss, runs in floating point for the rest. The lowest cosine seen is in the scan's report.
Sampling every batch rather than running one batch in eight whole compares the same photos' variety
for half the floating-point work (a ViT-B-32 image in bfloat16 costs about two in int8 on a quiet
machine, five on a loaded one: benchmarks/RESULTS.md)."""

from __future__ import annotations

import logging
import os
import random
from typing import Protocol

import numpy as np
from nanodb.pipeline.decode import DecodedImage
from nanodb.pipeline.sink import EmbeddingModel

from nanodb.media.paths import printable

log = logging.getLogger(__name__)

CALIBRATION_IMAGES = 64
SPREAD_FOLDERS = 4
SPREAD_IMAGES = 256
SAMPLE_IMAGES = 128  # kept for calibration: a recalibration's wider sample
CHECK_EVERY = 8
CHECKED_PER_BATCH = 2  # images of each held batch compared with floating point, spread over it (0: none)
MIN_COSINE = 0.99  # what the README promises of an int8 vector, against float32

Batch = list[DecodedImage]


class Quantization(Protocol):
    """A quantized image tower's controls (a model's `quantization`, None in floating point)."""

    quantized: bool  # its vectors come from the quantized tower (else from floating point)
    floating_only: bool  # refused or fallen back: floating point for good, no calibration

    def calibrate(self, pixels: np.ndarray) -> bool:
        """Quantize on these images (kept only if faithful on them); returns whether it is quantized now."""

    def floating(self, pixels: np.ndarray) -> np.ndarray:
        """The floating-point tower's features (not unit length), the reference of the checks."""

    def fall_back(self, why: str) -> None:
        """Run in floating point from now on."""


class CalibrationSample:
    """The model-input pixels of up to `capacity` images, shared evenly among the folders seen so far,
    each folder's share a uniform sample of its images: the first folder of a scan does not fill it."""

    def __init__(self, capacity: int = SAMPLE_IMAGES, seed: int = 0):
        self.capacity = capacity
        self.kept: dict[str, list[np.ndarray]] = {}
        self.seen: dict[str, int] = {}
        self.rng = random.Random(seed)

    def __len__(self) -> int:
        return sum(map(len, self.kept.values()))

    def add(self, folder: str, pixels: np.ndarray) -> None:
        kept = self.kept.setdefault(folder, [])
        self.seen[folder] = self.seen.get(folder, 0) + 1
        if len(kept) < max(1, self.capacity // len(self.kept)):  # under its share: in, at a larger one's cost
            if len(self) >= self.capacity:
                largest = max(self.kept.values(), key=len)
                largest.pop(self.rng.randrange(len(largest)))
            kept.append(pixels)
        elif (j := self.rng.randrange(self.seen[folder])) < len(kept):  # reservoir sampling within the folder
            kept[j] = pixels

    def ready(self) -> bool:
        """Enough images, spread over enough folders (or a long run of one) to calibrate on."""
        spread = len(self.kept) >= SPREAD_FOLDERS or sum(self.seen.values()) >= SPREAD_IMAGES
        return len(self) >= CALIBRATION_IMAGES and spread

    def pixels(self) -> np.ndarray:
        return np.stack([p for kept in self.kept.values() for p in kept])


def spread(n: int, k: int) -> np.ndarray:
    """`k` row numbers spread evenly over `n` rows, each the middle of its share (all rows when `k` >= `n`)."""
    k = min(k, n)
    return ((np.arange(k) + 0.5) * n / k).astype(int)


def unit(features: np.ndarray) -> np.ndarray:
    features = np.asarray(features, np.float32)
    return features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)


class QuantizedEmbedding:
    """Embeds a scan's batches with a model whose image tower runs in int8 once calibrated (the module's
    docstring); `report` gets `int8_check(images, cosine, reembedded)` calls."""

    def __init__(self, model: EmbeddingModel, quantization: Quantization, report, check_every: int = CHECK_EVERY):
        self.model = model
        self.quantization = quantization
        self.report = report
        self.check_every = check_every
        self.sample = CalibrationSample()
        self.held: list[tuple[Batch, np.ndarray]] = []  # int8 batches no check has passed since
        self.calibrated = False  # this scan calibrated the tower (once, when its sample was ready)
        self.recalibrated = False  # and once more after a miss: the next miss falls back

    def embed(self, batch: Batch, last: bool) -> list[tuple[Batch, np.ndarray]]:
        """Embed `batch`; returns the batches whose vectors are final, in order. `last`: no batch follows
        soon (the end of the scan, or a pause in a watched folder's feed), so nothing is held back."""
        pixels = np.stack([b.pixels for b in batch])
        quantization = self.quantization
        if not quantization.floating_only:
            for b in batch:
                self.sample.add(os.path.dirname(b.record.path), b.pixels)
        if not quantization.quantized:
            vectors = self.model.encode_pixels(pixels)
            if not quantization.floating_only and not self.calibrated and self.sample.ready():
                self.calibrated = True
                quantization.calibrate(self.sample.pixels())
            return [(batch, vectors)]
        self.held.append((batch, self.model.encode_pixels(pixels)))
        return self._check() if last or len(self.held) >= self.check_every else []

    def flush(self) -> list[tuple[Batch, np.ndarray]]:
        """Check the held batches now (no image follows soon) and return them."""
        return self._check() if self.held else []

    def _check(self) -> list[tuple[Batch, np.ndarray]]:
        """Run CHECKED_PER_BATCH images of each held batch in floating point too; returns the held
        batches, re-embedded in floating point if one of those images fell short."""
        picks = [(held, row) for held, (batch, _) in enumerate(self.held)
                 for row in spread(len(batch), CHECKED_PER_BATCH)]
        if not picks:
            return self._release()
        checked = [self.held[held][0][row] for held, row in picks]
        reference = unit(self.quantization.floating(np.stack([d.pixels for d in checked])))
        cosines = np.sum(np.stack([self.held[held][1][row] for held, row in picks]) * reference, axis=1)
        worst = int(np.argmin(cosines))
        if cosines[worst] >= MIN_COSINE:
            self.report.int8_check(len(checked), float(cosines[worst]), 0)
            return self._release()
        missed = np.stack([d.pixels for d in self.held[picks[worst][0]][0]])  # the batch of the worst image
        redone = self._reembed()
        self.report.int8_check(len(checked), float(cosines[worst]), redone)
        self._after_a_miss(printable(checked[worst].record.path), float(cosines[worst]), redone, missed)
        return self._release()

    def _release(self) -> list[tuple[Batch, np.ndarray]]:
        released, self.held = self.held, []
        return released

    def _reembed(self) -> int:
        """Replace every held int8 vector with floating point's."""
        self.held = [(b, unit(self.quantization.floating(np.stack([d.pixels for d in b])))) for b, _ in self.held]
        return sum(len(b) for b, _ in self.held)

    def _after_a_miss(self, path: str, cosine: float, redone: int, missed: np.ndarray) -> None:
        """A check fell short on the batch `missed`: calibrate once more on the wider sample and that
        batch, or at a second miss, fall back."""
        if not self.recalibrated:
            log.warning("the int8 vector of %s is at cosine %.4f to floating point (under %.2f): %d images "
                        "re-embedded in floating point; calibrating again on %d images from %d folders", path,
                        cosine, MIN_COSINE, redone, len(self.sample) + len(missed), len(self.sample.kept))
            self.recalibrated = True
            self.quantization.calibrate(np.concatenate([self.sample.pixels(), missed]))
            return
        log.warning("the int8 vector of %s is at cosine %.4f to floating point (under %.2f): %d images "
                    "re-embedded in floating point, and the rest of the scan (and later ones) runs in floating "
                    "point", path, cosine, MIN_COSINE, redone)
        self.quantization.fall_back(f"cosine {cosine:.6f} on {path}")

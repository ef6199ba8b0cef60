"""The scan's int8 fidelity checks (pipeline/fidelity.py) with a stand-in model: calibration on a sample
spread over the scan's folders, held int8 batches re-embedded in floating point when a check falls short,
then one more calibration or a fall back to floating point, and the lowest cosine in the scan summary."""

from __future__ import annotations

import asyncio
import logging

import numpy as np
import pytest
from nanodb.pipeline import fidelity
from nanodb.pipeline.decode import DecodedImage
from nanodb.pipeline.embed import ClipStage
from nanodb.pipeline.fidelity import CalibrationSample, QuantizedEmbedding, unit
from nanodb.pipeline.report import ScanReport

from nanodb.media.record import FileRecord


def features(pixels: np.ndarray) -> np.ndarray:
    """The stand-in floating-point tower: the pixels as numbers, and a last coordinate of 0."""
    flat = pixels.reshape(len(pixels), -1).astype(np.float32) / 255
    return np.hstack([1 + flat, np.zeros((len(pixels), 1), np.float32)])


class StandInTower:
    """Its int8 vectors are faithful (cosine 0.99995) on the kinds of photo (the first pixel's value) it
    was calibrated on, and drift (cosine 0.98) on others; `learns`: how many calibrations teach it kinds."""

    def __init__(self, learns: int = 2):
        self.kinds: set[int] = set()
        self.learns = learns
        self.calibrations: list[set[int]] = []
        self.floating_only = False
        self.why = None

    @property
    def quantized(self) -> bool:
        return bool(self.kinds) and not self.floating_only

    def calibrate(self, pixels: np.ndarray) -> bool:
        self.calibrations.append({int(k) for k in pixels[:, 0, 0, 0]})
        if len(self.calibrations) <= self.learns:
            self.kinds |= self.calibrations[-1]
        return self.quantized

    def floating(self, pixels: np.ndarray) -> np.ndarray:
        return features(pixels)

    def fall_back(self, why: str) -> None:
        self.floating_only, self.why = True, why

    def int8(self, pixels: np.ndarray) -> np.ndarray:
        out = features(pixels)
        error = np.where(np.isin(pixels[:, 0, 0, 0], list(self.kinds)), 0.01, 0.2)
        out[:, -1] = error * np.linalg.norm(out, axis=1)
        return out


class StandInModel:
    def __init__(self, tower: StandInTower):
        self.quantization = tower

    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        tower = self.quantization
        return unit(tower.int8(pixels) if tower.quantized else tower.floating(pixels))


def photos(kind: int, folder: str, n: int, start: int = 0) -> list[DecodedImage]:
    """`n` images of one kind in one folder (a kind is the first pixel's value; the rest tells them apart)."""
    images = []
    for i in range(start, start + n):
        pixels = np.random.default_rng(i).integers(0, 255, (2, 2, 3), dtype=np.uint8)
        pixels[0, 0, 0] = kind
        images.append(DecodedImage(FileRecord(path=f"/photos/{folder}/{i}.jpg", hash=bytes(16)), pixels))
    return images


def batches(images: list[DecodedImage], size: int = 16) -> list[list[DecodedImage]]:
    return [images[i : i + size] for i in range(0, len(images), size)]


def scan(tower: StandInTower, images: list[DecodedImage]) -> tuple[ScanReport, list[tuple[list, np.ndarray]]]:
    """Embed `images` batch by batch as the CLIP stage does; returns the report and the final batches."""
    report = ScanReport()
    embedding = QuantizedEmbedding(StandInModel(tower), tower, report)
    parts = batches(images)
    final = []
    for i, batch in enumerate(parts):
        final += embedding.embed(batch, last=i == len(parts) - 1)
    return report, final


def assert_every_vector_faithful(final, images):
    assert [d for batch, _ in final for d in batch] == images  # each image once, in order
    stored = np.vstack([vectors for _, vectors in final])
    reference = unit(features(np.stack([d.pixels for d in images])))
    assert np.sum(stored * reference, axis=1).min() >= fidelity.MIN_COSINE


def test_the_calibration_sample_is_spread_over_the_folders():
    sample = CalibrationSample()
    for d in photos(1, "faces", 200):
        sample.add("faces", d.pixels)
    for kind, folder in [(2, "coco"), (3, "imagenet"), (4, "pets")]:
        for d in photos(kind, folder, 40):
            sample.add(folder, d.pixels)
    assert sample.ready()
    kinds = list(sample.pixels()[:, 0, 0, 0])
    assert len(kinds) == fidelity.SAMPLE_IMAGES
    assert [kinds.count(k) for k in (1, 2, 3, 4)] == [32, 32, 32, 32]


def test_a_folder_alone_calibrates_only_after_a_long_run_of_it():
    sample = CalibrationSample()
    for d in photos(1, "faces", fidelity.SPREAD_IMAGES):
        assert not sample.ready()
        sample.add("faces", d.pixels)
    assert sample.ready()


def test_int8_calibrated_on_faces_then_drifting_on_coco_calibrates_again_and_keeps_every_vector_faithful(caplog):
    tower = StandInTower(learns=2)
    images = photos(1, "faces", 320) + photos(2, "coco", 320, start=1000)
    report, final = scan(tower, images)
    assert_every_vector_faithful(final, images)
    assert tower.calibrations[0] == {1} and 2 in tower.calibrations[1]  # the wider sample has the COCO photos
    assert not tower.floating_only
    assert report.int8_min_cosine < fidelity.MIN_COSINE and report.int8_reembedded > 0
    assert caplog.text.count("under 0.99") == 1
    assert "lowest cosine 0.98" in report.summary() and "re-embedded" in report.summary()


def test_int8_that_drifts_again_after_calibrating_again_falls_back_to_floating_point(caplog):
    tower = StandInTower(learns=1)
    images = photos(1, "faces", 320) + photos(2, "coco", 480, start=1000)
    with caplog.at_level(logging.WARNING):
        report, final = scan(tower, images)
    assert_every_vector_faithful(final, images)
    assert len(tower.calibrations) == 2 and tower.floating_only and "coco" in tower.why
    assert caplog.text.count("runs in floating point") == 1


def test_int8_that_stays_faithful_reports_its_lowest_cosine_and_reembeds_nothing():
    tower = StandInTower()
    images = photos(1, "faces", 100) + photos(2, "coco", 100, start=1000) + photos(3, "pets", 500, start=2000)
    report, final = scan(tower, images)
    assert_every_vector_faithful(final, images)
    assert report.int8_checked > 0 and report.int8_reembedded == 0
    assert report.int8_min_cosine == pytest.approx(1 / np.sqrt(1 + 0.01**2), abs=1e-6)
    assert "int8 checked on" in report.summary() and "re-embedded" not in report.summary()


def test_held_int8_batches_are_passed_on_when_the_images_stop_coming():
    tower = StandInTower()
    tower.kinds = {1}  # a tower calibrated before

    async def watch() -> list:
        inbox, outbox = asyncio.Queue(), asyncio.Queue()
        running = asyncio.Event()
        running.set()
        clip_stage = ClipStage(lambda: StandInModel(tower), 16, ScanReport(), running)
        stage = asyncio.create_task(clip_stage.run(inbox, outbox))
        for d in photos(1, "faces", 48):  # three full batches, then a watched folder goes quiet
            inbox.put_nowait(d)
        got = [await asyncio.wait_for(outbox.get(), 30) for _ in range(3)]  # liveness bound: 0.25 s normally
        inbox.put_nowait(None)
        assert await asyncio.wait_for(outbox.get(), 30) is None
        await stage
        return got

    got = asyncio.run(watch())
    assert [len(records) for records, _ in got] == [16, 16, 16]


def test_a_drifting_batch_between_checks_is_caught_and_reembedded():
    tower = StandInTower()
    tower.kinds = {1}  # calibrated on faces before
    images = photos(1, "faces", 16 * 3) + photos(2, "coco", 16, start=1000) + photos(1, "faces", 16 * 4, start=2000)
    report, final = scan(tower, images)  # eight batches, one check: the drifting batch is not the last
    assert_every_vector_faithful(final, images)
    assert report.int8_reembedded == len(images) and report.int8_min_cosine < fidelity.MIN_COSINE
    assert len(tower.calibrations) == 1  # calibrated again once, with the drifting batch


class CountingTower(StandInTower):
    floating_rows = 0

    def floating(self, pixels: np.ndarray) -> np.ndarray:
        self.floating_rows += len(pixels)
        return super().floating(pixels)


def test_the_checks_run_a_few_images_of_each_batch_in_floating_point():
    tower = CountingTower()
    tower.kinds = {1}
    images = photos(1, "faces", 32 * 16)
    report = ScanReport()
    embedding = QuantizedEmbedding(StandInModel(tower), tower, report)
    for i in range(0, len(images), 32):
        embedding.embed(images[i : i + 32], last=i + 32 == len(images))
    assert tower.floating_rows == report.int8_checked == 16 * fidelity.CHECKED_PER_BATCH

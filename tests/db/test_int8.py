"""int8 image tower (OpenVINO + NNCF): calibrated by a scan on a sample spread over its folders, kept
only when faithful, checked while the scan runs, and its stored vectors stay within cosine 0.99 of
open_clip's float32 ones for the same files, also on kinds of photo it was not calibrated on."""

from __future__ import annotations

import logging
import shutil
import subprocess
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest
from helpers import coco_photos, data_dir
from nanodb.pipeline import fidelity
from PIL import Image

import nanodb.model.runtimes.openvino_int8 as int8_module
from nanodb import NanoDB
from nanodb.model.clip import ClipModel, ModelConfig, ModelLoadError, ModelSpec
from nanodb.model.runtimes import resolve_precision

pytestmark = pytest.mark.skipif(not (find_spec("openvino") and find_spec("nncf")), reason="needs openvino and nncf")

SPEC = ModelSpec("ViT-S-32", "none", seed=11)  # its own weights: no other test's cached tower


def clip(precision: str, backend: str = "openvino") -> ClipModel:
    """A model of SPEC built now (not load_model's process cache: each test has its own model cache)."""
    return ClipModel(ModelConfig(SPEC, "cpu", precision, backend))


def face_photos(n: int) -> list[Path]:
    return sorted(data_dir("caltech101/Faces").glob("*.jpg"))[:n]


def pixels(model: ClipModel, files) -> np.ndarray:
    return np.stack([model.image_pixels(Image.open(f)) for f in files])


def cpu_has_int8_dot_products() -> bool:
    """VNNI (AVX512-VNNI, AVX-VNNI) or AMX: without them (AVX2 alone) OpenVINO's int8 arithmetic saturates
    its u8 x s8 products and the tower is not faithful enough; nanodb then stays in floating point (the
    fidelity check refuses it), which `test_a_tower_that_is_not_faithful_stays_in_floating_point` covers."""
    flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("flags")), [])
    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & set(flags))


needs_int8_units = pytest.mark.skipif(not cpu_has_int8_dot_products(),
                                      reason="this CPU has no int8 dot-product units (VNNI/AMX)")


def int8_db(path: Path, **settings) -> NanoDB:
    return NanoDB(path, "ViT-S-32", pretrained="none", seed=11, precision="int8", backend="openvino", device="cpu",
                  **settings)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A model cache of its own, holding the int8 tower calibrated on 64 face photos only."""
    folder = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NANODB_CACHE", str(folder))
        model = clip("int8")
        assert model.quantization.calibrate(pixels(model, face_photos(64)))
    return folder


@pytest.fixture
def in_cache(cache, monkeypatch):
    monkeypatch.setenv("NANODB_CACHE", str(cache))
    return cache


def refuse_calibration(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("calibrated again")

    monkeypatch.setattr(subprocess, "run", fail)


@needs_int8_units
def test_int8_calibrated_on_faces_stays_within_cosine_099_of_float32_on_coco(in_cache, monkeypatch):
    refuse_calibration(monkeypatch)  # the cached tower is used as it is
    images = [Image.open(f) for f in coco_photos(40)]
    int8 = clip("int8")
    assert int8.precision_id == "int8/openvino" and int8.quantization.quantized
    vectors = int8.encode_images(images)
    reference = clip("float32", "torch").encode_images(images)
    assert np.sum(vectors * reference, axis=1).min() >= fidelity.MIN_COSINE
    again = clip("int8").encode_images(images)
    np.testing.assert_array_equal(again, vectors)  # the same tower, from disk
    # a batch is split among the tower's streams: each image keeps its own vector, in its place
    alone = np.vstack([int8.encode_images([image]) for image in images[:5]])
    np.testing.assert_allclose(int8.encode_images(images[:5]), alone, atol=1e-5)


@needs_int8_units
def test_a_scan_calibrates_on_a_sample_spread_over_its_folders(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("NANODB_CACHE", str(tmp_path / "cache"))
    photos = coco_photos(80)
    for i, f in enumerate(photos):  # four folders of 16, then 16 more in the fourth
        folder = tmp_path / "photos" / f"album{min(i // 16, 3)}"
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, folder / f.name)
    with caplog.at_level(logging.WARNING), int8_db(tmp_path / "db", batch_size=16) as db:
        report = db.scan(tmp_path / "photos")
    assert caplog.text.count("calibrating the int8 image tower on") == 1
    assert len(list((tmp_path / "cache").glob("openvino/*-int8/model.xml"))) == 1
    assert not [p for p in (tmp_path / "cache").glob("openvino/*") if p.name.startswith("tmp")]  # nothing half-written
    assert 0 < report.int8_checked <= 16 and report.int8_min_cosine >= fidelity.MIN_COSINE  # the images after it
    assert f"int8 checked on {report.int8_checked} image" in report.summary()
    assert f"lowest cosine {report.int8_min_cosine:.4f} to floating point" in report.summary()


def test_a_tower_that_is_not_faithful_stays_in_floating_point(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("NANODB_CACHE", str(tmp_path))
    monkeypatch.setattr(int8_module, "INT8_MIN_COSINE", 1.5)  # no quantized tower can pass
    model = clip("int8")
    images = [Image.open(f) for f in coco_photos(16)]
    assert not model.quantization.calibrate(pixels(model, coco_photos(16)))
    assert "not faithful" in caplog.text
    np.testing.assert_allclose(model.encode_images(images), clip("bfloat16").encode_images(images), atol=1e-6)
    assert clip("int8").quantization.floating_only  # the refusal is remembered: no second calibration


@needs_int8_units
def test_int8_database_of_coco_calibrated_on_faces_stores_vectors_within_099_of_float32(in_cache, tmp_path,
                                                                                         monkeypatch):
    refuse_calibration(monkeypatch)
    photos = tmp_path / "photos"
    photos.mkdir()
    for f in coco_photos(12):
        shutil.copy(f, photos / f.name)
    with int8_db(tmp_path / "db") as db:
        report = db.scan(photos)
        assert db.precision == "int8/openvino"
        assert report.int8_checked > 0 and report.int8_min_cosine >= fidelity.MIN_COSINE
        float32 = clip("float32", "torch")
        for f in sorted(photos.iterdir()):
            first = db.search(str(f), k=1)[0]
            assert db.path_of(first.index) == str(f)
            stored = db.vectors[first.index].astype(np.float32)
            assert float(stored @ float32.encode_images([Image.open(f)])[0]) >= fidelity.MIN_COSINE
            copy = Image.open(f)
            copy = copy.resize((copy.width // 2, copy.height // 2))
            assert db.path_of(db.search(copy, k=1)[0].index) == str(f)


@pytest.mark.slow
@pytest.mark.timeout(1800)  # 448 images and a calibration: minutes, more on a busy two-core machine
def test_a_scan_of_faces_then_coco_and_imagenet_stores_every_vector_within_099_of_float32(tmp_path, monkeypatch,
                                                                                         caplog):
    """From an empty cache, as a user's first int8 scan: the faces come first and calibrate the tower."""
    monkeypatch.setenv("NANODB_CACHE", str(tmp_path / "cache"))
    imagenet = sorted(data_dir("imagenet-sample/images").glob("*"))[:96]
    files = face_photos(fidelity.SPREAD_IMAGES) + coco_photos(96) + imagenet  # the faces alone calibrate
    for f in files:
        folder = tmp_path / "photos" / f"{f.parent.parent.name}-{f.parent.name}"
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, folder / f.name)
    with caplog.at_level(logging.WARNING), int8_db(tmp_path / "db", batch_size=32) as db:
        report = db.scan(tmp_path / "photos")
        assert report.added == len(files) and report.int8_checked > 0
        stored = {db.path_of(i): db.vectors[i].astype(np.float32) for i in range(len(db.vectors))}
    paths = sorted(stored)
    float32 = clip("float32", "torch")
    reference = np.vstack([float32.encode_images([Image.open(p) for p in paths[i : i + 64]])
                           for i in range(0, len(paths), 64)])
    cosines = np.sum(np.stack([stored[p] for p in paths]) * reference, axis=1)
    assert cosines.min() >= fidelity.MIN_COSINE  # int8 vectors, or floating point ones after a fall back
    if report.int8_reembedded:
        assert "re-embedded in floating point" in caplog.text
    print(f"lowest cosine to float32: {cosines.min():.4f}; {report.summary()}")


def test_int8_needs_openvino_on_a_cpu():
    with pytest.raises(ModelLoadError, match="int8 runs on the openvino backend"):
        clip("int8", "torch")
    with pytest.raises(ModelLoadError, match="int8 runs on a CPU"):
        resolve_precision("int8", "cuda")

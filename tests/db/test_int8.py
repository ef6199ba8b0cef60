"""int8 image tower (OpenVINO + NNCF): calibrated once on the user's own first images, kept only when
faithful, and its vectors stay within cosine 0.99 of open_clip's float32 ones for the same files."""

from __future__ import annotations

import shutil
import subprocess
from importlib.util import find_spec

import numpy as np
import pytest
from helpers import coco_photos
from PIL import Image

import nanodb.model.runtimes.openvino_int8 as int8_module
from nanodb import NanoDB
from nanodb.model.clip import ClipModel, ModelConfig, ModelLoadError, ModelSpec
from nanodb.model.runtimes import resolve_precision
from nanodb.model.runtimes.openvino_int8 import CALIBRATION_IMAGES

pytestmark = pytest.mark.skipif(not (find_spec("openvino") and find_spec("nncf")), reason="needs openvino and nncf")

SPEC = ModelSpec("ViT-S-32", "none", seed=11)  # its own weights: no other test's cached tower


def clip(precision: str, backend: str = "openvino") -> ClipModel:
    """A model of SPEC built now (not load_model's process cache: each test has its own model cache)."""
    return ClipModel(ModelConfig(SPEC, "cpu", precision, backend))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A model cache of its own, holding the int8 tower calibrated on the first 24 COCO photos."""
    folder = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NANODB_CACHE", str(folder))
        clip("int8").encode_images([Image.open(f) for f in coco_photos(24)])
    return folder


@pytest.fixture
def in_cache(cache, monkeypatch):
    monkeypatch.setenv("NANODB_CACHE", str(cache))
    return cache


def refuse_calibration(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("calibrated again")

    monkeypatch.setattr(subprocess, "run", fail)


def test_int8_vectors_stay_within_cosine_099_of_float32(in_cache, monkeypatch):
    refuse_calibration(monkeypatch)  # the cached tower is used as it is
    files = coco_photos(40)[24:]  # photos the calibration never saw
    images = [Image.open(f) for f in files]
    int8 = clip("int8")
    assert int8.precision_id == "int8/openvino"
    vectors = int8.encode_images(images)
    reference = clip("float32", "torch").encode_images(images)
    assert np.sum(vectors * reference, axis=1).min() > 0.99
    again = clip("int8").encode_images(images)
    np.testing.assert_array_equal(again, vectors)  # the same tower, from disk


def test_calibration_waits_for_a_batch_large_enough_and_happens_once(tmp_path, monkeypatch):
    monkeypatch.setenv("NANODB_CACHE", str(tmp_path))
    images = [Image.open(f) for f in coco_photos(CALIBRATION_IMAGES + 2)]
    model = clip("int8")
    floating = model.encode_images(images[:2])  # too few to calibrate on: floating point, not quantized
    assert not list(tmp_path.glob("openvino/*-int8"))
    np.testing.assert_allclose(floating, clip("bfloat16").encode_images(images[:2]),
                               atol=1e-6)
    model.encode_images(images[2:])
    assert len(list(tmp_path.glob("openvino/*-int8/model.xml"))) == 1
    assert not [p for p in tmp_path.glob("openvino/*") if p.name.startswith("tmp")]  # nothing half-written left
    assert not np.allclose(model.encode_images(images[:2]), floating, atol=1e-6)  # now int8


def test_a_tower_that_is_not_faithful_stays_in_floating_point(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("NANODB_CACHE", str(tmp_path))
    monkeypatch.setattr(int8_module, "INT8_MIN_COSINE", 1.5)  # no quantized tower can pass
    images = [Image.open(f) for f in coco_photos(CALIBRATION_IMAGES)]
    vectors = clip("int8").encode_images(images)
    assert "not faithful" in caplog.text
    np.testing.assert_allclose(vectors, clip("bfloat16").encode_images(images),
                               atol=1e-6)
    refuse_calibration(monkeypatch)  # the refusal is remembered: no second calibration
    clip("int8").encode_images(images)


def test_int8_database_finds_each_photo_and_its_resized_copy(in_cache, tmp_path, monkeypatch):
    refuse_calibration(monkeypatch)
    photos = tmp_path / "photos"
    photos.mkdir()
    for f in coco_photos(12):
        shutil.copy(f, photos / f.name)
    with NanoDB(tmp_path / "db", "ViT-S-32", pretrained="none", seed=11, precision="int8", backend="openvino",
                device="cpu") as db:
        db.scan(photos)
        assert db.precision == "int8/openvino"
        for f in sorted(photos.iterdir()):
            first = db.search(str(f), k=1)[0]
            assert db.path_of(first.index) == str(f)
            np.testing.assert_allclose(db.vectors[first.index].astype(np.float32),
                                       db.model.encode_images([Image.open(f)])[0], atol=2e-3)  # float16 storage
            copy = Image.open(f)
            copy = copy.resize((copy.width // 2, copy.height // 2))
            assert db.path_of(db.search(copy, k=1)[0].index) == str(f)


def test_int8_needs_openvino_on_a_cpu():
    with pytest.raises(ModelLoadError, match="int8 runs on the openvino backend"):
        clip("int8", "torch")
    with pytest.raises(ModelLoadError, match="int8 runs on a CPU"):
        resolve_precision("int8", "cuda")

"""Fast CLIP paths (bfloat16, OpenVINO, JPEG draft decoding) give the vectors of open_clip's own
float32 preprocess + encode_image for the same real files, and databases of any precision mix."""

from __future__ import annotations

import asyncio
import json
import shutil
from importlib.util import find_spec

import numpy as np
import pytest
import torch
from helpers import coco_photos
from nanodb.pipeline.decode import DecodedImage, ImageDecodePool
from PIL import Image

from nanodb import NanoDB
from nanodb.media.opener import open_image
from nanodb.model.clip import ClipModel, ModelConfig, ModelLoadError, ModelSpec, load_model
from nanodb.model.preprocess import ResizeCenterCrop
from nanodb.model.runtimes import resolve_precision

SPEC = ModelSpec("ViT-S-32", "none")
PATHS = [("float32", "torch"), ("bfloat16", "torch")]
if find_spec("openvino"):
    PATHS += [("float32", "openvino"), ("bfloat16", "openvino")]


@pytest.fixture(scope="module")
def reference():
    """open_clip's own float32 preprocess + encode_image: what NanoDB and rclip computed before."""
    return load_model(ModelConfig(SPEC, "cpu", "float32", "torch"))


def open_clip_vectors(reference: ClipModel, files) -> np.ndarray:
    with torch.no_grad():
        x = torch.stack([reference.preprocess(Image.open(f)) for f in files])
        return torch.nn.functional.normalize(reference.model.encode_image(x), dim=-1).numpy()


@pytest.fixture(scope="module")
def big_jpeg(tmp_path_factory):
    """A 12-megapixel JPEG: large enough for a reduced-scale (draft) decode."""
    path = tmp_path_factory.mktemp("big") / "big.jpg"
    image = Image.open(coco_photos(1)[0])
    image.resize((4000, 3000), Image.Resampling.BICUBIC).save(path, quality=92)
    return path


@pytest.mark.parametrize("precision,backend", PATHS)
def test_every_path_matches_open_clip_float32(reference, precision, backend):
    model = load_model(ModelConfig(SPEC, "cpu", precision, backend))
    assert model.precision_id == f"{precision}/{backend}"
    files = coco_photos(8)
    cosines = np.sum(model.encode_images([Image.open(f) for f in files]) * open_clip_vectors(reference, files), 1)
    assert cosines.min() > 0.999


@pytest.mark.parametrize("precision,backend", PATHS)
def test_text_vectors_match_float32(reference, precision, backend):
    texts = ["a dog on a beach", "two people riding horses", "x"]
    model = load_model(ModelConfig(SPEC, "cpu", precision, backend))
    cosines = np.sum(model.encode_text(texts) * reference.encode_text(texts), 1)
    assert cosines.min() > 0.999


def test_scan_decoding_matches_open_clip_float32(reference, big_jpeg):
    """The decode workers' path (draft decoding of large JPEGs, Pillow resize) plus the fastest model."""
    model = load_model(ModelConfig(SPEC, "cpu"))
    files = [*coco_photos(6), big_jpeg]
    pool = ImageDecodePool(model.pixel_transform, 1, 89478485)  # a decode worker, as in a scan

    async def decode_all():
        return [await pool.decode(str(f)) for f in files]

    try:
        decoded = asyncio.run(decode_all())
    finally:
        pool.close()
    assert all(isinstance(d, list) and len(d) == 1 for d in decoded), decoded  # a photo is one item
    decoded = [items[0] for items in decoded]
    assert all(isinstance(d, DecodedImage) for d in decoded)
    vectors = model.encode_pixels(np.stack([d.pixels for d in decoded]))
    assert np.sum(vectors * open_clip_vectors(reference, files), 1).min() > 0.99


def test_large_jpeg_decodes_at_reduced_scale_but_at_least_twice_the_input(reference, big_jpeg):
    transform = reference.pixel_transform
    assert isinstance(transform, ResizeCenterCrop)
    image = open_image(big_jpeg.read_bytes(), draft_size=transform.draft_size)
    assert min(image.size) < 3000 and min(image.size) >= 2 * transform.short_side
    small = coco_photos(1)[0]  # 640x480: under twice 224 is not reduced
    assert open_image(small.read_bytes(), draft_size=transform.draft_size).size == Image.open(small).size


def test_auto_precision_follows_the_hardware(monkeypatch):
    import nanodb.model.runtimes as m

    monkeypatch.setattr(m, "cpu_has_bfloat16", lambda: True)
    assert resolve_precision("auto", "cpu") == "bfloat16"
    assert resolve_precision("auto", "cuda") == "float16"
    monkeypatch.setattr(m, "cpu_has_bfloat16", lambda: False)
    assert resolve_precision("auto", "cpu") == "float32"
    with pytest.raises(ModelLoadError, match="float16 runs on a CUDA GPU"):
        resolve_precision("float16", "cpu")
    with pytest.raises(ModelLoadError, match="unknown precision"):
        resolve_precision("int4", "cpu")


@pytest.mark.skipif(not find_spec("openvino"), reason="openvino is not installed")
def test_openvino_conversion_is_cached_and_falls_back_to_torch(monkeypatch, tmp_path):
    import openvino

    from nanodb.model.runtimes.openvino_float import OpenVinoImageTower

    monkeypatch.setenv("NANODB_CACHE", str(tmp_path))
    spec = ModelSpec("ViT-S-32", "none", seed=7)  # not in the process cache of load_model
    first = ClipModel(ModelConfig(spec, "cpu", "bfloat16", "openvino"))
    assert len(list((tmp_path / "openvino").glob("ViT-S-32-*/model.xml"))) == 1
    image = Image.open(coco_photos(1)[0])

    def fail(*args, **kwargs):
        raise RuntimeError("unsupported operation")

    monkeypatch.setattr(openvino, "convert_model", fail)
    again = ClipModel(ModelConfig(spec, "cpu", "bfloat16", "openvino"))  # from the cache: no conversion
    np.testing.assert_allclose(again.encode_images([image]), first.encode_images([image]), atol=1e-6)

    monkeypatch.setattr(OpenVinoImageTower, "__init__", fail)
    fallback = ClipModel(ModelConfig(spec, "cpu", "bfloat16", "auto"))
    assert fallback.precision_id == "bfloat16/torch"
    assert float(np.sum(fallback.encode_images([image]) * first.encode_images([image]))) > 0.999
    with pytest.raises(ModelLoadError, match="backend openvino cannot run the image tower"):
        ClipModel(ModelConfig(spec, "cpu", "bfloat16", "openvino"))


def test_database_records_its_precision_and_opens_in_another(tmp_path):
    """Built with the fast path, reopened in float32 torch (and an old manifest with no precision):
    each photo and a resized copy of it still find the stored photo first."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for f in coco_photos(10):
        shutil.copy(f, photos / f.name)
    with NanoDB(tmp_path / "db", config="test", precision="auto", backend="auto") as db:
        db.scan(photos)
        built = db.precision
        assert built == db.model.precision_id
        db.save()
    assert json.loads((tmp_path / "db" / "nanodb.json").read_text())["precision"] == built

    manifest = json.loads((tmp_path / "db" / "nanodb.json").read_text())
    del manifest["precision"]  # as written before precisions were recorded
    (tmp_path / "db" / "nanodb.json").write_text(json.dumps(manifest))
    with NanoDB(tmp_path / "db", config="test", precision="float32", backend="torch") as db:
        assert db.precision == "float32/torch" and db.model.precision_id == "float32/torch"
        for f in sorted(photos.iterdir()):
            assert db.path_of(db.search(str(f), k=1)[0].index) == str(f)
            copy = Image.open(f)
            copy = copy.resize((copy.width // 2, copy.height // 2))
            assert db.path_of(db.search(copy, k=1)[0].index) == str(f)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_float16_matches_cpu_float32(reference):
    model = ClipModel(ModelConfig(SPEC, "cuda"))
    assert model.precision_id == "float16/torch"
    files = coco_photos(8)
    cosines = np.sum(model.encode_images([Image.open(f) for f in files]) * open_clip_vectors(reference, files), 1)
    assert cosines.min() > 0.99

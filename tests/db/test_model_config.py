"""One ModelConfig (model, weights, seed, device, precision, backend) reaches every model loader: the
database's own, a Ray actor's, a repair's; preprocessing comes from the model's preprocess config; and
a new image-tower runtime is one new file."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import open_clip
import pytest
import torch
from helpers import REPO, coco_photos
from PIL import Image

import nanodb.cluster as cluster
from nanodb import NanoDB
from nanodb.config import load_settings
from nanodb.model.clip import BACKENDS, PRECISIONS, ModelConfig, ModelLoadError, ModelSpec
from nanodb.model.preprocess import Preprocessing, ResizeCenterCrop
from nanodb.storage.format import MANIFEST

# bfloat16 in torch runs on any CPU, and is neither 'auto' nor the manifest's default ('float32/torch')
RUN = {"device": "cpu", "precision": "bfloat16", "backend": "torch"}


def test_repair_builds_its_fallback_model_as_the_settings_say(tmp_path):
    path = tmp_path / "db"
    with NanoDB(path, config="test") as db:
        db.add(np.random.default_rng(0).standard_normal((3, db.dim)), paths=["/a", "/b", "/c"])
        db.save()
    (path / MANIFEST).write_text("garbage")
    report = NanoDB.repair(path, settings=load_settings("test", **RUN))
    assert report.manifest_rebuilt and report.kept == 3
    assert json.loads((path / MANIFEST).read_text())["precision"] == "bfloat16/torch"


def test_a_ray_scan_hands_the_databases_whole_model_config_to_the_clip_actors(tmp_path, monkeypatch):
    """The embed stage's actor factory loads the model with the settings' precision and backend."""
    pytest.importorskip("ray")

    class Started(Exception):
        """The stage is not started for real: its factory is what is looked at."""

    factories = []

    def stage(factory, *args):
        factories.append(factory)
        raise Started

    monkeypatch.setattr(cluster, "RayEmbedStage", stage)
    loaded = []
    monkeypatch.setattr(cluster, "load_model", loaded.append)
    (tmp_path / "photos").mkdir()
    shutil.copy(coco_photos(1)[0], tmp_path / "photos")
    with NanoDB(tmp_path / "db", config="test", seed=3, **RUN) as db:
        db.cluster = cluster.RayCluster(cluster.RayOptions())  # not connected: Ray is never started
        monkeypatch.setattr(db.cluster, "resources", lambda: {"CPU": 2.0})
        with pytest.raises(Started):
            db.scan(tmp_path / "photos")
    factories[0]()  # as the actor calls it
    assert loaded == [ModelConfig(ModelSpec("ViT-S-32", "none", 3), "cpu", "bfloat16", "torch")]


def test_the_actor_factory_loads_the_config_it_is_given(monkeypatch):
    loaded = []
    monkeypatch.setattr(cluster, "load_model", loaded.append)
    config = ModelConfig(ModelSpec("ViT-S-32", "none"), "cpu", "float32", "torch")
    threads = torch.get_num_threads()
    try:
        cluster.actor_model(config, 1)
    finally:
        torch.set_num_threads(threads)
    assert loaded == [config]


def test_the_identity_of_a_model_is_its_spec_not_how_it_runs():
    spec = ModelSpec("ViT-S-32", "none", 3)
    settings = load_settings("test", seed=3, **RUN)
    config = ModelConfig.from_settings(settings)
    assert config == ModelConfig(spec, "cpu", "bfloat16", "torch")
    assert ModelConfig.from_settings(load_settings("test", seed=3)).spec == config.spec
    assert config.with_spec(ModelSpec("ViT-B-32", "none")).precision == "bfloat16"


@pytest.mark.parametrize("cfg", [
    {},  # open_clip's usual: shortest side, bicubic, square centre crop (Pillow alone)
    {"interpolation": "bilinear"},
    {"resize_mode": "squash"},
    {"resize_mode": "longest"},
    {"size": (224, 192)},
    {"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.5, 0.75)},
])
def test_preprocessing_follows_the_models_preprocess_config(cfg):
    """pixel_transform then normalisation with the config's mean and std equal open_clip's preprocess."""
    config = open_clip.transform.PreprocessCfg(**cfg)
    preprocess = open_clip.transform.image_transform_v2(config, is_train=False)
    steps = Preprocessing.of(config)
    transform = steps.pixel_transform(preprocess)
    assert isinstance(transform, ResizeCenterCrop) == (cfg.get("resize_mode", "shortest") == "shortest"
                                                       and "size" not in cfg)
    mean, std = np.asarray(steps.mean)[:, None, None], np.asarray(steps.std)[:, None, None]
    for photo in coco_photos(3):
        image = Image.open(photo).convert("RGB")
        pixels = np.asarray(transform(image), np.float64).transpose(2, 0, 1) / 255
        np.testing.assert_allclose((pixels - mean) / std, preprocess(image).numpy(), atol=1e-5)


def test_decode_workers_unpickle_the_pixel_transform_without_torch():
    code = ("import pickle, sys; t = pickle.loads(sys.stdin.buffer.read()); "
            "assert 'torch' not in sys.modules and 'open_clip' not in sys.modules, sorted(sys.modules); print(t)")
    done = subprocess.run([sys.executable, "-c", code], input=pickle.dumps(ResizeCenterCrop(224, (224, 224), 3)),
                          capture_output=True, cwd=REPO)
    assert done.returncode == 0, done.stderr.decode()
    assert b"ResizeCenterCrop" in done.stdout


def test_the_choices_of_precision_and_backend_come_from_the_registered_runtimes():
    assert set(BACKENDS) == {"auto", "torch", "openvino"}
    assert PRECISIONS == ("auto", "float32", "bfloat16", "float16", "int8")


def test_auto_takes_the_preferred_runtime_that_is_installed(monkeypatch):
    import nanodb.model.runtimes as runtimes

    monkeypatch.setattr(runtimes, "find_spec", lambda name: None if name in ("openvino", "nncf") else name)
    assert runtimes.resolve_backend("auto", "cpu", "float32") == "torch"
    with pytest.raises(ModelLoadError, match="needs openvino, nncf: pip install openvino nncf"):
        runtimes.resolve_backend("auto", "cpu", "int8")
    with pytest.raises(ModelLoadError, match="int8 runs on the openvino backend"):
        runtimes.resolve_backend("torch", "cpu", "int8")
    with pytest.raises(ModelLoadError, match="backend openvino does not run on a CUDA GPU"):
        runtimes.resolve_backend("openvino", "cuda", "float32")


FAKE_RUNTIME = '''
"""A test runtime: the image tower's features are the pixels' channel means, repeated."""

import numpy as np

from nanodb.model.runtimes import runtime


@runtime("fake", cpu=("float32", "int4"))
class FakeTower:
    def __init__(self, clip):
        self.dim = int(clip.model.text_projection.shape[1])

    def __call__(self, pixels):
        means = pixels.reshape(len(pixels), -1, 3).mean(axis=1)
        return np.tile(means, (1, self.dim // 3 + 1))[:, : self.dim].astype(np.float32)
'''


def test_a_new_runtime_is_one_new_file(tmp_path):
    """A copy of the package with one more file in nanodb/model/runtimes offers its backend and
    precision and runs the image tower with it."""
    shutil.copytree(REPO / "nanodb", tmp_path / "nanodb", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "nanodb" / "model" / "runtimes" / "fake.py").write_text(FAKE_RUNTIME)
    code = textwrap.dedent(f"""
        import numpy as np
        import nanodb.model.clip as clip
        assert clip.__file__.startswith({str(tmp_path)!r}), clip.__file__
        assert "fake" in clip.BACKENDS and "int4" in clip.PRECISIONS, (clip.BACKENDS, clip.PRECISIONS)
        model = clip.ClipModel(clip.ModelConfig(clip.ModelSpec("ViT-S-32", "none"), "cpu", "int4", "auto"))
        assert model.precision_id == "int4/fake", model.precision_id
        vectors = model.encode_pixels(np.full((2, 224, 224, 3), 7, np.uint8))
        assert vectors.shape == (2, model.dim) and np.allclose(vectors, vectors[0, 0])
    """)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr

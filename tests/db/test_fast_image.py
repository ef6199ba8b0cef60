"""A query image without the model (model/image_export.py): the image tower a scan converted to OpenVINO
gives the model's vector and search results, spares a fresh process torch and open_clip, is used only
where the database's vectors were computed by that runtime and precision, and a one-shot command says
on stderr what it waits for and how long it took."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from helpers import REPO

from nanodb import NanoDB
from nanodb.model.clip import ClipModel
from nanodb.model.image_export import ExportedImageTower
from nanodb.model.runtimes.openvino_float import cache_dir


def test_a_query_image_gets_the_models_vector_without_the_model(scanned_db, query_image):
    path, _ = scanned_db
    with NanoDB(path, read_only=True) as fast:
        vector = fast.embed_query(query_image)
        found = fast.search(str(query_image), k=8)
        assert isinstance(fast.image_model, ExportedImageTower) and not fast.model_loaded
    with NanoDB(path, read_only=True) as slow:
        assert isinstance(slow.model, ClipModel) and slow.image_model is slow.model
        assert np.allclose(vector, slow.embed_query(query_image), atol=1e-6)
        expected = slow.search(str(query_image), k=8)
    assert [r.index for r in found] == [r.index for r in expected]
    assert np.allclose([r.similarity for r in found], [r.similarity for r in expected], atol=1e-6)


def test_a_database_computed_in_another_precision_loads_the_model(scanned_db, query_image):
    path, _ = scanned_db
    with NanoDB(path, read_only=True) as db:
        built = db.precision  # e.g. 'bfloat16/openvino'
    other = "float32" if built.startswith("bfloat16") else "bfloat16"
    with NanoDB(path, read_only=True, precision=other) as db:
        db.embed_query(query_image)
        assert db.model_loaded and db.image_model is db.model
    with NanoDB(path, read_only=True, backend="torch") as db:
        db.embed_query(query_image)
        assert db.model_loaded


def one_shot(args: list[str], cache) -> tuple[list[dict], str]:
    """`nanodb ARGS --json` in a fresh process with its own cache folder: (its results, its stderr, with
    the modules it imported: python -X importtime)."""
    run = subprocess.run([sys.executable, "-X", "importtime", "-m", "nanodb", *args, "--json"], cwd=REPO,
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(REPO), "NANODB_CACHE": str(cache)})
    assert run.returncode == 0, run.stderr[-3000:]
    return [json.loads(line) for line in run.stdout.splitlines()], run.stderr


def imported(stderr: str) -> set[str]:
    return {line.rsplit("|", 1)[1].strip() for line in stderr.splitlines() if line.startswith("import time:")}


def said(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("nanodb: ")]


def test_one_shot_image_queries_say_what_they_load_and_the_second_needs_no_torch(scanned_db, query_image,
                                                                                 tmp_path):
    path, _ = scanned_db
    cache = tmp_path / "cache"
    shutil.copytree(cache_dir() / "openvino", cache / "openvino")  # converted towers: no conversion here
    first, err = one_shot(["similar", "--path", str(path), str(query_image)], cache)
    assert said(err)[:2] == ["nanodb: loading the model ViT-S-32…", said(err)[1]], err[-3000:]
    assert said(err)[1].startswith("nanodb: loading the model ViT-S-32: ") and said(err)[1].endswith(" s")
    assert "torch" in imported(err)
    second, err = one_shot(["similar", "--path", str(path), str(query_image)], cache)
    assert said(err)[0] == "nanodb: loading the image tower of ViT-S-32 (converted to OpenVINO)…", err[-3000:]
    assert not any("loading the model" in line for line in said(err)), err[-3000:]
    assert not {"torch", "open_clip"} & imported(err)
    assert [r["index"] for r in second] == [r["index"] for r in first]
    assert np.allclose([r["similarity"] for r in second], [r["similarity"] for r in first], atol=2e-6)


@pytest.mark.slow
def test_the_first_text_query_says_it_loads_the_model_and_exports_the_text_tower(scanned_db, tmp_path):
    path, _ = scanned_db
    cache = tmp_path / "cache"
    shutil.copytree(cache_dir() / "openvino", cache / "openvino")
    _, err = one_shot(["search", "--path", str(path), "a red car"], cache)
    lines = said(err)
    assert lines[0] == "nanodb: loading the model ViT-S-32…" and lines[1].startswith("nanodb: loading the model")
    assert lines[2] == "nanodb: exporting the text tower of ViT-S-32 for fast text queries (once)…"
    assert lines[3].startswith("nanodb: exporting the text tower of ViT-S-32 for fast text queries (once): ")
    _, err = one_shot(["search", "--path", str(path), "a red car"], cache)
    assert said(err) == [] and not {"torch", "open_clip"} & imported(err)

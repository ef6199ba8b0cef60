"""Text queries without torch: the text tower's export (model/text_export.py) reads text as open_clip does,
gives its vectors and search results, is never used stale or broken, and spares a fresh process torch."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import open_clip
import pytest
import torch

from nanodb import NanoDB
from nanodb.model.clip import ModelConfig, ModelSpec, load_model
from nanodb.model.text_export import (
    ExportedTextTower,
    export_folder,
    export_text_tower,
    load_text_tower,
    text_encoder,
)

FLOAT32_TORCH = ModelConfig(ModelSpec("ViT-S-32", "none"), "auto", "float32", "torch")  # a NanoDB's with these
QUERIES = ["a red car", "a dog on the beach", "people at a table", "2:dog + beach - snow", "café ☕ at night"]

FRAGMENTS = [
    "a", "red", "car", "Dog", "BEACH", "photo", "of", "the", "night", "42", "3.14", "1,000", "don't", "it's",
    "we're", "I'll", "they've", "I'm", "he'd", "!!", "?", "...", "--", "(parens)", "[x]", "#tag", "@user",
    "e-mail", "snake_case", "CamelCase", "&amp;", "&lt;b&gt;", "&#39;", "&nbsp;", "café", "cafe\u0301",
    "naïve", "Straße", "İstanbul", "ΑΘΗΝΑ", "москва", "東京", "タワー", "서울", "北京市", "مرحبا", "שלום",
    "नमस्ते", "ไทย", "🚗", "🐈‍⬛", "👍🏽", "🇫🇷", "∑∫√", "½", "①", "Ⅻ", "ﬁ", "ｆｕｌｌ", "\u00a0", "\u2003",
    "\t", "\n", "\x1c", "\u200b", "<start_of_text>", "<end_of_text>", "â€œmojibakeâ€\x9d", "Ã©tÃ©", "\\",
    "'", '"', "`", "~", "€100", "x²", "ǅ", "ß",
]


def varied_texts(n: int, seed: int = 0) -> list[str]:
    """`n` texts of 1 to 30 fragments (words, scripts, emoji, entities, odd whitespace), joined by
    spaces or not; some long enough to be cut at the context length."""
    rng = np.random.default_rng(seed)
    texts = ["", " ", "a photo of " * 60, "x" * 500, "🚗" * 100]
    while len(texts) < n:
        parts = rng.choice(FRAGMENTS, rng.integers(1, 30))
        texts.append(("" if rng.random() < 0.3 else " ").join(parts))
    return texts


@pytest.fixture(scope="module")
def exported(scanned_db):
    """The test model's text export (made by a first text query if no earlier test made it)."""
    path, _ = scanned_db
    with NanoDB(path, read_only=True) as db:
        tower = db.text_model
    assert isinstance(tower, ExportedTextTower)
    return tower


def test_the_export_reads_text_as_open_clip_does(exported):
    texts = varied_texts(300)
    reference = open_clip.get_tokenizer("ViT-S-32")
    ours, theirs = exported.tokenizer(texts), reference(texts).numpy()
    differ = [t for t, a, b in zip(texts, ours, theirs) if not np.array_equal(a, b)]
    assert differ == []
    assert (theirs[2] != 0).all() and theirs[2][-1] == reference.eot_token_id  # one was cut at 77


def test_exported_vectors_are_open_clips(exported):
    model = load_model(FLOAT32_TORCH)
    with torch.no_grad():
        reference = model.model.encode_text(model.tokenizer(QUERIES)).float()
    reference = torch.nn.functional.normalize(reference, dim=-1).numpy()
    assert (exported.encode_text(QUERIES) * reference).sum(1).min() >= 0.999


def test_a_text_search_finds_what_the_torch_model_finds(scanned_db, exported):
    path, _ = scanned_db
    with NanoDB(path, read_only=True) as fast, NanoDB(path, read_only=True, backend="torch",
                                                     precision="float32") as slow:
        assert isinstance(slow.text_model, type(slow.model))
        for query in QUERIES:
            a, b = fast.search(query, k=8), slow.search(query, k=8)
            assert [r.index for r in a] == [r.index for r in b], query
            assert np.allclose([r.similarity for r in a], [r.similarity for r in b], atol=1e-4)


def test_a_fresh_process_searches_text_without_torch(scanned_db, exported):
    path, _ = scanned_db
    script = ("import sys, json; from nanodb import NanoDB; db = NanoDB(sys.argv[1], read_only=True);"
              "found = [r.index for r in db.search('a red car', k=5)];"
              "print(json.dumps([found, [m for m in ('torch', 'open_clip') if m in sys.modules]]))")
    out = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=300)
    found, heavy = json.loads(out.stdout)
    assert heavy == []
    with NanoDB(path, read_only=True, backend="torch", precision="float32") as db:
        assert found == [r.index for r in db.search("a red car", k=5)]


def test_an_export_of_other_weights_or_another_version_is_never_found(tmp_path, monkeypatch):
    spec = ModelSpec("ViT-S-32", "none")
    folder = export_folder(spec, "2026.1")
    assert export_folder(ModelSpec("ViT-S-32", "none", seed=1), "2026.1") != folder
    assert export_folder(ModelSpec("ViT-B-32", "none"), "2026.1") != folder
    assert export_folder(spec, "2026.2") != folder
    monkeypatch.setattr("nanodb.__version__", "9.9.9")
    assert export_folder(spec, "2026.1") != folder
    checkpoint = tmp_path / "weights.bin"
    checkpoint.write_bytes(b"one")
    before = export_folder(ModelSpec("ViT-S-32", str(checkpoint)), "2026.1")
    checkpoint.write_bytes(b"two")  # the same path and size, rewritten
    os.utime(checkpoint, ns=(1, 1))
    assert export_folder(ModelSpec("ViT-S-32", str(checkpoint)), "2026.1") != before


def test_a_broken_export_falls_back_to_the_torch_model(exported, tmp_path, monkeypatch, caplog):
    import openvino as ov

    monkeypatch.setattr("nanodb.model.text_export.cache_dir", lambda: tmp_path)  # the image tower's stays
    spec = ModelSpec("ViT-S-32", "none")
    broken = export_folder(spec, ov.__version__)
    shutil.copytree(exported.folder, broken)
    (broken / "text.bin").write_bytes(b"not weights")
    assert load_text_tower(spec, "none@0") is None
    assert "cannot be read" in caplog.text
    model = load_model(FLOAT32_TORCH)
    assert text_encoder(dataclasses.replace(FLOAT32_TORCH, backend="auto"), "none@0", lambda: model) is model
    assert load_text_tower(spec, "none@0") is None  # not read again, nor overwritten
    assert (broken / "text.bin").read_bytes() == b"not weights"


def test_a_model_that_cannot_be_exported_is_not_tried_again(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr("nanodb.model.text_export.cache_dir", lambda: tmp_path)
    tries = []

    def failing(clip, folder, ov):
        tries.append(folder)
        raise RuntimeError("the converter gave up")

    monkeypatch.setattr("nanodb.model.text_export._write_export", failing)
    model = load_model(FLOAT32_TORCH)
    assert export_text_tower(model) is None and "the converter gave up" in caplog.text
    monkeypatch.setattr("nanodb.model.text_export._failed", set())  # as in a new process
    assert export_text_tower(model) is None and len(tries) == 1
    assert [p.suffix for p in (tmp_path / "text").iterdir()] == [".failed"]  # no export, the note why

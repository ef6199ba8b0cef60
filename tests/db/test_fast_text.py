"""Text queries without torch: the text tower's export (model/text_export.py) reads text as open_clip does,
gives its vectors and search results, is never used stale or broken, and spares a fresh process torch."""

from __future__ import annotations

import copy
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

import nanodb.model.clip
from nanodb import NanoDB
from nanodb.model.clip import ModelConfig, ModelSpec, load_model
from nanodb.model.text_export import (
    ExportedTextTower,
    export_folder,
    export_text_tower,
    load_text_tower,
    text_encoder,
)
from nanodb.model.text_length import cuttable, needed_length

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


# texts of 2 to 77 tokens (start and end included), for a batch that runs cut to its longest
UNEVEN = ["x", "a red car", "a dog on the beach at sunset, people at a table behind it",
          "🚗🚕 emoji 🐈‍⬛ " * 4, "", "a photo of " * 40, "東京タワー の 夜景"]


def full_length_vectors(texts: list[str]) -> np.ndarray:
    """open_clip's own encode_text at the full context length, float32, unit length."""
    model = load_model(FLOAT32_TORCH)
    with torch.no_grad():
        return torch.nn.functional.normalize(model.model.encode_text(model.tokenizer(texts)), dim=-1).numpy()


def record_token_shapes(monkeypatch) -> list[tuple[int, int]]:
    """The shapes of the token ids every ExportedTextTower runs from now on, in order."""
    shapes = []
    token_ids = ExportedTextTower.token_ids

    def recorded(self, texts):
        tokens = token_ids(self, texts)
        shapes.append(tokens.shape)
        return tokens

    monkeypatch.setattr(ExportedTextTower, "token_ids", recorded)
    return shapes


def test_a_batch_of_uneven_texts_runs_cut_to_its_longest_with_open_clips_vectors(exported, monkeypatch):
    assert exported.cut
    shapes = record_token_shapes(monkeypatch)
    reference = full_length_vectors(UNEVEN)
    short = [i for i, t in enumerate(UNEVEN) if t != "a photo of " * 40]
    lengths = needed_length(open_clip.get_tokenizer("ViT-S-32")([UNEVEN[i] for i in short]).numpy())
    for rows in (range(len(UNEVEN)), short, [0], [1, 4]):
        vectors = exported.encode_text([UNEVEN[i] for i in rows])
        assert (vectors * reference[rows]).sum(1).min() > 0.9999, rows
    assert [shape[1] for shape in shapes] == [77, lengths, 3, 5]  # "x" is 3 tokens, "a red car" 5
    assert 20 < lengths < 77


def test_the_torch_model_runs_a_batch_cut_to_its_longest_with_the_same_vectors(monkeypatch):
    model = load_model(FLOAT32_TORCH)
    assert cuttable(model.model)
    lengths = []
    cut = nanodb.model.clip.encode_text_cut
    monkeypatch.setattr("nanodb.model.clip.encode_text_cut", lambda m, tokens: lengths.append(tokens.shape[1])
                        or cut(m, tokens))
    reference = full_length_vectors(UNEVEN)
    assert (model.encode_text(UNEVEN) * reference).sum(1).min() > 0.9999
    assert (model.encode_text(UNEVEN[:2]) * reference[:2]).sum(1).min() > 0.9999
    assert lengths == [77, 5]


def lone_vectors(tower, texts: list[str]) -> np.ndarray:
    return np.concatenate([tower.encode_text([text]) for text in texts])


def test_texts_encoded_together_get_their_lone_vectors_bit_for_bit(exported):
    """What the query batcher relies on: encode_each gives each text the bits encode_text([text]) gives,
    the first time a shape is met (checked then) and after (its calls shared where checked alike)."""
    tower = ExportedTextTower(exported.folder)
    texts = varied_texts(40, seed=3) + [f"photo number {i}" for i in range(48)] + ["a red car"] * 3
    want = lone_vectors(tower, texts)
    for _ in range(2):
        np.testing.assert_array_equal(tower.encode_each(texts), want)
    np.testing.assert_array_equal(tower.encode_each(texts[5:6]), want[5:6])


def test_the_torch_model_encodes_each_text_as_alone():
    model = load_model(FLOAT32_TORCH)
    texts = UNEVEN + ["a red car"]
    np.testing.assert_array_equal(model.encode_each(texts), lone_vectors(model, texts))


def test_a_shape_seen_to_change_the_bits_is_never_shared_again(exported, monkeypatch):
    """A call of 8 texts that gives other bits than the texts alone (a CPU whose kernels differ by the
    rows, stood in for by a tower that shifts them) is answered with the lone vectors, remembered, and
    later such texts share calls of a size seen alike."""
    tower = ExportedTextTower(exported.folder)
    texts = [f"photo number {i}" for i in range(100, 200)]
    lengths = [needed_length(tower.tokenizer([t])) for t in texts]
    length = max(set(lengths), key=lengths.count)
    texts = [t for t, n in zip(texts, lengths) if n == length][:12]
    assert len(texts) == 12
    want = lone_vectors(tower, texts)
    features, calls = tower.features, []

    def eights_differ(tokens):
        calls.append(len(tokens))
        return features(tokens) + (1e-3 if len(tokens) == 8 else 0)

    monkeypatch.setattr(tower, "features", eights_differ)
    np.testing.assert_array_equal(tower.encode_each(texts), want)
    assert calls == [8] + [1] * 8 + [4] + [1] * 4  # each new shape checked against the texts alone
    assert tower.shared_shapes == {(8, length): False, (4, length): True}
    calls.clear()
    np.testing.assert_array_equal(tower.encode_each(texts), want)
    assert calls == [4, 4, 4]


def test_a_text_tower_without_a_causal_mask_or_an_end_token_feature_runs_at_full_length():
    model = copy.deepcopy(load_model(FLOAT32_TORCH).model)
    assert cuttable(model)
    model.text_pool_type = "last"  # the feature at the last position: needs every position
    assert not cuttable(model)
    model.text_pool_type = "argmax"
    causal = model.attn_mask
    for mask in (None, torch.zeros_like(causal), causal[:10, :10], causal.T):
        model.attn_mask = mask
        assert not cuttable(model)


@pytest.mark.slow  # a second export (~20 s)
def test_a_tower_that_cannot_run_cut_is_exported_at_full_length(tmp_path, monkeypatch):
    monkeypatch.setattr("nanodb.model.text_export.cache_dir", lambda: tmp_path)
    monkeypatch.setattr("nanodb.model.text_export.cuttable", lambda model: False)
    folder = export_text_tower(load_model(FLOAT32_TORCH))  # checked against open_clip on the probes
    tower = ExportedTextTower(folder, keep_compiled=False)
    assert not tower.cut and json.loads((folder / "meta.json").read_text())["cut"] is False
    shapes = record_token_shapes(monkeypatch)
    assert (tower.encode_text(UNEVEN[:2]) * full_length_vectors(UNEVEN[:2])).sum(1).min() > 0.9999
    assert shapes == [(2, 77)]


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

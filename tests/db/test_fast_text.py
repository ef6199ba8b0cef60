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
from nanodb.model.text_length import cuttable
from nanodb.model.text_shapes import ROWS, TextShapes, check_shapes, cpu_id
from nanodb.search.text_cache import TEXT_VECTORS

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
    features = ExportedTextTower.features

    def recorded(self, tokens):
        shapes.append(tokens.shape)
        return features(self, tokens)

    monkeypatch.setattr(ExportedTextTower, "features", recorded)
    return shapes


def test_each_text_runs_at_its_token_length_bucket_with_open_clips_vectors(exported, monkeypatch):
    assert exported.cut
    shapes = record_token_shapes(monkeypatch)
    reference = full_length_vectors(UNEVEN)
    needed = open_clip.get_tokenizer("ViT-S-32")(UNEVEN).numpy().argmax(axis=1) + 1
    assert list(needed) == [3, 5, 16, 38, 2, 77, 15]
    for rows in (range(len(UNEVEN)), [0], [1, 4], [2, 3]):
        vectors = exported.encode_text([UNEVEN[i] for i in rows])
        assert (vectors * reference[rows]).sum(1).min() > 0.9999, rows
    # all: the texts of 3 and 2 positions in a call of 2 rows of 4, the one of 5 in 1 row of 8, those of
    # 16 and 15 in 2 rows of 16, those of 38 and 77 in 2 rows of 77; then "x" alone, and the others
    assert shapes == [(2, 4), (1, 8), (2, 16), (2, 77), (1, 4), (1, 4), (1, 8), (1, 16), (1, 77)]


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
    """What the query batcher relies on: each text gets the bits encode_text([text]) gives it, with any
    others, in any number (encode_each is encode_text)."""
    tower = ExportedTextTower(exported.folder)
    texts = varied_texts(40, seed=3) + [f"photo number {i}" for i in range(48)] + ["a red car"] * 3
    want = lone_vectors(tower, texts)
    for _ in range(2):
        np.testing.assert_array_equal(tower.encode_each(texts), want)
    np.testing.assert_array_equal(tower.encode_text(texts[5:6]), want[5:6])
    np.testing.assert_array_equal(tower.encode_text(texts[::-1][3:40]), want[::-1][3:40])


def texts_of_length(tokenizer, length: int, count: int) -> list[str]:
    """`count` distinct texts of `length` token positions (start and end included)."""
    words = ("dog", "beach", "car", "red", "snow", "city", "night", "cat", "sofa", "tree")
    texts = [" ".join([words[i // 10], words[i % 10], *(words[(i + j) % 10] for j in range(length - 4))])
             for i in range(count * 2)]  # one token a word
    return [t for t in texts if tokenizer([t]).argmax() + 1 == length][:count]


def test_a_text_gets_its_lone_bits_in_full_batches_of_every_shape(exported):
    """By construction: a text runs in the same shape alone or with others, and the shapes kept (checked
    at export) give it the same bits in every row count and at every place; here each bucket's text is
    encoded alone, then in full calls of every row count, at the first and the last row, among others."""
    tower = ExportedTextTower(exported.folder)
    assert set(tower.shapes.rows) == {4, 8, 16, 32, 77}
    for length, rows_kept in tower.shapes.rows.items():
        needed = {4: 4, 8: 6, 16: 13, 32: 30, 77: 60}[length]  # start, words, end
        texts = texts_of_length(tower.tokenizer, needed, max(rows_kept) + 1)
        assert len(texts) == max(rows_kept) + 1, length
        alone = tower.encode_text(texts[:1])[0]
        for rows in rows_kept:
            for batch in ([texts[0], *texts[1:rows]], [*texts[1:rows], texts[0]]):
                assert tower.shapes.calls(len(batch), length) == [rows]
                got = tower.encode_text(batch)[batch.index(texts[0])]
                np.testing.assert_array_equal(got, alone, err_msg=f"{rows} x {length}")
        assert (alone * full_length_vectors(texts[:1])[0]).sum() > 0.9999  # the lone torch model's, or close


def test_the_export_keeps_the_shapes_it_checked_and_a_lone_query_runs_in_one_row(exported, monkeypatch):
    meta = json.loads((exported.folder / "meta.json").read_text())
    assert TextShapes.from_meta(meta["shapes"]) == exported.shapes
    assert meta["shapes"]["cpu"] == cpu_id()
    assert exported.shapes.rows == {length: ROWS for length in (4, 8, 16, 32, 77)}  # all alike on this CPU
    shapes = record_token_shapes(monkeypatch)
    exported.encode_each(["a red car"])
    exported.encode_each([f"photo number {i}" for i in range(37)])  # 32, then 5 in a call of 8
    assert shapes == [(1, 8), (32, 8), (8, 8)]


def shifted_where(condition):
    """Stand-in tower features that get other bits where `condition(tokens)` holds, by the call's other
    rows (a CPU whose kernels mix rows)."""

    def features(tokens):
        base = tokens[:, :8].astype(np.float32) * np.linspace(0.5, 1.5, 8, dtype=np.float32)
        return base + (np.float32(1e-3) * tokens.sum(0)[:8] if condition(tokens) else np.float32(0))

    return features


def test_row_counts_that_give_other_bits_are_not_used(caplog):
    """A row count whose rows' bits depend on their neighbours, or differ from the largest's, is dropped
    for that token length, and said; where one row a call is left, texts run one by one."""
    lengths = (8, 16)
    shapes = check_shapes(shifted_where(lambda t: len(t) == 16), lengths, 49406, 49407)
    assert shapes.rows == {8: (1, 2, 4, 8, 32), 16: (1, 2, 4, 8, 32)}
    assert "texts of up to 8 tokens run in calls of 1/2/4/8/32 rows only (16 give other bits)" in caplog.text
    assert shapes.calls(20, 8) == [8, 8, 4] and shapes.calls(40, 16) == [32, 8]  # no call of 16
    shapes = check_shapes(shifted_where(lambda t: len(t) > 1 and t.shape[1] == 16), lengths, 49406, 49407)
    assert shapes.rows == {8: ROWS, 16: (1,)}  # every larger call at 16 mixes rows: one by one
    assert shapes.calls(3, 16) == [1, 1, 1]

    def features(tokens):  # calls of 2 and 4 rows a shade off: neither mixes rows, but their bits differ
        return shifted_where(lambda t: False)(tokens) * np.float32(1.001 if len(tokens) in (2, 4) else 1)

    assert check_shapes(features, lengths, 49406, 49407).rows == {8: (1, 8, 16, 32), 16: (1, 8, 16, 32)}


def test_an_export_checked_on_another_cpu_is_checked_again_here(exported, tmp_path, caplog):
    moved = tmp_path / exported.folder.name
    shutil.copytree(exported.folder, moved, ignore=shutil.ignore_patterns("compiled"))
    meta = json.loads((moved / "meta.json").read_text())
    meta["shapes"] = {"rows": {str(length): [1] for length in (4, 8, 16, 32, 77)}, "cpu": "another CPU"}
    (moved / "meta.json").write_text(json.dumps(meta))
    with caplog.at_level("INFO"):
        tower = ExportedTextTower(moved, keep_compiled=False)
    assert "was checked on another CPU (another CPU); checking its shapes on this one" in caplog.text
    assert tower.shapes == exported.shapes


def test_the_torch_model_encodes_each_text_as_alone():
    model = load_model(FLOAT32_TORCH)
    texts = UNEVEN + ["a red car"]
    np.testing.assert_array_equal(model.encode_each(texts), lone_vectors(model, texts))


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


def test_a_text_asked_again_is_served_from_the_cache_with_the_same_bits(scanned_db, exported, monkeypatch):
    path, _ = scanned_db
    calls = record_token_shapes(monkeypatch)
    with NanoDB(path, read_only=True) as db:
        TEXT_VECTORS.clear()
        first = db.search("A red car", k=5)
        assert calls == [(1, 8)]
        for text in ("a red car", "  a RED   car "):  # read alike by the tokenizer: one vector
            again = db.search(text, k=5)
            assert [(r.index, r.similarity) for r in again] == [(r.index, r.similarity) for r in first]
        assert calls == [(1, 8)]
        np.testing.assert_array_equal(db.queries.encode_texts(["a red car"]), exported.encode_text(["a red car"]))


def test_two_models_in_one_process_never_get_each_others_cached_vectors(scanned_db, exported):
    """The same database opened with the export and with the torch model (the same weights, vectors a
    little apart): each gets its own model's vector for a text the other asked first."""
    path, _ = scanned_db
    TEXT_VECTORS.clear()
    with NanoDB(path, read_only=True) as fast, NanoDB(path, read_only=True, backend="torch",
                                                     precision="float32") as slow:
        got = {name: db.queries.encode_texts(["a dog on the beach"]) for name, db in (("fast", fast), ("slow", slow))}
        np.testing.assert_array_equal(got["fast"], exported.encode_text(["a dog on the beach"]))
        np.testing.assert_array_equal(got["slow"], slow.text_model.encode_each(["a dog on the beach"]))
        assert not np.array_equal(got["fast"], got["slow"])
        assert len(TEXT_VECTORS) == 2

"""The database folder: crash-safe saves that cost what was added, and a model that cannot be mixed."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from nanodb import DatabaseError, NanoDB


def unit_vectors(n: int, dim: int, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.fixture
def db_path(tmp_path):
    return tmp_path / "db"


def test_save_appends_only_what_was_added(db_path):
    with NanoDB(db_path, config="test") as db:
        db.add(unit_vectors(100, db.dim), paths=[f"item{i}" for i in range(100)])
        db.save()
        files = {p.name: p.read_bytes() for p in db_path.iterdir() if p.suffix in (".f16", ".bin")}
        db.add(unit_vectors(10, db.dim, seed=1), metadata={"camera": "front"})
        db.save()
        for name, before in files.items():
            after = (db_path / name).read_bytes()
            assert after[: len(before)] == before, f"{name} was rewritten, not appended to"
        assert (db_path / "vectors.0.f16").stat().st_size == 110 * db.dim * 2


def test_an_interrupted_save_leaves_the_last_completed_save(db_path):
    with NanoDB(db_path, config="test") as db:
        dim = db.dim
        db.add(unit_vectors(50, dim), paths=[f"a{i}" for i in range(50)])
        db.save()
        saved = db.vectors.copy()
    # What a kill -9 in the middle of the next save leaves: data past the committed lengths,
    # and a half-written manifest that was never renamed into place.
    with open(db_path / "vectors.0.f16", "ab") as f:
        f.write(unit_vectors(7, dim).astype(np.float16).tobytes()[:-3])
    with open(db_path / "paths.0.bin", "ab") as f:
        f.write(b"half-written")
    (db_path / "nanodb.json.tmp").write_text('{"count": 99')
    with NanoDB(db_path) as db:
        assert len(db) == 50
        np.testing.assert_array_equal(db.vectors, saved)
        assert [db.path_of(i) for i in (0, 49)] == ["a0", "a49"]
        db.add(unit_vectors(5, dim, seed=2), paths=[f"b{i}" for i in range(5)])
        db.save()
    with NanoDB(db_path) as db:
        assert len(db) == 55
        assert db.path_of(54) == "b4" and db.path_of(49) == "a49"


def test_opening_with_another_model_is_a_clear_error(db_path):
    NanoDB(db_path, config="test").close()
    with pytest.raises(DatabaseError, match="built with ViT-S-32"):
        NanoDB(db_path, model="ViT-B-32", pretrained="none")
    with pytest.raises(DatabaseError, match="built with"):
        NanoDB(db_path, seed=1)


def test_random_weights_are_the_same_after_reopening(db_path):
    with NanoDB(db_path, config="test") as db:
        first = db.embed_query("a lighthouse at night")
    with NanoDB(db_path) as db:
        np.testing.assert_array_equal(db.embed_query("a lighthouse at night"), first)


def test_a_second_writer_is_refused(db_path):
    with NanoDB(db_path, config="test"):
        with pytest.raises(DatabaseError, match="open for writing by another process"):
            NanoDB(db_path)
        with NanoDB(db_path, read_only=True) as reader:
            assert len(reader) == 0


def test_newer_format_version_is_refused(db_path):
    NanoDB(db_path, config="test").close()
    manifest = json.loads((db_path / "nanodb.json").read_text())
    manifest["version"] = 99
    (db_path / "nanodb.json").write_text(json.dumps(manifest))
    with pytest.raises(DatabaseError, match="format version 99"):
        NanoDB(db_path)


def test_truncated_vectors_file_is_an_error_naming_the_file(db_path):
    with NanoDB(db_path, config="test") as db:
        db.add(unit_vectors(20, db.dim))
        db.save()
    with open(db_path / "vectors.0.f16", "r+b") as f:
        f.truncate(100)
    with pytest.raises(DatabaseError, match=r"vectors\.0\.f16 is truncated"):
        NanoDB(db_path)


def test_closing_removes_the_lock_file_it_wrote_and_only_that(tmp_path):
    root = tmp_path / "db"
    with NanoDB(root, config="test") as db:
        assert (root / ".lock").read_text() == str(os.getpid())
        with pytest.raises(DatabaseError, match="open for writing by another process"):
            NanoDB(root, config="test")  # refused: the holder's lock file stays
        assert (root / ".lock").read_text() == str(os.getpid())
        db.add(np.eye(db.dim, dtype=np.float32)[:1])
        db.save()
    assert not (root / ".lock").exists()
    (root / ".lock").write_text("12345")  # left by a writer that was killed: rewritten, then removed
    NanoDB(root, config="test").close()
    assert not (root / ".lock").exists()
    with NanoDB(root, config="test"):
        (root / ".lock").unlink()
        (root / ".lock").write_text("a file someone else wrote")  # not the one this process wrote: kept
    assert (root / ".lock").read_text() == "a file someone else wrote"
    with NanoDB(root, config="test", read_only=True) as db:
        assert len(db) == 1

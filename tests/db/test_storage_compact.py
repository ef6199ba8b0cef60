"""The compact copy is part of the database folder: appended by saves, checked, rewritten by a
compaction, rebuilt by repair, and computed for a folder written before it existed (format 1)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_storage import unit_vectors

from nanodb import DatabaseError, NanoDB
from nanodb.storage.compact import quantize_rows


@pytest.fixture
def db_path(tmp_path):
    return tmp_path / "db"


def assert_compact_matches_vectors(db):
    codes, scales = quantize_rows(db.vectors)
    np.testing.assert_array_equal(db.store.index.codes, codes)
    np.testing.assert_array_equal(db.store.index.scales, scales)


def assert_exact_search(db, queries, k=5):
    vectors, live = db.vectors.astype(np.float64), np.flatnonzero(~db.store.index.dead)
    for q in queries:
        scores = vectors[live] @ q.astype(np.float64)
        want = live[np.lexsort((live, -scores))[:k]]
        assert [r.index for r in db.search(q, k)] == want.tolist()


def test_saves_append_the_compact_copy_and_opening_reads_it(db_path):
    with NanoDB(db_path, config="test") as db:
        dim = db.dim
        db.add(unit_vectors(300, dim), paths=[f"a{i}" for i in range(300)])
        db.save()
        before = (db_path / "codes.0.u8").read_bytes()
        db.add(unit_vectors(20, dim, seed=1))
        db.save()
    assert (db_path / "codes.0.u8").read_bytes()[: len(before)] == before
    assert (db_path / "codes.0.u8").stat().st_size == 320 * dim
    assert (db_path / "scales.0.f32").stat().st_size == 320 * 12
    with NanoDB(db_path) as db:
        assert_compact_matches_vectors(db)
        assert_exact_search(db, unit_vectors(4, dim, seed=2))


def test_a_corrupted_compact_copy_is_refused_and_repair_rebuilds_it(db_path):
    with NanoDB(db_path, config="test") as db:
        dim = db.dim
        db.add(unit_vectors(200, dim), paths=[f"a{i}" for i in range(200)])
        db.save()
    data = bytearray((db_path / "codes.0.u8").read_bytes())
    data[5 * dim + 3] ^= 0x40
    (db_path / "codes.0.u8").write_bytes(bytes(data))
    with pytest.raises(DatabaseError, match="codes.0.u8 is corrupted"):
        NanoDB(db_path)
    (db_path / "scales.0.f32").unlink()
    report = NanoDB.repair(db_path)
    assert report.kept == 200
    with NanoDB(db_path) as db:
        assert_compact_matches_vectors(db)
        assert_exact_search(db, unit_vectors(3, dim, seed=3))


def test_compaction_rewrites_the_compact_copy_of_the_live_rows(db_path):
    with NanoDB(db_path, config="test") as db:
        dim = db.dim
        db.add(unit_vectors(400, dim), paths=[f"a{i}" for i in range(400)])
        db.save()
        db.delete(range(0, 400, 2))
        db.save()  # half deleted: compaction to generation 1
        assert (db_path / "codes.1.u8").stat().st_size == 200 * dim
        assert not (db_path / "codes.0.u8").exists()
    with NanoDB(db_path) as db:
        assert len(db) == 200
        assert_compact_matches_vectors(db)
        assert_exact_search(db, unit_vectors(3, dim, seed=4))


def test_a_format_1_folder_opens_and_its_next_save_writes_the_compact_copy(db_path):
    with NanoDB(db_path, config="test") as db:
        dim = db.dim
        db.add(unit_vectors(150, dim), paths=[f"a{i}" for i in range(150)])
        db.delete([3])
        db.save()
    # what nanodb before the compact copy wrote: version 1, no compact files, no compact field
    manifest = json.loads((db_path / "nanodb.json").read_text())
    manifest["version"] = 1
    del manifest["compact"]
    for kind in ("codes", "scales"):
        del manifest["checksums"][kind]
        (db_path / f"{kind}.0.{'u8' if kind == 'codes' else 'f32'}").unlink()
    (db_path / "nanodb.json").write_text(json.dumps(manifest))
    with NanoDB(db_path, read_only=True) as db:  # read-only: computed in memory, nothing written
        assert_compact_matches_vectors(db)
        assert_exact_search(db, unit_vectors(3, dim, seed=5))
    assert not (db_path / "codes.0.u8").exists()
    with NanoDB(db_path) as db:
        db.add(unit_vectors(1, dim, seed=6))
        db.save()
    assert json.loads((db_path / "nanodb.json").read_text())["version"] == 2
    assert (db_path / "codes.0.u8").stat().st_size == 151 * dim
    with NanoDB(db_path) as db:
        assert_compact_matches_vectors(db)
        assert_exact_search(db, unit_vectors(3, dim, seed=7))


def test_compaction_writes_the_live_rows_in_pieces_without_a_second_copy_of_the_vectors(db_path, monkeypatch):
    """At 10M x 512 a copy of the live vectors is 10 GB more: a compaction gathers them piece by piece
    while writing. The rows are those of the live items, in order, across piece boundaries."""
    import tracemalloc

    import nanodb.storage.store as store

    monkeypatch.setattr(store, "COMPACT_CHUNK_ROWS", 1000, raising=False)
    n = 20_000
    with NanoDB(db_path, config="test") as db:
        dim = db.dim
        db.add(unit_vectors(n, dim), paths=[f"a{i}" for i in range(n)])
        db.save()
        db.delete(range(0, n, 2))
        kept = db.vectors[1::2].copy()
        tracemalloc.start()
        try:
            db.save()  # half deleted: compaction
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert (db_path / "vectors.1.f16").stat().st_size == kept.nbytes
        assert peak < kept.nbytes / 2, f"compaction held {peak / 1e6:.1f} MB for {kept.nbytes / 1e6:.1f} MB of vectors"
    with NanoDB(db_path) as db:
        np.testing.assert_array_equal(db.vectors, kept)
        assert [db.path_of(i) for i in (0, 1, len(db) - 1)] == ["a1", "a3", f"a{n - 1}"]
        assert_compact_matches_vectors(db)

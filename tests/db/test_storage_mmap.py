"""Opening maps the vectors and their compact copy instead of reading them: a reopened database is
searched exactly, grows, saves, compacts and still catches a corrupted file (big files after opening)."""

from __future__ import annotations

import mmap
import os
import time

import numpy as np
import pytest
from test_storage import unit_vectors
from test_storage_compact import assert_exact_search

import nanodb.storage.index
import nanodb.storage.store
from nanodb import DatabaseError, NanoDB
from nanodb.storage.compact import quantize_rows
from nanodb.storage.mapped_rows import HUGE_PAGE, HeldFile, file_backed_rows, read_ahead

ROWS = 2000


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "db"
    with NanoDB(path, config="test") as db:
        db.add(unit_vectors(ROWS, db.dim), paths=[f"/p/{i}" for i in range(ROWS)])
        db.delete([3, 500])
        db.save()
    return path


def memory_behind(array: np.ndarray):
    base = array
    while isinstance(base, np.ndarray):
        base = base.base
    return base.obj if isinstance(base, memoryview) else base


def test_a_reopened_database_is_mapped_not_read(saved):
    with NanoDB(saved, read_only=True) as db:
        index = db.store.index
        assert index.mapped == ROWS
        for rows in (db.vectors, index.codes, index.scales):
            assert not rows.flags.owndata and isinstance(memory_behind(rows), mmap.mmap)


def test_searches_after_reopening_equal_a_float64_brute_force(saved):
    with NanoDB(saved, read_only=True) as db:
        assert_exact_search(db, unit_vectors(6, db.dim, seed=5), k=10)
        assert [r.index for r in db.search(db.vectors[7].astype(np.float32), 1)] == [7]


def test_appends_after_reopening_save_and_reopen_bit_for_bit(saved):
    file = saved / "vectors.0.f16"
    committed = file.read_bytes()
    with NanoDB(saved) as db:
        before = db.vectors.copy()
        added = unit_vectors(ROWS, db.dim, seed=9)  # past the mapped capacity: the index grows
        db.add(added[: ROWS // 3])
        db.add(added[ROWS // 3 :], paths=[f"/q/{i}" for i in range(ROWS - ROWS // 3)])
        assert db.store.index.mapped == ROWS
        db.vectors[0] = 0  # copy-on-write: the file never sees a change made in memory
        assert file.read_bytes() == committed
        db.vectors[0] = before[0]
        assert_exact_search(db, unit_vectors(4, db.dim, seed=6))
        assert db.path_of(5) == "/p/5" and db.path_of(2 * ROWS - 1) == f"/q/{ROWS - ROWS // 3 - 1}"
        db.save()
        everything = db.vectors.copy()
    np.testing.assert_array_equal(everything[:ROWS], before)
    with NanoDB(saved, read_only=True) as db:
        assert db.store.index.mapped == 2 * ROWS
        np.testing.assert_array_equal(db.vectors, everything)
        assert db.path_of(5) == "/p/5" and db.path_of(2 * ROWS - 1) == f"/q/{ROWS - ROWS // 3 - 1}"
        assert_exact_search(db, unit_vectors(4, db.dim, seed=7))


def test_compacting_a_mapped_database(saved):
    with NanoDB(saved) as db:
        keep = db.vectors[ROWS - 100 :].copy()
        db.delete(range(ROWS - 100))
        db.save()  # most rows are deleted: the save compacts
        assert db.store.manifest.generation == 1 and db.store.index.mapped == 100
        np.testing.assert_array_equal(db.vectors, keep)
        assert db.path_of(0) == f"/p/{ROWS - 100}"
        assert_exact_search(db, unit_vectors(4, db.dim, seed=8))
        db.add(unit_vectors(10, db.dim, seed=10))
        db.save()
    assert not list(saved.glob("*.0.*"))
    with NanoDB(saved, read_only=True) as db:
        assert len(db) == 110 and db.path_of(99) == f"/p/{ROWS - 1}"
        np.testing.assert_array_equal(db.vectors[:100], keep)


def test_a_big_corrupted_file_is_reported_by_the_check_after_opening(saved, monkeypatch):
    """Above VERIFY_AT_OPEN_BYTES the checksum is verified after opening; then searches, saves and
    --validate report the file."""
    data = bytearray((saved / "vectors.0.f16").read_bytes())
    data[100] ^= 0x01
    (saved / "vectors.0.f16").write_bytes(bytes(data))
    monkeypatch.setattr(nanodb.storage.store, "VERIFY_AT_OPEN_BYTES", 1024)
    with NanoDB(saved) as db:
        with pytest.raises(DatabaseError, match="vectors.0.f16 is corrupted"):
            db.validate()
        query = unit_vectors(1, db.dim)[0]
        with pytest.raises(DatabaseError, match="vectors.0.f16 is corrupted"):
            db.search(query, 3)
        db.add(query)
        with pytest.raises(DatabaseError, match="vectors.0.f16 is corrupted"):
            db.save()
    monkeypatch.undo()
    with pytest.raises(DatabaseError, match="vectors.0.f16 is corrupted"):
        NanoDB(saved)


def test_a_big_intact_database_passes_the_check_after_opening(saved, monkeypatch):
    monkeypatch.setattr(nanodb.storage.store, "VERIFY_AT_OPEN_BYTES", 1024)
    with NanoDB(saved) as db:
        db.store.checks.wait()
        assert db.validate().ok
        db.add(unit_vectors(1, db.dim))
        assert db.save()


def test_a_big_compact_copy_is_read_ahead_not_copied_after_opening(saved, monkeypatch):
    """Above READ_AHEAD_BYTES the mapped codes are read ahead by a background thread, and stay the file's
    pages: a server's own memory does not grow with its database. Rows appended meanwhile are kept,
    and searches stay exact throughout."""
    monkeypatch.setattr(nanodb.storage.index, "READ_AHEAD_BYTES", 0)
    with NanoDB(saved) as db:
        index = db.store.index
        db.add(unit_vectors(ROWS, db.dim, seed=4))  # grows the index, maybe while the read ahead runs
        assert_exact_search(db, unit_vectors(2, db.dim, seed=12))
        deadline = time.monotonic() + 60
        while not index.codes_read and time.monotonic() < deadline:
            time.sleep(0.01)
        assert index.codes_read and isinstance(memory_behind(index.codes), mmap.mmap)
        np.testing.assert_array_equal(index.codes, quantize_rows(db.vectors)[0])
        assert_exact_search(db, unit_vectors(4, db.dim, seed=13))


def test_a_mapped_file_is_read_ahead_on_a_2mb_boundary_and_a_shortened_one_fails_softly(tmp_path):
    """The mapping starts where the kernel can use 2 MB pages; reading ahead a file shortened under its
    mapping is refused (False), never a SIGBUS that would kill the process."""
    path = tmp_path / "codes.0.u8"
    path.write_bytes(np.arange(4 << 20, dtype=np.uint8).tobytes())
    held = HeldFile(path, 4 << 20)
    rows = file_backed_rows(held, (4 << 20) // 256, (256,), np.uint8, (4 << 20) // 256)
    assert rows.ctypes.data % HUGE_PAGE == 0
    assert read_ahead(rows, 0, 4 << 20)
    assert rows[-1, -1] == 255
    os.truncate(path, 4096)
    assert not read_ahead(rows, 0, 4 << 20)
    held.close()

"""The store under damage done to its folder: a folder of data files without its manifest is a damaged
database (refused, repaired), never a new one; no save deletes a file nanodb did not write; a file
truncated or overwritten under an open database is one clear error naming it, never a signal."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from helpers import REPO, data_file, save_vectors_db

import nanodb.storage.commit as commit
import nanodb.storage.index
from nanodb import DatabaseError, NanoDB
from nanodb.storage.format import ITEM_DTYPE, MANIFEST

ROWS = 2000  # data files of several pages: a page past a truncated file's end is what kills a process


@pytest.fixture(scope="module")
def saved_db(tmp_path_factory):
    """ROWS random unit vectors with paths, the first half with metadata, saved twice, one deletion."""
    return save_vectors_db(tmp_path_factory.mktemp("store_damage") / "template", ROWS)


@pytest.fixture
def db_path(saved_db, tmp_path):
    path = tmp_path / "db"
    shutil.copytree(saved_db, path)
    return path


def folder_state(path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in path.iterdir() if f.name != ".lock"}


# ------------------------------------------------------------------ item 10: a missing manifest
@pytest.mark.parametrize("left", ["data files", "a manifest being written"])
def test_a_folder_of_data_files_without_its_manifest_is_refused_not_taken_as_new(db_path, left):
    if left == "a manifest being written":
        for f in db_path.glob("*.*.*"):
            f.unlink()
        (db_path / MANIFEST).rename(db_path / (MANIFEST + ".tmp"))
    else:
        (db_path / MANIFEST).unlink()
    before = folder_state(db_path)
    for read_only in (False, True):
        with pytest.raises(DatabaseError) as e:
            NanoDB(db_path, config="test", read_only=read_only)
        assert f"{db_path / MANIFEST} is missing" in str(e.value) and "--repair" in str(e.value)
    assert folder_state(db_path) == before  # nothing written, nothing deleted


def test_a_new_database_killed_while_writing_its_first_manifest_opens_as_new(empty_db_path, tmp_path):
    path = tmp_path / "db"
    path.mkdir()
    (path / (MANIFEST + ".tmp")).write_bytes((empty_db_path / MANIFEST).read_bytes()[:-20])  # cut short
    with NanoDB(path, config="test") as db:
        assert len(db) == 0


def test_repair_after_the_manifest_is_deleted_keeps_every_saved_item(db_path):
    (db_path / MANIFEST).unlink()
    report = NanoDB.repair(db_path, model="ViT-S-32", pretrained="none")
    assert report.manifest_rebuilt and report.kept == ROWS
    with NanoDB(db_path, config="test") as db:
        assert len(db) == ROWS - 1 and db[5].deleted
        assert db.metadata_of(0) == {"n": 1} and db.path_of(ROWS - 1) == f"/q/{ROWS // 2 - 1}"


def test_files_the_user_put_in_the_folder_survive_saves_and_compactions(db_path):
    mine = {"notes.txt": b"my notes", "vectors.backup": b"a copy", "vectors.1.bak": b"another",
            "vectors.0.f16.orig": b"old", "vectors.9.f16": b"a generation this database never reached",
            "items.01.bin": b"not a name nanodb writes"}
    for name, data in mine.items():
        (db_path / name).write_bytes(data)
    with NanoDB(db_path, config="test") as db:
        db.add(np.ones((2, db.dim)), paths=["/new/0", "/new/1"])
        db.save()
        db.delete(range(ROWS - 10))
        db.save()  # most rows deleted: a compaction to generation 1, then generation 0 is removed
        assert db.store.manifest.generation == 1
    with NanoDB(db_path, config="test") as db:  # opening removes other generations again
        assert len(db) == 12
    assert {name: (db_path / name).read_bytes() for name in mine if (db_path / name).exists()} == mine
    assert [f.name for f in db_path.glob("*.0.*")] == ["vectors.0.f16.orig"]  # generation 0 is gone


def test_a_manifest_deleted_under_a_writer_is_written_again_by_its_next_save(db_path, caplog):
    with NanoDB(db_path, config="test") as db:
        db.add(np.ones((3, db.dim)), paths=["/new/0", "/new/1", "/new/2"])
        (db_path / MANIFEST).unlink()
        assert db.save()
        assert "was deleted while this process had the database open" in caplog.text
    with NanoDB(db_path, read_only=True) as db:
        assert db.store.rows == ROWS + 3 and db.path_of(ROWS + 2) == "/new/2" and db.validate().ok


@pytest.mark.parametrize("damage", ["garbage", "another database's"])
def test_a_manifest_replaced_under_a_writer_refuses_the_save_and_keeps_the_items(db_path, damage):
    manifest = db_path / MANIFEST
    saved = manifest.read_bytes()
    replacement = b"garbage" if damage == "garbage" else json.dumps({**json.loads(saved), "count": 0}).encode()
    with NanoDB(db_path, config="test") as db:
        new = np.eye(db.dim, dtype=np.float32)[:3]
        db.add(new, paths=["/new/0", "/new/1", "/new/2"])
        manifest.write_bytes(replacement)
        with pytest.raises(DatabaseError, match="refusing to save.*unsaved changes stay in this process's memory"):
            db.save()
        with pytest.raises(DatabaseError, match="refusing to save"):
            db.store.record_roots({str(db_path.parent / "photos"): False})  # a scan's roots: the same check
        assert manifest.read_bytes() == replacement  # nothing written
        assert db.unsaved == 3 and db.search(new[2], 1)[0].path == "/new/2"  # still searchable
        manifest.write_bytes(saved)  # the user puts it back
        assert db.save()
    with NanoDB(db_path, read_only=True) as db:
        assert db.store.rows == ROWS + 3 and db.path_of(ROWS + 2) == "/new/2"


# ------------------------------------------------------------------ item 11: truncated or overwritten files
TRUNCATE_WHILE_OPEN = textwrap.dedent(
    """
    import os, shutil, sys
    from pathlib import Path
    import numpy as np
    from nanodb import DatabaseError, NanoDB

    template = Path(sys.argv[1])
    for kind in ("vectors", "codes", "scales", "items"):
        path = template.with_name(f"open-{kind}")
        shutil.copytree(template, path)
        with NanoDB(path, read_only=True) as db:
            query = db.vectors[7].astype(np.float32)
            assert db.search(query, 3)[0].index == 7  # the pages are mapped and read
            os.truncate(next(path.glob(f"{kind}.*")), 1000)
            try:
                db.search(query, 3)
                print(kind, "no error", flush=True)
            except DatabaseError as e:
                print(kind, "error:", e, flush=True)
    """
)


@pytest.mark.timeout(300)
def test_a_file_truncated_while_open_is_an_error_naming_it_not_a_crash(saved_db):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-c", TRUNCATE_WHILE_OPEN, str(saved_db)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=280)
    assert run.returncode != -signal.SIGBUS, f"killed by SIGBUS after: {run.stdout}"
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.splitlines()
    assert len(lines) == 4, run.stdout
    for line, kind in zip(lines, ("vectors", "codes", "scales", "items")):
        assert line.startswith(f"{kind} error:") and f"open-{kind}/{kind}.0." in line, line
        assert "truncated while the database was open" in line and "--repair" in line, line


def test_a_save_over_a_file_truncated_while_open_is_refused(db_path):
    with NanoDB(db_path, config="test") as db:
        db.add(np.ones((2, db.dim)))
        os.truncate(data_file(db_path, "vectors"), 1000)  # a save would append after a hole of zeros
        with pytest.raises(DatabaseError, match="vectors.0.f16 was truncated while the database was open"):
            db.save()
        assert db.unsaved == 2


@pytest.mark.parametrize("fast_pass", ["compact", "float16"])
def test_vector_rows_overwritten_while_open_are_an_error_naming_the_file(db_path, monkeypatch, fast_pass):
    if fast_pass == "float16":
        monkeypatch.setattr(nanodb.storage.index, "KERNEL", None)
    with NanoDB(db_path, read_only=True) as db:
        query = db.vectors[25].astype(np.float32)  # a damaged row's own vector: its row is rescored
        garbage = np.random.default_rng(3).integers(0, 256, 10 * db.dim * 2, dtype=np.uint8).tobytes()
        with open(data_file(db_path, "vectors"), "r+b") as f:
            f.seek(20 * db.dim * 2)
            f.write(garbage)  # ten rows overwritten in place: the mapping sees the new bytes
        with pytest.raises(DatabaseError, match=r"vectors\.0\.f16 is damaged: rows 2\d.*--repair"):
            db.search(query, 10)


def test_the_http_api_answers_damage_with_a_503_and_logs_the_file(db_path, caplog):
    from fastapi.testclient import TestClient

    from nanodb.interfaces.server import build_app

    with NanoDB(db_path, read_only=True) as db:
        client = TestClient(build_app(db))
        assert client.get(f"/api/search/item/{ROWS - 1}").status_code == 200
        with open(data_file(db_path, "vectors"), "r+b") as f:
            f.write(b"\xff" * ((ROWS - 1) * db.dim * 2))  # every row but the query's: NaN
        answer = client.get(f"/api/search/item/{ROWS - 1}")
        assert answer.status_code == 503 and "log names the damaged file" in answer.json()["error"]
        assert str(data_file(db_path, "vectors")) in caplog.text and "--repair" in caplog.text


def test_an_item_record_overwritten_while_open_is_an_error_naming_the_file(db_path):
    with NanoDB(db_path, read_only=True) as db:
        with open(data_file(db_path, "items"), "r+b") as f:
            f.seek(3 * ITEM_DTYPE.itemsize)
            f.write(b"\xff" * ITEM_DTYPE.itemsize)
        for read in (db.path_of, db.metadata_of):
            with pytest.raises(DatabaseError, match=r"items\.0\.bin is damaged: the record of item 3.*--repair"):
                read(3)
        with pytest.raises(DatabaseError, match=r"items\.0\.bin is damaged"):
            db.search(db.vectors[3].astype(np.float32), 1)
        assert db.path_of(4) == "/p/4"  # the other records are intact


@pytest.mark.parametrize("code", [errno.EACCES, errno.EPERM, errno.EROFS])
def test_a_save_to_a_folder_made_read_only_says_so(db_path, monkeypatch, code):
    def refused(path, offset, data):
        raise OSError(code, os.strerror(code), str(path))

    with NanoDB(db_path, config="test") as db:
        db.add(np.ones(db.dim))
        monkeypatch.setattr(commit, "append_at", refused)
        with pytest.raises(DatabaseError) as e:
            db.save()
        assert "read-only or not writable" in str(e.value) and "free some space" not in str(e.value)
        assert "previous save is intact" in str(e.value) and db.unsaved == 1

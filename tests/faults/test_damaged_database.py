"""Damaged, foreign, read-only, full or shared database folders: a clear error naming the file, never
a silent partial load, the previous save intact, and a repair path."""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from helpers import REPO, coco_photos, data_file, save_vectors_db

from nanodb.database import NanoDB
from nanodb.interfaces import cli
from nanodb.storage.format import ITEM_DTYPE, MANIFEST, DatabaseError

ROWS = 40


@pytest.fixture(scope="module")
def saved_db(tmp_path_factory):
    """A database of ROWS random vectors with paths and metadata, saved in two saves, one deletion."""
    return save_vectors_db(tmp_path_factory.mktemp("damaged") / "template", ROWS)


@pytest.fixture
def db_path(saved_db, tmp_path):
    path = tmp_path / "db"
    shutil.copytree(saved_db, path)
    return path


def open_error(path) -> str:
    with pytest.raises(DatabaseError) as e:
        NanoDB(path, config="test")
    with pytest.raises(DatabaseError):
        NanoDB(path, read_only=True)
    return str(e.value)


@pytest.mark.parametrize("kind", ["vectors", "items", "paths", "meta", "deleted", "codes", "scales"])
def test_a_truncated_data_file_is_named_and_repair_keeps_the_consistent_part(db_path, kind):
    f = data_file(db_path, kind)
    os.truncate(f, f.stat().st_size // 3)
    message = open_error(db_path)
    assert str(f) in message and "truncated" in message and "--repair" in message
    report = NanoDB.repair(db_path)
    assert "rescan" in report.summary()
    with NanoDB(db_path, config="test") as db:
        # the compact copy (codes, scales) is rebuilt from the vectors: no item is lost
        assert db.store.rows == report.kept < ROWS or kind in ("deleted", "codes", "scales")
        for i in range(db.store.rows):
            assert db.path_of(i) in {f"/p/{j}" for j in range(ROWS // 2)} | {f"/q/{j}" for j in range(ROWS // 2)}
        assert np.allclose(np.linalg.norm(db.vectors.astype(np.float32), axis=1), 1, atol=1e-2)
        db.add(np.ones(db.dim), paths=["/after-repair"])  # and it takes new saves
        db.save()
    with NanoDB(db_path, read_only=True) as db:
        assert db.path_of(db.store.rows - 1) == "/after-repair"


@pytest.mark.parametrize("kind", ["vectors", "items", "paths", "meta", "deleted", "codes", "scales"])
def test_a_corrupted_data_file_is_refused_naming_it(db_path, kind):
    f = data_file(db_path, kind)
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x10  # one flipped bit in the committed bytes
    f.write_bytes(bytes(data))
    message = open_error(db_path)
    assert str(f) in message and "corrupted" in message


@pytest.mark.parametrize(
    "content, expected",
    [
        ('{"version": 1, "count": ', "corrupted"),
        ("[1, 2, 3]", "corrupted"),
        ("", "corrupted"),
        ('{"version": 1}', "not a nanodb manifest"),
        ("NEGATIVE", "count is not a non-negative whole number"),
        ("NEWER", "newer nanodb (format version 3)"),
    ],
)
def test_a_bad_manifest_is_named(db_path, content, expected):
    manifest = db_path / MANIFEST
    data = json.loads(manifest.read_text())
    if content == "NEGATIVE":
        content = json.dumps({**data, "count": -3})
    elif content == "NEWER":
        content = json.dumps({**data, "version": 3})
    manifest.write_text(content)
    message = open_error(db_path)
    assert str(manifest) in message and expected in message


def test_repair_rebuilds_a_lost_manifest_from_the_data_files(db_path):
    (db_path / MANIFEST).write_text("garbage")
    report = NanoDB.repair(db_path, settings=None, model="ViT-S-32", pretrained="none")
    assert report.manifest_rebuilt and report.kept == ROWS
    assert (db_path / (MANIFEST + ".damaged")).read_text() == "garbage"
    with NanoDB(db_path, config="test") as db:
        assert len(db) == ROWS - 1 and db[5].deleted
        assert db[0].metadata == {"n": 1} and db.path_of(ROWS - 1) == f"/q/{ROWS // 2 - 1}"


def test_cli_repair_flag(db_path, monkeypatch, capsys):
    os.truncate(data_file(db_path, "vectors"), 10 * 384 * 2 + 5)
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert cli.main(["--path", str(db_path), "--config", "test"]) == 2
    assert "truncated" in capsys.readouterr().err
    assert cli.main(["--path", str(db_path), "--config", "test", "--repair"]) == 0
    err = capsys.readouterr().err
    assert "kept 10 of 40 items" in err and "rescan" in err


def test_a_full_disk_during_save_keeps_the_previous_save_and_the_process_goes_on(db_path, monkeypatch):
    import nanodb.storage.commit as storage

    real_append_at = storage.append_at

    def disk_full(path, offset, data):
        real_append_at(path, offset, bytes(memoryview(data).cast("B"))[:7])  # a partial write, then
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    with NanoDB(db_path, config="test") as db:
        db.add(np.ones((3, db.dim)), paths=["/new/0", "/new/1", "/new/2"])
        monkeypatch.setattr(storage, "append_at", disk_full)
        with pytest.raises(DatabaseError, match="No space left on device.*previous save is intact"):
            db.save()
        with NanoDB(db_path, read_only=True) as other:
            assert other.store.rows == ROWS
        monkeypatch.setattr(storage, "append_at", real_append_at)
        assert db.save()  # space is back: the same items save
    with NanoDB(db_path, read_only=True) as db:
        assert db.store.rows == ROWS + 3 and db.path_of(ROWS + 2) == "/new/2"


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real 2 MiB file system, where the machine lets us mount one (root in a container)."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
                                           capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root); the injected ENOSPC test covers the logic")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_really_full_disk(saved_db, small_tmpfs):
    db_path = small_tmpfs / "db"
    shutil.copytree(saved_db, db_path)
    filler = small_tmpfs / "filler"
    with NanoDB(db_path, config="test") as db:
        free = shutil.disk_usage(small_tmpfs).free
        filler.write_bytes(b"\0" * (free - 64 * 1024))
        db.add(np.random.default_rng(1).standard_normal((200, db.dim)))  # 150 KiB of vectors
        with pytest.raises(DatabaseError, match="No space left on device"):
            db.save()
        with NanoDB(db_path, read_only=True) as other:
            assert other.store.rows == ROWS
        filler.unlink()
        assert db.save()
    with NanoDB(db_path, read_only=True) as db:
        assert db.store.rows == ROWS + 200


@pytest.fixture
def read_only_folder(db_path):
    """The database folder remounted read-only (root only; as another user, chmod would do)."""
    if os.geteuid() != 0 or subprocess.run(["mount", "--bind", str(db_path), str(db_path)],
                                           capture_output=True).returncode:
        pytest.skip("cannot bind-mount here (needs root)")
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(db_path)], check=True)
        yield db_path
    finally:
        subprocess.run(["umount", str(db_path)], check=True)


def test_a_read_only_folder_opens_for_search_only(read_only_folder):
    with pytest.raises(DatabaseError, match="Read-only file system.*--read-only"):
        NanoDB(read_only_folder, config="test")
    with NanoDB(read_only_folder, read_only=True) as db:
        assert len(db) == ROWS - 1
        assert db.search(db.vectors[7].astype(np.float32), k=1)[0].index == 7
        with pytest.raises(DatabaseError, match="read-only"):
            db.save()


HOLDER = """
import sys
from nanodb.database import NanoDB
db = NanoDB(sys.argv[1])
print("open", flush=True)
sys.stdin.read()
"""


def test_a_second_writer_gets_a_clear_error_and_readers_still_work(db_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(db_path)], cwd=REPO, env=env,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        with pytest.raises(DatabaseError, match=f"open for writing by another process \\(pid {holder.pid}\\)"):
            NanoDB(db_path, config="test")
        second = subprocess.run([sys.executable, "-m", "nanodb", "--path", str(db_path)], cwd=REPO, env=env,
                                stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2 and "open for writing by another process" in second.stderr
        assert "Traceback" not in second.stderr
        with NanoDB(db_path, read_only=True) as reader:
            assert reader.search(reader.vectors[3].astype(np.float32), k=1)[0].index == 3
        reader = subprocess.run([sys.executable, "-m", "nanodb", "--path", str(db_path), "--read-only"],
                                cwd=REPO, env=env, input="3\nsimilar 3\nsave\n", capture_output=True,
                                text=True, timeout=120)
        assert reader.returncode == 0, reader.stderr
        assert "index=3 " in reader.stdout and "read-only" in reader.stdout
    finally:
        holder.kill()
        holder.wait()
    with NanoDB(db_path, config="test") as db:  # a killed writer's lock is released with it
        assert len(db) == ROWS - 1


@pytest.fixture(scope="module")
def photo_db(tmp_path_factory):
    """Four real photos in one folder, scanned and saved; the database is copied by each test."""
    root = tmp_path_factory.mktemp("photo-db")
    photos = root / "photos"
    photos.mkdir()
    for src in coco_photos(4):
        shutil.copy(src, photos / src.name)
    with NanoDB(root / "template", config="test") as db:
        db.scan(photos)
        db.save()
    return root / "template", photos


def live_paths(db) -> list[str]:
    return sorted(db.path_of(int(i)) for i in db.store.live_rows())


def garble(path, kind: str) -> int:
    """Corrupt the stored path bytes of one item of a scanned photo database; returns that item."""
    with NanoDB(path, read_only=True) as db:
        first, second = db.path_of(0), db.path_of(1)
    items = np.frombuffer(data_file(path, "items").read_bytes(), ITEM_DTYPE)
    f = data_file(path, "paths")
    data = bytearray(f.read_bytes())
    off = int(items["path_off"][1])
    if kind == "nul":
        data[off + len(second) // 2] = 0
    elif kind == "relative":
        data[off] = ord("x")
    elif kind == "undecodable":
        data[off + len(second) - 6] = 0xFF
    elif kind == "folder":  # still a clean absolute path, but in a folder that does not exist
        pos = off + second.index("/photos/") + 2
        data[pos] ^= 0x01
    elif kind == "other-file":  # item 0 now names item 1's file
        name = os.path.basename(second).encode()
        end = int(items["path_off"][0]) + int(items["path_len"][0])
        data[end - len(name) : end] = name
        assert len(first) == len(second)
        f.write_bytes(bytes(data))
        return 0
    f.write_bytes(bytes(data))
    return 1


@pytest.mark.parametrize("kind", ["nul", "relative", "undecodable", "folder", "other-file"])
def test_repair_drops_an_item_with_a_garbled_path_so_a_rescan_indexes_each_file_once(photo_db, tmp_path, kind):
    template, photos = photo_db
    path = tmp_path / "db"
    shutil.copytree(template, path)
    with NanoDB(path, read_only=True) as db:
        before = {i: db.path_of(i) for i in range(db.store.rows)}
    damaged = garble(path, kind)
    assert "corrupted" in open_error(path)
    report = NanoDB.repair(path)
    assert "deleted 1 item with a damaged path" in report.summary()
    with NanoDB(path, config="test") as db:
        for i, p in before.items():  # every other item is kept as it was: nothing to re-embed
            assert db.store.is_live(i) == (i != damaged) and (i == damaged or db.path_of(i) == p)
        scan = db.scan(photos)
        assert (scan.added, scan.unchanged) == (1, 3)
        files = sorted(str(p) for p in photos.iterdir())
        assert live_paths(db) == files  # each file exactly once, no garbled path live
        db.save()
    with NanoDB(path, read_only=True) as db:
        assert live_paths(db) == files


def test_repair_keeps_items_of_a_missing_folder_when_the_paths_file_is_damaged(photo_db, tmp_path):
    """A folder that is not there (an unmounted disk) loses nothing: only the garbled item goes."""
    template, photos = photo_db
    path = tmp_path / "db"
    shutil.copytree(template, path)
    other = tmp_path / "disk" / "photos"
    shutil.copytree(photos, other)
    with NanoDB(path, config="test") as db:
        db.scan(other)
        db.save()
        elsewhere = [db.path_of(i) for i in range(4, 8)]
    damaged = garble(path, "folder")
    (tmp_path / "disk").rename(tmp_path / "unmounted")
    NanoDB.repair(path)
    with NanoDB(path, read_only=True) as db:
        assert live_paths(db) == sorted([p for i, p in enumerate(map(db.path_of, range(4))) if i != damaged]
                                        + elsewhere)

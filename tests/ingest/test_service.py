"""nanodb as a long-running service: incremental rescans, compaction, watched folders, a console that
answers during a scan, a decoder crash, and kill -9 in the middle of a watch."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import REPO, coco_photos, data_dir
from helpers.background import BackgroundService, wait_for

from nanodb import NanoDB
from nanodb.service import IngestService

WATCH_BOUND_S = 5.0  # the promise: searchable within 5 s of the last write


def folder_files(root: Path) -> set[str]:
    return {str(p) for p in root.rglob("*.jpg")}


def searchable_paths(db: NanoDB) -> set[str]:
    """Every path search can return (a vector query with k above the size of the database)."""
    if len(db) == 0:
        return set()
    return {r.path for r in db.search(np.ones(db.dim, np.float32), k=len(db) + 10)}


@pytest.fixture
def photos(tmp_path) -> Path:
    root = tmp_path / "photos"
    (root / "trip").mkdir(parents=True)
    for i, src in enumerate(coco_photos(6)):
        shutil.copy(src, root / ("trip" if i % 2 else "") / src.name)
    return root


def test_rescan_skips_unchanged_reembeds_changed_and_drops_gone(tmp_path, photos):
    with NanoDB(tmp_path / "db", config="test") as db:
        first = db.scan(photos)
        files = sorted(photos.rglob("*.jpg"))
        gone, changed = files[0], files[1]
        gone.unlink()
        shutil.copy(coco_photos(7)[6], changed)  # new content under the same name
        again = db.scan(photos)
        assert (first.added, again.unchanged, again.updated, again.dropped) == (6, 4, 1, 1)
        assert searchable_paths(db) == folder_files(photos)
        assert db.save()
    with NanoDB(tmp_path / "db", config="test") as db:
        assert searchable_paths(db) == folder_files(photos)
        assert db.validate().ok


def test_rescan_of_a_missing_folder_loses_nothing(tmp_path, photos):
    with NanoDB(tmp_path / "db", config="test") as db:
        db.scan(photos)
        moved = tmp_path / "unmounted"
        photos.rename(moved)  # like an unplugged disk: the folder is not there at all
        assert db.scan(photos / "trip").dropped == 0
        assert len(db) == 6


def test_compaction_drops_dead_rows_and_old_files(tmp_path, photos):
    with NanoDB(tmp_path / "db", config="test") as db:
        db.scan(photos)
        db.save()
        keep = {p: db[db.index_of(p)].vector for p in folder_files(photos / "trip")}
        db.forget([photos / p.name for p in photos.glob("*.jpg")])
        assert db.save()
        files = sorted(f.name for f in (tmp_path / "db").iterdir() if f.name[0] != ".")
        assert all(".1." in f for f in files if f != "nanodb.json"), files  # generation 0 is gone
        assert len(db) == db.store.rows == 3
    with NanoDB(tmp_path / "db", config="test") as db:
        assert not (db.store.rows != len(db))
        assert {p: db[db.index_of(p)].vector.tobytes() for p in keep} == {p: v.tobytes() for p, v in keep.items()}


def test_a_crashed_compaction_leaves_the_last_save_intact(tmp_path, photos, monkeypatch):
    import nanodb.storage.commit

    with NanoDB(tmp_path / "db", config="test") as db:
        db.scan(photos)
        db.save()
        db.forget([str(photos / "trip")])
        monkeypatch.setattr(nanodb.storage.commit, "write_manifest", _crash)
        with pytest.raises(SystemExit):
            db.save()  # the new generation's files are written, the manifest is not
    monkeypatch.undo()
    with NanoDB(tmp_path / "db", config="test") as db:
        assert searchable_paths(db) == folder_files(photos)
        assert not list((tmp_path / "db").glob("*.1.*"))  # the partial generation was removed


def _crash(*args):
    raise SystemExit("killed")


class CrashOnSize:
    """A pixel transform that kills its decode worker on images of one size (a decoder crash)."""

    def __init__(self, transform, size):
        self.transform, self.size = transform, size

    def __call__(self, image):
        if image.size == self.size:
            os._exit(1)
        return self.transform(image)


def test_a_dead_decode_worker_is_replaced_and_only_its_file_reported(tmp_path, photos):
    from nanodb.pipeline.decode import ImageDecodePool
    from PIL import Image

    culprit = photos / "trip" / "culprit.jpg"
    Image.open(coco_photos(1)[0]).resize((123, 77)).save(culprit)
    with NanoDB(tmp_path / "db", config="test") as db:
        db.decode_pool = ImageDecodePool(CrashOnSize(db.model.pixel_transform, (123, 77)), 2,
                                          db.settings.max_image_pixels)
        report = db.scan(photos)
        assert [path for path, _ in report.failures] == [str(culprit)]
        assert "crashed" in report.failures[0][1]
        assert searchable_paths(db) == folder_files(photos) - {str(culprit)}


# ---------------------------------------------------------------------------------------- watch
def test_watch_reflects_every_kind_of_change_and_survives_a_restart(tmp_path, photos):
    db = NanoDB(tmp_path / "db", config="test", autosave=True)
    bg = BackgroundService(db, [photos])
    try:
        assert bg.ready.wait(120), "the first scan of the watched folder did not finish"
        paths = lambda: bg.query(lambda: searchable_paths(db))  # noqa: E731
        embedded = lambda: bg.query(lambda: bg.service.watch_report.added + bg.service.watch_report.updated)  # noqa: E731
        assert paths() == folder_files(photos)
        extra = coco_photos(10)[6:]

        # create
        new = photos / "new.jpg"
        shutil.copy(extra[0], new)
        wait_for(lambda: str(new) in paths(), WATCH_BOUND_S, "a new image")

        # copy in progress: written in pieces, each within the settle time; indexed once, complete
        slow = photos / "trip" / "slow.jpg"
        data = extra[1].read_bytes()
        with open(slow, "wb") as f:
            for piece in range(4):
                f.write(data[piece * len(data) // 4 : (piece + 1) * len(data) // 4])
                f.flush()
                assert str(slow) not in paths()
                time.sleep(0.3)
        wait_for(lambda: str(slow) in paths(), WATCH_BOUND_S, "an image copied slowly")
        assert bg.service.watch_report.failed == 0

        # rename: the same vector under the new path, nothing embedded
        before, vector = embedded(), bg.query(lambda: db[db.index_of(new)].vector)
        renamed = photos / "renamed.jpg"
        new.rename(renamed)
        wait_for(lambda: str(renamed) in paths() and str(new) not in paths(), WATCH_BOUND_S, "a renamed image")
        np.testing.assert_allclose(bg.query(lambda: db[db.index_of(renamed)].vector), vector, atol=1e-3)

        # move a folder
        moved = photos / "holiday"
        (photos / "trip").rename(moved)
        wait_for(lambda: paths() == folder_files(photos), WATCH_BOUND_S, "a moved folder")

        # a move seen as delete + create (from another disk): matched by content hash
        outside = tmp_path / "outside.jpg"
        renamed.rename(outside)
        wait_for(lambda: str(renamed) not in paths(), WATCH_BOUND_S, "an image moved out")
        shutil.copy2(outside, photos / "back.jpg")
        wait_for(lambda: paths() == folder_files(photos), WATCH_BOUND_S, "an image moved back in")
        assert embedded() == before  # neither the renames nor the moves re-embedded anything

        # delete
        victim = sorted(moved.glob("*.jpg"))[0]
        victim.unlink()
        wait_for(lambda: str(victim) not in paths(), WATCH_BOUND_S, "a deleted image")

        # modify: re-embedded under the same path
        target = photos / "back.jpg"
        old_vector = bg.query(lambda: db[db.index_of(target)].vector)
        shutil.copy(extra[2], target)
        wait_for(lambda: bg.query(lambda: (i := db.index_of(target)) is not None
                                  and not np.array_equal(db[i].vector, old_vector)), WATCH_BOUND_S,
                 "a modified image")
        assert paths() == folder_files(photos)
    finally:
        bg.stop()
        db.save()
        db.close()
    with NanoDB(tmp_path / "db", config="test") as db:
        assert searchable_paths(db) == folder_files(photos)
        assert db.validate().ok


def test_pause_holds_ingestion_and_resume_finishes_it(tmp_path, photos):
    async def scenario(db):
        service = IngestService(db)
        service.pause()
        task = service.scan(str(photos))
        await asyncio.sleep(3)
        paused = (task.done(), len(db), service.status())
        service.resume()
        await task
        await service.stop()
        return paused, task.result()

    with NanoDB(tmp_path / "db", config="test") as db:
        (finished, items, status), report = asyncio.run(scenario(db))
        assert (finished, items) == (False, 0) and "PAUSED" in status
        assert report.added == 6 and searchable_paths(db) == folder_files(photos)


# ---------------------------------------------------------------------------------------- console
def start_nanodb(*args, stdin=subprocess.PIPE) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "nanodb", *args], stdin=stdin, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=env, cwd=REPO, text=True)


def test_console_answers_a_query_while_a_scan_runs(tmp_path):
    folder = data_dir("imagenet-sample/images")
    proc = start_nanodb("--path", str(tmp_path / "db"), "--config", "test")
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        proc.stdin.write(f"scan {folder}\n")
        proc.stdin.flush()
        deadline = time.monotonic() + 240
        while not any(line.startswith("* index=") for line in list(lines)):
            assert time.monotonic() < deadline, "".join(lines)
            proc.stdin.write("status\na dog on a beach\n")
            proc.stdin.flush()
            time.sleep(1.0)
        answered = list(lines)
        assert not any(line.startswith("scanned ") for line in answered), "the scan ended first"
        assert any(line.startswith(f"scan {folder}: ") and " files, " in line for line in answered)
        proc.stdin.write("exit\n")
        proc.stdin.flush()
        assert proc.wait(120) == 0
    finally:
        proc.kill()
    reader.join(10)
    assert any("saved" in line for line in lines)  # exit during a scan stops it and saves what it has
    with NanoDB(tmp_path / "db", config="test") as db:
        assert 0 < len(db) < 1000 and db.validate().ok


@pytest.mark.slow
def test_kill_9_during_watch_churn_then_restart_catches_up(tmp_path):
    sources = coco_photos(60)
    watched = tmp_path / "watched"
    watched.mkdir()
    for src in sources[:20]:
        shutil.copy(src, watched / src.name)
    args = ("--path", str(tmp_path / "db"), "--config", "test", "--watch", str(watched))
    proc = start_nanodb(*args, stdin=subprocess.DEVNULL)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    wait_for(lambda: any(line.startswith("scanned ") for line in lines), 180, "the first scan")
    rng = np.random.default_rng(0)
    for step, src in enumerate(sources[20:]):  # churn: add, rename, delete, move into folders
        shutil.copy(src, watched / src.name)
        present = sorted(watched.rglob("*.jpg"))
        victim = present[rng.integers(len(present))]
        action = step % 3
        if action == 0:
            victim.unlink()
        elif action == 1:
            victim.rename(victim.with_name("r" + victim.name))
        else:
            (watched / f"d{step}").mkdir()
            victim.rename(watched / f"d{step}" / victim.name)
        time.sleep(0.15)
    time.sleep(2)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    with NanoDB(tmp_path / "db", config="test", read_only=True) as db:
        assert db.validate().ok  # whatever was last committed is consistent
    proc = start_nanodb(*args, stdin=subprocess.DEVNULL)
    lines = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    wait_for(lambda: any(line.startswith("scanned ") for line in lines), 180, "the catch-up scan")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0, "".join(lines)
    with NanoDB(tmp_path / "db", config="test") as db:
        assert searchable_paths(db) == folder_files(watched)
        assert db.validate().ok

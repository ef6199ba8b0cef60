"""A file that failed to decode is remembered with its size and mtime (failed.json in the database folder):
a rescan does not try it again, so it loads no model, until the file changes or --retry-failed asks."""

from __future__ import annotations

import io
import json
import shutil

import pytest
from helpers import coco_photos

import nanodb.database
from nanodb import NanoDB
from nanodb.interfaces import cli


@pytest.fixture
def folder(tmp_path):
    """One good photo and one broken one (a JPEG cut short)."""
    root = tmp_path / "photos"
    root.mkdir()
    good = coco_photos(2)
    shutil.copy(good[0], root / "good.jpg")
    (root / "broken.jpg").write_bytes(good[1].read_bytes()[:2000])
    return root


@pytest.fixture
def model_loads(monkeypatch):
    """The models loaded by NanoDB since the fixture started (a list that grows)."""
    loads = []
    real = nanodb.database.load_model

    def counted(config):
        loads.append(config)
        return real(config)

    monkeypatch.setattr(nanodb.database, "load_model", counted)
    return loads


def rescan(db_path, folder, **options):
    """A scan, then a save, by a process that has not loaded the model yet (a new NanoDB, as a command)."""
    with NanoDB(db_path, config="test", workers=1) as db:
        report = db.scan(folder, **options)
        db.save()
        return report


def test_a_rescan_does_not_retry_a_broken_file_nor_load_the_model(tmp_path, folder, model_loads):
    first = rescan(tmp_path / "db", folder)
    assert (first.added, first.failed) == (1, 1)
    loaded = len(model_loads)
    again = rescan(tmp_path / "db", folder)
    assert len(model_loads) == loaded, "the rescan loaded the model for a file that failed before"
    assert (again.added, again.failed, again.failed_before) == (0, 0, 1)
    assert "1 failed before (unchanged: not retried)" in again.summary()
    saved = json.loads((tmp_path / "db" / "failed.json").read_text())
    assert list(saved["files"]) == [str(folder / "broken.jpg")]


def test_a_changed_broken_file_is_retried_and_forgotten_once_it_is_indexed(tmp_path, folder, model_loads):
    rescan(tmp_path / "db", folder)
    broken = folder / "broken.jpg"
    broken.write_bytes(broken.read_bytes() + b"still not a whole JPEG")
    loaded = len(model_loads)
    changed = rescan(tmp_path / "db", folder)
    assert (changed.failed, changed.failed_before) == (1, 0) and len(model_loads) == loaded + 1
    shutil.copy(coco_photos(3)[2], broken)  # mended
    mended = rescan(tmp_path / "db", folder)
    assert (mended.added, mended.failed, mended.failed_before) == (1, 0, 0)
    assert json.loads((tmp_path / "db" / "failed.json").read_text())["files"] == {}


def test_retry_failed_retries_an_unchanged_broken_file(tmp_path, folder):
    rescan(tmp_path / "db", folder)
    forced = rescan(tmp_path / "db", folder, retry_failed=True)
    assert (forced.failed, forced.failed_before) == (1, 0)


def test_an_unreadable_record_of_failures_means_a_retry_not_an_error(tmp_path, folder):
    rescan(tmp_path / "db", folder)
    (tmp_path / "db" / "failed.json").write_text('{"version": 1, "files": {"/x": [1')  # a torn write
    again = rescan(tmp_path / "db", folder)
    assert (again.failed, again.failed_before) == (1, 0)
    assert rescan(tmp_path / "db", folder).failed_before == 1  # written anew


def test_the_command_line_retries_failed_files_only_with_retry_failed(tmp_path, folder, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO(""))  # no console commands: scan, save, exit
    db = str(tmp_path / "db")
    scan = ["--path", db, "--config", "test", "--scan", str(folder)]
    assert cli.main(scan) == 0
    assert cli.main(scan) == 0
    assert "1 failed before (unchanged: not retried)" in capsys.readouterr().err
    assert cli.main([*scan, "--retry-failed"]) == 0
    err = capsys.readouterr().err
    assert "failed before" not in err and "1 skipped" in err


@pytest.mark.parametrize("kind", ["photo", "video"])
def test_a_changed_file_that_fails_loses_its_stale_items_and_stays_failed(tmp_path, folder, kind):
    """Its items describe bytes the file no longer holds (the server already refuses to show them):
    they are dropped, the file is reported as failed, and a rescan says it failed before."""
    from helpers.videos import make_clip

    if kind == "photo":
        changed = folder / "good.jpg"
    else:
        changed = make_clip(folder / "clip.mp4", coco_photos(2))
    db_path = tmp_path / "db"
    rescan(db_path, folder)
    with NanoDB(db_path, config="test") as db:
        assert any(item.path == str(changed) for item in db)
    changed.write_bytes(changed.read_bytes()[:3000])  # cut short: unreadable now
    report = rescan(db_path, folder)
    assert [p for p, _ in report.failures] == [str(changed)]
    with NanoDB(db_path, config="test") as db:
        assert [item.path for item in db if item.path == str(changed)] == [], "stale items are still searchable"
    again = rescan(db_path, folder)
    assert (again.failed, again.failed_before) == (0, 2)

"""A scan of a folder of messy and hostile files: every bad one skipped with one log line and counted,
every good one indexed as the image a viewer shows, and the scan never hangs."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import REPO, hostile_corpus
from PIL import Image

from nanodb.database import NanoDB
from nanodb.media.paths import printable


@pytest.fixture(scope="module")
def scanned(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    good, bad = hostile_corpus.build(root / "files")
    db = NanoDB(root / "db", config="test")
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("nanodb.pipeline")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    try:
        report = db.scan(root / "files")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    yield db, report, good, bad, records
    db.close()


@pytest.mark.timeout(300)
def test_every_bad_file_is_skipped_once_and_counted(scanned):
    db, report, good, bad, _ = scanned
    skipped = [path for path, _ in report.failures]
    assert sorted(skipped) == sorted(bad)
    assert report.failed == len(bad)
    assert report.added == len(good)
    assert all(db.index_of(p) is None for p in bad)


def test_each_skip_is_one_log_line_naming_the_file(scanned):
    _, _, _, bad, records = scanned
    lines = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    assert all("\n" not in line for line in lines)
    for path in bad:
        assert sum(printable(path) in line for line in lines) == 1, path


def test_every_good_file_is_indexed_as_shown(scanned):
    """Stored vectors match the model's embedding of the image a viewer shows: EXIF orientation
    applied, the first frame of an animation, any mode converted, any file name kept."""
    db, _, good, _, _ = scanned
    for path, shown in good.items():
        i = db.index_of(path)
        assert i is not None, f"{path!r} was not indexed"
        assert db.path_of(i) == path
        expected = db.model.encode_images([shown])[0]
        cosine = float(db.vectors[i].astype(np.float32) @ expected)
        assert cosine >= 0.999, f"{path!r}: cosine {cosine:.4f} with the expected image"


def test_orientation_and_first_frame_are_what_makes_the_match(scanned):
    """The alternatives (unrotated pixels, the second frame) embed measurably differently, so the
    checks above would fail if EXIF orientation or frame selection were wrong."""
    db, _, good, _, _ = scanned
    rotated = next(p for p in good if p.endswith("exif-rotated.jpg"))
    with Image.open(rotated) as raw:
        unrotated = db.model.encode_images([Image.fromarray(np.asarray(raw.convert("RGB")))])[0]  # no EXIF
    assert float(db.vectors[db.index_of(rotated)].astype(np.float32) @ unrotated) < 0.999
    animated = next(p for p in good if p.endswith("animated.gif"))
    with Image.open(animated) as gif:
        gif.seek(1)
        second = db.model.encode_images([gif.convert("RGB")])[0]
    assert float(db.vectors[db.index_of(animated)].astype(np.float32) @ second) < 0.999


@pytest.mark.timeout(300)
def test_a_rescan_skips_the_same_files_and_adds_nothing(scanned):
    db, _, good, bad, _ = scanned
    again = db.scan(db.path.parent / "files")
    assert again.unchanged == len(good) and again.added == 0
    # a file that failed to decode is remembered, not tried again; one the walk refused is refused again
    assert again.failed_before + again.failed == len(bad) and {p for p, _ in again.failures} < set(bad)
    retried = db.scan(db.path.parent / "files", retry_failed=True)
    assert sorted(p for p, _ in retried.failures) == sorted(bad)


def test_saved_names_survive_reopening(scanned, tmp_path):
    """Names with newlines, emoji and non-UTF-8 bytes round-trip through the on-disk format."""
    db, _, good, _, _ = scanned
    db.save()
    with NanoDB(db.path, read_only=True) as reopened:
        assert all(reopened.index_of(p) == db.index_of(p) for p in good)


@pytest.mark.timeout(300)
def test_the_command_line_scan_reports_each_skipped_file_on_one_line(scanned, tmp_path):
    _, _, good, bad, _ = scanned
    files = scanned[0].path.parent / "files"
    proc = subprocess.run(
        [sys.executable, "-m", "nanodb", "--path", str(tmp_path / "db"), "--config", "test", "--scan", str(files)],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdin=subprocess.DEVNULL, capture_output=True,
        timeout=280,
    )
    err = proc.stderr.decode("utf-8")
    assert proc.returncode == 0, err[-3000:]
    lines = err.splitlines()
    for path in bad:
        assert sum(printable(path) in line and "skipped" in line for line in lines) == 1, path
    assert f"{len(good)} added" in err and f"{len(bad)} skipped" in err
    assert "Traceback" not in err

"""The exit status of a stopped program, as a script or a service manager reads it: a scan cut short by
SIGINT, SIGTERM or SIGHUP exits 128 + the signal's number (130, 143, 129) after saving what it indexed;
a server that a signal ends with nothing in progress exits 0 (a clean shutdown), and its decode workers
are stopped, so loky reports no leaked semaphores."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import time

import httpx
import pytest
from helpers import REPO, coco_photos

from nanodb.database import NanoDB

STARTUP_BOUND_S = 180  # imports and opening the database on a loaded CI machine
STOP_BOUND_S = 60


def start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "nanodb", *args], cwd=REPO, stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def read_until(proc: subprocess.Popen, pattern: str) -> re.Match:
    deadline = time.monotonic() + STARTUP_BOUND_S
    for line in proc.stderr:
        if m := re.search(pattern, line):
            return m
        assert time.monotonic() < deadline, f"never printed {pattern!r}"
    pytest.fail(f"ended (status {proc.wait()}) before printing {pattern!r}")


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
def test_a_scan_stopped_by_a_signal_saves_and_exits_128_plus_the_signal(scanned_db, tmp_path, stop):
    path, _ = scanned_db
    shutil.copytree(path, tmp_path / "db")
    photos = tmp_path / "photos"
    photos.mkdir()
    for p in coco_photos(96)[40:]:  # new files (the scanned database holds the first 40): the scan embeds them
        shutil.copy(p, photos)
    with NanoDB(tmp_path / "db", read_only=True) as db:
        before = len(db)
    proc = start(["--path", str(tmp_path / "db"), "--config", "test", "--scan", str(photos)])
    try:
        read_until(proc, r"^nanodb: NanoDB\(")  # opened; its scan starts now (and takes seconds)
        proc.send_signal(stop)
        _, err = proc.communicate(timeout=STOP_BOUND_S)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + stop, f"exit status {proc.returncode}: {err[-3000:]}"
    assert "scanned " not in err, f"the scan ended before the signal: {err[-3000:]}"
    assert "Traceback" not in err and "leaked" not in err, err[-3000:]
    assert "nanodb: stopping: saving what was indexed" in err, err[-3000:]  # a scan was adding items
    assert not (tmp_path / "db" / ".lock").exists(), "the lock file it wrote is left behind"
    saved = [int(n) for n in re.findall(r"saved (\d+) items?", err)]
    with NanoDB(tmp_path / "db", read_only=True) as db:  # what it reported saved is there
        assert len(db) == (saved[-1] if saved else before), err[-3000:]


def test_a_server_stopped_by_ctrl_c_exits_0_and_leaks_no_worker_semaphores(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for p in coco_photos(3):
        shutil.copy(p, photos)
    proc = start(["--path", str(tmp_path / "db"), "--config", "test", "--server", "--host", "127.0.0.1",
                  "--port", "0", "--scan", str(photos)])
    try:
        url = read_until(proc, r"web UI at (http://\S+)").group(1)
        read_until(proc, r"^scanned 3 files")
        # a thumbnail and an uploaded query image: each starts a decode worker process of the server's
        assert httpx.get(url + "api/items/0/thumbnail", timeout=60).status_code == 200
        upload = httpx.post(url + "api/search/image", files={"file": photos.joinpath(sorted(
            p.name for p in photos.iterdir())[0]).read_bytes()}, timeout=60)
        assert upload.status_code == 200, upload.text
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=STOP_BOUND_S)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, f"exit status {proc.returncode}: {err[-3000:]}"
    assert "saved 3 items" in err and "Traceback" not in err, err[-3000:]
    assert "leaked semlock" not in err and "resource_tracker" not in err, err[-3000:]


def test_a_server_with_nothing_unsaved_stopped_by_sigterm_says_stopping_and_leaves_no_lock_file(scanned_db, tmp_path):
    """It has nothing to save, so it does not say it saves; and the `.lock` it wrote is gone once it exits."""
    path, _ = scanned_db
    shutil.copytree(path, tmp_path / "db")
    assert not (tmp_path / "db" / ".lock").exists()
    proc = start(["--path", str(tmp_path / "db"), "--config", "test", "--server", "--host", "127.0.0.1",
                  "--port", "0"])
    try:
        read_until(proc, r"web UI at (http://\S+)")
        assert (tmp_path / "db" / ".lock").read_text() == str(proc.pid)  # held while it serves
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=STOP_BOUND_S)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, f"exit status {proc.returncode}: {err[-3000:]}"
    assert "nanodb: stopping\n" in err and "saving" not in err and "saved" not in err, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert sorted(p.name for p in (tmp_path / "db").iterdir()) == sorted(p.name for p in path.iterdir()), \
        "the lock file it wrote is left behind"

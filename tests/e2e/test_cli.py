"""The command line and the console, driven as a user scripts them: over stdin, in a subprocess."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
from helpers import coco_photos
from helpers.killharness import write_config

from nanodb.model.clip import hub_reachable

RESULT_LINE = re.compile(r"^\* index=(\d+)  (.+)  similarity=(-?\d\.\d+)$")


def nanodb(*args, stdin: str = "", timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "nanodb", *args],
        input=stdin.encode(),
        capture_output=True,
        timeout=timeout,
    )


def test_scripted_console_prints_nanodb_result_lines(tmp_path, photo_tree):
    db = tmp_path / "db"
    photo = sorted((photo_tree / "set1").rglob("*.jpg"))[0]
    run = nanodb("--path", str(db), "--config", "test", "--scan", str(photo_tree), "--k", "3",
                 stdin=f"a dog on a beach\nsimilar {photo}\nsave\n")
    out = run.stdout.decode()
    assert run.returncode == 0, run.stderr.decode()
    lines = [m for m in map(RESULT_LINE.match, out.splitlines()) if m]
    assert len(lines) == 6
    sims = [float(m.group(3)) for m in lines[:3]]
    assert sims == sorted(sims, reverse=True)
    assert lines[3].group(2) == str(photo)
    assert "saved 40 items" in out
    assert "6 skipped" in run.stderr.decode()
    # The summary's counts add up to the files found (a broken link, found by the walk, is one of them).
    found, *counts = map(int, re.search(r"scanned (\d+) files in [\d.]+s: (\d+) added, (\d+) updated, "
                                        r"(\d+) unchanged, (\d+) skipped", run.stderr.decode()).groups())
    assert found == sum(counts) == 46, run.stderr.decode()
    # Reopened later, with no scan: the same database answers, and a bad command does not end it.
    again = nanodb("--path", str(db), stdin=f"similar /no/such/file.jpg\nsimilar {photo}\n")
    out = again.stdout.decode()
    assert "error: no such image file" in out
    assert [m.group(2) for m in map(RESULT_LINE.match, out.splitlines()) if m][0] == str(photo)


def test_validate_reports_every_item_finds_itself(tmp_path, photo_tree):
    run = nanodb("--path", str(tmp_path / "db"), "--config", "test", "--scan", str(photo_tree / "set0"), "--validate")
    assert run.returncode == 0, run.stderr.decode()
    assert re.search(r"validated (\d+) items: \1 found themselves first, 0 did not", run.stdout.decode())


def test_bad_arguments_give_one_line_errors(tmp_path):
    run = nanodb("--path", str(tmp_path / "db"), "--model", "No-Such-Model", "--pretrained", "none")
    assert run.returncode == 2 and "unknown model 'No-Such-Model'" in run.stderr.decode()
    run = nanodb("--path", str(tmp_path / "db"), "--k", "0")
    assert run.returncode == 2 and "--k: must be at least 1" in run.stderr.decode()
    assert not (tmp_path / "db").exists()


@pytest.mark.skipif(hub_reachable(), reason="the model hub is reachable: weights would be downloaded")
def test_missing_weights_without_network_is_a_clear_error(tmp_path):
    run = nanodb("--path", str(tmp_path / "db"), "--model", "ViT-B-32", "--pretrained", "laion2b_s34b_b79k",
                 timeout=120)
    err = run.stderr.decode()
    assert run.returncode == 2
    assert "cannot get the weights ViT-B-32/laion2b_s34b_b79k" in err and "--pretrained /path/to/file" in err
    assert err.strip().splitlines() == ["nanodb: loading the model ViT-B-32…", err.strip().splitlines()[-1]]
    assert err.strip().splitlines()[-1].startswith("nanodb: error: ")  # the load said it began, then why it failed


def test_a_watch_prints_a_line_for_each_change_it_indexes(tmp_path):
    """Without a console (a service, stdin closed), `--watch` says what it does, one line per change."""
    folder = tmp_path / "watched"
    folder.mkdir()
    photos = coco_photos(2)
    shutil.copy(photos[0], folder / "a.jpg")
    config = write_config(tmp_path / "watch.yaml", settle_seconds=0.2)
    log = tmp_path / "stderr.log"
    with open(log, "wb") as err:
        watch = subprocess.Popen([sys.executable, "-m", "nanodb", "--path", str(tmp_path / "db"), "--config",
                                  str(config), "--watch", str(folder)], stdin=subprocess.DEVNULL,
                                 stdout=subprocess.DEVNULL, stderr=err, env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def wait_for(line: str) -> None:
        deadline = time.monotonic() + 120  # a liveness bound: each step takes about a second
        while line not in log.read_text():
            assert watch.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)

    try:
        wait_for("scanned 1 file in ")  # the first scan indexed a.jpg: the watch follows
        os.rename(folder / "a.jpg", folder / "b.jpg")
        wait_for(f"watch: moved {folder / 'a.jpg'} -> {folder / 'b.jpg'}\n")
        (folder / "b.jpg").unlink()
        wait_for(f"watch: removed {folder / 'b.jpg'}\n")
        shutil.copy(photos[1], folder / "c.jpg")
        wait_for(f"watch: indexing {folder / 'c.jpg'}\n")
        watch.send_signal(signal.SIGTERM)
        assert watch.wait(120) == 0, log.read_text()
    finally:
        watch.kill()


def test_k_is_taken_as_dash_k_and_as_dash_dash_k(scanned_db):
    """`nanodb --path DB -k 2`, as the one-shot commands take it (it was `invalid choice: '2'`)."""
    path, _ = scanned_db
    for flag in ("-k", "--k"):
        run = nanodb("--path", str(path), flag, "2", "--read-only", stdin="a red car\n")
        assert run.returncode == 0, run.stderr.decode()
        assert len([m for m in map(RESULT_LINE.match, run.stdout.decode().splitlines()) if m]) == 2

"""`nanodb search` and `nanodb similar` for scripts: result lines or JSON lines, then exit; shell completion."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

from nanodb.database import NanoDB

RESULT_LINE = re.compile(r"^\* index=(\d+)  (.+)  similarity=(-?\d\.\d+)$")


def nanodb(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nanodb", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})


def test_search_prints_result_lines_and_exits(scanned_db):
    path, _ = scanned_db
    run = nanodb("search", "--path", path, "a", "red", "car", "-k", "4")
    assert run.returncode == 0, run.stderr
    lines = [RESULT_LINE.match(line) for line in run.stdout.splitlines()]
    assert len(lines) == 4 and all(lines)
    with NanoDB(path, read_only=True) as db:
        assert [int(m.group(1)) for m in lines] == [r.index for r in db.search(text="a red car", k=4)]


def test_similar_prints_json_lines_with_the_photo_first(scanned_db, photo_tree):
    path, _ = scanned_db
    photo = sorted((photo_tree / "set0").rglob("*.jpg"))[3]
    run = nanodb("similar", "--path", path, photo, "--json", "-k", "3")
    assert run.returncode == 0, run.stderr
    rows = [json.loads(line) for line in run.stdout.splitlines()]
    assert len(rows) == 3 and rows[0]["path"] == str(photo) and rows[0]["similarity"] > 0.99
    assert set(rows[0]) == {"index", "path", "similarity"}
    by_index = nanodb("similar", "--path", path, rows[0]["index"], "--json", "-k", "3", "--folder", "set1")
    assert all("/set1/" in json.loads(line)["path"] for line in by_index.stdout.splitlines())


def test_one_shot_errors_are_one_line_and_exit_2(scanned_db, tmp_path):
    path, _ = scanned_db
    for args, message in [
        (("similar", "--path", path, "-1"), "an item index is 0 or more"),
        (("similar", "--path", path, tmp_path / "nope.jpg"), "no such image file"),
        (("search", "--path", tmp_path / "no-db", "cat"), "no nanodb database at"),
        (("search", "--path", path, "cat", "--since", "soon"), "since: 'soon' is not a date"),
    ]:
        run = nanodb(*args)
        assert run.returncode == 2 and message in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr


def test_preview_draws_thumbnails_with_the_terminal_image_protocol(scanned_db):
    path, _ = scanned_db
    kitty = nanodb("search", "--path", path, "a dog", "-k", "2", "--preview", env={"NANODB_PREVIEW": "kitty"})
    assert kitty.returncode == 0 and kitty.stdout.count("\033_Ga=T,f=100,") == 2
    iterm = nanodb("search", "--path", path, "a dog", "-k", "1", "--preview", env={"NANODB_PREVIEW": "iterm2"})
    assert "\033]1337;File=inline=1;" in iterm.stdout
    plain = nanodb("search", "--path", path, "a dog", "-k", "1", "--preview", env={"NANODB_PREVIEW": ""})
    assert "\033" not in plain.stdout and "needs a terminal that shows images" in plain.stderr


def test_shell_completion_scripts():
    bash = nanodb("--print-completion", "bash")
    assert bash.returncode == 0 and "complete" in bash.stdout and "similar" in bash.stdout
    assert "--path" in nanodb("--print-completion", "zsh").stdout

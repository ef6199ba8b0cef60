"""`nanodb search` and `nanodb similar` for scripts: result lines or JSON lines, then exit; shell completion."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys

import pytest

from nanodb.database import NanoDB
from nanodb.interfaces.cli import main
from nanodb.interfaces.console import Console

RESULT_LINE = re.compile(r"^\* index=(\d+)  (.+)  similarity=(-?\d\.\d+)$")
NO_TMUX = {"TMUX": ""}  # previews as drawn straight to the terminal, even when the tests run inside tmux


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
    kitty = nanodb("search", "--path", path, "a dog", "-k", "2", "--preview",
                   env={"NANODB_PREVIEW": "kitty", **NO_TMUX})
    assert kitty.returncode == 0 and kitty.stdout.count("\033_Ga=T,f=100,") == 2
    iterm = nanodb("search", "--path", path, "a dog", "-k", "1", "--preview",
                   env={"NANODB_PREVIEW": "iterm2", **NO_TMUX})
    assert "\033]1337;File=inline=1;" in iterm.stdout
    plain = nanodb("search", "--path", path, "a dog", "-k", "1", "--preview", env={"NANODB_PREVIEW": ""})
    assert "\033" not in plain.stdout and "needs a terminal that shows images" in plain.stderr


def test_shell_completion_scripts():
    bash = nanodb("--print-completion", "bash")
    assert bash.returncode == 0 and "complete" in bash.stdout and "similar" in bash.stdout
    assert "--path" in nanodb("--print-completion", "zsh").stdout


def run_main(capsys, *args) -> tuple[int, str, str]:
    """`nanodb ARGS...` in this process (fast): (exit status, stdout, stderr)."""
    capsys.readouterr()
    status = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return status, out, err


def test_json_output_is_only_json_even_with_previews_forced(scanned_db, capsys, monkeypatch):
    monkeypatch.setenv("NANODB_PREVIEW", "kitty")
    status, out, err = run_main(capsys, "search", "--path", scanned_db[0], "a dog", "-k", "3", "--json", "--preview")
    assert status == 0 and len([json.loads(line) for line in out.splitlines()]) == 3
    assert "\033" not in out and "--preview is ignored with --json" in err


def test_previews_inside_tmux_pass_through_it(scanned_db, capsys, monkeypatch):
    """tmux drops an image escape unless it is wrapped in its passthrough DCS, every ESC doubled."""
    monkeypatch.setenv("TMUX", "/tmp/tmux-1000/default,1234,0")
    for protocol, start in (("kitty", "\033_Ga=T,f=100,"), ("iterm2", "\033]1337;File=inline=1;")):
        monkeypatch.setenv("NANODB_PREVIEW", protocol)
        status, out, _ = run_main(capsys, "search", "--path", scanned_db[0], "a dog", "-k", "1", "--preview")
        assert status == 0 and "\033Ptmux;" + start.replace("\033", "\033\033") in out, repr(out[-300:])
        assert out.count("\033Ptmux;") == out.count("\033\\") - out.count("\033\033\\")  # each one closed


def test_no_results_leaves_stdout_empty_and_says_so_on_stderr(scanned_db, capsys):
    status, out, err = run_main(capsys, "search", "--path", scanned_db[0], "a dog", "--type", "png")
    assert (status, out, err) == (0, "", "nanodb: no results match the filters\n")


@pytest.mark.parametrize("args", [("similar", "--path", "{db}", "0", "-k", "8"), ("--print-completion", "zsh")])
def test_output_cut_by_its_reader_ends_quietly(scanned_db, args):
    """`nanodb ... | head -0`: the reader is gone before the first line; the exit status is 141, as for a
    standard tool (128 + SIGPIPE), with nothing on stderr."""
    command = [sys.executable, "-m", "nanodb", *(a.format(db=scanned_db[0]) for a in args)]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as run:
        run.stdout.close()  # before it writes anything
        err = run.stderr.read().decode()
        assert run.wait(timeout=300) == 141 and err == "", err


def test_a_missing_file_says_how_to_search_the_words_as_the_console_does(scanned_db, capsys, tmp_path, monkeypatch):
    path, _ = scanned_db
    monkeypatch.chdir(tmp_path)  # where no such file is
    assert main(["search", "--path", str(path), "./missing.jpg"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == (
        "nanodb: error: no such file or folder: ./missing.jpg (to search for these words, quote them: "
        """'"./missing.jpg"' or add --text)\n""")
    with NanoDB(path, read_only=True) as db:  # the console's message, its quotes typed as it reads them
        out: list[str] = []
        asyncio.run(Console(db, 3, out.append).execute("./missing.jpg"))
    assert out == ['error: no such file or folder: ./missing.jpg (to search for these words, quote them: '
                   '"./missing.jpg")']
    for words in (['"./missing.jpg"'], ["--text", "./missing.jpg"]):  # either hint searches the words
        assert main(["search", "--path", str(path), *words, "-k", "2"]) == 0
        assert len(capsys.readouterr().out.splitlines()) == 2


def test_words_that_are_not_utf8_are_a_one_line_error(scanned_db, capsys):
    """`nanodb search caf$'\\xe9'` from a Latin-1 shell: an error, not a search of replacement characters."""
    path, _ = scanned_db
    for words in (["caf\udce9", "au", "lait"], ["--text", "caf\udce9 au lait"]):
        assert main(["search", "--path", str(path), *words]) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err == (
            "nanodb: error: the query is not UTF-8 text: caf\\udce9 au lait (is the terminal set to UTF-8?)\n")

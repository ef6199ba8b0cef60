"""Bad queries at the console: each gets a clear message (or results), and the console goes on."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import REPO

from nanodb.database import NanoDB
from nanodb.interfaces.console import Console

ODD_PATH = "/photos/caf\udce9\nnew line.jpg"  # undecodable byte and a newline in a stored name


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    path = tmp_path_factory.mktemp("queries") / "db"
    with NanoDB(path, config="test") as db:
        db.add(np.random.default_rng(0).standard_normal((5, db.dim)),
               paths=[f"/photos/{i}.jpg" for i in range(4)] + [ODD_PATH])
        db.save()
        yield db


def run(db, line: str) -> list[str]:
    out: list[str] = []
    assert asyncio.run(Console(db, 3, out.append).execute(line)) is True  # the console goes on
    return out


@pytest.mark.parametrize(
    "line, message",
    [
        ("   ", "error: empty query"),
        ("\t \t", "error: empty query"),
        ("/no/such/photo.jpg", "error: no such file or folder: /no/such/photo.jpg (to search for these words, quote"),
        ("similar /no/such/photo.jpg", "error: no such image file"),
        (f"similar {REPO / 'pyproject.toml'}", "not an image"),
        ("similar 12345", "error: no item with index 12345"),
        ("similar", "error: similar needs an image path, an item index or an image URL"),
        ("scan /no/such/folder", "error: no such file or folder"),
        ("similar /no/caf\udce9\n.jpg", "error: no such image file: /no/caf\\udce9\\n.jpg"),
        ("caf\udce9 au lait", "error: the query is not UTF-8 text: caf\\udce9 au lait"),  # as the README says
        ('"caf\udce9 au lait"', "error: the query is not UTF-8 text"),
    ],
)
def test_a_bad_query_gets_one_clear_message(db, line, message):
    out = run(db, line)
    assert len(out) == 1 and out[0].startswith("error: ") and message in out[0], out


@pytest.mark.parametrize(
    "line",
    ["a" * 1000, "a red car " * 100, "\x00\x01\x07\x1b[31m red\x7f", "café au lait", "😀" * 1000, "🚗"],
)
def test_odd_text_is_searched(db, line):
    out = run(db, line)
    assert len(out) == 3 and all(o.startswith("* index=") for o in out), out


@pytest.mark.parametrize("line", ["a" * 100_000, "a red car " * 10_000, "😀" * 5000])
def test_overlong_text_gets_the_same_limit_as_the_web(db, line):
    out = run(db, line)
    assert out == [f"error: the query is {len(line.strip())} characters long; at most 1000 are searched"], out


def test_a_stored_name_with_odd_characters_prints_on_one_line(db):
    out = run(db, "similar 4")
    assert out[0].startswith("* index=4 ") and "\n" not in out[0] and "caf\\udce9\\nnew line.jpg" in out[0]
    out[0].encode("utf-8")  # printable anywhere: no lone surrogates left


@pytest.mark.timeout(180)
def test_console_over_stdin_survives_hostile_bytes(db, tmp_path):
    """The real process: non-UTF-8 bytes, NULs, a 100 KB line and bad paths on stdin; it answers every
    line and exits cleanly at the end of input."""
    lines = [
        b"",
        b"   ",
        b"caf\xe9 \xff\xfe au lait",
        b"\x00\x00\x00",
        b"x" * 100_000,
        b"/no/such/photo.jpg",
        b"similar /no/such/\xff.jpg",
        b"similar 4",
        b"help",
        b"a red car",
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "nanodb", "--path", str(db.path), "--read-only", "--k", "2"],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, input=b"\n".join(lines) + b"\n",
        capture_output=True, timeout=170,
    )
    out = proc.stdout.decode("utf-8")  # everything printed is valid UTF-8
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-3000:]
    assert "Traceback" not in proc.stderr.decode(errors="replace")
    assert out.count("error: empty query") == 1
    assert "error: no such file or folder: /no/such/photo.jpg" in out
    assert "error: no such image file: /no/such/\\udcff.jpg" in out
    assert "caf\\udce9\\nnew line.jpg" in out
    assert "commands:" in out
    assert "error: the query is 100000 characters long; at most 1000 are searched" in out
    assert "error: the query is not UTF-8 text: caf\\udce9 \\udcff\\udcfe au lait" in out
    assert out.count("* index=") == 2 * 3  # two results for each of the three searches

"""The console as a person uses it: completion, history, colours, the status line, and one rule for paths."""

from __future__ import annotations

import asyncio
import os
import shutil
import sys

import numpy as np
import pytest
from helpers import coco_photos
from prompt_toolkit.completion import CompleteEvent
from prompt_toolkit.document import Document
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput

from nanodb.database import NanoDB
from nanodb.interfaces.console import (
    Console,
    ConsoleCompleter,
    open_in_viewer,
    progress_line,
    styled,
)
from nanodb.interfaces.query_args import words_query
from nanodb.search.query import QueryError


@pytest.fixture
def console(tmp_path, empty_db_path):
    """A console on an empty database, its output in .lines and the files it opened in .opened."""
    shutil.copytree(empty_db_path, tmp_path / "db")
    db = NanoDB(tmp_path / "db")
    lines: list[str] = []
    opened: list[str] = []
    c = Console(db, 3, lines.append, history=tmp_path / "history", opener=opened.append)
    c.lines, c.opened = lines, opened
    yield c
    db.close()


def run(console, *commands) -> list[str]:
    """Run commands in one event loop (with its own ingest service), as the console's loop would."""
    console.lines.clear()

    async def go():
        c = Console(console.db, console.k, console.lines.append, history=console.history, opener=console.opener)
        for command in commands:
            await c.execute(command)
        await c.service.wait_scans()
        await c.service.stop()

    asyncio.run(go())
    return list(console.lines)


def completions(text: str) -> list[str]:
    event = CompleteEvent(completion_requested=True)
    return [c.text for c in ConsoleCompleter().get_completions(Document(text), event)]


def test_tab_completes_commands_and_paths(tmp_path):
    (tmp_path / "holiday").mkdir()
    (tmp_path / "holly.jpg").write_bytes(b"x")
    assert completions("sim") == ["similar"]
    assert {"save", "scan", "status"} <= set(completions("s"))
    assert sorted(completions(f"scan {tmp_path}/hol")) == ["iday", "ly.jpg"]
    assert sorted(completions(f"similar {tmp_path}/holl")) == ["y.jpg"]
    assert completions(f"{tmp_path}/holi") == ["day"]  # a first word that is a path


def test_history_is_kept_across_sessions_and_suggested(tmp_path, console):
    executed: list[str] = []

    class Recording(Console):
        async def execute(self, line: str) -> bool:
            executed.append(line)
            return await super().execute(line)

    async def session(keys: str):
        with create_pipe_input() as pipe:
            pipe.send_text(keys)
            c = Recording(console.db, 3, console.lines.append, history=console.history)
            await c.interact(input=pipe, output=DummyOutput())
            await c.service.stop()

    async def load(history):
        return [entry async for entry in history.load()]

    asyncio.run(session("help\r\x04"))  # Ctrl-D ends the session
    assert "help" in (tmp_path / "history").read_text()
    fresh = Console(console.db, 3, console.lines.append, history=tmp_path / "history")
    with create_pipe_input() as pipe:
        prompt = fresh.session(input=pipe, output=DummyOutput())
        asyncio.run(load(prompt.history))
        suggestion = prompt.auto_suggest.get_suggestion(prompt.default_buffer, Document("he"))
    assert suggestion.text == "lp"  # typed `he`, the earlier session's `help` is suggested
    asyncio.run(session("\x1b[A\r\x04"))  # Up recalls `help` from the earlier session and runs it
    assert executed == ["help", "help"]


def test_scores_and_errors_are_coloured():
    assert styled("error: no such file")[0][0].startswith("ansired")
    high = styled("* index=3  /p/cat.jpg  similarity=0.3512")
    low = styled("* index=4  /p/dog.jpg  similarity=0.0512")
    assert "green" in high[-1][0] and high[-1][1] == "0.3512" and "green" not in low[-1][0]


def test_the_status_line_fits_the_terminal_and_shows_progress(console):
    class Scan:
        found, done, walking = 200, 50, False

    console.db.active_scans.append(Scan())
    try:
        for width in (40, 120, 300):
            line = progress_line(console.db, lambda room: "scan /a/very/long/folder/name: " + "x" * 300, width)
            assert len(line) <= width and "25%" in line
    finally:
        console.db.active_scans.clear()


def test_every_spelling_of_an_image_path_scans_it_then_answers(tmp_path, console, monkeypatch):
    photos = tmp_path / "photos"
    photos.mkdir()
    for p in coco_photos(4):
        shutil.copy(p, photos)
    first = sorted(photos.iterdir())[0]
    monkeypatch.chdir(photos)
    out = run(console, first.name)  # a bare file name in the current folder
    assert any("1 added" in line for line in out)
    assert out[out.index(f"nearest to {first.name}:") + 1].startswith(f"* index=0  {first}  similarity=1.0")
    out = run(console, "./" + sorted(photos.iterdir())[1].name, str(photos))
    assert any(line.startswith("* index=1") for line in out)
    run(console, "wait")
    assert len(console.db) == 4
    out = run(console, f'"{first.name}"')  # quotes force text
    assert len(out) == 3 and all(line.startswith("* index=") for line in out)


def test_a_missing_path_is_an_error_not_a_text_search(console):
    for typed in ("./missing.jpg", "/no/such/folder", "missing.png", "~/no-such-photo.jpg"):
        out = run(console, typed)
        assert len(out) == 1 and out[0].startswith("error: no such file or folder"), out
        assert 'quote them: "' in out[0]
    assert console.db.timings.searches == 0


def test_bad_commands_get_clear_messages(console):
    console.db.add(np.eye(console.db.dim)[:2])
    assert run(console, "similar -1") == ["error: similar -1: an item index is 0 or more (the index= of a result)"]
    assert run(console, "scan") == ["error: scan needs a folder or an image file, e.g.  scan ~/Pictures"]
    assert run(console, "similar")[0].startswith("error: similar needs an image path, an item index")
    assert run(console, "similar 99") == ["error: no item with index 99"]
    assert run(console, "clear")[0].startswith("error: clear only clears a terminal")
    assert len(run(console, "similar 1")) == 2


def test_open_shows_an_item_in_the_desktop_viewer(tmp_path, console):
    photo = shutil.copy(coco_photos(1)[0], tmp_path / "a.jpg")
    console.db.add([str(photo)])
    assert run(console, "open 0") == [f"opened {photo}"] and console.opened == [str(photo)]
    assert run(console, "open 5") == ["error: no item with index 5"]
    assert run(console, "open cat")[0].startswith("error: open needs an item index")


def test_similar_to_an_image_url_fetches_it(console, monkeypatch):
    import http.server
    import threading

    photo = coco_photos(1)[0]
    console.db.add([str(photo)])
    handler = type("H", (http.server.SimpleHTTPRequestHandler,), {"log_message": lambda *a: None})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: handler(*a, directory=str(photo.parent)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        out = run(console, f"similar http://127.0.0.1:{server.server_port}/{photo.name}")
    finally:
        server.shutdown()
    assert out[0].startswith("* index=0") and float(out[0].rsplit("=", 1)[1]) > 0.99


@pytest.fixture(scope="module")
def vectors_db(tmp_path_factory):
    """50 random vectors: queries rank them, no photo needed."""
    with NanoDB(tmp_path_factory.mktemp("query") / "db", config="test") as db:
        db.add(np.random.default_rng(0).standard_normal((50, db.dim)).astype(np.float32))
        yield db


def test_search_and_console_use_combined_queries(vectors_db):
    db = vectors_db
    d, b, s = (db.embed_query(t) for t in ("dog", "beach", "snow"))
    expected = db.search((2 * d + b - s).astype(np.float32), k=5)
    assert [r.index for r in db.search("2:dog + beach - snow", k=5)] == [r.index for r in expected]
    lines: list[str] = []
    asyncio.run(Console(db, 5, lines.append).execute("2:dog + beach - snow"))
    assert lines == [str(r) for r in expected]
    lines.clear()
    asyncio.run(Console(db, 5, lines.append).execute("dog - dog"))
    assert len(lines) == 1 and lines[0].startswith("error:") and "cancel out" in lines[0]


def test_the_console_the_command_line_and_the_api_agree_on_a_dog_jpg(vectors_db, tmp_path, monkeypatch):
    """`a dog.jpg` named an image to NanoDB.search but was words to the console and `nanodb search`: now
    a missing file is an error everywhere, and words stay words everywhere."""
    db = vectors_db
    monkeypatch.chdir(tmp_path)  # where no such file is

    def console(line: str) -> list[str]:
        lines: list[str] = []
        asyncio.run(Console(db, 3, lines.append).execute(line))
        return lines

    for typed in ("a dog.jpg", "my holiday.png"):
        with pytest.raises(QueryError, match="no such image file"):
            db.search(typed, k=3)
        out = console(typed)
        assert len(out) == 1 and out[0].startswith("error: no such file or folder"), out
        assert words_query(typed) == {"query": typed}  # `nanodb search a dog.jpg` asks NanoDB.search
    words = "a dog.jpg on a beach"
    assert console(words) == [str(r) for r in db.search(words, k=3)]
    assert words_query(words) == {"query": words}  # words by the same rule as NanoDB.search's
    assert words_query('"a dog.jpg"') == {"text": "a dog.jpg"}  # quoted: always words
    assert words_query("a dog.jpg", text=True) == {"text": "a dog.jpg"}  # and with --text


def test_an_existing_file_that_is_no_image_is_named_as_such(tmp_path, console, monkeypatch):
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "logo.svg").write_text("<svg/>")
    monkeypatch.chdir(tmp_path)
    for typed in ("./notes.txt", str(tmp_path / "notes.txt")):
        out = run(console, typed)
        assert len(out) == 1 and out[0].startswith(f"error: not an image nanodb reads: {typed} is a .txt file"), out
        assert ".jpg" in out[0] and ".heic" in out[0]
    assert run(console, "./logo.svg") == ["error: nanodb cannot read .svg images: ./logo.svg"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the desktop viewer is xdg-open on Linux")
def test_open_says_so_when_no_application_could_open_the_file(tmp_path, console, monkeypatch):
    """xdg-open exits 3 when it finds no application: `open` must not claim it opened the file."""
    photo = shutil.copy(coco_photos(1)[0], tmp_path / "a.jpg")
    console.db.add([str(photo)])
    (tmp_path / "bin").mkdir()
    viewer = tmp_path / "bin" / "xdg-open"
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    for status, expected in ((3, f"error: cannot open {photo}: xdg-open found no application to open it "
                                 "(exit status 3)"), (0, f"opened {photo}")):
        viewer.write_text(f"#!/bin/sh\necho \"$1\" > {tmp_path / 'asked'}\nexit {status}\n")
        viewer.chmod(0o755)
        console.opener = open_in_viewer
        assert run(console, "open 0") == [expected]
        assert (tmp_path / "asked").read_text().strip() == str(photo)


def test_a_read_only_console_says_up_front_that_it_cannot_scan(tmp_path, empty_db_path):
    shutil.copytree(empty_db_path, tmp_path / "db")
    shutil.copy(coco_photos(1)[0], tmp_path / "a.jpg")
    with NanoDB(tmp_path / "db", read_only=True) as db:
        lines: list[str] = []
        console = Console(db, 3, lines.append, history=tmp_path / "history")
        console.lines, console.opener = lines, None
        for typed in (f"scan {tmp_path}", str(tmp_path), str(tmp_path / "a.jpg")):
            assert run(console, typed) == [f"error: cannot scan {typed.removeprefix('scan ')}: the database is open "
                                           "read-only (--read-only)"]
        assert len(db) == 0


def test_counts_of_one_are_singular(console):
    console.db.add(np.eye(console.db.dim)[:1])
    assert run(console, "save")[0].startswith("saved 1 item to ")
    console.db.add(np.eye(console.db.dim)[:1])
    assert run(console, "validate")[0].split("\n")[0] == (
        "validated 2 items: 2 found themselves first, 0 did not; 1 group of exact duplicates")

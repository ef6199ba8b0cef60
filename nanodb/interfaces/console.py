"""The interactive `> ` console (prompt_toolkit), and the same commands read line by line from a pipe."""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
import threading
from collections.abc import Callable

from nanodb.database import NanoDB
from nanodb.service import IngestService
from pipeline.walk import is_image_name, printable

HELP = """\
commands:
  TEXT                 search by text, e.g.  a girl riding a horse
  A + B - C            combined query, e.g.  dog + beach - snow  (weights: 2:dog + cat)
  PATH                 an existing folder or image file: scan it into the database
  similar PATH|INDEX   images similar to an image file or to a stored item
  scan PATH            scan a folder or file in the background (also when the name could be read as text)
  status               what ingestion is doing: files done/total, images/s, errors, ETA, queues
  pause / resume       pause or resume ingestion (scans and watches); queries keep working
  wait                 wait until the running scans are done
  save                 save the database now
  validate             check that every stored vector finds itself first
  help                 this text
  exit                 save and quit (also Ctrl-D)"""


class Console:
    """Reads commands and runs them against `db`. Output goes through `write` (print by default)."""

    def __init__(self, db: NanoDB, k: int, write: Callable[[str], None] = print,
                 service: IngestService | None = None):
        self.db = db
        self.k = k
        self.write = write
        self._service = service
        self.exited = False  # `exit` typed, rather than the end of input

    @property
    def service(self) -> IngestService:
        if self._service is None:
            self._service = IngestService(self.db)
        return self._service

    async def run(self) -> None:
        try:  # a file name with undecodable bytes is printed escaped, not a crash
            sys.stdout.reconfigure(errors="backslashreplace")
        except (AttributeError, ValueError):
            pass
        if sys.stdin.isatty() and sys.stdout.isatty():
            await self._interactive()
        else:
            await self._scripted()

    async def _interactive(self) -> None:
        from prompt_toolkit import PromptSession
        from prompt_toolkit.patch_stdout import patch_stdout

        # The bottom toolbar is the live status line: redrawn in place, below the line being typed.
        session: PromptSession = PromptSession(
            bottom_toolbar=lambda: self.service.status(), refresh_interval=0.5
        )
        with patch_stdout():
            while True:
                try:
                    line = await session.prompt_async("> ")
                except KeyboardInterrupt:
                    continue
                except EOFError:
                    return
                if not await self.execute(line):
                    return

    async def _scripted(self) -> None:
        try:
            sys.stdin.reconfigure(errors="surrogateescape")  # non-UTF-8 file names stay usable
        except (AttributeError, ValueError):
            pass
        # A daemon thread reads stdin, so a SIGTERM never waits for a line that may never come.
        loop = asyncio.get_running_loop()
        lines: asyncio.Queue = asyncio.Queue()

        def read() -> None:
            for line in sys.stdin:
                loop.call_soon_threadsafe(lines.put_nowait, line)
            loop.call_soon_threadsafe(lines.put_nowait, "")

        threading.Thread(target=read, name="nanodb-stdin", daemon=True).start()
        while line := await lines.get():
            if not await self.execute(line.rstrip("\n")):
                return

    async def execute(self, line: str) -> bool:
        """Run one command; returns False when the console should exit. Never raises for bad input."""
        if not line:  # a bare Enter
            return True
        line = line.strip()
        if not line:
            self.write("error: empty query: type some words, or give an image path")
            return True
        word, _, rest = line.partition(" ")
        word = word.lower()
        try:
            if word in ("exit", "quit"):
                self.exited = True
                return False
            if word == "help":
                self.write(HELP)
            elif word == "save":
                saved = await asyncio.to_thread(self.db.save)
                self.write(f"saved {len(self.db)} items to {self.db.path}" if saved else "nothing to save")
            elif word == "validate":
                self.write(format_validation(self.db, await asyncio.to_thread(self.db.validate)))
            elif word == "similar":
                await self._search(_image_or_index(rest))
            elif word == "status":
                self.write(self.service.status())
            elif word == "pause":
                self.service.pause()
                self.write("ingestion paused (queries still work); `resume` to go on")
            elif word == "resume":
                self.service.resume()
                self.write("ingestion resumed")
            elif word == "wait":
                await self.service.wait_scans()
                self.write(self.service.status())
            elif word == "scan":
                await self._scan(_unquote(rest))
            elif _is_existing_path(line):
                await self._scan(_unquote(line))
            elif _looks_like_image_path(line):
                raise ValueError(f"no such image file: {_unquote(line)}")
            else:
                await self._search(line)
        except (ValueError, TypeError, OSError) as e:
            self.write(f"error: {printable(str(e))}")
        except Exception as e:  # the console must outlive any single bad command
            self.write(f"error: {type(e).__name__}: {printable(str(e))}")
        return True

    async def _search(self, query) -> None:
        results = await asyncio.to_thread(self.db.search, query, self.k)
        if not results:
            self.write("no results: the database is empty")
        for r in results:
            self.write(str(r))

    async def _scan(self, path: str) -> None:
        self.service.scan(path, on_done=lambda report: self.write(report.summary()))
        self.write(f"scanning {path} in the background (`status` to follow it)")


def format_validation(db: NanoDB, report) -> str:
    lines = [
        f"validated {report.checked} items: {report.checked - len(report.failures)} found themselves first, "
        f"{len(report.failures)} did not; {len(report.duplicates)} groups of exact duplicates"
    ]
    for item, found in report.failures:
        lines.append(f"  FAILED index={item} {db.path_of(item)} -> found index={found} {db.path_of(found)} first")
    for group in report.duplicates:
        lines.append("  duplicates: " + "  ".join(f"[{i}] {db.path_of(i)}" for i in group))
    return "\n".join(lines)


def _unquote(text: str) -> str:
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        try:
            return shlex.split(text)[0]
        except ValueError:
            pass
    return text


def _is_existing_path(line: str) -> bool:
    path = os.path.expanduser(_unquote(line))
    return (os.sep in path or path.startswith(".")) and os.path.exists(path)


def _looks_like_image_path(line: str) -> bool:
    """A missing image file typed as a path, which must not silently become a text search."""
    path = _unquote(line)
    return path.startswith(("/", "~/", "./", "../")) and is_image_name(path)


def _image_or_index(arg: str):
    arg = _unquote(arg)
    if not arg:
        raise ValueError("similar needs an image path or an item index")
    if arg.isdigit():
        return int(arg)
    path = os.path.expanduser(arg)
    if not os.path.isfile(path):
        raise ValueError(f"no such image file: {arg}")
    from pathlib import Path

    return Path(path)

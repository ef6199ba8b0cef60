"""The interactive `> ` console (prompt_toolkit), and the same commands read line by line from a pipe.

Interactive: tab completion of commands and paths, history kept across sessions (and suggested as you
type), coloured scores and errors, and a status line that fits the terminal."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TextIO

from prompt_toolkit.completion import CompleteEvent, Completer, Completion, PathCompleter, WordCompleter
from prompt_toolkit.document import Document
from prompt_toolkit.formatted_text import FormattedText

from nanodb.database import NanoDB
from nanodb.interfaces.query_args import (
    is_combined_query,
    missing_path,
    similar_query,
    unquote,
    utf8_words,
    words_query,
)
from nanodb.interfaces.stopping import clear_line, wait_showing_progress
from nanodb.media.formats import IMAGE_EXTENSIONS, RAW_EXTENSIONS
from nanodb.media.paths import is_image_name, is_unsupported_image_name, printable
from nanodb.search.query import is_image_reference, is_url, unquoted
from nanodb.service import IngestService

HELP = """\
commands:
  TEXT                 search by text, e.g.  a girl riding a horse   ("quoted" is always text)
  A + B - C            combined query, e.g.  dog + beach - snow  (weights: 2:dog + cat); a term can
                       be an image path or URL, or an item: ./cat.jpg - 3:cat + 2:bee, #12 + night
  PATH                 an existing folder or image file: scan it (an image: then show its neighbours)
  similar PATH|INDEX|URL  images similar to an image file, a stored item or an image on the web
  open INDEX           open an item's file in the desktop's image viewer
  scan PATH            scan a folder or file in the background
  status               what ingestion is doing: files done/total, images/s, errors, ETA, queues
  pause / resume       pause or resume ingestion (scans and watches); queries keep working
  wait                 wait until the running scans are done, showing their progress (Ctrl-C: stop, save, quit)
  cancel / stop        stop the running scans, keeping what they indexed (unsaved until save or exit)
  save                 save the database now
  validate             check that every stored vector finds itself first
  clear                clear the screen
  help                 this text
  exit                 save and quit (also Ctrl-D)"""

MODEL_NOTE_AFTER_S = 1.0  # a query still waiting this long for the model's load says so
RESULT_LINE = re.compile(r"^(\* index=\d+  )(.*)(  similarity=)(-?\d+\.\d+)$")
VIEWER_WAIT_S = 3.0  # how long `open` waits for xdg-open (or macOS open) to say it found no application


def counted(n: int, noun: str) -> str:
    """`1 item`, `2 items`: a count with its noun in the right number."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def history_file() -> Path:
    """Where the console keeps its history: $XDG_DATA_HOME/nanodb/history (~/.local/share/...)."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return Path(base) / "nanodb" / "history"


class ConsoleCompleter(Completer):
    """Commands for the first word, paths after `scan`/`similar` and for a first word that starts like a path."""

    def __init__(self) -> None:
        self.commands = WordCompleter([word for word in Console.COMMANDS if word != "quit"])
        self.paths = PathCompleter(expanduser=True)

    def get_completions(self, document: Document, complete_event: CompleteEvent) -> Iterable[Completion]:
        text = document.text_before_cursor.lstrip()
        word, space, rest = text.partition(" ")
        if space and word.lower() in ("scan", "similar"):
            yield from self.paths.get_completions(Document(rest, len(rest)), complete_event)
        elif not space:
            if word.startswith(("/", "~", ".")) or os.sep in word:
                yield from self.paths.get_completions(Document(word, len(word)), complete_event)
            else:
                yield from self.commands.get_completions(document, complete_event)


def styled(line: str) -> FormattedText:
    """A line of output with colours: errors red, similarity scores green (high) to grey (low)."""
    if line.startswith("error:"):
        return FormattedText([("ansired bold", "error:"), ("ansired", line[len("error:"):])])
    m = RESULT_LINE.match(line)
    if not m:
        return FormattedText([("", line)])
    score = float(m.group(4))
    colour = "ansigreen bold" if score >= 0.3 else "ansiyellow" if score >= 0.2 else "ansibrightblack"
    return FormattedText([("ansicyan", m.group(1)), ("", m.group(2)), ("", m.group(3)), (colour, m.group(4))])


def progress_line(db: NanoDB, status: Callable[[int], str], width: int) -> str:
    """The status line: a bar and percentage for the running scans, then the service's status made to
    fit what is left of `width` (`status(room)`), cut to `width` if it still does not fit."""
    scans = list(db.active_scans)
    head = ""
    if scans:
        found, done = sum(r.found for r in scans), sum(r.done for r in scans)
        share = done / found if found else 0.0
        bar = "█" * round(share * 20) + "░" * (20 - round(share * 20))
        walking = "+" if any(r.walking for r in scans) else ""
        head = f"{bar} {share:4.0%} {done:,}/{found:,}{walking} | "
    line = head + status(width - len(head))
    return line if len(line) <= width else line[: max(width - 1, 0)] + "…"


def open_in_viewer(path: str) -> None:
    """Open a file with the desktop's default application (xdg-open, macOS `open`, or Windows)."""
    if sys.platform == "win32":
        os.startfile(path)  # noqa: S606 - a file the user asked to see
        return
    command = "open" if sys.platform == "darwin" else "xdg-open"
    if shutil.which(command) is None:
        raise OSError(f"cannot open {path}: no desktop viewer ({command}) found")
    launcher = subprocess.Popen([command, path], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
    try:  # it ends at once when it found no application; one still running has started the viewer
        status = launcher.wait(timeout=VIEWER_WAIT_S)
    except subprocess.TimeoutExpired:
        return
    if status != 0:
        raise OSError(f"cannot open {path}: {command} found no application to open it (exit status {status})")


class Console:
    """Reads commands and runs them against `db`. Output goes through `write` (print by default)."""

    def __init__(self, db: NanoDB, k: int, write: Callable[[str], None] = print,
                 service: IngestService | None = None, *, history: str | os.PathLike | None = None,
                 opener: Callable[[str], None] = open_in_viewer):
        self.db = db
        self.k = k
        self.write = write
        self._service = service
        self.history = Path(history) if history is not None else history_file()
        self.opener = opener
        self.exited = False  # `exit` typed, rather than the end of input
        self._clear: Callable[[], None] | None = None
        self._terminal: TextIO | None = None  # where `wait` draws its progress line (None: read from a pipe)

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
            await self.interact()
        else:
            await self._scripted()

    def session(self, **io):
        """The prompt: completion, history in `self.history`, suggestions from it, the status line."""
        from prompt_toolkit import PromptSession
        from prompt_toolkit.auto_suggest import AutoSuggestFromHistory
        from prompt_toolkit.history import FileHistory, InMemoryHistory

        try:
            self.history.parent.mkdir(parents=True, exist_ok=True)
            history = FileHistory(str(self.history))
        except OSError:  # e.g. a read-only home: history for this session only
            history = InMemoryHistory()
        session = None

        def toolbar() -> str:
            return self._progress(session.app.output.get_size().columns if session else 80)

        session = PromptSession(
            history=history, completer=ConsoleCompleter(), auto_suggest=AutoSuggestFromHistory(),
            complete_while_typing=False, bottom_toolbar=toolbar, refresh_interval=0.5, **io,
        )
        return session

    async def interact(self, **io) -> None:
        """The interactive loop; `io` (input=, output=) lets tests drive it with prompt_toolkit's test input."""
        from prompt_toolkit import print_formatted_text
        from prompt_toolkit.patch_stdout import patch_stdout
        from prompt_toolkit.shortcuts import clear

        session = self.session(**io)
        self._terminal = sys.__stdout__ if not io else None
        output = io.get("output")
        write, self.write = self.write, lambda line: print_formatted_text(styled(line), output=output)
        self._clear = clear if output is None else None
        try:
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
        finally:
            self.write = write

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
        word, rest = word.lower(), rest.strip()
        command = self.COMMANDS.get(word)
        if word == "clear" and rest:
            command = None  # `clear sky` is a search
        try:
            await (command(self, rest) if command else self._query(line))
        except BrokenPipeError:
            raise  # the reader of the output is gone: the program ends (cli.main), it is no bad command
        except (ValueError, TypeError, OSError) as e:
            self.write(f"error: {printable(str(e))}")
        except Exception as e:  # the console must outlive any single bad command
            self.write(f"error: {type(e).__name__}: {printable(str(e))}")
        return not self.exited

    # ------------------------------------------------------------------ commands: each takes the rest of the line
    async def do_exit(self, rest: str) -> None:
        self.exited = True

    async def do_help(self, rest: str) -> None:
        self.write(HELP)

    async def do_save(self, rest: str) -> None:
        saved = await asyncio.to_thread(self.db.save)
        self.write(f"saved {counted(len(self.db), 'item')} to {self.db.path}" if saved else "nothing to save")

    async def do_validate(self, rest: str) -> None:
        self.write(format_validation(self.db, await asyncio.to_thread(self.db.validate)))

    async def do_similar(self, rest: str) -> None:
        await self._search(**similar_query(rest))

    async def do_status(self, rest: str) -> None:
        self.write(self.service.status())

    async def do_pause(self, rest: str) -> None:
        self.service.pause()
        self.write("ingestion paused (queries still work); `resume` to go on")

    async def do_resume(self, rest: str) -> None:
        self.service.resume()
        self.write("ingestion resumed")

    async def do_wait(self, rest: str) -> None:
        if self._terminal is None:  # read from a pipe: no progress line to draw
            await self.service.wait_scans()
        else:  # a scan's summary, written meanwhile, replaces the progress line
            write, self.write = self.write, lambda line: (clear_line(self._terminal), write(line))
            try:
                await wait_showing_progress(self.service.wait_scans(), self._progress, self._terminal)
            finally:
                self.write = write
        self.write(self.service.status())

    async def do_cancel(self, rest: str) -> None:
        stopped = await self.service.cancel_scans()
        for path, report in stopped:
            self.write(f"cancelled the scan of {path}: {report.summary()}")
        unsaved = f"; {self.db.unsaved} unsaved (`save` or `exit` saves them)" if self.db.unsaved else ""
        self.write(("no scan is running" if not stopped else "scans stopped") + unsaved)

    async def do_scan(self, rest: str) -> None:
        if not rest:
            raise ValueError("scan needs a folder or an image file, e.g.  scan ~/Pictures")
        await self._scan(unquote(rest))

    async def do_clear(self, rest: str) -> None:
        if self._clear is None:
            raise ValueError('clear only clears a terminal; to search for the word, type "clear"')
        self._clear()

    async def do_open(self, arg: str) -> None:
        if not arg.isdigit():
            raise ValueError("open needs an item index, e.g.  open 12  (the index= of a result)")
        index = int(arg)
        if not self.db.has_item(index):
            raise ValueError(f"no item with index {index}")
        path = self.db.path_of(index)
        if path is None or not os.path.isfile(path):
            raise ValueError(f"item {index} has no file to open" if path is None else f"the file is gone: {path}")
        await asyncio.to_thread(self.opener, path)  # raises when no application could open it
        self.write(f"opened {path}")

    # The commands by their first word (`help` lists them); any other line is a query (see `_query`).
    COMMANDS = {
        "similar": do_similar, "open": do_open, "scan": do_scan, "status": do_status, "pause": do_pause,
        "resume": do_resume, "wait": do_wait, "cancel": do_cancel, "stop": do_cancel, "save": do_save,
        "validate": do_validate, "clear": do_clear,
        "help": do_help, "exit": do_exit, "quit": do_exit,
    }

    async def _query(self, line: str) -> None:
        """Not a command: quoted text, an existing path to scan, a missing path (an error), or a query
        NanoDB.search reads by the one rule (words, an image URL, `#12`, or a combined query of those and
        image paths)."""
        if (words := unquoted(line)) is not None:
            await self._search(text=utf8_words(words))  # quotes force text
        elif _is_existing_path(line):
            await self._scan(os.path.expanduser(line))
        elif is_image_reference(line) and not is_url(line) and not is_combined_query(line):
            raise ValueError(_not_an_image(line) if os.path.isfile(os.path.expanduser(line)) else
                             missing_path(line, f'"{line}"'))
        else:
            await self._search(**words_query(line))

    def _progress(self, width: int) -> str:
        return progress_line(self.db, self.service.status, width)

    async def _search(self, query=None, **named) -> None:
        search = asyncio.ensure_future(asyncio.to_thread(lambda: self.db.search(query, self.k, **named)))
        await asyncio.wait({search}, timeout=MODEL_NOTE_AFTER_S)
        if not search.done() and self.db.model_loading_for is not None:  # started by this query or a scan
            self.write(f"loading the model {self.db.spec.name}: the first query waits for it…")
        results = await search
        if not results:
            self.write("no results: the database is empty" if len(self.db) == 0 else "no results")
        for r in results:
            self.write(str(r))

    async def _scan(self, path: str) -> None:
        if self.db.read_only:
            raise ValueError(f"cannot scan {path}: the database is open read-only (--read-only)")
        task = self.service.scan(path, on_done=lambda report: self.write(report.summary()))
        if not os.path.isfile(path):
            self.write(f"scanning {path} in the background (`status` to follow it)")
            return
        await task  # one image is quick: scan it, then answer with its neighbours
        if self.db.index_of(path) is not None:
            self.write(f"nearest to {path}:")
            await self._search(self.db.index_of(path))


def format_validation(db: NanoDB, report) -> str:
    lines = [
        f"validated {counted(report.checked, 'item')}: {report.checked - len(report.failures)} found themselves "
        f"first, {len(report.failures)} did not; {counted(len(report.duplicates), 'group')} of exact duplicates"
    ]
    for item, found in report.failures:
        lines.append(f"  FAILED index={item} {db.path_of(item)} -> found index={found} {db.path_of(found)} first")
    for group in report.duplicates:
        lines.append("  duplicates: " + "  ".join(f"[{i}] {db.path_of(i)}" for i in group))
    return "\n".join(lines)


def _not_an_image(line: str) -> str:
    """Why an existing file typed in the console is not searched by: not a format nanodb reads."""
    extension = os.path.splitext(line)[1].lower()
    if is_unsupported_image_name(line):
        return f"nanodb cannot read {extension} images: {line}"
    readable = " ".join(sorted(IMAGE_EXTENSIONS - RAW_EXTENSIONS))
    named = f"a {extension} file" if extension else "a file without an image extension"
    return f"not an image nanodb reads: {line} is {named} (it reads {readable} and camera RAW)"


def _is_existing_path(line: str) -> bool:
    """An existing folder or image file, however it is spelt (`cat.jpg`, `./cat.jpg`, `~/Pictures`)."""
    path = os.path.expanduser(line)
    return os.path.isdir(path) or (os.path.isfile(path) and is_image_name(path))

"""Stopping the program cleanly, whenever it is asked to: signals, and a `wait` that Ctrl-C ends.

SIGINT (Ctrl-C), SIGTERM (a service manager, `kill`) and SIGHUP (a closed terminal) all mean: stop
ingestion, save what was indexed, exit. The exit status says whether the signal cut work short, as a
shell tells a stopped command from a finished one: 128 + the signal's number (130 SIGINT, 143 SIGTERM,
129 SIGHUP) when it stopped a scan or the start (the database opening, the model loading), 0 when it
ended a server, a watch or a console that had nothing in progress (a clean shutdown: a service manager
stops a server so). Installed only by the command line's entry point (cli.run): a library call never
touches a program's signal handlers."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import shutil
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import TextIO

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
CLEAR_TO_END = "\x1b[K"  # erase from the cursor to the end of the line


class StopOnSignals:
    """The first stop signal cancels `task` (the program, whose cleanup saves); a signal that comes
    while it is stopping says so, and a third quits at once: the database keeps its last save (each
    save is atomic), only what was indexed since is lost. `busy()`, asked when the first signal comes,
    says whether work is in progress then (a scan): the exit status is 128 + the signal's number if so.
    `saving()` says whether there is anything to save (unsaved items, or a scan that may add some): the
    line on stderr says "saving what was indexed" only then."""

    def __init__(self, task: asyncio.Task, busy: Callable[[], bool], saving: Callable[[], bool]):
        self.task = task
        self.busy = busy
        self.saving = saving
        self.stopping = False  # set by the program once its cleanup began: a signal then cancels nothing
        self.received = 0
        self.exit_status = 0  # once stopped by a signal: 128 + its number if it cut work short, else 0
        self._loop = asyncio.get_running_loop()
        # signal.signal, not loop.add_signal_handler: prompt_toolkit's prompt saves and restores a handler
        # set so, but removes the loop's SIGINT handler after each prompt (SIGINT then did nothing). And it
        # runs even while the loop is blocked (a save), so a third signal can always quit.
        self._previous = {stop_signal: signal.signal(stop_signal, self._on_signal) for stop_signal in STOP_SIGNALS}

    def restore(self) -> None:
        """The handlers from before, once the program is done (a caller of cli.main in-process goes on)."""
        for stop_signal, handler in self._previous.items():
            signal.signal(stop_signal, handler)

    def exit_if_stopped(self) -> None:
        """Once the program's cleanup is done (saved, closed): after a stop signal, exit now rather than
        wait for a thread still inside a batch's inference or the model's load, whose result nothing
        would keep."""
        if self.received:
            # the worker pools' semaphores, stopped but not yet collected, are released (unregistered from
            # loky's resource tracker, which would report them leaked): os._exit runs no finalizer itself
            gc.collect()
            logging.shutdown()
            for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
                with contextlib.suppress(Exception):
                    stream.flush()
            os._exit(self.exit_status)

    def _on_signal(self, signum: int, frame) -> None:
        self.received += 1
        if not self.stopping:
            self.exit_status = 128 + signum if self.busy() else 0
            self.stopping = True
            self._loop.call_soon_threadsafe(self.task.cancel)
            _say(f"\nnanodb: {_stopping(self.saving())}")
        elif self.received < 3:
            saving = self.saving()
            _say(f"nanodb: {_stopping(saving)} ({signal.Signals(signum).name} once more to quit "
                 f"{'without saving' if saving else 'at once'})")
        else:
            os._exit(128 + signum)


def _stopping(saving: bool) -> str:
    return "stopping: saving what was indexed" if saving else "stopping"


def _say(line: str) -> None:
    """A line on stderr from a signal handler: straight to the descriptor, as sys.stderr may be in the
    middle of a write that the signal interrupted."""
    with contextlib.suppress(OSError):
        os.write(2, (line + "\n").encode())


async def wait_showing_progress(waiting: Awaitable, line: Callable[[int], str], terminal: TextIO) -> None:
    """Await `waiting` while `line(width)` is shown on the terminal's current line, redrawn in place. No
    prompt reads keys meanwhile, so Ctrl-C is the terminal's SIGINT, the stop signal (the decode workers
    ignore it: the program decides). Write other lines with `clear_line` first."""
    waited = asyncio.ensure_future(waiting)
    try:
        while not waited.done():
            terminal.write("\r" + line(shutil.get_terminal_size().columns - 1) + CLEAR_TO_END)
            terminal.flush()
            await asyncio.wait({waited}, timeout=0.5)
    finally:
        clear_line(terminal)
    await waited


def clear_line(terminal: TextIO) -> None:
    terminal.write("\r" + CLEAR_TO_END)
    terminal.flush()

"""Stopping the console at any moment of a scan: Ctrl-C (the key, which the terminal turns into SIGINT for
every process of its group, decode workers included), SIGINT to the whole group, SIGTERM, `exit`, and
`cancel` (which stays in the console). The console runs in a pseudo-terminal, as a person's would.

Each stop must end the program within a bound that tells a hang from a slow machine, with no traceback,
no decode worker left behind, and a database that reopens holding every item the run reported saved
(the console saves on the way out), with no duplicate; a final rescan completes the folder."""

from __future__ import annotations

import fcntl
import os
import pty
import random
import re
import shutil
import signal
import struct
import sys
import termios
import threading
import time
from pathlib import Path

import psutil
import pytest
from helpers import REPO
from helpers.killharness import image_folder, live_paths, run_to_end, write_config

from nanodb.database import NanoDB
from nanodb.storage.format import MANIFEST

STARTUP_BOUND_S = 180  # the prompt appears (imports, opening the database): seconds on a loaded CI machine
STOP_BOUND_S = 45  # from the stop to the exit: a few seconds normally; past this it hung
EMBEDDING = re.compile(rb"(?<![\d.])(?:[1-9]\d*\.\d|0\.[1-9]) images/s")  # a progress line's rate above 0
SAVED = re.compile(r"saved (?:\S+: )?(\d+) items?\b")  # the console's "saved N items to DB", -v's "saved DB: N items"
# At the prompt, Ctrl-C (and a SIGINT, which prompt_toolkit turns into it) clears the line being typed, as
# in a shell; while a command runs (`wait`), it stops the program. SIGTERM stops it at any moment.
STOPS = ("ctrl-c during wait", "sigint to the group during wait", "sigint to the group before the prompt",
         "sigterm", "sigterm before the prompt", "exit", "cancel, then exit")


class TerminalConsole:
    """`python -m nanodb -v ARGS` on a pseudo-terminal (its controlling terminal, so a typed Ctrl-C is a
    SIGINT to its process group); stderr goes to a file, the terminal's output is drained and kept."""

    def __init__(self, args: list[str], stderr: Path):
        self.stderr = stderr
        env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", "TERM": "xterm",
               "PROMPT_TOOLKIT_NO_CPR": "1",  # this terminal answers no cursor position request
               "PYTHONFAULTHANDLER": "1"}  # end_stuck's SIGABRT writes the stacks to the log
        command = [sys.executable, "-m", "nanodb", "-v", *args]
        pid, self.fd = pty.fork()
        if pid == 0:  # the child: nothing but exec (the test process has threads)
            try:
                os.chdir(REPO)
                err = os.open(stderr, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(err, 2)
                os.execve(sys.executable, command, env)
            finally:
                os._exit(127)
        self.pid = pid
        fcntl.ioctl(self.fd, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 160, 0, 0))
        self.screen = bytearray()
        self.started = time.monotonic()
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()
        self.returncode: int | None = None

    def _drain(self) -> None:
        while True:
            try:
                data = os.read(self.fd, 65536)
            except OSError:  # EIO: the child has ended
                return
            if not data:
                return
            self.screen += data

    def wait_for(self, *texts: str, bound: float) -> None:
        """Until the terminal shows one of `texts`."""
        deadline = time.monotonic() + bound
        while not any(text.encode() in self.screen for text in texts):
            assert self.poll() is None, f"ended before showing {texts}: {self.log()[-3000:]}\n{self.text()}"
            if time.monotonic() > deadline:
                pytest.fail(f"never showed {texts}: {self.end_stuck()}")
            time.sleep(0.05)

    def type(self, keys: str) -> None:
        os.write(self.fd, keys.encode())

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, bound: float) -> float:
        """Seconds until it ended; it is killed, and the test fails, past `bound`."""
        t0 = time.monotonic()
        while self.poll() is None:
            if time.monotonic() - t0 > bound:
                pytest.fail(f"still running {bound:.0f} s after the stop (hung): {self.end_stuck()}")
            time.sleep(0.05)
        self._reader.join(5)
        os.close(self.fd)
        return time.monotonic() - t0

    def end_stuck(self) -> str:
        """End a stuck run with SIGABRT, whose faulthandler writes every thread's stack to its log; the
        log's end and the terminal's."""
        os.kill(self.pid, signal.SIGABRT)
        time.sleep(3)
        os.kill(self.pid, signal.SIGKILL)
        self.returncode = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
        return f"{self.log()[-6000:]}\n{self.text()}"

    def text(self) -> str:
        """The terminal's last output, without its escape sequences."""
        return re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", bytes(self.screen[-6000:]).decode(errors="replace"))[-2000:]

    def log(self) -> str:
        return self.stderr.read_text(errors="replace")


def stop_once(stop: str, console: TerminalConsole, delay: float, after_embedding: bool = False) -> None:
    """Stop the scanning console `delay` seconds from now (or from when `wait` shows that images were
    embedded, `after_embedding`), in the way `stop` names."""
    if stop.endswith("during wait"):
        shown = len(console.screen)
        console.type("wait\r")
        while not (b"\r\xe2\x96" in console.screen[shown:]  # `wait` draws its progress bar (█ or ░) ...
                   and (not after_embedding or EMBEDDING.search(console.screen[shown:]))):  # ... and its rate
            assert console.poll() is None and time.monotonic() - console.started < STARTUP_BOUND_S, console.log()
            time.sleep(0.05)
    time.sleep(delay)
    # a scan that ended meanwhile (its summary written) ended the `wait` too: the stop lands at the prompt
    wait_ended = stop.endswith("during wait") and "scanned " in console.log()
    if stop == "ctrl-c during wait":
        console.type("\x03")
        if wait_ended:
            time.sleep(1.0)
            assert console.poll() is None, f"a Ctrl-C at the prompt ended the console: {console.log()[-3000:]}"
            console.type("exit\r")
    elif stop.startswith("sigint to the group"):
        at_the_prompt = wait_ended or (stop.endswith("before the prompt") and b">" in console.screen)
        os.killpg(console.pid, signal.SIGINT)  # what the terminal does with Ctrl-C outside the prompt
        if at_the_prompt:  # there, as Ctrl-C, it clears the line and the console goes on
            time.sleep(1.0)
            assert console.poll() is None, f"a Ctrl-C at the prompt ended the console: {console.log()[-3000:]}"
            console.type("exit\r")
    elif stop.startswith("sigterm"):
        os.kill(console.pid, signal.SIGTERM)
    elif stop == "exit":
        console.type("exit\r")
    else:
        console.type("cancel\r")
        console.wait_for("scans stopped", "no scan is running", bound=STOP_BOUND_S)
        assert console.poll() is None, "`cancel` left the console"
        console.type("exit\r")


def run_and_stop(args: list[str], log: Path, stop: str, delay: float, at_prompt: bool = True,
                 after_embedding: bool = False) -> tuple[str, float]:
    """One console run stopped by `stop` `delay` seconds after its prompt shows (or after it starts):
    (its stderr, seconds from the stop to its exit)."""
    console = TerminalConsole(args, log)
    try:
        if at_prompt:
            console.wait_for(">", bound=STARTUP_BOUND_S)  # the prompt (drawn with escapes around it)
        stop_once(stop, console, delay, after_embedding)
        workers = psutil.Process(console.pid).children(recursive=True) if console.poll() is None else []
        seconds = console.wait(STOP_BOUND_S)
    finally:
        if console.poll() is None:
            os.kill(console.pid, signal.SIGKILL)
    _, alive = psutil.wait_procs(workers, timeout=10)
    for worker in alive:
        worker.kill()
    text = console.log()
    if not text and console.returncode == -signal.SIGTERM:
        return text, seconds  # SIGTERM's default action, before the program began (while Python imported it)
    # a signal that stopped a scan (or the start): 128 + its number; one that met no work, or `exit`: 0
    codes = {"ctrl-c": (0, 128 + signal.SIGINT), "sigint": (0, 128 + signal.SIGINT),
             "sigterm": (0, 128 + signal.SIGTERM)}.get(stop.split()[0], (0,))
    assert console.returncode in codes, f"{stop}: exit status {console.returncode}: {text[-3000:]}"
    assert "Traceback" not in text and "exception was never retrieved" not in text, f"{stop}: {text[-4000:]}"
    assert not alive, f"{stop}: {len(alive)} decode worker(s) outlived the console"
    return text, seconds


def check_saved(db_path: Path, log: str, before: int, folder: set[str]) -> int:
    """The database reopens with every item the run reported saved, each file once; its item count."""
    reported = [int(n) for n in SAVED.findall(log)]
    if not (db_path / MANIFEST).exists():  # stopped before the new database was first written
        assert not reported and before == 0, log[-3000:]
        return 0
    with NanoDB(db_path, read_only=True) as db:
        paths = live_paths(db)
        assert len(paths) == len(set(paths)), "an item is stored twice"
        assert set(paths) <= folder
        assert len(db) == (reported[-1] if reported else before), (
            f"the run reported saving {reported} items, the database holds {len(db)}: {log[-3000:]}")
        return len(db)


def stop_scans_at_random(tmp_path: Path, stops: list[str], seed: int, photos: int, max_delay: float,
                         after_embedding: bool = False) -> list[str]:
    """Each stop `0..max_delay` seconds after the prompt (or after the first images are embedded), while
    a scan of `photos` runs; every other trial on a new database."""
    rng = random.Random(seed)
    folder = set(image_folder(tmp_path / "photos", photos))
    config = write_config(tmp_path / "console.yaml")
    db_path = tmp_path / "db"
    args = ["--path", str(db_path), "--config", str(config), "--follow-symlinks", "--scan", str(tmp_path / "photos")]
    held, outcomes = 0, []
    for trial, stop in enumerate(stops):
        if trial % 2 == 0:  # a new database: the stop lands during a scan (odd trials rescan what it saved)
            shutil.rmtree(db_path, ignore_errors=True)
            held = 0
        at_prompt = not stop.endswith("before the prompt")
        delay = rng.uniform(0.0, max_delay if at_prompt else 15.0)
        log, seconds = run_and_stop(args, tmp_path / f"run{trial}.log", stop, delay, at_prompt,
                                    after_embedding or rng.random() < 0.5)
        held = check_saved(db_path, log, held, folder)
        after = "the prompt (or the first embedding)" if at_prompt else "the start"
        outcomes.append(f"{stop} {delay:.1f} s after {after}: exited {seconds:.1f} s later, {held} items saved")
    final = run_to_end(args, tmp_path / "final.log")  # stdin is no terminal: the scan ends, then the console
    assert final.returncode == 0, final.log[-3000:]
    assert check_saved(db_path, final.log, held, folder) == len(folder), "the rescan did not complete the folder"
    print("\n".join(outcomes))
    return outcomes


@pytest.mark.timeout(600)
def test_ctrl_c_during_wait_and_sigint_to_the_group_save_and_exit(tmp_path):
    stop_scans_at_random(tmp_path, ["ctrl-c during wait", "sigint to the group during wait"], seed=1,
                         photos=160, max_delay=1.0, after_embedding=True)


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_every_stop_at_random_moments_of_a_scan(tmp_path):
    rng = random.Random(21)
    stop_scans_at_random(tmp_path, [rng.choice(STOPS) for _ in range(24)], seed=21, photos=800, max_delay=3.0)

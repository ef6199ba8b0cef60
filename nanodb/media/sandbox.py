"""Decoding untrusted files with a time and a memory limit: in worker processes that the limit kills.

A decoder can be made to work for minutes on a small file (a progressive JPEG with its scan repeated
thousands of times) or to allocate far more than its pixels need. Python cannot stop a C decoder from
inside, so each decode runs in a worker process that limits itself: an alarm whose default action
ends the process after `seconds` of wall time, and a limit of `memory_mb` on what it may allocate
above what the idle worker holds (an allocation past it fails: a MemoryError). The parent sees the
worker die, replaces it, and names the cause. Workers are started by loky from a fixed entry point
(never re-running the user's script) and exit with their parent.

`exit_with_parent`, `limit_this_process` and `run_limited` are what a worker does (the scan's decode
pool uses them too); `DecodeSandbox` is a few such workers, one call at a time each, for uploads,
thumbnails and query images.
"""

from __future__ import annotations

import contextlib
import os
import queue
import resource
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

import numpy as np

from nanodb.media.opener import ImageRejected, model_pixels, open_image

TOO_MUCH_MEMORY = "needs too much memory to decode"
KILL_GRACE_S = 5.0  # the parent kills a worker whose own alarm has not ended it this long after its limit


@dataclass(frozen=True)
class DecodeLimits:
    """How long one decode may take (wall seconds) and how much memory it may allocate (MiB)."""

    seconds: float
    memory_mb: int

    @classmethod
    def of(cls, settings) -> DecodeLimits:
        """The limits a Settings object declares (`decode_seconds`, `decode_memory_mb`)."""
        return cls(float(settings.decode_seconds), int(settings.decode_memory_mb))

    @property
    def too_slow(self) -> str:
        return f"took too long to decode (over {self.seconds:g} s)"

    @property
    def too_big(self) -> str:
        return f"{TOO_MUCH_MEMORY} (over {self.memory_mb} MiB)"


def exit_with_parent(parent: int) -> None:
    """In a worker: exit once `parent` is gone. A worker whose parent was killed (kill -9) is not told;
    without this it would wait, holding its memory, forever."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(0)

    threading.Thread(target=watch, daemon=True).start()


def ignore_terminal_interrupt() -> None:
    """In a worker's initializer: a Ctrl-C typed at the terminal reaches every process of its group;
    the parent decides what it means (stop and save), the worker must not die of it mid-file."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


@contextlib.contextmanager
def interrupt_blocked_in_children():
    """Start worker processes inside this: the calling thread blocks SIGINT meanwhile, and the processes
    (and threads) it starts inherit the block, so a Ctrl-C before a worker's initializer has run
    (`ignore_terminal_interrupt`) cannot kill it either. Only this thread's mask changes: a SIGINT
    arriving meanwhile goes to another thread of the process, as usual."""
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def limit_this_process(limits: DecodeLimits) -> None:
    """In a worker's initializer: let SIGALRM end the process (run_limited sets the alarm), and cap the
    memory it may allocate at `limits.memory_mb` above what it holds now (RLIMIT_DATA: the heap and
    anonymous mappings; unlike RLIMIT_AS, not the address space that libraries and idle thread arenas
    reserve, which differs from machine to machine)."""
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    try:
        with open("/proc/self/statm") as f:
            held = int(f.read().split()[5]) * os.sysconf("SC_PAGE_SIZE")  # data and stack
    except (OSError, ValueError, IndexError):
        return  # not Linux: no memory limit, the time limit still holds
    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    soft = held + (limits.memory_mb << 20)
    resource.setrlimit(resource.RLIMIT_DATA, (soft if hard == resource.RLIM_INFINITY else min(soft, hard), hard))


def _init_sandbox_worker(limits: DecodeLimits, parent: int, prepare: Callable | None = None) -> None:
    ignore_terminal_interrupt()
    exit_with_parent(parent)
    if prepare is not None:  # e.g. load a decoder's libraries: the memory limit counts what a decode allocates
        prepare()
    limit_this_process(limits)


def run_limited(limits: DecodeLimits, fn: Callable, *args) -> Any:
    """fn(*args) in a worker set up by limit_this_process: past `limits.seconds` the alarm ends this
    process (the parent reports it); a MemoryError becomes ImageRejected naming the limit."""
    signal.setitimer(signal.ITIMER_REAL, limits.seconds)
    try:
        return fn(*args)
    except MemoryError:
        pass  # raised below, once this handler has let go of the traceback (and what the decode holds)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    raise ImageRejected(limits.too_big)


def why_worker_died(error: BaseException, limits: DecodeLimits | None) -> str:
    """The reason a worker ended on a file, from loky's report of its exit code."""
    if limits is not None and (isinstance(error, FutureTimeout) or "SIGALRM" in str(error)):
        return limits.too_slow
    if limits is not None and "SIGKILL" in str(error):  # the kernel's out-of-memory killer, most likely
        return f"the decoder process was killed ({limits.too_big}?)"
    return "the decoder process crashed on this file"


def model_input(data: bytes, max_pixels: int, transform) -> np.ndarray:
    """An image's bytes as the model's input pixels: what a worker sends back for a query image (a small
    array, not the whole decoded image)."""
    return model_pixels(open_image(data, max_pixels), transform)


def _ready() -> bool:
    """A worker answers once started and initialised."""
    return True


def start_worker(limits: DecodeLimits, prepare: Callable | None = None) -> Executor:
    """One limited worker process, started and answering; `prepare()` (picklable) runs in it before it
    limits itself."""
    from loky import ProcessPoolExecutor

    worker = ProcessPoolExecutor(1, initializer=_init_sandbox_worker, initargs=(limits, os.getpid(), prepare))
    try:
        with interrupt_blocked_in_children():
            started = worker.submit(_ready)
        started.result()
    except BaseException:
        worker.shutdown(wait=False, kill_workers=True)
        raise
    return worker


class DecodeSandbox:
    """`workers` limited worker processes (started on first need), each running one call at a time: a
    time bomb costs its own call, at most `limits.seconds`, and then its worker is replaced. `prepare`: a
    picklable function each worker runs before it limits itself (media.video.preload_video_libraries)."""

    def __init__(self, workers: int, limits: DecodeLimits, prepare: Callable | None = None):
        self.limits = limits
        self.prepare = prepare
        self._idle: queue.SimpleQueue[Executor | None] = queue.SimpleQueue()
        for _ in range(workers):
            self._idle.put(None)  # a slot whose process is not started yet
        self._workers = workers

    def run(self, fn: Callable, *args) -> Any:
        """fn(*args) in a worker (fn and its arguments picklable); what fn raises is raised here, and a
        decode past the limits raises ImageRejected with the reason."""
        worker = self._idle.get()
        try:
            if worker is None:
                worker = start_worker(self.limits, self.prepare)
            with interrupt_blocked_in_children():  # a worker that timed out idle starts again here
                future = worker.submit(run_limited, self.limits, fn, *args)
            try:
                return future.result(timeout=self.limits.seconds + KILL_GRACE_S)
            except (BrokenProcessPool, FutureTimeout) as e:
                worker.shutdown(wait=False, kill_workers=True)
                worker = None
                raise ImageRejected(why_worker_died(e, self.limits)) from None
        finally:
            self._idle.put(worker)

    def close(self) -> None:
        """Stop the idle workers (a call running now keeps its own); later calls start new ones."""
        for _ in range(self._workers):
            try:
                worker = self._idle.get_nowait()
            except queue.Empty:
                break
            if worker is not None:
                worker.shutdown(wait=True, kill_workers=True)
            self._idle.put(None)

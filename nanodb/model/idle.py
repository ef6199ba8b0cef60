"""A model part held only while it is used: loaded on first use, dropped after a while unused (logged),
loaded again on the next use. A server keeps the image tower this way: most queries are words, and the
tower holds hundreds of MB that text queries never touch."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import sys
import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


def return_freed_memory() -> None:
    """Collect what was dropped, then hand the C heap's free pages back to the system (glibc keeps the
    memory of freed model weights for reuse otherwise: ~260 MB of a ViT-B-32 loaded, exported and freed)."""
    gc.collect()  # a model's modules may hold reference cycles
    if sys.platform == "linux" and (libc := ctypes.util.find_library("c")):
        trim = getattr(ctypes.CDLL(libc), "malloc_trim", None)  # glibc's; none in musl
        if trim is not None:
            trim(0)


class IdleFreed(Generic[T]):
    """What `load` returns, held from its first `get` until `idle_s` seconds pass without one; a watcher
    thread (started with each load, ended with the drop) frees it. A caller that got it keeps its own
    reference, so a query running when it is dropped finishes with it."""

    def __init__(self, load: Callable[[], T], idle_s: float, what: str):
        self.load = load
        self.idle_s = idle_s
        self.what = what
        self._lock = threading.Lock()
        self._value: T | None = None
        self._last_use = 0.0
        self._closed = threading.Event()

    def get(self) -> T:
        """The thing, loaded now if it is not held."""
        with self._lock:
            self._last_use = time.monotonic()
            if self._value is None:
                self._value = self.load()
                threading.Thread(target=self._watch, name="nanodb-idle-free", daemon=True).start()
            return self._value

    @property
    def held(self) -> bool:
        return self._value is not None

    def _watch(self) -> None:
        while not self._closed.wait(max(0.0, self._last_use + self.idle_s - time.monotonic())):
            with self._lock:
                unused = time.monotonic() - self._last_use
                if unused >= self.idle_s:
                    self._value = None
                    break
        else:
            return
        return_freed_memory()
        log.info("freed %s after %.0f s unused (loaded again on next use)", self.what, unused)

    def close(self) -> None:
        """Drop the thing now and stop the watcher."""
        self._closed.set()
        with self._lock:
            self._value = None

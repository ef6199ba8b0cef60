"""An IngestService run on its own event loop thread, as the command line runs it, for watch tests."""

from __future__ import annotations

import asyncio
import threading
import time

from nanodb import NanoDB
from nanodb.service import IngestService


def wait_for(condition, bound: float, what: str) -> float:
    """Poll until `condition()`; fail naming `what` if it takes longer than `bound` seconds."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > bound:
            raise AssertionError(f"{what}: not seen within {bound} s")
        time.sleep(0.05)
    return time.monotonic() - start


class BackgroundService:
    """An IngestService watching `folders` on its own event loop thread, as the CLI runs it."""

    def __init__(self, db: NanoDB, folders):
        self.db = db
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.service = self.call(self._start, folders)

    async def _start(self, folders):
        service = IngestService(self.db)
        service.watch([str(f) for f in folders], on_ready=lambda report: self.ready.set())
        return service

    def call(self, coro_fn, *args):
        return asyncio.run_coroutine_threadsafe(coro_fn(*args), self.loop).result(60)

    def query(self, fn):
        """Run `fn()` on the service's loop, between two of its steps (a consistent view)."""
        async def run():
            return fn()
        return self.call(run)

    def stop(self):
        self.call(self.service.stop)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()

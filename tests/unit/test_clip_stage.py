"""The CLIP stage stops when its scan is cancelled, whenever the cancel lands (a stopped scan that went
on waiting for images nobody would send hung the console's Ctrl-C: saved, never exited)."""

from __future__ import annotations

import asyncio

import numpy as np
from nanodb.pipeline.decode import DecodedImage, DecodeFailure
from nanodb.pipeline.embed import ClipStage
from nanodb.pipeline.report import ScanReport

from nanodb.media.record import FileRecord


class NoModel:
    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        raise AssertionError("a cancelled stage embedded a batch")


def test_a_cancel_landing_as_an_image_arrives_stops_the_stage():
    """The cancel comes in the same turn of the event loop as the next item, while the stage waits with
    a partial batch (asyncio.wait_for in Python 3.11 returned the item and dropped the cancel)."""

    async def race() -> asyncio.Task:
        inbox, outbox = asyncio.Queue(), asyncio.Queue()
        running = asyncio.Event()
        running.set()
        stage = ClipStage(lambda: NoModel(), 16, ScanReport(), running)
        task = asyncio.create_task(stage.run(inbox, outbox))
        inbox.put_nowait(DecodedImage(FileRecord(path="/photos/a.jpg", hash=bytes(16)), np.zeros((8, 8, 3), np.uint8)))
        for _ in range(5):  # the stage takes the image and waits for the next with a partial batch
            await asyncio.sleep(0)
        inbox.put_nowait(DecodeFailure("/photos/b.jpg", "truncated"))
        task.cancel()
        await asyncio.wait({task}, timeout=2)
        return task

    task = asyncio.run(race())
    assert task.done() and task.cancelled()

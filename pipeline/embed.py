"""Stage 3, the CLIP stage: gathers decoded images into batches and embeds them with the model."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from nanodb.pipeline.decode import DecodedImage, DecodeFailure
from nanodb.pipeline.sink import EmbeddingModel

# A partial batch is embedded once no further image has arrived for this long, so a trickle
# of new files (a watched folder) is searchable quickly.
FLUSH_AFTER_S = 0.25

# Every forward pass of every scan runs on this one thread. Batches run one at a time anyway (they
# share the cores), and with a single thread their large activation buffers come from one malloc
# arena: spread over a pool of threads, each thread's arena keeps its own peak, and memory creeps up.
CLIP_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nanodb-clip")


class ClipStage:
    """Consumes DecodedImage / DecodeFailure (None ends the stream); emits (records, vectors) batches.

    An image whose exact bytes the sink has a vector for is passed on alone, unembedded (vectors None).
    `get_model` is called on the first batch to embed: a rescan with nothing new loads no model.
    """

    def __init__(self, get_model: Callable[[], EmbeddingModel], batch_size: int, report, running: asyncio.Event,
                 is_known: Callable[[bytes], bool] = lambda content_hash: False):
        self.get_model = get_model
        self.batch_size = batch_size
        self.report = report
        self.running = running  # cleared while ingestion is paused
        self.is_known = is_known

    async def run(self, inbox: asyncio.Queue, outbox: asyncio.Queue) -> None:
        batch: list[DecodedImage] = []
        done = False
        while not done:
            try:
                item = await asyncio.wait_for(inbox.get(), FLUSH_AFTER_S) if batch else await inbox.get()
            except TimeoutError:
                item = ...
            if item is None:
                done = True
            elif isinstance(item, DecodeFailure):
                self.report.fail(item.path, item.reason)
            elif isinstance(item, DecodedImage) and self.is_known(item.record.hash):
                await outbox.put(([item.record], None))
            elif isinstance(item, DecodedImage):
                batch.append(item)
            if batch and (done or item is ... or len(batch) >= self.batch_size):
                await self.running.wait()
                vectors = await asyncio.get_running_loop().run_in_executor(CLIP_THREAD, self._embed, batch)
                self.report.embedded += len(batch)
                await outbox.put(([b.record for b in batch], vectors))
                batch = []
        await outbox.put(None)

    def _embed(self, batch: list[DecodedImage]) -> np.ndarray:
        return self.get_model().encode_pixels(np.stack([b.pixels for b in batch]))

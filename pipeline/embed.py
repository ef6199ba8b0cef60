"""Stage 3, the CLIP stage: gathers decoded images into batches and embeds them with the model."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from nanodb.pipeline.decode import DecodedImage, DecodeFailure
from nanodb.pipeline.fidelity import QuantizedEmbedding
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
    `get_model` is called on the first batch to embed: a rescan with nothing new loads no model. A model
    with a `quantization` (int8) is calibrated and checked as the scan goes (fidelity.py), which may hold
    its batches back until a check passes.
    """

    def __init__(self, get_model: Callable[[], EmbeddingModel], batch_size: int, report, running: asyncio.Event,
                 is_known: Callable[[bytes], bool] = lambda content_hash: False):
        self.get_model = get_model
        self.batch_size = batch_size
        self.report = report
        self.running = running  # cleared while ingestion is paused
        self.is_known = is_known
        self.quantized: QuantizedEmbedding | None = None  # made with the model, when it has a quantization

    async def run(self, inbox: asyncio.Queue, outbox: asyncio.Queue) -> None:
        batch: list[DecodedImage] = []
        done = False
        while not done:
            waiting = batch or (self.quantized is not None and self.quantized.held)
            try:
                # asyncio.timeout, not wait_for: in Python 3.11 wait_for returns an item that arrives in the
                # same turn as a cancel and drops the cancel (the stopped scan then waited here for ever)
                async with asyncio.timeout(FLUSH_AFTER_S if waiting else None):
                    item = await inbox.get()
            except TimeoutError:
                item = ...
            if item is None:
                done = True
            elif isinstance(item, DecodeFailure):
                self.report.fail(item.path, item.reason)
            elif isinstance(item, DecodedImage) and (item.pixels is None or self.is_known(item.record.hash)):
                await outbox.put(([item.record], None))
            elif isinstance(item, DecodedImage):
                batch.append(item)
            last = done or item is ...  # no image follows soon: embed what there is, hold nothing back
            if batch and (last or len(batch) >= self.batch_size):
                await self.running.wait()
                ready = await asyncio.get_running_loop().run_in_executor(CLIP_THREAD, self._embed, batch, last)
                self.report.count_embedded(b.record for b in batch)
                batch = []
            elif last and self.quantized is not None and self.quantized.held:
                ready = await asyncio.get_running_loop().run_in_executor(CLIP_THREAD, self.quantized.flush)
            else:
                continue
            for images, vectors in ready:
                await outbox.put(([b.record for b in images], vectors))
        await outbox.put(None)

    def _embed(self, batch: list[DecodedImage], last: bool) -> list[tuple[list[DecodedImage], np.ndarray]]:
        """The batches whose vectors are final now (`last`: none held back)."""
        model = self.get_model()
        if self.quantized is None and getattr(model, "quantization", None) is not None:
            self.quantized = QuantizedEmbedding(model, model.quantization, self.report)
        if self.quantized is not None:
            return self.quantized.embed(batch, last)
        return [(batch, model.encode_pixels(np.stack([b.pixels for b in batch])))]

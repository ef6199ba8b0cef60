"""Stage 4, the index appender: adds embedded batches to the database and autosaves."""

from __future__ import annotations

import asyncio
import logging

from nanodb.pipeline.sink import IndexSink

from nanodb.media.remote import source_exists

log = logging.getLogger(__name__)


class IndexAppender:
    """Consumes (FileRecords, vectors) batches (None ends the stream) into `sink`; saves every
    `autosave_every` new items when autosave is on."""

    def __init__(self, sink: IndexSink, report, autosave_every: int | None):
        self.sink = sink
        self.report = report
        self.autosave_every = autosave_every

    async def run(self, inbox: asyncio.Queue) -> None:
        while (batch := await inbox.get()) is not None:
            records, vectors = batch
            # A file deleted or moved away while it was being embedded is not added: the watcher,
            # which runs on this same event loop, handled its event already or will find it indexed.
            present = [i for i, r in enumerate(records) if source_exists(r.path)]
            if len(present) < len(records):
                records = [records[i] for i in present]
                vectors = None if vectors is None else vectors[present]
            if not records:
                continue
            added, updated = self.sink.add_files(records, vectors)
            self.report.added += added
            self.report.updated += updated
            self.report.changed()
            if self.autosave_every and self.sink.unsaved >= self.autosave_every:
                try:
                    await asyncio.to_thread(self.sink.save)
                except Exception as e:  # e.g. a full disk: keep scanning, the next autosave retries
                    log.error("autosave failed, scanning goes on: %s", e)

"""Stage 4, the index appender: adds embedded batches to the database and autosaves."""

from __future__ import annotations

import asyncio
import logging

from nanodb.storage import DatabaseError

log = logging.getLogger(__name__)


class IndexAppender:
    """Consumes (images, vectors) batches (None ends the stream) into `db`; saves every
    `autosave_every` new items when autosave is on."""

    def __init__(self, db, report, autosave_every: int | None):
        self.db = db
        self.report = report
        self.autosave_every = autosave_every

    async def run(self, inbox: asyncio.Queue) -> None:
        while (batch := await inbox.get()) is not None:
            images, vectors = batch
            added, updated = self.db._add_scanned(images, vectors)
            self.report.added += added
            self.report.updated += updated
            self.report.changed()
            if self.autosave_every and self.db.unsaved >= self.autosave_every:
                try:
                    await asyncio.to_thread(self.db.save)
                except DatabaseError as e:  # e.g. a full disk: keep scanning, the next autosave retries
                    log.error("autosave failed, scanning goes on: %s", e)

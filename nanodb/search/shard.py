"""One shard of a sharded database (search.sharded): the Ray actor that owns its store folder, and how
a record is routed to its shard. Every call reaches the shard through `call`, addressed to the actor
instance it is meant for: a restarted actor (a new instance) refuses calls meant for its predecessor
until the coordinator has sent it again what it had not saved."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from nanodb.media.record import FileRecord
from nanodb.media.video import frame_time
from nanodb.search.local import LocalSearcher, ValidationReport, validate
from nanodb.search.request import SearchRequest
from nanodb.storage.format import DatabaseError, Manifest, read_manifest
from nanodb.storage.store import Item, ItemStore

# the shard calls that change what it holds: kept in the coordinator's journal until the shard saves
WRITES = frozenset({"append", "add_files", "drop_files", "add_known_file", "delete", "forget", "move_paths",
                    "move_folder", "remember_failure", "drop_stale"})
RESTARTED = "restarted"  # a shard's answer to a call meant for the actor instance before its restart


def route_key(record: FileRecord) -> bytes:
    """What decides a record's shard: its content hash; for a video's frame, the video's path."""
    if frame_time(record.metadata) is not None and record.path is not None:
        return hashlib.blake2b(os.fsencode(record.path), digest_size=16).digest()
    return bytes(record.hash)


def shard_of(key: bytes, shards: int) -> int:
    return int.from_bytes(key[:8], "little") % shards


class Shard:
    """A Ray actor owning one shard's store folder: every read and write of its items happens here."""

    def __init__(self, folder: str, model: Manifest, read_only: bool, compact_dead_fraction: float):
        """Opens the folder (also when Ray restarts the actor after its node was lost). A folder that cannot
        be opened (damaged: the --repair hint; missing: on a lost disk) is not an actor that dies: every
        call answers its error. Only `create` makes a new store, once, when the database is made."""
        self._store: ItemStore | None = None
        self._error: DatabaseError | None = None
        self.instance = uuid.uuid4().hex  # a new one at each (re)start: the coordinator then replays
        self.folder, self.model = Path(folder), model
        self.options = {"read_only": read_only, "compact_dead_fraction": compact_dead_fraction}
        try:
            manifest = read_manifest(self.folder)
            if manifest is None:
                raise DatabaseError(f"the shard folder {folder} holds no database on this node: it is on "
                                    f"another node's disk, or was removed")
            self._store = ItemStore(self.folder, manifest, **self.options)
        except DatabaseError as e:
            self._error = e

    def create(self) -> None:
        """Make this shard's empty store (a new database's, before anything else is asked of it)."""
        if self._store is None and read_manifest(self.folder) is None:
            empty = dataclasses.replace(self.model, count=0, generation=0, paths_bytes=0, meta_bytes=0, deleted=0,
                                        compact=0, roots={})
            self._store, self._error = ItemStore(self.folder, empty, **self.options), None

    @property
    def store(self) -> ItemStore:
        if self._error is not None:
            raise self._error
        return self._store

    @property
    def searcher(self) -> LocalSearcher:
        return LocalSearcher(self.store)

    def node(self) -> str:
        """The id of the Ray node this shard runs on."""
        import ray

        return ray.get_runtime_context().get_node_id()

    def call(self, instance: str | None, method: str, *args) -> tuple[str, Any]:
        """(this instance, method(*args)); (RESTARTED, None) when the call was meant for `instance`, an
        earlier one (before a restart): the coordinator replays its journal first. None: any instance."""
        if instance is not None and instance != self.instance:
            return RESTARTED, self.instance
        return self.instance, getattr(self, method)(*args)

    def saved_mark(self) -> tuple | None:
        """What was last committed to the folder (None: no store)."""
        m = None if self._store is None else self._store.manifest
        return None if m is None else (m.generation, m.count, m.deleted, m.paths_bytes, m.meta_bytes)

    def info(self) -> dict[str, Any]:
        s = self.store
        return {"items": len(s), "rows": s.rows, "unsaved": 0 if s.read_only else s.unsaved, "state": s.state}

    # --- writing
    def append(self, vectors: np.ndarray, records: list[FileRecord]) -> list[int]:
        return self.store.append(vectors, records)

    def add_files(self, records: list[FileRecord], vectors: np.ndarray | None) -> tuple[int, int]:
        return self.store.add_files(records, vectors)

    def drop_files(self, paths: list[str]) -> list[str]:
        """Delete the items of exactly these paths (not folders); returns the paths that had some."""
        rows = {p: self.store.rows_of(p) for p in paths}
        self.store.delete([i for r in rows.values() for i in r])
        return [p for p, r in rows.items() if r]

    def add_known_file(self, record: FileRecord) -> int | None:
        return self.store.add_known_file(record)

    def delete(self, rows: list[int]) -> None:
        self.store.delete(rows)

    def forget(self, paths: list[str]) -> int:
        return self.store.forget(paths)

    def move_paths(self, moves: list[tuple[str, str]]) -> int:
        return self.store.move_paths(moves)

    def move_folder(self, old: str, new: str) -> int:
        return self.store.move_folder(old, new)

    def remember_failure(self, path: str, size: int, mtime: float, reason: str) -> None:
        self.store.remember_failure(path, size, mtime, reason)

    def drop_stale(self, path: str, size: int, mtime: float) -> int:
        return self.store.drop_stale(path, size, mtime)

    def save(self) -> bool:
        return self.store.save()

    def save_failures(self) -> None:
        self.store.save_failures()

    # --- reading
    def known_files(self, files: list[tuple[str, int, float]]) -> tuple[list[str], list[str]]:
        """(the paths among `files` indexed here, those of them unchanged)."""
        held = [p for p, _, _ in files if self.store.rows_of(p)]
        return held, sorted(self.store.unchanged_files(files))

    def failed_before(self, files: list[tuple[str, int, float]]) -> list[str]:
        return sorted(self.store.failed_before(files))

    def indexed_paths(self) -> list[str]:
        return self.store.indexed_paths()

    def rows_of(self, path: str) -> list[int]:
        return self.store.rows_of(path)

    def row_with_hash(self, content_hash: bytes) -> int | None:
        return self.store.row_with_hash(content_hash)

    def items(self, rows: list[int]) -> list[Item | None]:
        """The items of these rows (None for a row that does not exist or is deleted)."""
        return [self.store.item(r) if self.store.is_live(r) else None for r in rows]

    def live_items(self, after: int, n: int) -> list[Item]:
        """Up to n live items with rows above `after`, in row order."""
        rows = self.store.live_rows()
        rows = rows[np.searchsorted(rows, after, side="right"):][:n]
        return [self.store.item(int(r)) for r in rows]

    def search(self, request: SearchRequest) -> list[list[tuple[int, float, str | None, dict, list[int]]]]:
        return [[(r.index, r.similarity, r.path, r.metadata, r.duplicates) for r in results]
                for results in self.searcher.search(request)]

    def search_each(self, requests: list[SearchRequest]) -> list:
        """`search` of each request (or its QueryError) in shared passes over this shard's rows."""
        return [answer if isinstance(answer, Exception) else
                [[(r.index, r.similarity, r.path, r.metadata, r.duplicates) for r in results] for results in answer]
                for answer in self.searcher.search_each(requests)]

    def validate(self, batch: int) -> ValidationReport:
        return validate(self.store, batch)

    def close(self) -> None:
        if self._store is not None:
            self._store.close()

"""The item table: one fixed-size record per row (ITEM_DTYPE), the path and metadata bytes the records
point into, and the two lookups derived from them (a file path's live row, a content hash's row).

The lookups are built on first use and kept in step by the table's own `append` and `drop_paths`, so no
caller synchronises them by hand. The table is not locked: the item store calls it under its lock.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from nanodb.media.record import FileRecord
from nanodb.storage.columns import FilterColumns
from nanodb.storage.format import ITEM_DTYPE, REPAIR_HINT, DatabaseError
from nanodb.storage.mapped_rows import HeldFile, file_backed_rows

MIN_CAPACITY = 1024  # rows allocated for a new or compacted table


class ItemTable:
    """The records of rows 0..count-1; committed rows are mapped from their file, appended ones in memory."""

    def __init__(self, records: np.ndarray, count: int, paths: bytearray, meta: bytearray,
                 file: HeldFile | None = None):
        self.records = records  # capacity >= count; rows past count are free
        self.count = count
        self.paths = paths
        self.meta = meta
        self.file = file  # the items file whose records are mapped at the start of `records`
        self.mapped = file.nbytes // ITEM_DTYPE.itemsize if file is not None else 0
        self.path_rows: dict[str, int] | None = None  # built on first use: a path's newest live row
        # every live row of a path that has several (a video's frames), built with path_rows
        self.shared_rows: dict[str, set[int]] = {}
        self.hash_rows: dict[bytes, int] | None = None
        self.columns: FilterColumns | None = None  # derived on first use (columns.store_columns)

    @classmethod
    def empty(cls) -> ItemTable:
        return cls(np.zeros(0, ITEM_DTYPE), 0, bytearray(), bytearray())

    @classmethod
    def load(cls, file: Path, count: int, paths: bytes | bytearray, meta: bytes | bytearray,
             capacity: int | None = None) -> ItemTable:
        """Map `count` committed records from `file` (read on demand) with room for appends."""
        capacity = capacity or max(MIN_CAPACITY, count + count // 2)
        held = HeldFile(file, count * ITEM_DTYPE.itemsize)
        records = file_backed_rows(held, count, (), ITEM_DTYPE, capacity)
        return cls(records, count, bytearray(paths), bytearray(meta), held)

    def check_file(self) -> None:
        """Fail naming the items file when it was shortened since it was mapped (see mapped_rows)."""
        if self.file is not None:
            self.file.check()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()

    def _damaged(self, row: int, what: str) -> DatabaseError:
        where = self.file.path if self.file is not None and row < self.mapped else "the item table"
        return DatabaseError(f"{where} is damaged: the record of item {row} {what} (changed after the database "
                             f"was opened); {REPAIR_HINT}")

    def points_past(self, paths_bytes: int, meta_bytes: int) -> bool:
        """Some record's path or metadata lies past the given lengths (a damaged table)."""
        self.check_file()
        rows = self.records[: self.count]
        return bool(self.count) and (
            int((rows["path_off"] + rows["path_len"]).max()) > paths_bytes
            or int((rows["meta_off"] + rows["meta_len"]).max()) > meta_bytes
        )

    # ----------------------------------------------------------------- reading
    def path_of(self, row: int) -> str | None:
        self.check_file()
        return self._path_of(row)

    def _path_of(self, row: int) -> str | None:
        rec = self.records[row]
        if rec["path_len"] == 0:
            return None
        off, end = int(rec["path_off"]), int(rec["path_off"]) + int(rec["path_len"])
        if end > len(self.paths):
            raise self._damaged(row, "points past the end of the paths")
        return os.fsdecode(bytes(self.paths[off:end]))

    def metadata_of(self, row: int) -> dict[str, Any]:
        self.check_file()
        rec = self.records[row]
        if rec["meta_len"] == 0:
            return {}
        off, end = int(rec["meta_off"]), int(rec["meta_off"]) + int(rec["meta_len"])
        try:
            if end > len(self.meta):
                raise ValueError
            return json.loads(self.meta[off:end])
        except ValueError:
            raise self._damaged(row, "does not point at its metadata") from None

    def record_of(self, row: int) -> FileRecord:
        self.check_file()
        rec = self.records[row]
        return FileRecord(path=self.path_of(row), hash=bytes(rec["hash"]), size=int(rec["size"]),
                          mtime=float(rec["mtime"]), metadata=self.metadata_of(row) or None)

    def column(self, name: str) -> np.ndarray:
        """One field over the rows (e.g. "mtime", "hash"): a view, not to be changed."""
        self.check_file()
        return self.records[name][: self.count]

    def live_paths(self, dead: np.ndarray) -> dict[str, int]:
        """The live row of each file path (`dead` marks deleted rows)."""
        if self.path_rows is None:
            self.check_file()
            self.path_rows, self.shared_rows = {}, {}
            for i in range(self.count):
                if not dead[i] and (p := self._path_of(i)) is not None:
                    self._add_path_row(p, i)
        return self.path_rows

    def _add_path_row(self, path: str, row: int) -> None:
        if (before := self.path_rows.get(path)) is not None:
            self.shared_rows.setdefault(path, {before}).add(row)
        self.path_rows[path] = row

    def rows_of(self, path: str, dead: np.ndarray) -> list[int]:
        """Every live row of a file path (several for a video: one per frame), in row order."""
        paths = self.live_paths(dead)
        if path in self.shared_rows:
            return sorted(self.shared_rows[path])
        return [paths[path]] if path in paths else []

    def row_with_hash(self, content_hash: bytes) -> int | None:
        """A row (deleted ones too) whose content has this hash."""
        if self.hash_rows is None:
            self.hash_rows = {bytes(h): i for i, h in enumerate(self.column("hash"))}
        return self.hash_rows.get(bytes(content_hash))

    # ----------------------------------------------------------------- changing
    def append(self, records: Sequence[FileRecord]) -> int:
        """Append live rows; returns the first new row."""
        start = self.count
        if start + len(records) > len(self.records):
            self._grow(max(start + len(records), int(len(self.records) * 1.5)))
        for i, rec in enumerate(records, start):
            row = self.records[i]
            pbytes = os.fsencode(rec.path) if rec.path else b""
            row["path_off"], row["path_len"] = len(self.paths), len(pbytes)
            self.paths += pbytes
            mbytes = json.dumps(rec.metadata, ensure_ascii=False, default=str).encode() if rec.metadata else b""
            row["meta_off"], row["meta_len"] = len(self.meta), len(mbytes)
            self.meta += mbytes
            row["size"], row["mtime"], row["hash"] = rec.size, rec.mtime, rec.hash
            if rec.path and self.path_rows is not None:
                self._add_path_row(rec.path, i)
            if self.hash_rows is not None:
                self.hash_rows[bytes(rec.hash)] = i
        self.count = start + len(records)
        if self.columns is not None:
            self.columns.append((os.fsencode(r.path) if r.path else None for r in records), (r.mtime for r in records))
        return start

    def drop_paths(self, rows: Iterable[int]) -> None:
        """Rows being deleted: their paths no longer name them."""
        if self.path_rows is None:
            return
        self.check_file()
        for i in rows:
            p = self._path_of(i)
            if p is not None and (shared := self.shared_rows.get(p)) is not None:
                shared.discard(i)
                if self.path_rows.get(p) == i and shared:
                    self.path_rows[p] = max(shared)
                if len(shared) <= 1:
                    del self.shared_rows[p]
            elif p is not None and self.path_rows.get(p) == i:
                del self.path_rows[p]

    def _grow(self, capacity: int) -> None:
        old, start = self.records, 0
        if self.file is None:
            self.records = np.zeros(capacity, ITEM_DTYPE)
        else:
            start = self.mapped
            self.records = file_backed_rows(self.file, start, (), ITEM_DTYPE, capacity)
        self.records[start : self.count] = old[start : self.count]

    # ----------------------------------------------------------------- committing
    def tail(self, rows: int, paths_bytes: int, meta_bytes: int) -> dict[str, Any]:
        """What was appended since a commit of `rows` records and these byte lengths, as data files."""
        return {"items": self.records[rows : self.count].copy(), "paths": bytes(self.paths[paths_bytes:]),
                "meta": bytes(self.meta[meta_bytes:])}

    def compacted(self, live: np.ndarray) -> ItemTable:
        """An in-memory table of the `live` rows alone, renumbered, its offsets pointing into new bytes."""
        self.check_file()
        records = np.zeros(max(len(live), MIN_CAPACITY), ITEM_DTYPE)
        records[: len(live)] = self.records[live]
        paths, meta = bytearray(), bytearray()
        for row in records[: len(live)]:
            for off, length, data, old in (("path_off", "path_len", paths, self.paths),
                                           ("meta_off", "meta_len", meta, self.meta)):
                start = int(row[off])
                row[off] = len(data)
                data += old[start : start + int(row[length])]
        table = ItemTable(records, len(live), paths, meta)
        table.columns = None if self.columns is None else self.columns.take(live)
        return table

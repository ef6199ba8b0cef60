"""The per-row columns that search filters test as arrays: each row's folder (an id into a table of the
distinct folders, each interned once), its file extension (an id into a table of the distinct
extensions) and its modification time, contiguous.

A filter then costs one test per distinct folder or extension (cached between searches) and a
vectorised gather over the rows, never a test of every path. The columns are derived from the item
table on first use (one pass over the path bytes, outside the store's lock: see `store_columns`), then
kept in step by the table's appends and compaction; deleted rows need nothing (the index skips them).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Hashable, Iterable
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from nanodb.storage.store import ItemStore

SEP = os.fsencode(os.sep)
FOLDER_MASKS_KEPT = 32  # folder filters whose test over the folder table is kept between searches
DERIVE_ROWS = 1 << 20  # rows whose paths are split at a time: bounds the Python objects alive at once


def path_keys(paths: list[bytes | None]) -> tuple[list[bytes | None], list[bytes | None]]:
    """The folder and the extension of each path, as os.path finds them, in list comprehensions (no
    call per path). Folder: everything before the last separator; None for no path or a bare file
    name, which no folder filter allows. Extension: after the name's last dot, without it (leading
    dots of a name start none); None for no path, which no type filter allows."""
    parts = [(b"", b"", b"") if p is None else p.rpartition(SEP) for p in paths]
    folders = [folder if sep else None for folder, sep, _ in parts]
    names = [name.lstrip(b".").rpartition(b".") for _, _, name in parts]
    extensions = [None if p is None else ext if dot else b"" for p, (_, dot, ext) in zip(paths, names)]
    return folders, extensions


def _split(paths: bytes, offsets: np.ndarray, lengths: np.ndarray) -> list[bytes | None]:
    """The paths at these offsets and lengths of the path bytes (None: length 0). Paths stored one after
    the other (as appended) are split in C: each followed by a NUL (no path holds one), one bytes.split."""
    ends = offsets + lengths
    if len(offsets) and (offsets[1:] == ends[:-1]).all():
        first = int(offsets[0])
        run = np.frombuffer(paths, np.uint8, int(ends[-1]) - first, first)
        split = np.insert(run, ends - first, 0).tobytes().split(b"\0")[:-1]
    else:
        split = [paths[a:b] for a, b in zip(offsets.tolist(), ends.tolist())]
    return [p or None for p in split]


def _interned(keys: list, table: dict, names: list, name: Callable[[Any], Any]) -> np.ndarray:
    """The id of each key in `table` (new keys added, with name(key) appended to `names`), as int32."""
    for key in dict.fromkeys(keys):
        if key not in table:
            table[key] = len(names)
            names.append(name(key))
    return np.fromiter(map(table.__getitem__, keys), np.int32, len(keys))


def _folder_name(key: bytes | None) -> str | None:
    return None if key is None else os.fsdecode(key)


def _extension_name(key: bytes | None) -> str | None:
    return None if key is None else os.fsdecode(key).lower()


class FilterColumns:
    """Rows 0..count-1's folder id, extension id and mtime; not locked (the store's lock guards it)."""

    def __init__(self) -> None:
        self.count = 0
        self.folder = np.zeros(0, np.int32)  # capacity >= count
        self.extension = np.zeros(0, np.int32)
        self.mtime = np.zeros(0, np.float64)
        self.folders: list[str | None] = []  # the folder of each id; None: no folder
        self.extensions: list[str | None] = []  # the lowercase extension of each id; None: no path
        self._folder_ids: dict[bytes | None, int] = {}
        self._extension_ids: dict[bytes | None, int] = {}
        self._folder_masks: dict[Hashable, np.ndarray] = {}  # a filter's test of folders[0:len(mask)]

    def append(self, paths: Iterable[bytes | None], mtimes: Iterable[float] | np.ndarray) -> None:
        """Rows appended with these paths (os.fsencode()d; None: no path) and modification times."""
        paths = list(paths)
        folders, extensions = path_keys(paths)
        mtimes = mtimes if isinstance(mtimes, np.ndarray) else np.fromiter(mtimes, np.float64, len(paths))
        self._put(_interned(folders, self._folder_ids, self.folders, _folder_name),
                  _interned(extensions, self._extension_ids, self.extensions, _extension_name), mtimes)

    def _put(self, folders: np.ndarray, extensions: np.ndarray, mtimes: np.ndarray) -> None:
        start, end = self.count, self.count + len(folders)
        if end > len(self.folder):
            cap = max(end, 1024, len(self.folder) * 3 // 2)
            self.folder, self.extension, self.mtime = (
                np.concatenate([a[:start], np.zeros(cap - start, a.dtype)])
                for a in (self.folder, self.extension, self.mtime))
        self.folder[start:end], self.extension[start:end], self.mtime[start:end] = folders, extensions, mtimes
        self.count = end

    @classmethod
    def derive(cls, paths: bytes, offsets: np.ndarray, lengths: np.ndarray, mtimes: np.ndarray) -> FilterColumns:
        """The columns of rows whose paths are paths[offsets[i] : offsets[i] + lengths[i]] (no path when
        the length is 0), DERIVE_ROWS at a time (about 0.5 s per million rows)."""
        columns = cls()
        for a in range(0, len(offsets), DERIVE_ROWS):
            rows = slice(a, a + DERIVE_ROWS)
            columns.append(_split(paths, offsets[rows], lengths[rows]), mtimes[rows])
        return columns

    def take(self, rows: np.ndarray) -> FilterColumns:
        """The columns of `rows` alone, renumbered (a compaction); the folder and extension tables are kept."""
        taken = FilterColumns()
        taken.folders, taken._folder_ids = self.folders, self._folder_ids
        taken.extensions, taken._extension_ids = self.extensions, self._extension_ids
        taken._folder_masks = self._folder_masks
        taken._put(self.folder[rows], self.extension[rows], self.mtime[rows])
        return taken

    # ----------------------------------------------------------------- row masks
    def folder_rows(self, key: Hashable, allows: Callable[[str], bool]) -> np.ndarray:
        """Rows whose folder `allows` accepts (never a row without one). Its test of each folder is
        kept under `key` (the filter's value) and extended to folders seen since."""
        known = self._folder_masks.pop(key, np.zeros(0, bool))
        if len(known) < len(self.folders):
            fresh = [f is not None and allows(f) for f in self.folders[len(known):]]
            known = np.concatenate([known, np.array(fresh, bool)])
        self._folder_masks[key] = known  # the most recently used last
        while len(self._folder_masks) > FOLDER_MASKS_KEPT:
            del self._folder_masks[next(iter(self._folder_masks))]
        return known[self.folder[: self.count]]

    def extension_rows(self, allowed: frozenset[str]) -> np.ndarray:
        """Rows whose lowercase extension (no dot) is in `allowed` (never a path-less row)."""
        table = np.array([e is not None and e in allowed for e in self.extensions], bool)
        return table[self.extension[: self.count]]


def store_columns(store: ItemStore) -> FilterColumns:
    """The store's filter columns, derived on first use with its lock held only to copy the path bytes:
    the committed records are never rewritten (a compaction makes a new table), so they are read
    outside it, and rows appended meanwhile are added under it. A compaction meanwhile: derived again.
    (Called with the lock held, it is held throughout: correct, only longer.)"""
    while True:
        with store.lock:
            table = store.table
            if table.columns is not None:
                return table.columns
            n, records, paths = table.count, table.records, bytes(table.paths)
        table.check_file()
        rows = records[:n]
        columns = FilterColumns.derive(paths, rows["path_off"].astype(np.int64), rows["path_len"].astype(np.int64),
                                       rows["mtime"])
        with store.lock:
            if store.table is table:
                table.columns = columns
                columns.append((None if (p := table.path_of(i)) is None else os.fsencode(p)
                                for i in range(n, table.count)), table.records["mtime"][n : table.count])
                return columns

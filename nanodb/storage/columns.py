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
EXTENSION_BYTES = 8  # extensions up to this long are interned as one integer each when derived


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


def _last_before(positions: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """For each end, the last of the sorted `positions` before it; -1 where there is none."""
    if not len(positions):
        return np.full(len(ends), -1, np.int64)
    j = np.searchsorted(positions, ends) - 1
    return np.where(j >= 0, positions[np.maximum(j, 0)], -1)


def _laid_out(paths: bytes, offsets: np.ndarray, lengths: np.ndarray) -> tuple[bytes, np.ndarray, np.ndarray]:
    """(bytes, starts, ends) where each row's path is bytes[start:end], one after the other: the stored
    bytes themselves when the rows' paths follow each other (as appended), else gathered so."""
    ends = offsets + lengths
    if (offsets[1:] == ends[:-1]).all():
        return paths, offsets, ends
    joined = b"".join(paths[a:b] for a, b in zip(offsets.tolist(), ends.tolist()))
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    return joined, starts, starts + lengths


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
        the length is 0), DERIVE_ROWS at a time."""
        columns = cls()
        for a in range(0, len(offsets), DERIVE_ROWS):
            rows = slice(a, a + DERIVE_ROWS)
            columns._derive(*_laid_out(paths, offsets[rows], lengths[rows]), mtimes[rows])
        return columns

    def _derive(self, paths: bytes, starts: np.ndarray, ends: np.ndarray, mtimes: np.ndarray) -> None:
        """Append rows whose paths are paths[starts[i] : ends[i]], one after the other. The last separator
        and dot of each are found by NumPy over the bytes; the folders are sliced out and interned; the
        extensions of up to EXTENSION_BYTES are interned as one integer each, the rest (a name starting
        with a dot, a long extension, no path) by path_keys."""
        lo, hi = int(starts[0]), int(ends[-1])
        if hi == lo:  # no row has a path (vectors added bare): nothing to split
            nothing = _interned([None], self._folder_ids, self.folders, _folder_name)[0]
            none_ext = _interned([None], self._extension_ids, self.extensions, _extension_name)[0]
            self._put(np.full(len(starts), nothing, np.int32), np.full(len(starts), none_ext, np.int32), mtimes)
            return
        data = np.frombuffer(paths, np.uint8)
        window = data[lo:hi]
        slash = _last_before(np.flatnonzero(window == SEP[0]) + lo, ends)
        has_folder = slash >= starts  # a path-less row (start == end) has none
        # sliced only where a row has a folder: a bare name's slash is before its start (or -1), and
        # paths[start:-1] would copy the rest of the table once per such row
        folders = [paths[a:b] if has else None
                   for a, b, has in zip(starts.tolist(), slash.tolist(), has_folder.tolist())]
        name = np.where(has_folder, slash + 1, starts)
        dot = _last_before(np.flatnonzero(window == ord(".")) + lo, ends)
        length = np.where(dot > name, ends - dot - 1, 0)  # a dot after the name's first character
        leading_dot = (ends > name) & (data[np.minimum(name, len(data) - 1)] == ord("."))
        simple = ~leading_dot & (length <= EXTENSION_BYTES) & (ends > starts)
        packed = data[np.minimum(dot[:, None] + 1 + np.arange(EXTENSION_BYTES), len(data) - 1)]
        packed[np.arange(EXTENSION_BYTES) >= length[:, None]] = 0  # no path holds a NUL: zeros end it
        keys, inverse = np.unique(packed[simple].view("<u8").ravel(), return_inverse=True)
        extensions = np.empty(len(starts), np.int32)
        extensions[simple] = _interned([int(k).to_bytes(8, "little").rstrip(b"\0") for k in keys],
                                       self._extension_ids, self.extensions, _extension_name)[inverse]
        others = np.flatnonzero(~simple)
        extensions[others] = _interned(path_keys([paths[starts[i] : ends[i]] or None for i in others.tolist()])[1],
                                       self._extension_ids, self.extensions, _extension_name)
        self._put(_interned(folders, self._folder_ids, self.folders, _folder_name), extensions, mtimes)

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

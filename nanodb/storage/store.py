"""The item store: the item table, the vectors and the commit protocol of one database folder.

It is the sink the ingestion pipeline writes into (pipeline.sink.IndexSink) and what NanoDB searches.
Every read that must see one consistent state (a search's indices and the paths they name) and every
change happen under `lock`; a compaction renumbers rows under that same lock.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from nanodb.media.paths import absolute_path, printable
from nanodb.media.record import FileRecord
from nanodb.media.video import frame_time
from nanodb.storage.checks import VERIFY_AT_OPEN_BYTES, FileCheck, check_length, read_exact, verify_file
from nanodb.storage.commit import (
    Chunks,
    WriteLock,
    check_unchanged,
    commit_append,
    commit_errors,
    commit_generation,
    remove_other_generations,
)
from nanodb.storage.failed import FailedFiles
from nanodb.storage.format import (
    DATA_FILES,
    MANIFEST,
    REPAIR_HINT,
    DatabaseError,
    Manifest,
    committed_lengths,
    read_manifest,
    write_manifest,
)
from nanodb.storage.index import VectorIndex
from nanodb.storage.items import ItemTable

log = logging.getLogger(__name__)

def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Float32 rows scaled to unit length; raises ValueError for non-finite or zero rows."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    if not np.isfinite(vectors).all() or (norms == 0).any():
        raise ValueError("vectors must be finite and non-zero")
    return vectors / norms


@dataclass
class Item:
    """One stored item: its vector, where it came from, and its metadata."""

    index: int
    path: str | None
    size: int
    mtime: float
    hash: str
    metadata: dict[str, Any]
    deleted: bool
    vector: np.ndarray = field(repr=False)  # float16, unit length


COMPACT_CHUNK_ROWS = 1 << 16  # rows of a data file a compaction gathers at a time (64 MB of 512-d vectors)


def live_chunks(rows: np.ndarray, live: np.ndarray, dtype: str) -> Chunks:
    """rows[live] as `dtype`, gathered COMPACT_CHUNK_ROWS at a time while it is written (at 10M x 512 a
    whole copy of the vectors would be 10 GB more)."""
    return Chunks(lambda: (np.ascontiguousarray(rows[live[a : a + COMPACT_CHUNK_ROWS]], dtype)
                           for a in range(0, len(live), COMPACT_CHUNK_ROWS)))


class ItemStore:
    """The rows of one database folder, in memory and committed to disk by `save`."""

    def __init__(self, root: Path, manifest: Manifest, *, read_only: bool, compact_dead_fraction: float):
        """Open (or, for a manifest not yet on disk, create) the database at `root`; takes the write lock
        unless read-only."""
        self.root = root
        self.path = str(root)  # for the pipeline: this folder is never scanned
        self.read_only = read_only
        self.compact_dead_fraction = compact_dead_fraction
        self.lock = threading.RLock()
        self._save_lock = threading.Lock()
        self._write_lock: WriteLock | None = None
        self.checks = FileCheck([])  # the checksums still being verified after opening
        new = not (root / MANIFEST).exists()
        if new:
            read_manifest(root)  # a folder of data files without its manifest is refused, never taken as new
        if not read_only:
            try:
                root.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise DatabaseError(f"cannot create the database folder {root}: {e.strerror}") from None
            self._write_lock = WriteLock(root)
            self._write_lock.acquire()
        try:
            self.manifest = manifest
            if new:
                self._load_empty()
                try:
                    write_manifest(root, manifest)
                except OSError as e:
                    raise DatabaseError(f"cannot write {root / 'nanodb.json'}: {e.strerror}") from None
            else:
                self._load()
                if not read_only:
                    remove_other_generations(root, manifest.generation)
            self.failed_files = FailedFiles(root, new=new)  # files that failed to decode: retried once changed
        except BaseException:
            self.close()
            raise

    # ----------------------------------------------------------------- loading
    def _load_empty(self) -> None:
        self.index = VectorIndex(self.manifest.dim)
        self.table = ItemTable.empty()
        self._deleted: list[int] = []

    def _load(self) -> None:
        """Map the vectors and their compact copy, read the other files with one binary read each (no
        per-item parsing); check small files' checksums now and start the check of big ones."""
        m = self.manifest
        root = self.root
        self._load_empty()
        crc = m.checksums or {}
        lengths = committed_lengths(m)
        later = [k for k in DATA_FILES if crc.get(k) is not None and lengths[k] > VERIFY_AT_OPEN_BYTES]
        crc = {k: v for k, v in crc.items() if k not in later}  # the ones checked at opening
        compact = m.compact == m.count
        for kind in ("vectors", "items", "codes", "scales") if compact else ("vectors", "items"):
            check_length(m.file(root, kind), lengths[kind])
            if crc.get(kind) is not None:
                verify_file(m.file(root, kind), lengths[kind], crc[kind])
        files = (m.file(root, "codes"), m.file(root, "scales")) if compact else None
        self.index.load_files(m.count, m.file(root, "vectors"), files)
        self.table = ItemTable.load(
            m.file(root, "items"), m.count,
            read_exact(m.file(root, "paths"), m.paths_bytes, checksum=crc.get("paths")),
            read_exact(m.file(root, "meta"), m.meta_bytes, checksum=crc.get("meta")),
        )
        deleted = np.frombuffer(read_exact(m.file(root, "deleted"), m.deleted * 8, checksum=crc.get("deleted")), "<i8")
        if ((deleted < 0) | (deleted >= m.count)).any():
            raise DatabaseError(f"{m.file(root, 'deleted')} names items that do not exist; {REPAIR_HINT}")
        self._deleted = deleted.tolist()
        if self._deleted:
            self.index.delete(self._deleted)
        if self.table.points_past(m.paths_bytes, m.meta_bytes):
            raise DatabaseError(
                f"{m.file(root, 'items')} points past the end of its path or metadata file; {REPAIR_HINT}"
            )
        self.checks = FileCheck([(m.file(root, k), lengths[k], m.checksums[k]) for k in later])

    # ----------------------------------------------------------------- reading
    @property
    def dim(self) -> int:
        return self.manifest.dim

    @property
    def rows(self) -> int:
        """Rows stored, deleted ones included (item indices run from 0 to rows - 1)."""
        return self.index.count

    def __len__(self) -> int:
        """Number of live (not deleted) items."""
        return self.index.count - len(self._deleted)

    @property
    def state(self) -> tuple[int, int, int]:
        """(the index's identity, its rows, the live items): changes when items are added or deleted and
        when a compaction renumbers them (results derived from the rows can be cached under it)."""
        with self.lock:
            return id(self.index), self.index.count, len(self)

    @property
    def unsaved(self) -> int:
        """Items added or deleted since the last save."""
        return (self.index.count - self.manifest.count) + (len(self._deleted) - self.manifest.deleted)

    @property
    def vectors(self) -> np.ndarray:
        """All stored float16 vectors (deleted rows included; see is_live)."""
        return self.index.vectors

    def is_live(self, index: int) -> bool:
        return 0 <= index < self.index.count and not self.index.dead[index]

    def live_rows(self) -> np.ndarray:
        return np.flatnonzero(~self.index.dead)

    def live_items(self) -> Iterator[Item]:
        for i in self.live_rows():
            yield self.item(int(i))

    def path_of(self, index: int) -> str | None:
        return self.table.path_of(index)

    def metadata_of(self, index: int) -> dict[str, Any]:
        return self.table.metadata_of(index)

    def item(self, index: int) -> Item:
        with self.lock:
            if not -self.index.count <= index < self.index.count:
                raise IndexError(f"item {index} does not exist (the database has {self.index.count} rows)")
            index %= self.index.count
            rec = self.table.record_of(index)
            return Item(index=index, path=rec.path, vector=self.index.vectors[index].copy(), size=rec.size,
                        mtime=rec.mtime, hash=rec.hash.hex(), metadata=rec.metadata or {},
                        deleted=bool(self.index.dead[index]))

    def index_of(self, path: str | os.PathLike) -> int | None:
        """The live item stored for a file path, if any."""
        return self._paths_to_index().get(absolute_path(path))

    def _paths_to_index(self) -> dict[str, int]:
        with self.lock:
            return self.table.live_paths(self.index.dead)

    def rows_of(self, path: str) -> list[int]:
        """Every live item of a file path: one for an image, one per frame for a video."""
        with self.lock:
            return self.table.rows_of(path, self.index.dead)

    def _replaced_rows(self, file: FileRecord, adding: list[FileRecord]) -> list[int]:
        """The live rows that adding `file` replaces: every row of its path, except, for a video's frame,
        the other frames of the same version of the video (same size and mtime, another time) and frames
        added in the same call (a video's frames come in several batches, each with its own call)."""
        rows = self.rows_of(file.path)
        if frame_time(file.metadata) is None or len(rows) < 1:
            return rows
        times = {frame_time(f.metadata) for f in adding if f.path == file.path}
        kept = []
        for i in rows:
            rec = self.table.record_of(i)
            sibling = rec.size == file.size and rec.mtime == file.mtime and frame_time(rec.metadata) is not None
            if not (sibling and frame_time(rec.metadata) not in times):
                kept.append(i)
        return kept

    def indexed_paths(self) -> list[str]:
        return list(self._paths_to_index())

    def unchanged_files(self, files: Iterable[tuple[str, int, float]]) -> set[str]:
        """The paths among `files` ((path, size, mtime)) indexed with that very size and mtime."""
        index = self._paths_to_index()
        self.table.check_file()
        unchanged = set()
        for path, size, mtime in files:
            i = index.get(path)
            if i is not None:
                rec = self.table.records[i]
                if int(rec["size"]) == size and float(rec["mtime"]) == mtime:
                    unchanged.add(path)
        return unchanged

    def vector(self, index: int) -> np.ndarray:
        """Row `index`'s stored float16 vector (a copy)."""
        return self.index.vectors[index].copy()

    def column(self, name: str) -> np.ndarray:
        """One field of the item table over the rows (e.g. "mtime", "hash"): a view, not to be changed."""
        return self.table.column(name)

    # ----------------------------------------------------------------- changing
    def check_writable(self) -> None:
        if self.read_only:
            raise DatabaseError(f"{self.root} is open read-only")

    def append(self, vectors: np.ndarray, records: Sequence[FileRecord], *, stored: bool = False) -> list[int]:
        """Append rows: one FileRecord per vector.

        `stored`: the vectors are rows of this store (unit length already), kept bit for bit."""
        self.check_writable()
        vectors = np.asarray(vectors, np.float32).reshape(-1, self.dim)
        if not stored:
            vectors = unit_rows(vectors)
        with self.lock:
            start = self.table.append(records)
            self.index.append(vectors)  # last: a concurrent search sees complete rows only
        return list(range(start, start + len(vectors)))

    def add_files(self, files: Sequence[FileRecord], vectors: np.ndarray | None) -> tuple[int, int]:
        """Append embedded files; a file indexed before is replaced. Returns (added, updated).

        A file whose content hash is stored already (an identical copy, or a file touched but not
        changed) gets that row's vector, bit for bit, so identical files tie: `vectors` may then be
        None (rows of files not known must be embedded)."""
        with self.lock:
            fresh = None if vectors is None else unit_rows(np.asarray(vectors, np.float32).reshape(-1, self.dim))
            rows = np.empty((len(files), self.dim), np.float32)
            first: dict[bytes, int] = {}  # identical files within this batch share the first one's vector
            for j, f in enumerate(files):
                h = bytes(f.hash)
                if (known := self.row_with_hash(h)) is not None:
                    rows[j] = self.index.vectors[known]
                elif h in first:
                    rows[j] = rows[first[h]]
                elif fresh is None:
                    raise ValueError(f"no vector for {printable(f.path)}: its content is not stored")
                else:
                    rows[j] = fresh[j].astype(np.float16)  # the bits it is stored with
                    first[h] = j
            files = list(files)
            # Counted by file, not by item: a video is one file added (or updated) when its first frames
            # come, none when more of its frames follow (siblings of that version are stored already).
            added = updated = 0
            replaced: set[int] = set()
            for path in dict.fromkeys(f.path for f in files):
                mine = [f for f in files if f.path == path]
                gone = set() if path is None else {i for f in mine for i in self._replaced_rows(f, files)}
                siblings = path is not None and len(self.rows_of(path)) > len(gone)
                if frame_time(mine[0].metadata) is None:
                    added, updated = added + len(mine) - bool(gone), updated + bool(gone)
                elif not siblings:
                    added, updated = added + (not gone), updated + bool(gone)
                replaced |= gone
            self.append(rows, files, stored=True)
            self.failed_files.discard(f.path for f in files)
            if replaced:
                self.delete(sorted(replaced))
        return added, updated

    def delete(self, indices: Iterable[int]) -> None:
        """Remove items from search results and from the folder at the next save."""
        self.check_writable()
        with self.lock:
            fresh = [i for i in map(int, indices) if self.is_live(i)]
            if not fresh:
                return
            self.table.drop_paths(fresh)
            self.index.delete(fresh)
            self._deleted.extend(fresh)

    def move_paths(self, moves: Iterable[tuple[str, str]]) -> int:
        """Re-point items to new file paths (renames, moves) without re-embedding: each gets a new row
        that copies its vector and record, and the old row is deleted. Returns how many moved."""
        self.check_writable()
        with self.lock:
            paths = self._paths_to_index()
            rows, records, replaced = [], [], []
            for old, new in moves:
                if absolute_path(old) not in paths:
                    continue
                new = absolute_path(new)
                replaced.extend(self.rows_of(new))
                for i in self.rows_of(absolute_path(old)):  # a video's frames move together
                    rows.append(i)
                    # The old size and mtime (a rename keeps both), not the file's now: if it has changed
                    # since the move, the next scan sees the difference and re-embeds it.
                    records.append(replace(self.table.record_of(i), path=new))
            if rows:
                self.append(self.index.vectors[rows], records, stored=True)
                self.delete(rows + replaced)
        return len({r.path for r in records})

    def move_folder(self, old: str, new: str) -> int:
        """Re-point every item under folder `old` to the same place under `new`."""
        old, new = absolute_path(old) + os.sep, absolute_path(new) + os.sep
        with self.lock:
            moves = [(p, new + p[len(old):]) for p in self._paths_to_index() if p.startswith(old)]
        return self.move_paths(moves)

    def forget(self, paths: Iterable[str]) -> int:
        """Delete the items of these files, and of every file under those that are folders."""
        self.check_writable()
        with self.lock:
            index = self._paths_to_index()
            rows = []
            for p in paths:
                p = absolute_path(p)
                rows.extend(self.rows_of(p))  # a video's frames, all of them
                prefix = p + os.sep
                rows.extend(i for q in list(index) if q.startswith(prefix) for i in self.rows_of(q))
            files = len({self.table.path_of(i) for i in rows})  # a video's frames are one file
            self.delete(rows)
        return files

    def add_known_file(self, file: FileRecord) -> int | None:
        """Index a file whose exact bytes are already known (a copy, or a move that arrived as a delete
        then a create) with the stored vector, without decoding. Returns its index, None if unknown."""
        self.check_writable()
        with self.lock:
            i = self.row_with_hash(file.hash)
            if i is None:
                return None
            found = replace(file, path=absolute_path(file.path), hash=bytes(file.hash),
                            metadata=file.metadata or self.table.metadata_of(i) or None)  # e.g. its EXIF date
            self.add_files([found], self.index.vectors[i : i + 1])
            return self._paths_to_index()[found.path]

    def has_content(self, content_hash: bytes) -> bool:
        """A file with exactly these bytes has a stored vector (it need not be embedded again)."""
        return self.row_with_hash(content_hash) is not None

    def metadata_of_content(self, content_hash: bytes) -> dict[str, Any] | None:
        """The metadata of the row with these exact bytes (its EXIF date: a copy's too); None if none has them."""
        with self.lock:
            i = self.row_with_hash(content_hash)
            return None if i is None else self.table.metadata_of(i)

    def row_with_hash(self, content_hash: bytes) -> int | None:
        """A row (deleted rows too: their vectors stay until compaction) whose content has this hash."""
        with self.lock:
            return self.table.row_with_hash(content_hash)

    # ----------------------------------------------------------------- files that failed
    def failed_before(self, files: Iterable[tuple[str, int, float]]) -> set[str]:
        """The paths among `files` ((path, size, mtime)) that failed to decode before with that very size
        and mtime."""
        with self.lock:
            return {path for path, size, mtime in files if self.failed_files.unchanged(path, size, mtime)}

    def remember_failure(self, path: str, size: int, mtime: float, reason: str) -> None:
        """A file that failed to decode with this size and mtime (not retried until they change); its
        items of another size or mtime are dropped (drop_stale), as a changed photo's are replaced."""
        with self.lock:
            self.failed_files.add(path, size, mtime, reason)
            self.drop_stale(path, size, mtime)

    def drop_stale(self, path: str, size: int, mtime: float) -> int:
        """Delete the items of file `path` indexed with another size or mtime: they describe bytes it no
        longer holds (searches would show it for what it was). Returns how many were deleted."""
        if self.read_only:
            return 0
        with self.lock:
            stale = [i for i in self.rows_of(absolute_path(path))
                     if (r := self.table.record_of(i)).size != size or r.mtime != mtime]
            self.delete(stale)
        if stale:
            log.info("%s changed and cannot be read now: its %d items are dropped", printable(path), len(stale))
        return len(stale)

    def save_failures(self) -> None:
        """Write the record of failed files if it changed (a cache: a failure to write it is only logged)."""
        if self.read_only:
            return
        with self.lock:
            try:
                self.failed_files.write()
            except OSError as e:
                log.warning("could not write %s: %s", self.failed_files.file, e.strerror or e)

    # ----------------------------------------------------------------- committing
    def record_weights(self, pretrained: str, weights_id: str) -> None:
        """Remember where the model's checkpoint is now (the same weights, moved), in the manifest."""
        self.check_writable()
        with self._save_lock:
            self._commit_manifest(Manifest(**{**self.manifest.__dict__, "pretrained": pretrained,
                                              "weights_id": weights_id}))

    def record_roots(self, roots: dict[str, bool]) -> None:
        """Remember folders scanned or watched (and whether symlinks out of them were followed), in the
        manifest, written now if they are new: the server sends only files under them."""
        self.check_writable()
        with self._save_lock:
            merged = {**self.manifest.roots, **roots}
            if merged != self.manifest.roots:
                self._commit_manifest(Manifest(**{**self.manifest.__dict__, "roots": merged}))

    def _commit_manifest(self, new: Manifest) -> None:
        """Replace the manifest alone, refused like a save when it is not the one this process committed."""
        check_unchanged(self.root, self.manifest, self._write_lock)
        try:
            write_manifest(self.root, new)
        except OSError as e:
            raise DatabaseError(f"cannot write {self.root / MANIFEST}: {e.strerror}") from None
        self.manifest = new

    def save(self) -> bool:
        """Commit everything added or deleted since the last save; crash-safe, cost ~ new items.
        Returns False when there was nothing to save. Refused once a data file is found corrupted."""
        self.check_writable()
        self.checks.raise_if_failed()
        self.save_failures()
        with self._save_lock:
            with self.lock:  # a consistent snapshot; appends may go on while the bytes are written
                self.index.check_files()  # every mapped file still whole: nothing is committed over damage
                self.table.check_file()
                m = self.manifest
                n = self.index.count
                if n == m.count and len(self._deleted) == m.deleted:
                    return False
                if len(self._deleted) > self.compact_dead_fraction * n:
                    self._compact()
                    return True
                new = Manifest(**{**m.__dict__})
                # 1-D vectors: an empty 2-D array (a save of deletions alone) cannot be cast to bytes
                appended = {
                    "vectors": self.index.vectors[m.count : n].astype("<f2").ravel(),
                    **self.table.tail(m.count, m.paths_bytes, m.meta_bytes),
                    "deleted": np.asarray(self._deleted[m.deleted :], "<i8"),
                    "codes": self.index.codes[m.compact : n].ravel(),
                    "scales": self.index.scales[m.compact : n].astype("<f4").ravel(),
                }
                new.count, new.deleted, new.compact = n, len(self._deleted), n
                new.paths_bytes = m.paths_bytes + len(appended["paths"])
                new.meta_bytes = m.meta_bytes + len(appended["meta"])
            log.info("saving %s: %d items", self.root, n)
            with commit_errors(f"save to {self.root}"):
                commit_append(self.root, m, new, appended, self._write_lock)
            self.manifest = new
            log.info("saved %s: %d items", self.root, len(self))
            return True

    def _compact(self) -> None:
        """Rewrite the folder without its deleted rows as generation G+1; the caller holds both locks.

        Crash-safe: the new files are complete and fsynced before the manifest names them, and the old
        generation is deleted only after. Renumbers the items (indices shown earlier become stale).
        The checksums of the old files must have been verified: new ones are computed from the bytes.
        """
        self.checks.wait()
        m = self.manifest
        live = self.live_rows()
        dropped = self.index.count - len(live)
        table = self.table.compacted(live)
        new = Manifest(**{**m.__dict__})
        new.generation, new.count, new.deleted, new.compact = m.generation + 1, len(live), 0, len(live)
        new.paths_bytes, new.meta_bytes = len(table.paths), len(table.meta)
        data = {
            "vectors": live_chunks(self.index.vectors, live, "<f2"), **table.tail(0, 0, 0), "deleted": b"",
            "codes": live_chunks(self.index.codes, live, "u1"), "scales": live_chunks(self.index.scales, live, "<f4"),
        }
        log.info("compacting %s: %d items", self.root, len(live))
        with commit_errors(f"compacting {self.root}"):
            commit_generation(self.root, m, new, data, self._write_lock)
        index = VectorIndex(self.dim, self.index.backend)
        index.load_files(len(live), new.file(self.root, "vectors"),
                         (new.file(self.root, "codes"), new.file(self.root, "scales")))
        del data
        self.index = index
        self.table.close()
        self.table = ItemTable.load(new.file(self.root, "items"), len(live), table.paths, table.meta,
                                    len(table.records))
        self.table.columns = table.columns  # the filter columns of the live rows, renumbered
        self._deleted = []
        self.manifest = new
        try:
            remove_other_generations(self.root, new.generation)
        except OSError as e:  # harmless: they are removed at the next open
            log.warning("could not remove old data files in %s: %s", self.root, e)
        log.info("compacted %s: %d deleted rows dropped, %d kept", self.root, dropped, len(live))


    def close(self) -> None:
        """Release the write lock and the data files; the store is empty afterwards."""
        self.checks.stop()
        self.index.close()
        self.table.close()
        self.table = ItemTable.empty()
        if self._write_lock is not None:
            self._write_lock.release()
            self._write_lock = None

"""Repair: make a damaged database folder openable again, keeping the longest consistent prefix."""

from __future__ import annotations

import functools
import json
import os
import stat
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nanodb.storage.commit import WriteLock, replace_file
from nanodb.storage.compact import quantize_rows
from nanodb.storage.format import (
    DATA_FILES,
    ITEM_DTYPE,
    MANIFEST,
    DatabaseError,
    Manifest,
    read_manifest,
    write_manifest,
)


@dataclass
class RepairReport:
    """What `repair` kept of a damaged database."""

    committed: int  # items the old manifest committed (or rows found in the files, if it was unreadable)
    kept: int  # the longest consistent prefix, now committed
    deleted: int  # tombstones, those of damaged paths included
    manifest_rebuilt: bool  # the manifest was unreadable and was rebuilt from the data files
    damaged_paths: int = 0  # items whose stored path could not be trusted, now deleted

    @classmethod
    def combined(cls, reports: list[RepairReport]) -> RepairReport:
        """One report for the shards of a sharded database, each repaired on its own."""
        return cls(sum(r.committed for r in reports), sum(r.kept for r in reports), sum(r.deleted for r in reports),
                   any(r.manifest_rebuilt for r in reports), sum(r.damaged_paths for r in reports))

    def summary(self) -> str:
        how = "rebuilt the manifest from the data files; " if self.manifest_rebuilt else ""
        lost = self.committed - self.kept
        doubtful = self.damaged_paths
        return (
            f"repair: {how}kept {self.kept} of {self.committed} items"
            + (f" ({lost} damaged items dropped)" if lost else "")
            + (f"; deleted {doubtful} item{'s' if doubtful != 1 else ''} with a damaged path" if doubtful else "")
            + "; rescan your folders to add back anything missing"
        )


def repair(root: Path, fallback: Callable[[], Manifest]) -> RepairReport:
    """Commit the longest consistent prefix of the items in the data files.

    An item is consistent when its record points inside the path and metadata files, its metadata
    parses, and its vector is finite and unit length. The manifest is kept if readable (nothing past
    its committed count is resurrected), else rebuilt from `fallback()` (model and dim) and the data
    files of the latest generation. The compact copy is rebuilt from the kept vectors. When the paths
    file cannot be vouched for (its checksum does not match, or there is none), the items whose path
    is in doubt are deleted (see `doubtful_paths`), so that a rescan adds their files back once
    instead of beside a garbled ghost. The caller holds the write lock.
    """
    try:
        committed = read_manifest(root)
    except DatabaseError:
        committed = None
    rebuilt = committed is None
    m = fallback() if rebuilt else Manifest(**committed.__dict__)
    if rebuilt:
        m.generation = max((int(p.name.split(".")[1]) for p in root.glob("vectors.*.f16")
                            if p.name.split(".")[1].isdigit()), default=0)
    files = {kind: m.file(root, kind) for kind in DATA_FILES}
    raw = {kind: files[kind].read_bytes() if files[kind].exists() else b"" for kind in DATA_FILES}
    rows = min(len(raw["vectors"]) // (m.dim * 2), len(raw["items"]) // ITEM_DTYPE.itemsize)
    if not rebuilt:
        rows = min(rows, m.count)
    items = np.frombuffer(raw["items"], ITEM_DTYPE, rows)
    kept = consistent_prefix(raw, items, m.dim)
    deleted = np.frombuffer(raw["deleted"], "<i8", len(raw["deleted"]) // 8)
    if not rebuilt:
        deleted = deleted[: m.deleted]
    deleted = np.unique(deleted[(deleted >= 0) & (deleted < kept)]).astype("<i8")
    crc = committed.checksums if committed else None
    paths_intact = crc is not None and len(raw["paths"]) >= committed.paths_bytes and (
        zlib.crc32(raw["paths"][: committed.paths_bytes]) == crc["paths"]
    )
    doubtful = [] if paths_intact else doubtful_paths(items[:kept], raw["paths"], deleted)
    deleted = np.union1d(deleted, np.asarray(doubtful, "<i8")).astype("<i8")

    codes, scales = quantize_rows(np.frombuffer(raw["vectors"], "<f2", kept * m.dim).reshape(kept, m.dim))
    m.count, m.deleted, m.compact = kept, len(deleted), kept
    m.paths_bytes = int(record_ends(items[:kept], "path").max()) if kept else 0
    m.meta_bytes = int(record_ends(items[:kept], "meta").max()) if kept else 0
    committed_bytes = {
        "vectors": raw["vectors"][: kept * m.dim * 2],
        "items": raw["items"][: kept * ITEM_DTYPE.itemsize],
        "paths": raw["paths"][: m.paths_bytes],
        "meta": raw["meta"][: m.meta_bytes],
        "deleted": deleted.tobytes(),
        "codes": codes.tobytes(),
        "scales": scales.astype("<f4").tobytes(),
    }
    for kind in ("deleted", "codes", "scales"):  # new files: a reader may have the old ones mapped
        replace_file(files[kind], committed_bytes[kind])
    m.checksums = {kind: zlib.crc32(data) for kind, data in committed_bytes.items()}
    if rebuilt and (root / MANIFEST).exists():
        os.replace(root / MANIFEST, root / (MANIFEST + ".damaged"))
    write_manifest(root, m)
    return RepairReport(committed.count if committed else rows, kept, len(deleted), rebuilt, len(doubtful))


def record_ends(items: np.ndarray, kind: str) -> np.ndarray:
    """Where each item's bytes in the `kind` ("path" or "meta") file end."""
    return items[f"{kind}_off"].astype(np.uint64) + items[f"{kind}_len"]


def consistent_prefix(raw: dict[str, bytes], items: np.ndarray, dim: int) -> int:
    """How many leading items are consistent: their record points inside the path and metadata files,
    their metadata is a JSON object, and their vector is finite and unit length."""
    rows = len(items)
    vectors = np.frombuffer(raw["vectors"], "<f2", rows * dim).reshape(rows, dim).astype(np.float32)
    meta_end = record_ends(items, "meta")
    ok = (record_ends(items, "path") <= len(raw["paths"])) & (meta_end <= len(raw["meta"]))
    ok &= np.abs(np.linalg.norm(vectors, axis=1) - 1) < 0.01
    for i in np.flatnonzero(ok & (items["meta_len"] > 0)):
        try:
            ok[i] = isinstance(json.loads(raw["meta"][int(items["meta_off"][i]) : int(meta_end[i])]), dict)
        except ValueError:
            ok[i] = False
    return int(np.argmin(ok)) if not ok.all() else rows


def doubtful_paths(items: np.ndarray, paths: bytes, deleted: np.ndarray) -> list[int]:
    """The live items of files whose stored path a damaged paths file leaves in doubt.

    A path is trusted when it is a clean absolute path (NUL-free, normalised, as scans store them)
    and either its file is there with the recorded size and mtime, or it lies in a missing folder
    that holds other items' files too (an unmounted disk, a moved folder: nothing to decide now).
    Any other item has a garbled path, or its file is gone or changed (which a rescan would drop or
    re-embed anyway): deleting it loses nothing a rescan does not bring back. Of several items with
    one path, only the last that matches its file is trusted. Items added from memory carry a label,
    not a file path: nothing to check it against and nothing would re-add them, so they are kept.
    """
    live = np.ones(len(items), bool)
    live[deleted] = False
    rows_of: dict[bytes, list[int]] = {}
    for i in np.flatnonzero(live & (items["size"] >= 0) & (items["path_len"] > 0)):
        off = int(items["path_off"][i])
        rows_of.setdefault(paths[off : off + int(items["path_len"][i])], []).append(int(i))
    doubtful: list[int] = []
    in_missing: dict[bytes, list[int]] = {}  # first missing component of a path -> rows
    exists = functools.cache(os.path.lexists)
    for path, rows in rows_of.items():
        if not path.startswith(b"/") or b"\0" in path or os.path.normpath(path) != path:
            doubtful += rows
            continue
        try:
            st = os.stat(path)
        except OSError:
            st = None
        matching = [i for i in rows if st is not None and stat.S_ISREG(st.st_mode)
                    and st.st_size == items["size"][i] and st.st_mtime == items["mtime"][i]]
        if matching:
            doubtful += [i for i in rows if i != matching[-1]]
        elif st is None and len(rows) == 1:
            missing, parent = path, os.path.dirname(path)
            while parent != missing and not exists(parent):
                missing, parent = parent, os.path.dirname(parent)
            in_missing.setdefault(missing, []).append(rows[0])
        else:
            doubtful += rows
    doubtful += [rows[0] for rows in in_missing.values() if len(rows) == 1]
    return sorted(doubtful)


def repair_folder(root: Path, fallback: Callable[[], Manifest]) -> RepairReport:
    """Make a damaged folder openable (see `repair`), under the write lock; errors as DatabaseError."""
    if not root.is_dir():
        raise DatabaseError(f"no nanodb database at {root}")
    lock = WriteLock(root)
    lock.acquire()
    try:
        return repair(root, fallback)
    except OSError as e:
        raise DatabaseError(f"cannot repair {root}: {e.strerror or e}") from None
    finally:
        lock.release()

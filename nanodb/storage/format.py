"""The database folder's format: its files, the item record, and the manifest that commits them.

Layout of a database folder (format version 2)::

    nanodb.json           manifest: model, dim, committed item count and byte lengths, generation
    vectors.G.f16         float16 vectors, row i is item i (count x dim, little-endian)
    codes.G.u8            the compact copy searched first: 8-bit codes of each row (count x dim, see
                          nanodb.storage.compact.quantize_rows)
    scales.G.f32          per row of the compact copy: its step and two error bounds (count x 3 float32)
    items.G.bin           fixed-size item records (ITEM_DTYPE): size, mtime, content hash, offsets
    paths.G.bin           file paths, os.fsencode()d bytes, concatenated
    meta.G.jsonl          per-item JSON metadata (only for items that have some), concatenated
    deleted.G.bin         int64 indices of deleted items (tombstones)
    .lock                 the pid of the one process that has the database open for writing (which
                          holds an flock on the folder itself)

G is the generation, bumped when a compaction rewrites the files without deleted items. The data
files are only ever appended to, or written anew as a new generation (see `commit`); the manifest
names their committed lengths and checksums (see `checks`).

A manifest of an older format version is upgraded when read, by the steps of MIGRATIONS in order, and
written at the current version by the next save. So a version 1 folder (no compact copy) opens as is:
its compact copy is computed at opening and written by the next save.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

MANIFEST = "nanodb.json"
DATA_FILES = ("vectors", "items", "paths", "meta", "deleted", "codes", "scales")
EXTENSIONS = {"vectors": "f16", "items": "bin", "paths": "bin", "meta": "jsonl", "deleted": "bin", "codes": "u8",
              "scales": "f32"}
SCALES_BYTES = 12  # bytes per row of scales.G.f32
REPAIR_HINT = "run `nanodb --path DB --repair` to keep what is consistent, then rescan your folders"

ITEM_DTYPE = np.dtype(
    [
        ("path_off", "<u8"),
        ("path_len", "<u4"),
        ("meta_len", "<u4"),
        ("meta_off", "<u8"),
        ("size", "<i8"),  # file size in bytes, -1 for items added from memory
        ("mtime", "<f8"),  # file modification time (seconds), 0 for items added from memory
        ("hash", "V16"),  # blake2b-128 of the file's bytes (or of the vector for added items)
    ]
)


def _add_compact_copy(data: dict) -> dict:
    """1 -> 2: the compact copy (codes, scales) joined the data files. None is committed yet (`compact`
    stays 0), so opening computes it and the next save writes it."""
    if isinstance(data.get("checksums"), dict):
        data["checksums"] = {"codes": 0, "scales": 0, **data["checksums"]}
    return data


# (version, the step that upgrades a manifest of that version to the next), in order
MIGRATIONS: list[tuple[int, Callable[[dict], dict]]] = [
    (1, _add_compact_copy),
]
FORMAT_VERSION = MIGRATIONS[-1][0] + 1  # the version this nanodb writes
RETIRED_KEYS = ("dtype",)  # written by earlier versions (always "float16"), never read: dropped when read


class DatabaseError(RuntimeError):
    """A database folder that cannot be opened or written; the message names the file and the fix."""


@dataclass
class Manifest:
    model: str
    pretrained: str
    weights_id: str
    seed: int
    dim: int
    count: int = 0
    generation: int = 0
    paths_bytes: int = 0
    meta_bytes: int = 0
    deleted: int = 0
    saved_at: float = 0.0
    version: int = FORMAT_VERSION
    # How the model computed the vectors (ClipModel.precision_id); any precision can search them.
    precision: str = "float32/torch"
    compact: int = 0  # rows whose compact copy (codes, scales) is committed: count, or 0 before version 2
    # CRC-32 of the committed bytes of each data file, extended at each save (cost ~ new bytes), so a
    # corrupted file is caught at opening. None when a writer did not record them (then not checked).
    checksums: dict[str, int] | None = field(default_factory=lambda: dict.fromkeys(DATA_FILES, 0))
    # The folders (or files) scanned or watched, absolute, each with whether symlinks out of them were
    # followed: the server sends only files under them (media.paths.servable_path). Optional: none before.
    roots: dict[str, bool] = field(default_factory=dict)

    def file(self, root: Path, kind: str) -> Path:
        return root / f"{kind}.{self.generation}.{EXTENSIONS[kind]}"


def committed_lengths(m: Manifest) -> dict[str, int]:
    """The committed byte length of each data file."""
    return {
        "vectors": m.count * m.dim * 2,
        "items": m.count * ITEM_DTYPE.itemsize,
        "paths": m.paths_bytes,
        "meta": m.meta_bytes,
        "deleted": m.deleted * 8,
        "codes": m.compact * m.dim,
        "scales": m.compact * SCALES_BYTES,
    }


def data_file_name(name: str) -> tuple[str, int] | None:
    """(kind, generation) of a file name of the format (`vectors.3.f16`), None for any other name."""
    parts = name.split(".")
    if len(parts) != 3 or parts[0] not in EXTENSIONS or parts[2] != EXTENSIONS[parts[0]]:
        return None
    if not (parts[1].isascii() and parts[1].isdigit()) or parts[1] != str(int(parts[1])):
        return None
    return parts[0], int(parts[1])


def database_files(root: Path) -> list[str]:
    """The names in `root` that only a nanodb database writes: data files of any generation, or a manifest
    being written that commits items. A folder holding one is a database, whether or not its manifest
    is there. (A new database killed while writing its first manifest leaves one of no items: nothing
    to lose, so that folder opens as new.)"""
    try:
        names = os.listdir(root)
    except OSError:
        return []
    found = sorted(n for n in names if data_file_name(n) is not None)
    if MANIFEST + ".tmp" in names and _names_items(root / (MANIFEST + ".tmp")):
        found.append(MANIFEST + ".tmp")
    return found


def _names_items(path: Path) -> bool:
    """The manifest at `path` may commit items: any JSON but a manifest of none. A partial one (killed
    while written) commits none: a save writes its data files first, and those count by themselves."""
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return False
    count = data.get("count") if isinstance(data, dict) else None
    return not isinstance(count, int) or count > 0


def read_manifest(root: Path) -> Manifest | None:
    """The committed manifest, upgraded to FORMAT_VERSION; None if the folder holds no database. A folder
    of data files whose manifest is missing is a damaged database, never a new one: DatabaseError."""
    path = root / MANIFEST
    if not path.exists():
        found = database_files(root)
        if found:
            raise DatabaseError(
                f"{path} is missing, but {root} holds nanodb data files ({', '.join(found[:4])}"
                f"{', ...' if len(found) > 4 else ''}): the database is damaged, not new; {REPAIR_HINT}"
            )
        return None
    try:
        data = json.loads(path.read_bytes())
    except OSError as e:
        raise DatabaseError(f"cannot read {path}: {e.strerror or e}") from None
    except ValueError as e:
        raise DatabaseError(f"{path} is corrupted ({e}); {REPAIR_HINT}") from None
    if not isinstance(data, dict):
        raise DatabaseError(f"{path} is corrupted (not a JSON object); {REPAIR_HINT}")
    data = upgraded(data, path)
    for key in RETIRED_KEYS:
        data.pop(key, None)
    try:
        manifest = Manifest(**data)
    except TypeError as e:
        raise DatabaseError(f"{path} is not a nanodb manifest ({e}); {REPAIR_HINT}") from None
    problem = _manifest_problem(manifest)
    if problem:
        raise DatabaseError(f"{path} is corrupted ({problem}); {REPAIR_HINT}")
    return manifest


def upgraded(data: dict, path: Path) -> dict:
    """A parsed manifest brought to FORMAT_VERSION by the MIGRATIONS steps from its version on."""
    version = data.get("version")
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise DatabaseError(
            f"{path} was written by a newer nanodb (format version {version}); this nanodb reads version "
            f"{FORMAT_VERSION}: upgrade nanodb"
        )
    for step_version, step in MIGRATIONS:
        if data.get("version") == step_version:
            data = {**step(data), "version": step_version + 1}
    if data.get("version") != FORMAT_VERSION:
        raise DatabaseError(f"{path} has an unknown format version {version!r}; {REPAIR_HINT}")
    return data


def _manifest_problem(m: Manifest) -> str | None:
    """What is wrong with a parsed manifest's fields, if anything."""
    for name in ("model", "pretrained", "weights_id"):
        if not isinstance(getattr(m, name), str):
            return f"{name} is not a string"
    for name in ("seed", "dim", "count", "generation", "paths_bytes", "meta_bytes", "deleted", "compact"):
        value = getattr(m, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            return f"{name} is not a non-negative whole number"
    if m.dim == 0:
        return "dim is 0"
    if m.deleted > m.count:
        return "more deleted items than items"
    if m.compact not in (0, m.count):
        return "compact is neither 0 nor count"
    if m.checksums is not None and (
        not isinstance(m.checksums, dict)
        or set(m.checksums) != set(DATA_FILES)
        or not all(isinstance(v, int) for v in m.checksums.values())
    ):
        return "checksums are malformed"
    if not isinstance(m.roots, dict) or not all(isinstance(v, bool) for v in m.roots.values()):
        return "roots are malformed"
    return None


def write_manifest(root: Path, manifest: Manifest) -> None:
    """Atomically replace the manifest: the commit point of a save."""
    manifest.saved_at = time.time()
    tmp = root / (MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(manifest.__dict__, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / MANIFEST)
    fsync_dir(root)


def fsync_dir(root: Path) -> None:
    """Make a rename or a new file in folder `root` durable."""
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

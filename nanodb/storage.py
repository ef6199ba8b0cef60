"""The database folder: append-only binary files committed by an atomically replaced manifest.

Layout of a database folder (format version 1)::

    nanodb.json           manifest: model, dim, committed item count and byte lengths, generation
    vectors.G.f16         float16 vectors, row i is item i (count x dim, little-endian)
    items.G.bin           fixed-size item records (ITEM_DTYPE): size, mtime, content hash, offsets
    paths.G.bin           file paths, os.fsencode()d bytes, concatenated
    meta.G.jsonl          per-item JSON metadata (only for items that have some), concatenated
    deleted.G.bin         int64 indices of deleted items (tombstones)
    .lock                 held (flock) by the one process that has the database open for writing

G is the generation, bumped when a compaction rewrites the files without deleted items.

A save appends what was added since the last save to each file (at the committed length, which
overwrites anything a crashed save left behind), fsyncs, then replaces nanodb.json. So a save costs
time in proportion to the new items, and a kill at any moment leaves the last committed manifest
pointing at complete data. Opening reads each file with one binary read: no per-item parsing.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FORMAT_VERSION = 1
MANIFEST = "nanodb.json"
LOCK = ".lock"

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
    dtype: str = "float16"

    def file(self, root: Path, kind: str) -> Path:
        ext = {"vectors": "f16", "items": "bin", "paths": "bin", "meta": "jsonl", "deleted": "bin"}[kind]
        return root / f"{kind}.{self.generation}.{ext}"


DATA_FILES = ("vectors", "items", "paths", "meta", "deleted")


def read_manifest(root: Path) -> Manifest | None:
    """The committed manifest, None if the folder holds no database."""
    path = root / MANIFEST
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DatabaseError(f"cannot read {path}: {e}") from None
    version = data.get("version")
    if version != FORMAT_VERSION:
        raise DatabaseError(
            f"{path} is format version {version}; this nanodb reads version {FORMAT_VERSION}: upgrade nanodb"
        )
    try:
        return Manifest(**data)
    except TypeError as e:
        raise DatabaseError(f"{path} is not a nanodb manifest ({e})") from None


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
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_exact(path: Path, nbytes: int, into: memoryview | None = None) -> bytes | memoryview:
    """Read the first `nbytes` of a data file, or fail naming the file: never a silent partial load."""
    try:
        with open(path, "rb") as f:
            if into is not None:
                got = f.readinto(into) if nbytes else 0
                data = into
            else:
                data = f.read(nbytes)
                got = len(data)
    except FileNotFoundError:
        if nbytes == 0:
            return b"" if into is None else into
        raise DatabaseError(f"{path} is missing; the database is damaged (rescan into a new --path)") from None
    except OSError as e:
        raise DatabaseError(f"cannot read {path}: {e.strerror}") from None
    if got < nbytes:
        raise DatabaseError(
            f"{path} is truncated ({got} of {nbytes} committed bytes); the database is damaged "
            "(rescan into a new --path)"
        )
    return data


def append_at(path: Path, offset: int, data: bytes | memoryview) -> None:
    """Write `data` at `offset` (the committed length), drop anything after it, and fsync."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.lseek(fd, offset, os.SEEK_SET)
        view = memoryview(data).cast("B")
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.ftruncate(fd, offset + len(memoryview(data).cast("B")))
        os.fsync(fd)
    finally:
        os.close(fd)


class WriteLock:
    """An exclusive flock on the database folder, so two writers never interleave their saves."""

    def __init__(self, root: Path):
        self.path = root / LOCK
        self.fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise DatabaseError(
                f"{self.path.parent} is open for writing by another process (pid {holder}); "
                "stop it first, or open this one read-only"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def write_generation(root: Path, manifest: Manifest, data: dict[str, bytes | memoryview]) -> None:
    """Write every data file of `manifest.generation` from scratch (a compaction), fsynced.

    Files left by a compaction that crashed before its manifest are simply overwritten; the old
    generation stays committed until the caller replaces the manifest.
    """
    for kind in DATA_FILES:
        append_at(manifest.file(root, kind), 0, data[kind])


def remove_other_generations(root: Path, generation: int) -> None:
    """Delete data files of generations other than the committed one: the old files of a finished
    compaction, or the partial files of one that crashed. Called only with the write lock held."""
    for kind in DATA_FILES:
        for path in root.glob(f"{kind}.*.*"):
            parts = path.name.split(".")
            if len(parts) == 3 and parts[1].isdigit() and int(parts[1]) != generation:
                path.unlink(missing_ok=True)

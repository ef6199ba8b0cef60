"""The commit protocol: saves append to the data files, compactions write a new generation, and the
manifest's atomic replacement commits either.

A save appends what was added since the last save to each file (at the committed length, which
overwrites anything a crashed save left behind), fsyncs, then replaces nanodb.json. So a save costs
time in proportion to the new items, and a kill at any moment leaves the last committed manifest
pointing at complete data. Opening maps the vectors, their compact copy and the item table (read
on demand, pages shared with the page cache; a compact copy over 64 MiB is then read into memory by
a background thread, as the fast pass scans it faster there) and reads the paths, metadata and
deletions with one binary read each: no per-item parsing. One writer at a time: WriteLock.
"""

from __future__ import annotations

import errno
import fcntl
import os
import zlib
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from nanodb.storage.format import (
    DATA_FILES,
    DatabaseError,
    Manifest,
    committed_lengths,
    fsync_dir,
    read_manifest,
    write_manifest,
)

LOCK = ".lock"


class Chunks:
    """A data file's bytes made piece by piece when iterated (each time anew), so a compaction of 10M
    rows never holds a second copy of the vectors: see ItemStore's compaction."""

    def __init__(self, make: Callable[[], object]):
        self._make = make

    def __iter__(self):
        return iter(self._make())


def pieces(data) -> list | Chunks:
    """The byte pieces of `data`: a bytes-like object is one piece."""
    return data if isinstance(data, Chunks) else [data]


def crc_of(data, crc: int = 0) -> int:
    """CRC-32 of `data` (bytes-like or Chunks), continued from `crc`."""
    for piece in pieces(data):
        crc = zlib.crc32(memoryview(piece).cast("B"), crc)
    return crc


def append_at(path: Path, offset: int, data: bytes | memoryview | Chunks) -> None:
    """Write `data` at `offset` (the committed length), drop anything after it, and fsync."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.lseek(fd, offset, os.SEEK_SET)
        end = offset
        for piece in pieces(data):
            view = memoryview(piece).cast("B")
            end += len(view)
            while view:
                n = os.write(fd, view)
                view = view[n:]
        os.ftruncate(fd, end)
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_file(path: Path, data: bytes) -> None:
    """Atomically replace a data file (fsynced), never rewriting it in place: a process that has it
    mapped keeps the old bytes (shrinking a mapped file would crash that process)."""
    tmp = path.with_name(path.name + ".tmp")
    append_at(tmp, 0, data)
    os.replace(tmp, path)
    fsync_dir(path.parent)


class WriteLock:
    """An exclusive flock on the database folder itself, so two writers never interleave their saves.

    The lock is taken on the folder's own file descriptor: deleting `.lock` (which only records the
    holder's pid, for the error message) cannot let a second writer in."""

    def __init__(self, root: Path):
        self.root = root
        self.path = root / LOCK
        self.fd: int | None = None

    def acquire(self) -> None:
        try:
            fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as e:
            raise DatabaseError(f"cannot open the database folder {self.root}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DatabaseError(
                f"{self.root} is open for writing by another process (pid {self._holder()}); "
                "stop it first, or open this one read-only"
            ) from None
        try:
            self._record_pid()
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd

    def _holder(self) -> str:
        try:
            return self.path.read_bytes()[:32].decode(errors="replace").strip() or "?"
        except OSError:
            return "?"

    def _record_pid(self) -> None:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        except OSError as e:
            if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
                raise DatabaseError(
                    f"cannot open {self.root} for writing ({e.strerror}: {self.path}); "
                    "open it read-only (--read-only) to search it"
                ) from None
            raise DatabaseError(f"cannot create {self.path}: {e.strerror}") from None
        try:
            os.write(fd, str(os.getpid()).encode())
        finally:
            os.close(fd)

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def check_unchanged(root: Path, committed: Manifest) -> None:
    """Refuse to write when the manifest on disk is not the one this process committed last: another
    process saved meanwhile (the lock was bypassed), and writing now would destroy what it saved."""
    try:
        on_disk = read_manifest(root)
    except DatabaseError as e:
        raise DatabaseError(f"refusing to save: {e}") from None
    if on_disk is None or on_disk.__dict__ != committed.__dict__:
        raise DatabaseError(
            f"refusing to save to {root}: another process changed it since this one opened it; nothing was "
            "written: reopen the database and add your changes again"
        )


def commit_append(root: Path, committed: Manifest, new: Manifest, appended: dict[str, bytes | memoryview]) -> None:
    """A save: append to each data file at its committed length (overwriting what a crashed save left
    there), extend the checksums, fsync, then replace the manifest, the commit point. Refused before
    anything is written when another process committed since `committed`."""
    check_unchanged(root, committed)
    if committed.checksums is not None:
        new.checksums = {
            kind: zlib.crc32(memoryview(appended[kind]).cast("B"), committed.checksums[kind]) for kind in DATA_FILES
        }
    lengths = committed_lengths(committed)
    for kind in DATA_FILES:
        append_at(committed.file(root, kind), lengths[kind], appended[kind])
    write_manifest(root, new)


def commit_generation(root: Path, committed: Manifest, new: Manifest,
                      data: dict[str, bytes | memoryview | Chunks]) -> None:
    """A compaction: write every data file of `new.generation` from scratch, fsynced, then replace the
    manifest. Files left by a compaction that crashed before its manifest are simply overwritten; the
    old generation stays committed until the manifest names the new one. Refused, like commit_append,
    when another process committed since `committed`."""
    check_unchanged(root, committed)
    new.checksums = {kind: crc_of(data[kind]) for kind in DATA_FILES}
    for kind in DATA_FILES:
        append_at(new.file(root, kind), 0, data[kind])
    write_manifest(root, new)


def remove_other_generations(root: Path, generation: int) -> None:
    """Delete data files of generations other than the committed one: the old files of a finished
    compaction, or the partial files of one that crashed. Called only with the write lock held."""
    for kind in DATA_FILES:
        for path in root.glob(f"{kind}.*.*"):
            parts = path.name.split(".")
            if len(parts) == 3 and parts[1].isdigit() and int(parts[1]) != generation:
                path.unlink(missing_ok=True)


@contextmanager
def commit_errors(what: str):
    """A commit that fails on the disk (e.g. full) is one clear DatabaseError; the last commit stays."""
    try:
        yield
    except OSError as e:
        raise DatabaseError(
            f"{what} failed ({e.strerror or e}); the previous save is intact and "
            f"nothing is lost from memory: free some space and save again"
        ) from None

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
import logging
import os
import zlib
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from nanodb.storage.checks import check_length
from nanodb.storage.format import (
    DATA_FILES,
    MANIFEST,
    DatabaseError,
    Manifest,
    committed_lengths,
    data_file_name,
    fsync_dir,
    read_manifest,
    write_manifest,
)

log = logging.getLogger(__name__)

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
    holder's pid, for the error message) cannot let a second writer in. On release, `.lock` is removed
    if it is still the file this process wrote its pid into (same file, same pid), before the flock is
    let go: so a lock file another process wrote, or one another process holds, is never removed."""

    def __init__(self, root: Path):
        self.root = root
        self.path = root / LOCK
        self.fd: int | None = None
        self.written: tuple[int, int] | None = None  # (device, inode) of the `.lock` this process wrote

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
            st = os.fstat(fd)
            self.written = (st.st_dev, st.st_ino)
        finally:
            os.close(fd)

    def _remove_own_pid_file(self) -> None:
        """Remove `.lock` if it is the file this process wrote and still holds its pid (the flock held)."""
        written, self.written = self.written, None
        try:
            st = os.stat(self.path, follow_symlinks=False)
            if written == (st.st_dev, st.st_ino) and self.path.read_bytes() == str(os.getpid()).encode():
                self.path.unlink()
        except FileNotFoundError:
            pass  # removed by someone else: nothing of this process's is left
        except OSError as e:
            log.warning("could not remove %s: %s", self.path, e.strerror)

    def release(self) -> None:
        if self.fd is not None:
            if self.written is not None:
                self._remove_own_pid_file()
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def check_unchanged(root: Path, committed: Manifest, lock: WriteLock | None = None) -> None:
    """Refuse to write when the manifest on disk is not the one this process committed last: another
    process saved meanwhile (the lock was bypassed), or it was replaced or damaged by hand, and writing
    now could destroy what is there. Nothing is written; what is unsaved stays in this process's memory.

    A manifest deleted under the process holding `lock` (the folder is still the one it locked, and the
    committed data files are whole) is no reason to lose anything: the save writes it again."""
    if lock is not None and rewrites_deleted_manifest(root, committed, lock):
        return
    try:
        on_disk = read_manifest(root)
        if on_disk is None:
            problem = f"{root / MANIFEST} was deleted, and its data files with it"
        elif on_disk.__dict__ != committed.__dict__:
            problem = "another process changed it since this one opened it"
        else:
            problem = None
    except DatabaseError as e:
        problem = str(e)
    if problem:
        raise DatabaseError(
            f"refusing to save to {root}: {problem}. Nothing was written, and the unsaved changes stay in this "
            f"process's memory (searchable): put back the {MANIFEST} this process saved, then save again"
        )


def rewrites_deleted_manifest(root: Path, committed: Manifest, lock: WriteLock) -> bool:
    """True when the manifest is missing from the folder this process has locked and every committed data
    file is still there at its committed length: the next commit can write the manifest anew."""
    if lock.fd is None or (root / MANIFEST).exists():
        return False
    try:
        held, now = os.fstat(lock.fd), os.stat(root)
        if (held.st_dev, held.st_ino) != (now.st_dev, now.st_ino):
            return False  # the folder was replaced: this process's files are not in it
        for kind, nbytes in committed_lengths(committed).items():
            check_length(committed.file(root, kind), nbytes)
    except (OSError, DatabaseError):
        return False
    log.warning("%s was deleted while this process had the database open: this save writes it again",
                root / MANIFEST)
    return True


def commit_append(root: Path, committed: Manifest, new: Manifest, appended: dict[str, bytes | memoryview],
                  lock: WriteLock | None = None) -> None:
    """A save: append to each data file at its committed length (overwriting what a crashed save left
    there), extend the checksums, fsync, then replace the manifest, the commit point. Refused before
    anything is written when another process committed since `committed` (see check_unchanged: `lock`
    is the write lock this process holds)."""
    check_unchanged(root, committed, lock)
    if committed.checksums is not None:
        new.checksums = {
            kind: zlib.crc32(memoryview(appended[kind]).cast("B"), committed.checksums[kind]) for kind in DATA_FILES
        }
    lengths = committed_lengths(committed)
    for kind in DATA_FILES:
        append_at(committed.file(root, kind), lengths[kind], appended[kind])
    write_manifest(root, new)


def commit_generation(root: Path, committed: Manifest, new: Manifest,
                      data: dict[str, bytes | memoryview | Chunks], lock: WriteLock | None = None) -> None:
    """A compaction: write every data file of `new.generation` from scratch, fsynced, then replace the
    manifest. Files left by a compaction that crashed before its manifest are simply overwritten; the
    old generation stays committed until the manifest names the new one. Refused, like commit_append,
    when another process committed since `committed`."""
    check_unchanged(root, committed, lock)
    new.checksums = {kind: crc_of(data[kind]) for kind in DATA_FILES}
    for kind in DATA_FILES:
        append_at(new.file(root, kind), 0, data[kind])
    write_manifest(root, new)


def remove_other_generations(root: Path, generation: int) -> None:
    """Delete the data files of generations this database wrote before the committed one (the old files
    of a finished compaction) or just after it (the partial files of a compaction that crashed before
    its manifest). Only names of the format (`vectors.3.f16`): a file the user put in the folder, or one
    of a generation this database never reached, is never touched. Called only with the write lock held."""
    for name in os.listdir(root):
        parsed = data_file_name(name)
        if parsed is not None and (parsed[1] < generation or parsed[1] == generation + 1):
            (root / name).unlink(missing_ok=True)


WRITE_PROTECTED = (errno.EACCES, errno.EPERM, errno.EROFS)
FULL = (errno.ENOSPC, errno.EDQUOT)


@contextmanager
def commit_errors(what: str):
    """A commit that fails on the disk (e.g. full) is one clear DatabaseError; the last commit stays."""
    try:
        yield
    except OSError as e:
        if e.errno in WRITE_PROTECTED:
            fix = f"the folder is read-only or not writable ({e.filename or e}): make it writable and save again"
        elif e.errno in FULL:
            fix = "free some space and save again"
        else:
            fix = "save again once the cause is fixed"
        raise DatabaseError(
            f"{what} failed ({e.strerror or e}); the previous save is intact and nothing is lost from memory: {fix}"
        ) from None

"""Damage detection: each data file's committed length and CRC-32 (recorded in the manifest) checked
before its bytes are used.

A file of at most VERIFY_AT_OPEN_BYTES is checked when the database opens (a damaged one is refused,
naming it); a larger one (from about 65K vectors at dim 512) is checked by a background thread right
after (FileCheck), so opening 10M vectors stays under a second. Until that check has passed, a save
that rewrites every byte (a compaction) waits for it; once it has failed, searches and saves raise the
DatabaseError naming the file, and `--validate` waits for the check and reports it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import zlib
from pathlib import Path

from nanodb.storage.format import REPAIR_HINT, DatabaseError

log = logging.getLogger(__name__)

VERIFY_AT_OPEN_BYTES = 64 << 20  # larger files are checked after opening (at ~2 GB/s: ~30 ms each)
CHECK_CHUNK = 8 << 20


def read_exact(
    path: Path, nbytes: int, into: memoryview | None = None, checksum: int | None = None
) -> bytes | memoryview:
    """Read the first `nbytes` of a data file, or fail naming the file: never a silent partial load.
    With `checksum`, the bytes must have that CRC-32 (a corrupted file is refused, not loaded)."""
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
        raise DatabaseError(f"{path} is missing; the database is damaged: {REPAIR_HINT}") from None
    except OSError as e:
        raise DatabaseError(f"cannot read {path}: {e.strerror}") from None
    _check_got(path, got, nbytes)
    if checksum is not None and zlib.crc32(data) != checksum:
        raise _corrupted(path)
    return data


def check_length(path: Path, nbytes: int) -> None:
    """Fail naming the file unless it holds at least its `nbytes` committed bytes (before mapping it)."""
    try:
        got = path.stat().st_size
    except FileNotFoundError:
        if nbytes == 0:
            return
        raise DatabaseError(f"{path} is missing; the database is damaged: {REPAIR_HINT}") from None
    except OSError as e:
        raise DatabaseError(f"cannot read {path}: {e.strerror}") from None
    _check_got(path, got, nbytes)


def _check_got(path: Path, got: int, nbytes: int) -> None:
    if got < nbytes:
        raise DatabaseError(
            f"{path} is truncated ({got} of {nbytes} committed bytes); the database is damaged: {REPAIR_HINT}"
        )


def _corrupted(path: Path) -> DatabaseError:
    return DatabaseError(f"{path} is corrupted (its checksum does not match); {REPAIR_HINT}")


def file_crc(fd: int, nbytes: int, stop: threading.Event | None = None) -> int | None:
    """CRC-32 of the first `nbytes` of an open file, read in chunks (never mapped: the pages read are
    not counted in this process's memory). None when `stop` was set first."""
    crc, buf = 0, bytearray(min(CHECK_CHUNK, max(nbytes, 1)))
    view = memoryview(buf)
    offset = 0
    while offset < nbytes:
        if stop is not None and stop.is_set():
            return None
        got = os.preadv(fd, [view[: min(len(buf), nbytes - offset)]], offset)
        if got == 0:
            break  # shorter than committed: cannot match
        crc = zlib.crc32(view[:got], crc)
        offset += got
    return crc


def verify_file(path: Path, nbytes: int, checksum: int) -> None:
    """Refuse a data file whose first `nbytes` do not have CRC-32 `checksum`."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        if nbytes == 0:
            return
        raise DatabaseError(f"{path} is missing; the database is damaged: {REPAIR_HINT}") from None
    try:
        if file_crc(fd, nbytes) != checksum:
            raise _corrupted(path)
    finally:
        os.close(fd)


class FileCheck:
    """The checksums of big data files, checked by a background thread after opening.

    The files are opened at once, so a compaction that deletes them meanwhile changes nothing. `error`
    is the DatabaseError naming the first corrupted file, once found."""

    def __init__(self, files: list[tuple[Path, int, int]]):
        self.error: DatabaseError | None = None
        self._stop = threading.Event()
        self._open: list[tuple[Path, int, int, int]] = []
        try:
            for path, nbytes, checksum in files:
                self._open.append((path, os.open(path, os.O_RDONLY), nbytes, checksum))
        except OSError:
            self._close_all()
            raise
        self._thread = threading.Thread(target=self._run, name="nanodb-checksums", daemon=True)
        if self._open:
            self._thread.start()

    def _run(self) -> None:
        started = time.perf_counter()
        try:
            for path, fd, nbytes, checksum in self._open:
                crc = file_crc(fd, nbytes, self._stop)
                if crc is None:
                    return
                if crc != checksum:
                    self.error = _corrupted(path)
                    log.error("%s", self.error)
                    return
            log.info("checksums of %d big files verified in %.1f s", len(self._open), time.perf_counter() - started)
        except OSError as e:
            self.error = DatabaseError(f"cannot read {path} to verify it: {e.strerror}")
            log.error("%s", self.error)
        finally:
            self._close_all()

    def _close_all(self) -> None:
        for _, fd, _, _ in self._open:
            try:
                os.close(fd)
            except OSError:
                pass
        self._open = []

    def wait(self) -> None:
        """Block until every file is checked; raise the DatabaseError of a corrupted one."""
        if self._thread.ident is not None:
            self._thread.join()
        self.raise_if_failed()

    def raise_if_failed(self) -> None:
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join()

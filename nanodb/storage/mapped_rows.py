"""Rows of a data file mapped copy-on-write at the start of an array that appends grow into, and the file
held open so its length is checked (fstat, ~1 us) before mapped pages are read: a page past the end of a
file shortened under its mapping kills the process with SIGBUS, which Python cannot catch."""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import sys
import weakref
from pathlib import Path

import numpy as np

from nanodb.storage.format import REPAIR_HINT, DatabaseError

log = logging.getLogger(__name__)

MAP_FIXED, MAP_NORESERVE, MADV_POPULATE_READ = 0x10, 0x4000, 22  # Linux values; the mmap module lacks them
HUGE_PAGE = 2 << 20  # x86-64's and arm64's (with 4 KB pages) page-table level above 4 KB pages
if sys.platform == "linux":
    _LIBC = ctypes.CDLL(None, use_errno=True)
    _LIBC.mmap.restype = ctypes.c_void_p
    _LIBC.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                           ctypes.c_int64]
    _LIBC.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


class HeldFile:
    """A data file whose first `nbytes` are mapped, held open for as long as the mapping is used."""

    def __init__(self, path: Path, nbytes: int):
        self.path = path
        self.nbytes = nbytes
        try:
            self.fd: int | None = os.open(path, os.O_RDONLY) if nbytes else None
        except OSError as e:
            raise DatabaseError(f"cannot open {path} ({e.strerror}); the database is damaged: {REPAIR_HINT}") from None
        # closed by close(), or when dropped (an old generation's file: its disk space is then freed)
        self._closer = weakref.finalize(self, os.close, self.fd) if self.fd is not None else None
        self.check()

    def check(self) -> None:
        """Fail naming the file when it no longer holds its mapped bytes (truncated after opening)."""
        if self.fd is None:
            return
        size = os.fstat(self.fd).st_size
        if size < self.nbytes:
            raise DatabaseError(f"{self.path} was truncated while the database was open ({size} of {self.nbytes} "
                                f"committed bytes); the database is damaged: {REPAIR_HINT}")

    def close(self) -> None:
        self.fd = None
        if self._closer is not None:
            self._closer()


def file_backed_rows(file: HeldFile | None, rows: int, row_shape: tuple[int, ...], dtype, capacity: int,
                     random_access: bool = False) -> np.ndarray:
    """A writable (capacity, *row_shape) array whose first `rows` rows are the first bytes of `file`,
    mapped copy-on-write (after checking its length), and whose other rows are anonymous memory for appends.

    Opening costs no read: pages of the file are read when first touched (and shared with the page
    cache, not copied), and writes to them stay private to this process, never reaching the file. The
    whole capacity is one contiguous array, so appends need no second part. `random_access` turns off
    read-ahead (rows read one by one, e.g. candidates rescored). Off Linux, or when mapping fails, the
    rows are read into memory instead."""
    dtype = np.dtype(dtype)
    row_bytes = dtype.itemsize * int(np.prod(row_shape, dtype=np.int64))
    file_bytes = rows * row_bytes
    total = max(capacity * row_bytes, mmap.PAGESIZE)
    if file_bytes:
        file.check()
    start = 0
    if sys.platform == "linux":
        # room to start the file's mapping on a 2 MB boundary, where the kernel can map its 2 MB pages
        region = mmap.mmap(-1, total + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE)
        start = -_address(region) % HUGE_PAGE
        if file_bytes and not _map_file_over(region, start, file, file_bytes, random_access):
            region, start = None, 0
    else:
        region = None
    if region is None:
        region = bytearray(total)
        if file_bytes and os.preadv(file.fd, [memoryview(region)[:file_bytes]], 0) != file_bytes:
            raise DatabaseError(f"cannot read {file.path} whole; {REPAIR_HINT}")
    rows_of = np.frombuffer(region, dtype, capacity * row_bytes // dtype.itemsize, offset=start)
    return rows_of.reshape(capacity, *row_shape)


def _address(region: mmap.mmap) -> int:
    anchor = ctypes.c_char.from_buffer(region)
    try:
        return ctypes.addressof(anchor)
    finally:
        del anchor  # releases the buffer export: the region can be closed when its arrays are gone


def _map_file_over(region: mmap.mmap, start: int, file: HeldFile, nbytes: int, random_access: bool) -> bool:
    """Map the first `nbytes` of `file` copy-on-write over `region` from byte `start` (the region keeps
    owning the address range: unmapping it unmaps the file too). False when the kernel refuses."""
    addr = _address(region) + start
    got = _LIBC.mmap(addr, nbytes, mmap.PROT_READ | mmap.PROT_WRITE,
                     mmap.MAP_PRIVATE | MAP_FIXED | MAP_NORESERVE, file.fd, 0)
    if got != addr:
        log.warning("cannot map %s (errno %d): reading it into memory", file.path, ctypes.get_errno())
        return False
    length = -(-nbytes // mmap.PAGESIZE) * mmap.PAGESIZE
    if random_access:
        region.madvise(mmap.MADV_RANDOM, start, length)
    elif hasattr(mmap, "MADV_HUGEPAGE"):
        # a scanned file: read ahead into 2 MB page-cache pages, mapped as such (a scan makes ~500x fewer
        # TLB misses than through 4 KB pages; see benchmarks/RESULTS.md), where the file system has them
        region.madvise(mmap.MADV_HUGEPAGE, start, length)
    return True


def read_ahead(rows: np.ndarray, offset: int, nbytes: int) -> bool:
    """Read `nbytes` of mapped `rows` from byte `offset` into memory now (MADV_POPULATE_READ: the mapping's
    own fault path, so its 2 MB pages; a file shortened meanwhile is an error here, not a SIGBUS). False
    when the kernel cannot (before Linux 5.14, or a shortened file): the pages are then read when touched."""
    if sys.platform != "linux":
        return False
    start = rows.ctypes.data + offset
    aligned = start - start % mmap.PAGESIZE
    return _LIBC.madvise(aligned, nbytes + start - aligned, MADV_POPULATE_READ) == 0

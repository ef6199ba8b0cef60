"""Exact k-nearest-neighbour search by cosine similarity over unit float16 vectors.

The vectors live in one growable float16 array (and, with CuPy and a GPU, a mirror on the device),
beside a compact copy: each row quantized to 8 bits with its own step (`compact.quantize_rows`), so
rows are appended independently of each other. Rows of the data files are mapped, not read
(`mapped_rows`). A search runs in two passes. The fast pass scores every row approximately and keeps,
per query, every row that could still be in the top k given a proven bound on its error; the exact pass
(`exact`) rescores those few candidates in float64 from the float16 rows and orders them by score, ties
to the lower index. So every path returns the float64 brute-force top k of the float16 rows, never
sorts all N scores, and never holds a float32 copy.

Fast passes (`scan`): on the CPU, the compact copy scored by a small C kernel (`nanodb/storage/_scan.c`,
AVX-512 VNNI, else AVX2, else plain C, chosen at run time; half the bytes of float16; loaded by
`kernel`), or, when that kernel was not built or does not match this code, the float16 rows converted
block by block into a small float32 scratch and scored by BLAS; on a GPU, float32 on CuPy (here).
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import numpy as np

from nanodb.storage.compact import quantize_rows
from nanodb.storage.exact import exact_top_k
from nanodb.storage.format import REPAIR_HINT, DatabaseError
from nanodb.storage.kernel import built_kernel
from nanodb.storage.mapped_rows import HeldFile, file_backed_rows, read_ahead
from nanodb.storage.scan import (
    DamagedRows,
    Selection,
    candidates_compact,
    candidates_float16,
    float32_error_bound,
)

log = logging.getLogger(__name__)

GPU_CHUNK_ROWS = 1 << 18  # rows scored per GPU step: bounds the float32 scores on the device


def cupy_available() -> bool:
    """True when CuPy imports and sees a CUDA device."""
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # ImportError, or CUDA driver/runtime errors from a machine without a GPU
        return False


KERNEL = built_kernel()


KERNEL_LOOPS = {2: "int8 vnni", 1: "int8 avx2", 0: "int8 c"}  # nanodb_level's answers


def fast_pass(dim: int) -> str:
    """Which CPU fast pass searches rows of `dim`: "int8 vnni", "int8 avx2", "int8 c" or "float16 blas" (no
    kernel built)."""
    if KERNEL is None:
        return "float16 blas"
    return KERNEL_LOOPS[KERNEL.nanodb_level(dim)]


# A mapped compact copy larger than this is read ahead by a background thread after opening (the first
# searches then scan memory), in 2 MB pages where the file system makes them: scanned through 4 KB pages
# the codes took ~2.4x longer (benchmarks/RESULTS.md). They are never copied: a server's own memory does
# not grow with its database.
READ_AHEAD_BYTES = 64 << 20
READ_AHEAD_CHUNK = 16 << 20
class VectorIndex:
    """The vectors of a database and exact top-k search over them."""

    def __init__(self, dim: int, backend: str = "auto"):
        self.dim = dim
        self._buf = np.empty((0, dim), np.float16)
        self._codes = np.empty((0, dim), np.uint8)
        self._scales = np.empty((0, 3), np.float32)
        self._steps = np.empty(0, np.float32)  # scales[:, 0], contiguous for the kernel
        self._error_max = 0.0  # the largest quantization error bound (scales[:, 1]) of any row
        self._norm_max = 0.0  # the largest row norm bound (scales[:, 2])
        self.count = 0
        self.mapped = 0  # rows 0..mapped-1 are the data files' (see load_files), read on demand
        self._files: dict[str, HeldFile] = {}  # the data files mapped, held open (see check_files)
        self._stop = threading.Event()
        self._codes_read = threading.Event()  # cleared while the mapped codes are read ahead
        self._codes_read.set()
        self._dead = np.zeros(0, bool)
        self._any_dead = False
        self._lock = threading.Lock()
        if backend == "auto":
            backend = "cupy" if cupy_available() else "numpy"
        self.backend = backend
        self._gpu = None
        if backend == "cupy":
            import cupy

            self._cp = cupy
            self._gpu = cupy.empty((0, dim), cupy.float16)
            self._gpu_dead = cupy.zeros(0, bool)

    @property
    def vectors(self) -> np.ndarray:
        """The stored float16 vectors, (count, dim), deleted rows included."""
        self.check_files()
        return self._buf[: self.count]

    @property
    def dead(self) -> np.ndarray:
        return self._dead[: self.count]

    @property
    def codes(self) -> np.ndarray:
        """The compact copy's codes, (count, dim) uint8 (see quantize_rows)."""
        self.check_files()
        return self._codes[: self.count]

    @property
    def scales(self) -> np.ndarray:
        """The compact copy's per-row step and bounds, (count, 3) float32 (see quantize_rows)."""
        self.check_files()
        return self._scales[: self.count]

    def _grow(self, need: int) -> None:
        cap = max(need, 1024, int(len(self._buf) * 1.5))
        buf, codes, scales = (self._grown(kind, old, cap) for kind, old in
                              (("vectors", self._buf), ("codes", self._codes), ("scales", self._scales)))
        dead = np.zeros(cap, bool)
        dead[: self.count] = self._dead[: self.count]
        steps = np.empty(cap, np.float32)
        steps[: self.count] = self._steps[: self.count]
        self._buf, self._dead, self._codes, self._scales, self._steps = buf, dead, codes, scales, steps
        if self._gpu is not None:
            cp = self._cp
            gpu = cp.empty((cap, self.dim), cp.float16)
            gpu[: self.count] = self._gpu[: self.count]
            gdead = cp.zeros(cap, bool)
            gdead[: self.count] = self._gpu_dead[: self.count]
            self._gpu, self._gpu_dead = gpu, gdead

    def check_files(self) -> None:
        """Fail naming a mapped data file that was shortened since it was mapped: reading its lost pages
        would kill the process (see mapped_rows). One fstat per file."""
        for held in list(self._files.values()):
            held.check()

    def _grown(self, kind: str, old: np.ndarray, cap: int) -> np.ndarray:
        """A copy of `old` with room for `cap` rows: the mapped rows are mapped again, not copied."""
        held = self._files.get(kind)
        if held is None:
            new, start = np.empty((cap, *old.shape[1:]), old.dtype), 0
        else:
            new = file_backed_rows(held, self.mapped, old.shape[1:], old.dtype, cap, kind == "vectors")
            start = self.mapped
        new[start : self.count] = old[start : self.count]
        return new

    def load_files(self, count: int, vectors: Path, compact: tuple[Path, Path] | None = None) -> None:
        """Fill a fresh index with the first `count` rows of data files, mapped (file_backed_rows), not
        read: `vectors` holds float16 rows, `compact` their codes and scales (else they are computed,
        which reads every row). Each file is held open and its length checked before it is mapped and
        before each search (check_files): a file shortened while mapped makes touching its lost pages
        fatal (SIGBUS), so a shortened file is an error naming it instead."""
        cap = max(1024, count + count // 2)  # address space only: nothing is allocated until appended
        self._files = {"vectors": HeldFile(vectors, count * self.dim * 2)}
        self.mapped = count
        self._buf = file_backed_rows(self._files["vectors"], count, (self.dim,), np.float16, cap, random_access=True)
        if compact is not None:
            self._files.update(codes=HeldFile(compact[0], count * self.dim), scales=HeldFile(compact[1], count * 12))
            self._codes = file_backed_rows(self._files["codes"], count, (self.dim,), np.uint8, cap)
            self._scales = file_backed_rows(self._files["scales"], count, (3,), np.float32, cap)
        else:
            self._codes, self._scales = np.empty((cap, self.dim), np.uint8), np.empty((cap, 3), np.float32)
            self._codes[:count], self._scales[:count] = quantize_rows(self._buf[:count])
        self._dead = np.zeros(cap, bool)
        self._steps = np.empty(cap, np.float32)
        self.count = count
        if count:
            self._steps[:count] = self._scales[:count, 0]
            self._error_max = float(self._scales[:count, 1].max())
            self._norm_max = float(self._scales[:count, 2].max())
        if self._gpu is not None:
            cp = self._cp
            self._gpu = cp.empty((cap, self.dim), cp.float16)
            self._gpu[:count] = cp.asarray(self._buf[:count])
            self._gpu_dead = cp.zeros(cap, bool)
        elif compact is not None and count * self.dim > READ_AHEAD_BYTES:
            self._codes_read.clear()
            threading.Thread(target=self._read_codes_ahead, name="nanodb-codes", daemon=True).start()

    def _read_codes_ahead(self) -> None:
        """Read the mapped codes into the page cache (2 MB pages where the file system makes them), so
        that the first searches scan memory, not the disk. They stay the file's pages: shared, never
        copied into this process's own memory."""
        with self._lock:
            codes, n = self._codes, self.mapped * self.dim
        try:
            for lo in range(0, n, READ_AHEAD_CHUNK):
                if self._stop.is_set() or not read_ahead(codes, lo, min(READ_AHEAD_CHUNK, n - lo)):
                    return
        finally:
            self._codes_read.set()

    @property
    def codes_read(self) -> bool:
        """The mapped codes were read ahead (or needed no read ahead): searches scan memory."""
        return self._codes_read.is_set()

    def close(self) -> None:
        """Drop the rows, so the data files are unmapped now rather than when garbage collected (the
        folder of a closed database can be unmounted); arrays handed out earlier keep theirs."""
        self._stop.set()
        with self._lock:
            self._buf = np.empty((0, self.dim), np.float16)
            self._codes, self._scales = np.empty((0, self.dim), np.uint8), np.empty((0, 3), np.float32)
            self._steps, self._dead = np.empty(0, np.float32), np.zeros(0, bool)
            self.count = self.mapped = 0
            for held in self._files.values():
                held.close()
            self._files = {}

    def append(self, vectors: np.ndarray) -> int:
        """Add rows (cast to float16); returns the index of the first. Searches running meanwhile see
        either none or all of them."""
        vectors = np.asarray(vectors, np.float16).reshape(-1, self.dim)
        codes, scales = quantize_rows(vectors)
        with self._lock:
            start, end = self.count, self.count + len(vectors)
            if end > len(self._buf):
                self._grow(end)
            self._buf[start:end] = vectors
            self._codes[start:end], self._scales[start:end], self._steps[start:end] = codes, scales, scales[:, 0]
            if len(vectors):
                self._error_max = max(self._error_max, float(scales[:, 1].max()))
                self._norm_max = max(self._norm_max, float(scales[:, 2].max()))
            if self._gpu is not None:
                self._gpu[start:end] = self._cp.asarray(vectors)
            self.count = end
        return start

    def delete(self, indices) -> None:
        """Exclude rows from search results (their storage stays until compaction)."""
        indices = np.asarray(list(indices), np.int64)
        with self._lock:
            self._dead[indices] = True
            if self._gpu is not None:
                self._gpu_dead[self._cp.asarray(indices)] = True
            self._any_dead = bool(self._dead[: self.count].any())

    def search(self, queries: np.ndarray, k: int, stats: dict | None = None,
               allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k rows by cosine similarity for each unit query (Q, dim) -> (indices, scores), each (Q, k').

        `allowed`, a boolean mask over the rows (those past its end are not allowed), limits the search
        to its rows: the fast pass skips the others, scoring only the allowed ones when they are few.

        `stats`, if given, receives how the passes went (for benchmarks): "fast_pass" (its kind),
        "fast_s" and "exact_s" (seconds), "rescored" (candidate rows scored exactly, all queries)."""
        queries = np.asarray(queries, np.float32).reshape(-1, self.dim)
        found = self.search_each(queries, [k] * len(queries), [allowed] * len(queries), stats)
        if not found:
            return np.zeros((0, 0), np.int64), np.zeros((0, 0), np.float32)
        # the same k and rows for all: as many results each (all the rows left when fewer than k)
        return np.stack([i for i, _ in found]), np.stack([s for _, s in found])

    def search_each(self, queries: np.ndarray, ks, allowed: list[np.ndarray | None],
                    stats: dict | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
        """For each unit query (Q, dim), its own top ks[j] rows among those allowed[j] allows (a boolean
        mask as in `search`; None: all), in one pass over the rows for all of them: [(indices, scores)].
        Each query gets exactly what it gets searched alone. Queries sharing a mask should share the
        object: the mask is applied once per segment for all of them."""
        start = time.perf_counter()
        queries = np.ascontiguousarray(np.asarray(queries, np.float32).reshape(-1, self.dim))
        with self._lock:  # a consistent snapshot; appends after it are not seen by this search
            n, buf, dead, any_dead = self.count, self._buf, self._dead, self._any_dead
            compact = self._codes, self._steps, self._error_max, self._norm_max
            gpu = None if self._gpu is None else (self._gpu, self._gpu_dead)
            self.check_files()
        ks = np.clip(np.asarray(ks, np.int64).reshape(-1), 0, n)
        found = [(np.zeros(0, np.int64), np.zeros(0, np.float32))] * len(queries)
        asked = np.flatnonzero(ks > 0)  # a query asking for no row (or of an empty index) gets none
        if len(asked) == 0:
            return found
        queries, ks = queries[asked], ks[asked]
        skip = dead[:n] if any_dead else None
        selection = self._selection(ks, [allowed[j] for j in asked], n, skip)
        try:
            if gpu is not None:
                margins = 2 * float32_error_bound(self.dim) * np.linalg.norm(queries.astype(np.float64), axis=1)
                parts = self._candidates_cupy(gpu[0], (skip, gpu[1]), selection, n, queries, margins)
            elif KERNEL is not None:
                margins, parts = candidates_compact(KERNEL, *compact, selection, n, queries)
            else:
                margins = 2 * float32_error_bound(self.dim) * np.linalg.norm(queries.astype(np.float64), axis=1)
                parts = candidates_float16(buf, selection, n, queries, margins)
            middle = time.perf_counter()
            for j, got in zip(asked, exact_top_k(buf, queries, ks, margins, parts, KERNEL, stats)):
                found[j] = got
        except DamagedRows as e:
            raise self._damaged(e.rows) from None
        if stats is not None:
            kind = "float32 cupy" if gpu is not None else fast_pass(self.dim)
            stats.update(fast_pass=kind, fast_s=middle - start, exact_s=time.perf_counter() - middle)
        return found

    @staticmethod
    def _selection(ks: np.ndarray, allowed: list[np.ndarray | None], n: int, dead: np.ndarray | None) -> Selection:
        """Each query's k and skip mask (its deleted rows and those its mask does not allow), one mask per
        distinct `allowed` object."""
        skips: list[np.ndarray | None] = []
        slot: dict[int, int] = {}
        skip_of = np.empty(len(ks), np.int64)
        for j, mask in enumerate(allowed):
            if id(mask) not in slot:
                slot[id(mask)] = len(skips)
                skip = dead
                if mask is not None:
                    kept = np.zeros(n, bool)
                    kept[: min(n, len(mask))] = mask[:n]
                    skip = ~kept if dead is None else dead | ~kept
                skips.append(skip)
            skip_of[j] = slot[id(mask)]
        return Selection(ks, skips, skip_of)

    def _damaged(self, rows: np.ndarray) -> DatabaseError:
        """The error for rows whose values no stored unit vector has: their file changed after its check."""
        held = self._files.get("vectors")
        mapped = held is not None and rows.min() < self.mapped
        where = f"{held.path} is damaged" if mapped else "the vectors are damaged"
        shown = ", ".join(map(str, rows[:5])) + (", ..." if len(rows) > 5 else "")
        return DatabaseError(f"{where}: rows {shown} are not unit vectors (changed after the database was opened); "
                             f"{REPAIR_HINT}")

    def _candidates_cupy(self, gbuf, dead, selection, n, queries, margins):
        """Float32 scores on the GPU in chunks; per chunk and query, the rows within its margin of its k-th
        best among the rows its skip mask leaves. `dead` is (the host's mask of deleted rows, the device's).

        The k-th best comes from torch.topk (a radix select): cupy's argpartition sorts whole rows."""
        import torch

        cp = self._cp
        q = cp.asarray(queries)
        gmargins = cp.asarray(margins)
        gks = cp.asarray(selection.ks)
        floor = float(np.finfo(np.float32).min)  # skipped rows (-inf) never qualify
        masks = [(None if skip is None else dead[1] if skip is dead[0] else cp.asarray(skip), cp.asarray(members))
                 for skip, members in selection.groups()]
        parts = []
        for lo in range(0, n, GPU_CHUNK_ROWS):
            hi = min(n, lo + GPU_CHUNK_ROWS)
            scores = q @ gbuf[lo:hi].astype(cp.float32).T  # (Q, rows)
            for gskip, members in masks:
                if gskip is not None:
                    scores[members] = cp.where(gskip[lo:hi][None, :], -cp.inf, scores[members])
            top = torch.topk(torch.from_dlpack(scores), min(int(selection.ks.max()), hi - lo), dim=1).values
            kth = cp.from_dlpack(top)[cp.arange(len(q)), cp.minimum(gks, hi - lo) - 1]
            qi, ri = cp.nonzero(scores >= cp.maximum(kth - gmargins, floor)[:, None])
            parts.append((qi.get(), ri.get() + lo, scores[qi, ri].get()))
        return parts

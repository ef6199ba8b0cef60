"""Exact k-nearest-neighbour search by cosine similarity over unit float16 vectors.

The vectors live in one growable float16 array (and, with CuPy and a GPU, a mirror on the device),
beside a compact copy: each row quantized to 8 bits with its own step (`quantize_rows`), so rows are
appended independently of each other. A search runs in two passes. The fast pass scores every row
approximately and keeps, per query, every row that could still be in the top k given a proven bound
on its error; the exact pass rescores those few candidates in float64 from the float16 rows and orders
them by score, ties to the lower index. So every path returns the float64 brute-force top k of the
float16 rows, never sorts all N scores, and never holds a float32 copy.

Fast passes: on the CPU, the compact copy scored by a small C kernel (`nanodb/storage/_scan.c`, AVX-512 VNNI
where the CPU has it; half the bytes of float16; loaded by `kernel`), or, when that kernel was not built
or does not match this code, the float16 rows converted block by block into a small float32 scratch and
scored by BLAS; on a GPU, float32 on CuPy.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from nanodb.storage.kernel import built_kernel

log = logging.getLogger(__name__)

SCRATCH_BYTES = 4 << 20  # float32 rows converted at a time per thread: stays in cache
SEGMENT_ROWS = 1 << 19  # most rows one CPU task scores before selecting its candidates
SEGMENT_SCORES_BYTES = 16 << 20  # float32 scores one task holds: a batch of queries gets shorter segments
GPU_CHUNK_ROWS = 1 << 18  # rows scored per GPU step: bounds the float32 scores on the device
ROW_NORM_MAX = 1.01  # stored rows are unit vectors rounded to float16
BLOCK_ROWS = 256  # rows per block of the compact pass: a block's best score bounds the k-th from below
EXACT_ROWS = 1024  # candidates rescored at a time: float64 temporaries that stay in cache
EXACT_PARALLEL_ROWS = 4096  # fewer candidates than this are rescored by one thread (a single query's)

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()
_scratch = threading.local()


def cupy_available() -> bool:
    """True when CuPy imports and sees a CUDA device."""
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # ImportError, or CUDA driver/runtime errors from a machine without a GPU
        return False


KERNEL = built_kernel()


def fast_pass(dim: int) -> str:
    """Which CPU fast pass searches rows of `dim`: "int8 vnni", "int8 c" or "float16 blas" (no kernel built)."""
    if KERNEL is None:
        return "float16 blas"
    return "int8 vnni" if KERNEL.nanodb_vnni(dim) else "int8 c"


QUANT_CHUNK = 1024  # rows quantized at a time: float64 temporaries that stay in cache (10x faster than 32K)


def quantize_rows(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The compact copy of float16 rows: (codes, scales).

    codes (n, dim) uint8: 128 + the 8-bit code c of each value, c = round(x / step) in [-127, 127].
    scales (n, 3) float32: step, an upper bound on ||x - step * c||_2 and one on ||x||_2, computed from
    the codes actually stored, so the bound holds whatever rounding produced them. Each row has its own
    step: rows are quantized independently, so appending never touches earlier rows."""
    rows = np.asarray(rows, np.float16)
    n = len(rows)
    codes = np.empty(rows.shape, np.uint8)
    scales = np.empty((n, 3), np.float32)
    for a in range(0, n, QUANT_CHUNK):
        x = rows[a : a + QUANT_CHUNK].astype(np.float64)
        step = (np.abs(x).max(axis=1, initial=0) / 127).astype(np.float32)
        step[~(step > 0)] = 1  # a zero row (any step is exact) or a non-finite one (its bound is inf)
        c = np.clip(np.rint(x / step[:, None]), -127, 127)
        err = x - c * step[:, None].astype(np.float64)  # exact: a float32 times a small integer
        codes[a : a + QUANT_CHUNK] = (c + 128).astype(np.uint8)
        scales[a : a + QUANT_CHUNK, 0] = step
        scales[a : a + QUANT_CHUNK, 1] = _round_up(np.sqrt((err * err).sum(axis=1)))
        scales[a : a + QUANT_CHUNK, 2] = _round_up(np.sqrt((x * x).sum(axis=1)))
    return codes, scales


def _round_up(v: np.ndarray) -> np.ndarray:
    """float64 -> float32 no smaller, with room for the float64 rounding of a sum of squares."""
    return np.nextafter((v * (1 + 1e-9)).astype(np.float32), np.float32(np.inf))


# A mapped compact copy larger than this is copied into anonymous memory by a background thread after
# opening: the fast pass scans it ~2.5x faster there (huge pages) than through a file's 4 KB pages
# (measured at 10M x 512; benchmarks/RESULTS.md). Searches use the mapping until the copy is done.
COMPACT_TO_MEMORY_BYTES = 64 << 20
COPY_CHUNK = 16 << 20
MAP_FIXED, MAP_NORESERVE = 0x10, 0x4000  # Linux values; the mmap module does not export them
if sys.platform == "linux":
    _LIBC = ctypes.CDLL(None, use_errno=True)
    _LIBC.mmap.restype = ctypes.c_void_p
    _LIBC.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                           ctypes.c_int64]


def file_backed_rows(path: Path, rows: int, row_shape: tuple[int, ...], dtype, capacity: int,
                     random_access: bool = False) -> np.ndarray:
    """A writable (capacity, *row_shape) array whose first `rows` rows are the first bytes of `path`,
    mapped copy-on-write, and whose other rows are anonymous memory for appends.

    Opening costs no read: pages of the file are read when first touched (and shared with the page
    cache, not copied), and writes to them stay private to this process, never reaching the file. The
    whole capacity is one contiguous array, so appends need no second part. `random_access` turns off
    read-ahead (rows read one by one, e.g. candidates rescored). Off Linux, or when mapping fails, the
    rows are read into memory instead."""
    dtype = np.dtype(dtype)
    row_bytes = dtype.itemsize * int(np.prod(row_shape, dtype=np.int64))
    file_bytes = rows * row_bytes
    total = max(capacity * row_bytes, mmap.PAGESIZE)
    if sys.platform == "linux":
        region = mmap.mmap(-1, total, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE)
        if file_bytes and not _map_file_over(region, path, file_bytes, random_access):
            region = None
    else:
        region = None
    if region is None:
        region = bytearray(total)
        if file_bytes:
            with open(path, "rb") as f:
                f.readinto(memoryview(region)[:file_bytes])
    return np.frombuffer(region, dtype, capacity * row_bytes // dtype.itemsize).reshape(capacity, *row_shape)


def _map_file_over(region: mmap.mmap, path: Path, nbytes: int, random_access: bool) -> bool:
    """Map the first `nbytes` of `path` copy-on-write over the start of `region` (which keeps owning
    the address range: unmapping it unmaps the file too). False when the kernel refuses."""
    anchor = ctypes.c_char.from_buffer(region)
    addr = ctypes.addressof(anchor)
    del anchor  # releases the buffer export: the region can be closed when its arrays are gone
    fd = os.open(path, os.O_RDONLY)
    try:
        got = _LIBC.mmap(addr, nbytes, mmap.PROT_READ | mmap.PROT_WRITE,
                         mmap.MAP_PRIVATE | MAP_FIXED | MAP_NORESERVE, fd, 0)
    finally:
        os.close(fd)
    if got != addr:
        log.warning("cannot map %s (errno %d): reading it into memory", path, ctypes.get_errno())
        return False
    if random_access:
        region.madvise(mmap.MADV_RANDOM, 0, -(-nbytes // mmap.PAGESIZE) * mmap.PAGESIZE)
    return True


def select_top_k(scores: np.ndarray, indices: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Best k per row of `scores` (Q, M), highest first, ties to the lower index; never sorts all M."""
    k = min(k, scores.shape[1])
    if k < scores.shape[1]:
        kth = np.partition(scores, scores.shape[1] - k, axis=1)[:, -k, None]
        qi, ci = np.nonzero(scores >= kth)  # k per row, more where the k-th score is tied
        order = np.lexsort((indices[qi, ci], -scores[qi, ci], qi))
        qi, ci = qi[order], ci[order]
        keep = np.arange(len(qi)) - np.searchsorted(qi, qi) < k
        return indices[qi, ci][keep].reshape(-1, k), scores[qi, ci][keep].reshape(-1, k)
    order = np.lexsort((indices, -scores), axis=1)
    return np.take_along_axis(indices, order, axis=1), np.take_along_axis(scores, order, axis=1)


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
        self._files: dict[str, Path] = {}
        self._stop = threading.Event()
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
        return self._buf[: self.count]

    @property
    def dead(self) -> np.ndarray:
        return self._dead[: self.count]

    @property
    def codes(self) -> np.ndarray:
        """The compact copy's codes, (count, dim) uint8 (see quantize_rows)."""
        return self._codes[: self.count]

    @property
    def scales(self) -> np.ndarray:
        """The compact copy's per-row step and bounds, (count, 3) float32 (see quantize_rows)."""
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

    def _grown(self, kind: str, old: np.ndarray, cap: int) -> np.ndarray:
        """A copy of `old` with room for `cap` rows: the mapped rows are mapped again, not copied."""
        path = self._files.get(kind)
        if path is None:
            new, start = np.empty((cap, *old.shape[1:]), old.dtype), 0
        else:
            new = file_backed_rows(path, self.mapped, old.shape[1:], old.dtype, cap, kind == "vectors")
            start = self.mapped
        new[start : self.count] = old[start : self.count]
        return new

    def load_files(self, count: int, vectors: Path, compact: tuple[Path, Path] | None = None) -> None:
        """Fill a fresh index with the first `count` rows of data files, mapped (file_backed_rows), not
        read: `vectors` holds float16 rows, `compact` their codes and scales (else they are computed,
        which reads every row). The caller has checked the files are long enough: a file shortened
        while mapped makes touching its lost pages fatal (SIGBUS), and nanodb only ever appends."""
        cap = max(1024, count + count // 2)  # address space only: nothing is allocated until appended
        self._files = {"vectors": vectors}
        self.mapped = count
        self._buf = file_backed_rows(vectors, count, (self.dim,), np.float16, cap, random_access=True)
        if compact is not None:
            self._files.update(codes=compact[0], scales=compact[1])
            self._codes = file_backed_rows(compact[0], count, (self.dim,), np.uint8, cap)
            self._scales = file_backed_rows(compact[1], count, (3,), np.float32, cap)
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
        elif compact is not None and count * self.dim > COMPACT_TO_MEMORY_BYTES:
            threading.Thread(target=self._copy_codes_to_memory, name="nanodb-codes", daemon=True).start()

    def _copy_codes_to_memory(self) -> None:
        """Read the mapped codes into anonymous memory, then search that: read from the file, not the
        mapping, so the process never holds both copies."""
        with self._lock:
            path, n, cap = self._files.get("codes"), self.mapped, len(self._codes)
        if path is None:
            return
        fresh = np.empty((cap, self.dim), np.uint8)
        view = memoryview(fresh[:n]).cast("B")
        try:
            with open(path, "rb", buffering=0) as f:
                for lo in range(0, len(view), COPY_CHUNK):
                    chunk = view[lo : lo + COPY_CHUNK]
                    if self._stop.is_set() or f.readinto(chunk) != len(chunk):
                        return
        except OSError as e:
            log.warning("cannot read %s into memory (%s): searching the mapped file", path, e)
            return
        with self._lock:
            if self._files.get("codes") != path or self._stop.is_set():
                return
            if len(self._codes) != cap:  # grown meanwhile
                grown = np.empty((len(self._codes), self.dim), np.uint8)
                grown[:n] = fresh[:n]
                fresh = grown
            fresh[n : self.count] = self._codes[n : self.count]
            self._codes = fresh
            del self._files["codes"]

    @property
    def codes_in_memory(self) -> bool:
        """The compact copy's codes are in anonymous memory, not (or no longer) read through a mapping."""
        return "codes" not in self._files

    def close(self) -> None:
        """Drop the rows, so the data files are unmapped now rather than when garbage collected (the
        folder of a closed database can be unmounted); arrays handed out earlier keep theirs."""
        self._stop.set()
        with self._lock:
            self._buf = np.empty((0, self.dim), np.float16)
            self._codes, self._scales = np.empty((0, self.dim), np.uint8), np.empty((0, 3), np.float32)
            self._steps, self._dead = np.empty(0, np.float32), np.zeros(0, bool)
            self.count = self.mapped = 0
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

    def search(self, queries: np.ndarray, k: int, stats: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k rows by cosine similarity for each unit query (Q, dim) -> (indices, scores), each (Q, k').

        `stats`, if given, receives how the passes went (for benchmarks): "fast_pass" (its kind),
        "fast_s" and "exact_s" (seconds), "rescored" (candidate rows scored exactly, all queries)."""
        start = time.perf_counter()
        queries = np.ascontiguousarray(np.asarray(queries, np.float32).reshape(-1, self.dim))
        with self._lock:  # a consistent snapshot; appends after it are not seen by this search
            n, buf, dead, any_dead = self.count, self._buf, self._dead, self._any_dead
            compact = self._codes, self._steps, self._error_max, self._norm_max
            gpu = None if self._gpu is None else (self._gpu, self._gpu_dead)
        k = max(0, min(int(k), n))
        if k == 0 or len(queries) == 0:
            return np.zeros((len(queries), 0), np.int64), np.zeros((len(queries), 0), np.float32)
        dead = dead if any_dead else None
        if gpu is not None:
            margins = 2 * float32_error_bound(self.dim) * np.linalg.norm(queries.astype(np.float64), axis=1)
            parts = self._candidates_cupy(gpu[0], gpu[1] if any_dead else None, n, queries, k, margins)
        elif KERNEL is not None:
            margins, parts = _candidates_compact(*compact, dead, n, queries, k)
        else:
            margins = 2 * float32_error_bound(self.dim) * np.linalg.norm(queries.astype(np.float64), axis=1)
            parts = _candidates_cpu(buf, dead, n, queries, k, margins)
        middle = time.perf_counter()
        result = _exact_top_k(buf, queries, k, margins, parts, stats)
        if stats is not None:
            kind = "float32 cupy" if gpu is not None else fast_pass(self.dim)
            stats.update(fast_pass=kind, fast_s=middle - start, exact_s=time.perf_counter() - middle)
        return result

    def _candidates_cupy(self, gbuf, gdead, n, queries, k, margins):
        """Float32 scores on the GPU in chunks; per chunk, the rows within `margins` of its k-th best.

        The k-th best comes from torch.topk (a radix select): cupy's argpartition sorts whole rows."""
        import torch

        cp = self._cp
        q = cp.asarray(queries)
        gmargins = cp.asarray(margins)
        floor = float(np.finfo(np.float32).min)  # deleted rows (-inf) never qualify
        parts = []
        for lo in range(0, n, GPU_CHUNK_ROWS):
            hi = min(n, lo + GPU_CHUNK_ROWS)
            scores = q @ gbuf[lo:hi].astype(cp.float32).T  # (Q, rows)
            if gdead is not None:
                scores = cp.where(gdead[lo:hi], -cp.inf, scores)
            top = torch.topk(torch.from_dlpack(scores), min(k, hi - lo), dim=1, sorted=False).values
            kth = cp.from_dlpack(top.min(dim=1).values)
            qi, ri = cp.nonzero(scores >= cp.maximum(kth - gmargins, floor)[:, None])
            parts.append((qi.get(), ri.get() + lo, scores[qi, ri].get()))
        return parts


def float32_error_bound(dim: int) -> float:
    """Largest |float32 dot - exact dot| of a unit query with a stored row, in any summation order."""
    u = 2.0**-24
    return dim * u / (1 - dim * u) * ROW_NORM_MAX


def search_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _search_pool() -> ThreadPoolExecutor:
    """One worker per core. Their torch thread count is left alone: torch.set_num_threads in any
    thread changes it for every thread started later (the CLIP model's included)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(search_threads(), "nanodb-search")
        return _pool


def segment_rows(n: int, nq: int) -> int:
    """Rows per CPU task: one task per core for a single query (each task costs a wake-up and a
    selection; measured 28.5 ms against 32 ms for 64K-row tasks at 1M x 512), shorter for batches so
    each task's scores stay within SEGMENT_SCORES_BYTES."""
    per_core = -(-n // search_threads())
    return max(4096, min(SEGMENT_ROWS, SEGMENT_SCORES_BYTES // (4 * max(nq, 1)), per_core))


def _candidates_cpu(buf, dead, n, queries, k, margins):
    """Segments of rows scored in parallel; each returns its candidates (query, row, float32 score)."""
    import torch

    seg = segment_rows(n, len(queries))
    q = torch.from_numpy(queries)
    tasks = [(lo, min(n, lo + seg)) for lo in range(0, n, seg)]
    run = lambda span: _segment_candidates(buf, dead, *span, q, k, margins)  # noqa: E731
    return list(_search_pool().map(run, tasks)) if len(tasks) > 1 else [run(tasks[0])]


def _segment_candidates(buf, dead, lo, hi, q, k, margins):
    import torch

    rows, dim = hi - lo, buf.shape[1]
    block = max(1, SCRATCH_BYTES // (4 * dim))
    scratch = getattr(_scratch, "rows", None)
    if scratch is None or scratch.shape != (block, dim):
        scratch = _scratch.rows = torch.empty((block, dim), dtype=torch.float32)
    src = torch.from_numpy(buf[lo:hi])
    out = torch.empty((rows, len(q)), dtype=torch.float32)
    for b in range(0, rows, block):
        e = min(rows, b + block)
        rows32 = scratch[: e - b]
        rows32.copy_(src[b:e])  # float16 -> float32, vectorised, in cache
        if len(q) == 1:
            torch.mv(rows32, q[0], out=out[b:e, 0])
        else:
            torch.mm(rows32, q.T, out=out[b:e])
    scores = np.ascontiguousarray(out.numpy().T)  # (Q, rows)
    if dead is not None:
        scores[:, dead[lo:hi]] = -np.inf
    kk = min(k, rows)
    kth = np.partition(scores, rows - kk, axis=1)[:, rows - kk]
    floor = np.finfo(np.float32).min  # deleted rows (-inf) never qualify
    qi, ri = np.nonzero(scores >= np.maximum(kth - margins, floor)[:, None])
    return qi, ri + lo, scores[qi, ri]


def quantize_queries(queries: np.ndarray):
    """8-bit codes of float32 queries, each with its own step: (codes int8, 128 * sum of codes, steps,
    an upper bound on ||q - step * code||_2, one on ||step * code||_2)."""
    q = queries.astype(np.float64)
    step = (np.abs(q).max(axis=1, initial=0) / 127).astype(np.float32)
    step[~(step > 0)] = 1
    c = np.clip(np.rint(q / step[:, None]), -127, 127)
    approx = c * step[:, None].astype(np.float64)
    codes = np.ascontiguousarray(c.astype(np.int8))
    offsets = 128 * codes.sum(axis=1, dtype=np.int32)
    d = np.sqrt(((q - approx) ** 2).sum(axis=1)) * (1 + 1e-9)
    return codes, offsets, step, d, np.sqrt((approx**2).sum(axis=1)) * (1 + 1e-9)


def compact_error_bound(error_max: float, norm_max: float, query_error, query_norm):
    """Largest |kernel score - exact score| of each query against any row.

    With row x = x' + e (x' its codes times step, ||e|| <= error_max, ||x|| <= norm_max) and query
    q = q' + d: q.x - q'.x' = q'.e + d.x, so |q'.e| <= ||q'|| error_max and |d.x| <= ||d|| norm_max
    (Cauchy-Schwarz). The kernel's integer sum is exact; its float32 conversion and two products round
    at most 3 times (relative 2**-24 each) a value no larger than ||q'|| (norm_max + error_max)."""
    exact_part = query_norm * error_max + query_error * norm_max
    return exact_part + 4 * 2.0**-24 * query_norm * (norm_max + error_max)


def _candidates_compact(codes, steps, error_max, norm_max, dead, n, queries, k):
    """The compact pass: segments of rows scored by the kernel in parallel; (margins, candidates)."""
    qc, offsets, qsteps, qerr, qnorm = quantize_queries(queries)
    margins = 2 * compact_error_bound(error_max, norm_max, qerr, qnorm)
    seg = -(-segment_rows(n, len(queries)) // BLOCK_ROWS) * BLOCK_ROWS
    query = (qc, offsets, qsteps)
    run = lambda lo: _segment_compact(codes, steps, dead, lo, min(n, lo + seg), query, k, margins)  # noqa: E731
    starts = range(0, n, seg)
    return margins, list(_search_pool().map(run, starts)) if len(starts) > 1 else [run(0)]


def _segment_compact(codes, steps, dead, lo, hi, query, k, margins):
    """Candidates of rows lo:hi. The k-th best of the blocks' best scores is at most the segment's k-th
    best score, so every row within `margins` of it is kept, found query by query (a per-query
    flatnonzero: 2 ms for 64 queries x 50K rows, against 9 ms gathering the blocks that qualify, most
    of them at this margin)."""
    qc, offsets, qsteps = query
    nq, dim = qc.shape
    rows = hi - lo
    nb = -(-rows // BLOCK_ROWS)
    out = _scores_scratch(nq * nb * BLOCK_ROWS).reshape(nq, nb * BLOCK_ROWS)
    out[:, rows:] = -np.inf
    KERNEL.nanodb_scores(codes[lo:hi].ctypes.data, steps[lo:hi].ctypes.data, rows, dim, qc.ctypes.data,
                         offsets.ctypes.data, qsteps.ctypes.data, nq, out.ctypes.data, out.shape[1])
    if dead is not None:
        out[:, np.flatnonzero(dead[lo:hi])] = -np.inf
    if nb >= k:
        kth = np.partition(out.reshape(nq, nb, BLOCK_ROWS).max(axis=2), nb - k, axis=1)[:, nb - k]
    else:  # fewer blocks than k: no bound from them, every live row is a candidate
        kth = np.full(nq, -np.inf, np.float32)
    floor = np.finfo(np.float32).min  # deleted rows (-inf) never qualify
    # float32 thresholds no larger than the float64 ones: a few more candidates, never one fewer
    threshold = np.maximum(np.nextafter((kth - margins).astype(np.float32), np.float32(-np.inf)), floor)
    hits = [np.flatnonzero(out[j, :rows] >= threshold[j]) for j in range(nq)]
    qi = np.repeat(np.arange(nq), [len(h) for h in hits])
    ri = np.concatenate(hits)
    return qi, ri + lo, out[qi, ri]


def _scores_scratch(size: int) -> np.ndarray:
    """This thread's float32 buffer for a segment's scores, kept between searches: a fresh 16 MB
    array each time costs its page faults again."""
    buf = getattr(_scratch, "scores", None)
    if buf is None or len(buf) < size:
        buf = _scratch.scores = np.empty(size, np.float32)
    return buf[:size]


def _exact_top_k(buf, queries, k, margins, parts, stats=None):
    """From every part's candidates: the top k per query by float64 score, ties to the lower index.

    `margins` is twice the fast pass's error bound. A row of the true top k scores (fast pass) at
    least the k-th best fast score minus the margin, in its segment and overall; so the candidates
    contain it, and float64 decides."""
    qi = np.concatenate([p[0] for p in parts]).astype(np.int64)
    rows = np.concatenate([p[1] for p in parts]).astype(np.int64)
    s32 = np.concatenate([p[2] for p in parts])
    nq = len(queries)
    kk = min(k, int(np.bincount(qi, minlength=nq).min()))  # fewer than k live rows: all are candidates
    if kk == 0:
        return np.zeros((nq, 0), np.int64), np.zeros((nq, 0), np.float32)
    order = np.argsort(qi, kind="stable")  # grouped by query (a radix sort of small integers)
    qi, rows, s32 = qi[order], rows[order], s32[order]
    bounds = np.searchsorted(qi, np.arange(nq + 1))
    kth = np.array([np.partition(s32[a:b], b - a - kk)[b - a - kk] for a, b in zip(bounds[:-1], bounds[1:])])
    keep = s32 >= kth[qi] - margins[qi]
    qi, rows = qi[keep], rows[keep]
    if stats is not None:
        stats["rescored"] = len(rows)
    exact = float64_dots(buf, rows, queries.astype(np.float64), qi)
    best_i = np.empty((nq, kk), np.int64)
    best_s = np.empty((nq, kk), np.float32)
    bounds = np.searchsorted(qi, np.arange(nq + 1))
    for j in range(nq):
        a, b = bounds[j], bounds[j + 1]
        ti, ts = select_top_k(exact[None, a:b], rows[None, a:b], kk)
        best_i[j], best_s[j] = ti[0], ts[0]
    return best_i, best_s


def float64_dots(buf: np.ndarray, rows: np.ndarray, queries: np.ndarray, qi: np.ndarray) -> np.ndarray:
    """buf[rows[i]] . queries[qi[i]] in float64 for float16 rows: each product of a float16 and a
    float32 value (widened) is exact, only the sums round. The C kernel's AVX-512 loop where it runs
    (64 queries at 100K x 512, 19K candidates: ~1 ms against 17 ms for NumPy, whose float16
    conversion is not vectorised); else NumPy in cache-sized slices (einsum sums 4x faster than a
    product array and .sum)."""
    out = np.empty(len(rows))
    dim = buf.shape[1]
    if KERNEL is not None and KERNEL.nanodb_dots_ok(dim) and buf.flags.c_contiguous and len(rows):
        rows, qi = np.ascontiguousarray(rows, np.int64), np.ascontiguousarray(qi, np.int64)
        queries = np.ascontiguousarray(queries, np.float64)

        def run(span):
            a, b = span
            KERNEL.nanodb_dots(buf.ctypes.data, rows[a:].ctypes.data, b - a, dim, queries.ctypes.data,
                               qi[a:].ctypes.data, out[a:].ctypes.data)

        step = max(EXACT_PARALLEL_ROWS, -(-len(rows) // search_threads()))
        spans = [(a, min(len(rows), a + step)) for a in range(0, len(rows), step)]
        list(_search_pool().map(run, spans)) if len(spans) > 1 else run(spans[0])
        return out
    for a in range(0, len(rows), EXACT_ROWS):
        np.einsum("ij,ij->i", buf[rows[a : a + EXACT_ROWS]].astype(np.float64), queries[qi[a : a + EXACT_ROWS]],
                  out=out[a : a + EXACT_ROWS])
    return out

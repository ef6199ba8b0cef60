"""Exact k-nearest-neighbour search by cosine similarity over unit float16 vectors.

The vectors live in one growable float16 array (and, with CuPy and a GPU, a mirror on the device).
A search runs in two passes. The fast pass scores every row in float32 (on the CPU: float16 blocks
converted into a small per-thread float32 scratch, then BLAS, one thread per core) and keeps, per
query, every row that could still be in the top k given float32 rounding. The exact pass rescores
those few candidates in float64 and orders them by score, ties to the lower index. So both backends
return the float64 brute-force top k, never sort all N scores, and never hold a float32 copy.
"""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

log = logging.getLogger(__name__)

SCRATCH_BYTES = 4 << 20  # float32 rows converted at a time per thread: stays in cache
SEGMENT_ROWS = 1 << 16  # rows one CPU task scores before selecting its candidates
GPU_CHUNK_ROWS = 1 << 18  # rows scored per GPU step: bounds the float32 scores on the device
ROW_NORM_MAX = 1.01  # stored rows are unit vectors rounded to float16

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
        self.count = 0
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

    def _grow(self, need: int) -> None:
        cap = max(need, 1024, int(len(self._buf) * 1.5))
        buf = np.empty((cap, self.dim), np.float16)
        buf[: self.count] = self._buf[: self.count]
        dead = np.zeros(cap, bool)
        dead[: self.count] = self._dead[: self.count]
        self._buf, self._dead = buf, dead
        if self._gpu is not None:
            cp = self._cp
            gpu = cp.empty((cap, self.dim), cp.float16)
            gpu[: self.count] = self._gpu[: self.count]
            gdead = cp.zeros(cap, bool)
            gdead[: self.count] = self._gpu_dead[: self.count]
            self._gpu, self._gpu_dead = gpu, gdead

    def reserve(self, n: int) -> None:
        with self._lock:
            if n > len(self._buf):
                self._grow(n)

    def load(self, read_into) -> None:
        """Fill a fresh index from storage: `read_into(buffer_view)` writes count x dim float16 rows."""
        if self.count:
            read_into(memoryview(self._buf[: self.count]).cast("B"))
        if self._gpu is not None:
            self._gpu[: self.count] = self._cp.asarray(self._buf[: self.count])

    def append(self, vectors: np.ndarray) -> int:
        """Add rows (cast to float16); returns the index of the first. Searches running meanwhile see
        either none or all of them."""
        vectors = np.asarray(vectors, np.float16).reshape(-1, self.dim)
        with self._lock:
            start, end = self.count, self.count + len(vectors)
            if end > len(self._buf):
                self._grow(end)
            self._buf[start:end] = vectors
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

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k rows by cosine similarity for each unit query (Q, dim) -> (indices, scores), each (Q, k')."""
        queries = np.ascontiguousarray(np.asarray(queries, np.float32).reshape(-1, self.dim))
        with self._lock:  # a consistent snapshot; appends after it are not seen by this search
            n, buf, dead, any_dead = self.count, self._buf, self._dead, self._any_dead
            gpu = None if self._gpu is None else (self._gpu, self._gpu_dead)
        k = max(0, min(int(k), n))
        if k == 0 or len(queries) == 0:
            return np.zeros((len(queries), 0), np.int64), np.zeros((len(queries), 0), np.float32)
        margins = 2 * float32_error_bound(self.dim) * np.linalg.norm(queries.astype(np.float64), axis=1)
        if gpu is not None:
            parts = self._candidates_cupy(gpu[0], gpu[1] if any_dead else None, n, queries, k, margins)
        else:
            parts = _candidates_cpu(buf, dead if any_dead else None, n, queries, k, margins)
        return _exact_top_k(buf, queries, k, margins, parts)

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


def _candidates_cpu(buf, dead, n, queries, k, margins):
    """Segments of rows scored in parallel; each returns its candidates (query, row, float32 score)."""
    import torch

    seg = min(SEGMENT_ROWS, max(4096, -(-n // search_threads())))
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


def _exact_top_k(buf, queries, k, margins, parts):
    """From every part's candidates: the top k per query by float64 score, ties to the lower index.

    A row of the true top k scores (float32) at least the k-th best float32 score minus twice the
    error bound, in its segment and overall; so the candidates contain it, and float64 decides."""
    qi = np.concatenate([p[0] for p in parts]).astype(np.int64)
    rows = np.concatenate([p[1] for p in parts]).astype(np.int64)
    s32 = np.concatenate([p[2] for p in parts])
    nq = len(queries)
    counts = np.bincount(qi, minlength=nq)
    kk = min(k, int(counts.min()))  # fewer than k live rows: every live row is a candidate
    if kk == 0:
        return np.zeros((nq, 0), np.int64), np.zeros((nq, 0), np.float32)
    order = np.lexsort((-s32, qi))
    qi, rows, s32 = qi[order], rows[order], s32[order]
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    kth = s32[starts + kk - 1]
    keep = s32 >= kth[qi] - margins[qi]
    qi, rows = qi[keep], rows[keep]
    q64 = queries.astype(np.float64)
    exact = np.concatenate(  # in slices: many exact ties (duplicate rows) make many candidates
        [
            (buf[rows[a : a + 8192]].astype(np.float64) * q64[qi[a : a + 8192]]).sum(axis=1)
            for a in range(0, len(rows), 8192)
        ]
    )
    best_i = np.empty((nq, kk), np.int64)
    best_s = np.empty((nq, kk), np.float32)
    bounds = np.searchsorted(qi, np.arange(nq + 1))
    for j in range(nq):
        a, b = bounds[j], bounds[j + 1]
        ti, ts = select_top_k(exact[None, a:b], rows[None, a:b], kk)
        best_i[j], best_s[j] = ti[0], ts[0]
    return best_i, best_s

"""Exact k-nearest-neighbour search by cosine similarity over unit float16 vectors.

The vectors live in one growable float16 array (and, with CuPy and a GPU, a mirror on the device).
Both backends score in float32 and break ties by the lower index, so they return the same results.
"""

from __future__ import annotations

import logging
import threading

import numpy as np

log = logging.getLogger(__name__)

CHUNK_ROWS = 1 << 15  # rows scored at a time: bounds the float32 scratch memory


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
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        scores = np.take_along_axis(scores, part, axis=1)
        indices = np.take_along_axis(indices, part, axis=1)
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
        if k == 0:
            return np.zeros((len(queries), 0), np.int64), np.zeros((len(queries), 0), np.float32)
        if gpu is not None:
            return self._search_cupy(gpu[0], gpu[1] if any_dead else None, n, queries, k)
        best_i = np.zeros((len(queries), 0), np.int64)
        best_s = np.zeros((len(queries), 0), np.float32)
        for lo in range(0, n, CHUNK_ROWS):
            hi = min(n, lo + CHUNK_ROWS)
            scores = queries @ buf[lo:hi].astype(np.float32).T  # (Q, rows)
            if any_dead:
                scores[:, dead[lo:hi]] = -np.inf
            idx = np.broadcast_to(np.arange(lo, hi), scores.shape)
            ci, cs = select_top_k(scores, idx, k)
            best_i, best_s = select_top_k(np.hstack([best_s, cs]), np.hstack([best_i, ci]), k)
        return self._drop_dead(best_i, best_s)

    def _search_cupy(self, gbuf, gdead, n, queries, k):
        cp = self._cp
        q = cp.asarray(queries)
        best_i = np.zeros((len(queries), 0), np.int64)
        best_s = np.zeros((len(queries), 0), np.float32)
        for lo in range(0, n, CHUNK_ROWS * 8):
            hi = min(n, lo + CHUNK_ROWS * 8)
            scores = q @ gbuf[lo:hi].astype(cp.float32).T
            if gdead is not None:
                scores[:, gdead[lo:hi]] = -cp.inf
            kk = min(k, hi - lo)
            part = cp.argpartition(-scores, kk - 1, axis=1)[:, :kk] if kk < hi - lo else cp.broadcast_to(
                cp.arange(hi - lo), scores.shape
            )
            cs = cp.take_along_axis(scores, part, axis=1).get()
            ci = part.get().astype(np.int64) + lo
            best_i, best_s = select_top_k(np.hstack([best_s, cs]), np.hstack([best_i, ci]), k)
        return self._drop_dead(best_i, best_s)

    @staticmethod
    def _drop_dead(idx: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Deleted rows score -inf and sort last; when fewer than k rows are live, trim the rest."""
        keep = int(np.isfinite(scores[0]).sum()) if len(scores) else 0
        return idx[:, :keep], scores[:, :keep]

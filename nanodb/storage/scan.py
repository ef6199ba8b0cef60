"""The CPU fast passes: rows split into segments scored in parallel, each segment keeping, per query, the
rows within a margin of its k-th best score (twice the pass's proven error bound), so the exact pass
(`exact`) gets every row of the true top k.

The compact pass scores the 8-bit copy (`compact`) with the C kernel (`kernel`); the float16 pass, for
when no kernel is loaded, converts the float16 rows block by block into a small float32 scratch and
scores them by BLAS.

Both take `skip`, the rows never to return (deleted, or not allowed by a search's filters; None: none):
a segment where few rows are left scores those alone (a gather), others score all and drop the skipped.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from nanodb.storage.compact import compact_error_bound, quantize_queries

SCRATCH_BYTES = 4 << 20  # float32 rows converted at a time per thread: stays in cache
SEGMENT_ROWS = 1 << 19  # most rows one CPU task scores before selecting its candidates
SEGMENT_SCORES_BYTES = 16 << 20  # float32 scores one task holds: a batch of queries gets shorter segments
ROW_NORM_MAX = 1.01  # stored rows are unit vectors rounded to float16
BLOCK_ROWS = 256  # rows per block of the compact pass: a block's best score bounds the k-th from below
GATHER_SHARE = 4  # a segment with at most 1/GATHER_SHARE of its rows left scores those alone

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()
_scratch = threading.local()


class DamagedRows(ValueError):
    """Rows whose float16 values no stored unit vector has (NaN, infinite, or a score no unit row can
    reach): their data file changed after it was checked. VectorIndex names the file."""

    def __init__(self, rows: np.ndarray):
        self.rows = np.unique(rows)
        super().__init__(f"rows {self.rows[:5].tolist()} are damaged")


def float32_error_bound(dim: int) -> float:
    """Largest |float32 dot - exact dot| of a unit query with a stored row, in any summation order."""
    u = 2.0**-24
    return dim * u / (1 - dim * u) * ROW_NORM_MAX


def search_threads() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def search_pool() -> ThreadPoolExecutor:
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


def rows_left(skip: np.ndarray | None, lo: int, hi: int) -> np.ndarray | None:
    """The rows of lo:hi not skipped when they are few enough to score alone (a gather), else None."""
    if skip is None:
        return None
    left = np.flatnonzero(~skip[lo:hi])
    return left + lo if len(left) * GATHER_SHARE <= hi - lo else None


def candidates_float16(buf, skip, n, queries, k, margins):
    """The float16 pass: segments of rows scored in parallel by BLAS; each returns its candidates (query,
    row, float32 score)."""
    import torch

    seg = segment_rows(n, len(queries))
    q = torch.from_numpy(queries)
    tasks = [(lo, min(n, lo + seg)) for lo in range(0, n, seg)]
    run = lambda span: _segment_candidates(buf, skip, *span, q, k, margins)  # noqa: E731
    return list(search_pool().map(run, tasks)) if len(tasks) > 1 else [run(tasks[0])]


def _segment_candidates(buf, skip, lo, hi, q, k, margins):
    import torch

    listed = rows_left(skip, lo, hi)
    rows, dim = hi - lo if listed is None else len(listed), buf.shape[1]
    if rows == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    block = max(1, SCRATCH_BYTES // (4 * dim))
    scratch = getattr(_scratch, "rows", None)
    if scratch is None or scratch.shape != (block, dim):
        scratch = _scratch.rows = torch.empty((block, dim), dtype=torch.float32)
    src = torch.from_numpy(buf[lo:hi] if listed is None else buf[listed])
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
    finite = np.isfinite(scores).all(axis=0)
    if not finite.all():
        raise DamagedRows(lo + np.flatnonzero(~finite) if listed is None else listed[~finite])
    if skip is not None and listed is None:
        scores[:, skip[lo:hi]] = -np.inf
    kk = min(k, rows)
    kth = np.partition(scores, rows - kk, axis=1)[:, rows - kk]
    floor = np.finfo(np.float32).min  # skipped rows (-inf) never qualify
    qi, ri = np.nonzero(scores >= np.maximum(kth - margins, floor)[:, None])
    return qi, ri + lo if listed is None else listed[ri], scores[qi, ri]


def candidates_compact(kernel, codes, steps, error_max, norm_max, skip, n, queries, k):
    """The compact pass: segments of rows scored by the kernel in parallel; (margins, candidates)."""
    qc, offsets, qsteps, qerr, qnorm = quantize_queries(queries)
    margins = 2 * compact_error_bound(error_max, norm_max, qerr, qnorm)
    seg = -(-segment_rows(n, len(queries)) // BLOCK_ROWS) * BLOCK_ROWS
    query = (qc, offsets, qsteps)

    def run(lo):
        return _segment_compact(kernel, codes, steps, skip, lo, min(n, lo + seg), query, k, margins)

    starts = range(0, n, seg)
    return margins, list(search_pool().map(run, starts)) if len(starts) > 1 else [run(0)]


def _segment_compact(kernel, codes, steps, skip, lo, hi, query, k, margins):
    """Candidates of rows lo:hi (or of the few not skipped, scored alone). The k-th best of the blocks'
    best scores is at most the segment's k-th best score, so every row within `margins` of it is kept,
    found query by query (a per-query flatnonzero: 2 ms for 64 queries x 50K rows, against 9 ms
    gathering the blocks that qualify, most of them at this margin)."""
    qc, offsets, qsteps = query
    nq, dim = qc.shape
    listed = rows_left(skip, lo, hi)
    rows = hi - lo if listed is None else len(listed)
    nb = -(-rows // BLOCK_ROWS)
    out = _scores_scratch(nq * nb * BLOCK_ROWS).reshape(nq, nb * BLOCK_ROWS)
    out[:, rows:] = -np.inf
    queries = (qc.ctypes.data, offsets.ctypes.data, qsteps.ctypes.data, nq, out.ctypes.data, out.shape[1])
    if listed is None:
        kernel.nanodb_scores(codes[lo:hi].ctypes.data, steps[lo:hi].ctypes.data, rows, dim, *queries)
        if skip is not None:
            out[:, np.flatnonzero(skip[lo:hi])] = -np.inf
    elif rows:
        kernel.nanodb_scores_rows(codes.ctypes.data, steps.ctypes.data, listed.ctypes.data, rows, dim, *queries)
    if nb >= k:
        kth = np.partition(out.reshape(nq, nb, BLOCK_ROWS).max(axis=2), nb - k, axis=1)[:, nb - k]
    else:  # fewer blocks than k: no bound from them, every live row is a candidate
        kth = np.full(nq, -np.inf, np.float32)
    floor = np.finfo(np.float32).min  # skipped rows (-inf) never qualify
    # float32 thresholds no larger than the float64 ones: a few more candidates, never one fewer
    threshold = np.maximum(np.nextafter((kth - margins).astype(np.float32), np.float32(-np.inf)), floor)
    hits = [np.flatnonzero(out[j, :rows] >= threshold[j]) for j in range(nq)]
    qi = np.repeat(np.arange(nq), [len(h) for h in hits])
    ri = np.concatenate(hits)
    return qi, ri + lo if listed is None else listed[ri], out[qi, ri]


def _scores_scratch(size: int) -> np.ndarray:
    """This thread's float32 buffer for a segment's scores, kept between searches: a fresh 16 MB
    array each time costs its page faults again."""
    buf = getattr(_scratch, "scores", None)
    if buf is None or len(buf) < size:
        buf = _scratch.scores = np.empty(size, np.float32)
    return buf[:size]

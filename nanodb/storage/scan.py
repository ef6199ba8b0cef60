"""The CPU fast passes: rows split into segments scored in parallel, each segment keeping, per query, the
rows within a margin of its k-th best score (twice the pass's proven error bound), so the exact pass
(`exact`) gets every row of the true top k.

The compact pass scores the 8-bit copy (`compact`) with the C kernel (`kernel`); the float16 pass, for
when no kernel is loaded, converts the float16 rows block by block into a small float32 scratch and
scores them by BLAS.

Both serve every query of a pass at once, each with its own k and its own skipped rows (a `Selection`:
deleted rows, or rows its filters do not allow): in each segment, the queries whose skip mask leaves most
rows are scored together over all of them (the rows read once for all), and the queries whose mask leaves
few score those alone (a gather); each keeps its own candidates.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

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


@dataclass(frozen=True)
class Selection:
    """What each query of a pass selects: its own k among the rows its skip mask leaves. The masks are
    boolean over the rows (True: never returned; None: none skipped); queries with the same filters share
    one (`skip_of` indexes `skips`)."""

    ks: np.ndarray  # (Q,) int64, each at least 1
    skips: list[np.ndarray | None]
    skip_of: np.ndarray  # (Q,) int64

    def groups(self) -> Iterator[tuple[np.ndarray | None, np.ndarray]]:
        """(skip mask, the queries that use it), for each mask some query uses."""
        for g, skip in enumerate(self.skips):
            members = np.flatnonzero(self.skip_of == g)
            if len(members):
                yield skip, members


# (the queries scored, the rows listed or None for all of lo:hi) -> their scores, (len(queries), >= rows)
Scorer = Callable[[np.ndarray, np.ndarray | None], np.ndarray]
# (scores, rows, the queries scored) -> the float32 threshold each query's candidates reach
Thresholds = Callable[[np.ndarray, int, np.ndarray], np.ndarray]


def segment_candidates(score: Scorer, thresholds: Thresholds, selection: Selection, lo: int, hi: int):
    """Every query's candidates among rows lo:hi: (query, row, float32 score). The queries whose skip mask
    leaves many rows are scored in one call over all of them (each then drops its skipped rows); those
    whose mask leaves few are scored on those alone, per mask."""
    dense, parts = [], []
    for skip, members in selection.groups():
        listed = rows_left(skip, lo, hi)
        if listed is None:
            dense.append((skip, members))
        elif len(listed):
            parts.append(_hits(score(members, listed), len(listed), members, thresholds, lo, listed))
    if dense:
        members = np.concatenate([m for _, m in dense])
        out, at = score(members, None), 0
        for skip, m in dense:
            if skip is not None:
                out[at : at + len(m), np.flatnonzero(skip[lo:hi])] = -np.inf
            at += len(m)
        parts.append(_hits(out, hi - lo, members, thresholds, lo, None))
    if not parts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    return tuple(np.concatenate([p[i] for p in parts]) for i in range(3))


def _hits(out, rows, members, thresholds, lo, listed):
    """The rows of `out` (the scores of queries `members`) that reach each query's threshold."""
    threshold = thresholds(out, rows, members)
    hits = [np.flatnonzero(out[j, :rows] >= threshold[j]) for j in range(len(members))]
    qi = np.repeat(np.arange(len(members)), [len(h) for h in hits])
    ri = np.concatenate(hits)
    return members[qi], ri + lo if listed is None else listed[ri], out[qi, ri]


def kth_per_query(scores: np.ndarray, ks: np.ndarray) -> np.ndarray:
    """Each row's ks[j]-th largest value of `scores` (Q, M); -inf where M < ks[j]."""
    m = scores.shape[1]
    kth = np.full(len(scores), -np.inf, np.float32)
    for k in np.unique(ks):
        if m >= k:
            same = np.flatnonzero(ks == k)
            kth[same] = np.partition(scores[same], m - k, axis=1)[:, m - k]
    return kth


def candidates_float16(buf, selection, n, queries, margins):
    """The float16 pass: segments of rows scored in parallel by BLAS; each returns its candidates (query,
    row, float32 score)."""
    import torch

    seg = segment_rows(n, len(queries))
    q = torch.from_numpy(queries)
    floor = np.finfo(np.float32).min  # skipped rows (-inf) never qualify

    def thresholds(scores, rows, members):
        kth = kth_per_query(scores, np.minimum(selection.ks[members], rows))
        # float32 thresholds no larger than the float64 ones: a few more candidates, never one fewer
        return np.maximum(np.nextafter((kth - margins[members]).astype(np.float32), np.float32(-np.inf)), floor)

    def run(lo):
        hi = min(n, lo + seg)
        return segment_candidates(lambda members, listed: _float16_scores(buf, lo, hi, q[members], listed),
                                  thresholds, selection, lo, hi)

    starts = range(0, n, seg)
    return list(search_pool().map(run, starts)) if len(starts) > 1 else [run(0)]


def _float16_scores(buf, lo, hi, q, listed):
    """Float32 scores (len(q), rows) of rows lo:hi (or the listed ones), converted to float32 a block at a
    time in a scratch that stays in cache. A row that scores NaN or infinity raises DamagedRows."""
    import torch

    rows, dim = hi - lo if listed is None else len(listed), buf.shape[1]
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
    return scores


def candidates_compact(kernel, codes, steps, error_max, norm_max, selection, n, queries):
    """The compact pass: segments of rows scored by the kernel in parallel; (margins, candidates)."""
    qc, offsets, qsteps, qerr, qnorm = quantize_queries(queries)
    margins = 2 * compact_error_bound(error_max, norm_max, qerr, qnorm)
    seg = -(-segment_rows(n, len(queries)) // BLOCK_ROWS) * BLOCK_ROWS
    floor = np.finfo(np.float32).min  # skipped rows (-inf) never qualify

    def thresholds(out, rows, members):
        """The k-th best of the blocks' best scores is at most the segment's k-th best score, so every row
        within `margins` of it is kept (fewer blocks than k: no bound, every live row is a candidate)."""
        nb = -(-rows // BLOCK_ROWS)
        best = out[:, : nb * BLOCK_ROWS].reshape(len(members), nb, BLOCK_ROWS).max(axis=2)
        kth = kth_per_query(best, selection.ks[members])
        # float32 thresholds no larger than the float64 ones: a few more candidates, never one fewer
        return np.maximum(np.nextafter((kth - margins[members]).astype(np.float32), np.float32(-np.inf)), floor)

    def run(lo):
        hi = min(n, lo + seg)

        def score(members, listed):
            return _compact_scores(kernel, codes, steps, lo, hi, (qc, offsets, qsteps), members, listed)

        return segment_candidates(score, thresholds, selection, lo, hi)

    starts = range(0, n, seg)
    return margins, list(search_pool().map(run, starts)) if len(starts) > 1 else [run(0)]


def _compact_scores(kernel, codes, steps, lo, hi, query, members, listed):
    """The kernel's scores of queries `members` over rows lo:hi (or the listed ones, scored alone), in
    blocks of BLOCK_ROWS, the last padded with -inf. The rows are read once for all the queries (a
    per-query flatnonzero of the candidates then costs 2 ms for 64 queries x 50K rows, against 9 ms
    gathering the blocks that qualify, most of them at this margin)."""
    qc, offsets, qsteps = query
    if not np.array_equal(members, np.arange(len(qc))):  # some of the queries, or in another order
        qc, offsets, qsteps = (np.ascontiguousarray(a[members]) for a in query)
    nq, dim = qc.shape
    rows = hi - lo if listed is None else len(listed)
    nb = -(-rows // BLOCK_ROWS)
    out = _scores_scratch(nq * nb * BLOCK_ROWS).reshape(nq, nb * BLOCK_ROWS)
    out[:, rows:] = -np.inf
    queries = (qc.ctypes.data, offsets.ctypes.data, qsteps.ctypes.data, nq, out.ctypes.data, out.shape[1])
    if listed is None:
        kernel.nanodb_scores(codes[lo:hi].ctypes.data, steps[lo:hi].ctypes.data, rows, dim, *queries)
    else:
        kernel.nanodb_scores_rows(codes.ctypes.data, steps.ctypes.data, listed.ctypes.data, rows, dim, *queries)
    return out


def _scores_scratch(size: int) -> np.ndarray:
    """This thread's float32 buffer for a segment's scores, kept between searches: a fresh 16 MB
    array each time costs its page faults again."""
    buf = getattr(_scratch, "scores", None)
    if buf is None or len(buf) < size:
        buf = _scratch.scores = np.empty(size, np.float32)
    return buf[:size]

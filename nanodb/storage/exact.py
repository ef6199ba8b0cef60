"""The exact pass: the fast pass's candidates rescored in float64 from the float16 rows, and the top k
per query selected, ties to the lower index."""

from __future__ import annotations

import numpy as np

from nanodb.storage.scan import DamagedRows, search_pool, search_threads

EXACT_ROWS = 1024  # candidates rescored at a time: float64 temporaries that stay in cache
EXACT_PARALLEL_ROWS = 4096  # fewer candidates than this are rescored by one thread (a single query's)


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


def exact_top_k(buf, queries, ks, margins, parts, kernel, stats=None) -> list[tuple[np.ndarray, np.ndarray]]:
    """From every part's candidates: each query's top ks[j] by float64 score, ties to the lower index, as
    (rows, float32 scores); fewer where fewer rows are left to it.

    `margins` is twice the fast pass's error bound. A row of the true top k scores (fast pass) at
    least the k-th best fast score minus the margin, in its segment and overall; so the candidates
    contain it, and float64 decides. A candidate scoring what no unit row can (NaN, or past twice the
    query's norm) raises DamagedRows: its file changed after it was checked."""
    qi = np.concatenate([p[0] for p in parts]).astype(np.int64)
    rows = np.concatenate([p[1] for p in parts]).astype(np.int64)
    s32 = np.concatenate([p[2] for p in parts])
    nq = len(queries)
    kk = np.minimum(ks, np.bincount(qi, minlength=nq))  # fewer than k rows left: all are candidates
    order = np.argsort(qi, kind="stable")  # grouped by query (a radix sort of small integers)
    qi, rows, s32 = qi[order], rows[order], s32[order]
    bounds = np.searchsorted(qi, np.arange(nq + 1))
    kth = np.array([np.partition(s32[a:b], b - a - k)[b - a - k] if k else np.inf
                    for a, b, k in zip(bounds[:-1], bounds[1:], kk)])
    keep = s32 >= kth[qi] - margins[qi]
    qi, rows = qi[keep], rows[keep]
    if stats is not None:
        stats["rescored"] = len(rows)
    queries64 = queries.astype(np.float64)
    exact = float64_dots(buf, rows, queries64, qi, kernel)
    # a unit row scores at most the query's norm; twice that is far past rounding and repair's tolerance
    reachable = 2 * np.linalg.norm(queries64, axis=1)
    damaged = ~(np.abs(exact) <= reachable[qi])  # NaN too
    if damaged.any():
        raise DamagedRows(rows[damaged])
    bounds = np.searchsorted(qi, np.arange(nq + 1))
    best = []
    for j in range(nq):
        a, b = bounds[j], bounds[j + 1]
        ti, ts = select_top_k(exact[None, a:b], rows[None, a:b], int(kk[j])) if kk[j] else (rows[None, :0],) * 2
        best.append((ti[0], ts[0].astype(np.float32)))
    return best


def float64_dots(buf: np.ndarray, rows: np.ndarray, queries: np.ndarray, qi: np.ndarray, kernel) -> np.ndarray:
    """buf[rows[i]] . queries[qi[i]] in float64 for float16 rows: each product of a float16 and a
    float32 value (widened) is exact, only the sums round. The C kernel's AVX-512 or AVX2 loop where it runs
    (64 queries at 100K x 512, 19K candidates: ~1 ms against 17 ms for NumPy, whose float16
    conversion is not vectorised); else NumPy in cache-sized slices (einsum sums 4x faster than a
    product array and .sum)."""
    out = np.empty(len(rows))
    dim = buf.shape[1]
    if kernel is not None and kernel.nanodb_dots_ok(dim) and buf.flags.c_contiguous and len(rows):
        rows, qi = np.ascontiguousarray(rows, np.int64), np.ascontiguousarray(qi, np.int64)
        queries = np.ascontiguousarray(queries, np.float64)

        def run(span):
            a, b = span
            kernel.nanodb_dots(buf.ctypes.data, rows[a:].ctypes.data, b - a, dim, queries.ctypes.data,
                               qi[a:].ctypes.data, out[a:].ctypes.data)

        step = max(EXACT_PARALLEL_ROWS, -(-len(rows) // search_threads()))
        spans = [(a, min(len(rows), a + step)) for a in range(0, len(rows), step)]
        list(search_pool().map(run, spans)) if len(spans) > 1 else run(spans[0])
        return out
    for a in range(0, len(rows), EXACT_ROWS):
        np.einsum("ij,ij->i", buf[rows[a : a + EXACT_ROWS]].astype(np.float64), queries[qi[a : a + EXACT_ROWS]],
                  out=out[a : a + EXACT_ROWS])
    return out

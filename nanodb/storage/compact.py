"""The compact copy of the vectors and of the queries: 8-bit codes with a per-row step, and the proven
bound on the error of a score computed from them (the compact fast pass keeps every row within it)."""

from __future__ import annotations

import numpy as np

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

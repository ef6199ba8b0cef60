"""The compact (8-bit) copy: its kernel computes what it claims, its error bound holds, and searches
through it equal the float64 brute force even where quantization cannot tell rows apart."""

import numpy as np
import pytest
from test_search_exact import check, unit

from nanodb.storage import index as index_module
from nanodb.storage import scan
from nanodb.storage.compact import compact_error_bound, quantize_queries, quantize_rows
from nanodb.storage.index import VectorIndex

pytestmark = pytest.mark.skipif(index_module.KERNEL is None, reason="the compact-copy kernel is not built")


@pytest.fixture(autouse=True)
def small_segments(monkeypatch):
    monkeypatch.setattr(scan, "SEGMENT_ROWS", 4096)


def kernel_scores(codes, steps, queries, level=2):
    """Scores by the kernel's loop `level` (2 VNNI, 1 AVX2, 0 plain C), or the best below it that runs here."""
    qc, offsets, qsteps, _, _ = quantize_queries(queries)
    out = np.empty((len(queries), len(codes)), np.float32)
    index_module.KERNEL.nanodb_scores_level(level, codes.ctypes.data, steps.ctypes.data, None, len(codes),
                                            codes.shape[1], qc.ctypes.data, offsets.ctypes.data, qsteps.ctypes.data,
                                            len(queries), out.ctypes.data, out.shape[1])
    return out, qc, qsteps


def runs_here(level: int, dim: int) -> None:
    if index_module.KERNEL.nanodb_level(dim) < level:
        pytest.skip(f"this CPU or dim {dim} does not run loop {index_module.KERNEL_LOOPS[level]}")


LEVELS = pytest.mark.parametrize("level", [2, 1, 0], ids=["vnni", "avx2", "c"])


@LEVELS
@pytest.mark.parametrize("dim", [64, 100, 512, 768])  # VNNI for multiples of 64, AVX2 of 16, plain C else
@pytest.mark.parametrize("nq", [1, 2, 3, 9])  # the loops' blocks of 4 x 4, 4 x 2 and 4 x 1
def test_kernel_equals_integer_dot_then_two_float32_products(level, dim, nq):
    runs_here(level, dim)
    rng = np.random.default_rng(dim * nq)
    codes = rng.integers(0, 256, (37, dim), dtype=np.uint8)
    codes[0] = 255  # extremes: the largest sums
    codes[1] = 0
    steps = rng.random(37, dtype=np.float32)
    queries = rng.standard_normal((nq, dim)).astype(np.float32)
    queries[0, : dim // 2] = -np.abs(queries[0, : dim // 2]).max()  # codes of -127 against 0 and 255
    out, qc, qsteps = kernel_scores(codes, steps, queries, level)
    dots = qc.astype(np.int64) @ (codes.astype(np.int64) - 128).T
    want = dots.astype(np.float32) * (qsteps[:, None] * steps[None, :])
    np.testing.assert_array_equal(out, want)


def test_quantization_bounds_hold_for_spiky_and_flat_rows():
    rng = np.random.default_rng(7)
    x = unit(rng, 500, 256)
    x[:50, 0] = 30  # one large coordinate: a coarse step for the rest
    x[50:100] = 1
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    rows = x.astype(np.float16)
    codes, scales = quantize_rows(rows)
    exact = rows.astype(np.float64)
    approx = (codes.astype(np.float64) - 128) * scales[:, :1].astype(np.float64)
    assert (np.linalg.norm(exact - approx, axis=1) <= scales[:, 1]).all()
    assert (np.linalg.norm(exact, axis=1) <= scales[:, 2]).all()
    # appended one by one or all at once: the same codes (each row has its own step)
    one_by_one = [quantize_rows(r[None]) for r in rows[:20]]
    np.testing.assert_array_equal(np.concatenate([c for c, _ in one_by_one]), codes[:20])
    np.testing.assert_array_equal(np.concatenate([s for _, s in one_by_one]), scales[:20])


def test_kernel_error_stays_within_the_proven_bound_even_for_a_query_along_the_error():
    rng = np.random.default_rng(8)
    rows = unit(rng, 2000, 512).astype(np.float16)
    codes, scales = quantize_rows(rows)
    exact = rows.astype(np.float64)
    err = exact - (codes.astype(np.float64) - 128) * scales[:, :1].astype(np.float64)
    queries = np.concatenate([unit(rng, 5, 512), (err[:5] / np.linalg.norm(err[:5], axis=1, keepdims=True)),
                              3 * unit(rng, 1, 512)]).astype(np.float32)  # the worst direction; a non-unit query
    out, _, _ = kernel_scores(codes, np.ascontiguousarray(scales[:, 0]), queries)
    _, _, _, qerr, qnorm = quantize_queries(queries)
    bound = compact_error_bound(float(scales[:, 1].max()), float(scales[:, 2].max()), qerr, qnorm)
    gap = np.abs(out - queries.astype(np.float64) @ exact.T)
    assert (gap <= bound[:, None]).all()
    assert (gap.max(axis=1) > 0.05 * bound).all()  # the bound is not vacuous


def test_rows_with_identical_codes_are_ordered_by_their_exact_scores():
    """Rows a hair apart (same 8-bit codes, different float16 values): only the exact pass tells them apart."""
    rng = np.random.default_rng(9)
    base = unit(rng, 1, 128)[0]
    x = np.repeat(base[None], 3000, axis=0)
    x[:, :2] += 3e-4 * rng.standard_normal((3000, 2)).astype(np.float32)  # below the 8-bit step (~2e-3)
    x = np.concatenate([unit(rng, 5000, 128), x / np.linalg.norm(x, axis=1, keepdims=True)])
    index = VectorIndex(128, "numpy")
    index.append(x)
    codes = index.codes[5000:]
    assert len(np.unique(codes, axis=0)) < 100  # many rows really share their codes
    check(index, np.stack([base, x[6000], unit(rng, 1, 128)[0]]), 25)


def test_appended_in_batches_and_with_deletions_equals_brute_force():
    rng = np.random.default_rng(10)
    index = VectorIndex(768, "numpy")
    x = unit(rng, 6000, 768)
    for lo in range(0, 6000, 1700):
        index.append(x[lo : lo + 1700])
    index.delete(range(0, 6000, 7))
    check(index, np.concatenate([x[[0, 1, 4095, 5999]], unit(rng, 60, 768)]), 10)
    check(index, x[[3]], 6000)  # k beyond the live rows: every live row once


def test_loaded_compact_copy_searches_like_the_computed_one(tmp_path):
    rng = np.random.default_rng(11)
    x = unit(rng, 5000, 64)
    built = VectorIndex(64, "numpy")
    built.append(x)
    for kind, rows in (("vectors", built.vectors), ("codes", built.codes), ("scales", built.scales)):
        rows.tofile(tmp_path / kind)
    loaded = VectorIndex(64, "numpy")
    loaded.load_files(5000, tmp_path / "vectors", (tmp_path / "codes", tmp_path / "scales"))
    assert loaded.mapped == 5000
    for k in (1, 10):
        np.testing.assert_array_equal(loaded.search(x[:5], k)[0], built.search(x[:5], k)[0])
    check(loaded, x[:5], 10)


def test_stats_report_the_passes():
    rng = np.random.default_rng(12)
    index = VectorIndex(64, "numpy")
    index.append(unit(rng, 3000, 64))
    stats = {}
    index.search(unit(rng, 2, 64), 5, stats)
    assert stats["fast_pass"].startswith("int8") and stats["rescored"] >= 10
    assert stats["fast_s"] >= 0 and stats["exact_s"] >= 0


@pytest.mark.parametrize("dim", [512, 520, 100])  # AVX-512 or AVX2, AVX2 only (a multiple of 8), NumPy
def test_exact_rescoring_sums_float64_products_of_float16_rows(dim):
    """The rescoring's float64 dots (the kernel's where it runs, else NumPy's) are the float64 dot products
    of the stored float16 rows, and equal rows score equal bits (their tie goes to the lower index)."""
    from nanodb.storage.exact import float64_dots

    rng = np.random.default_rng(dim)
    rows = unit(rng, 300, dim).astype(np.float16)
    rows[7] = rows[3]
    queries = unit(rng, 5, dim).astype(np.float64)
    picked = rng.integers(0, 300, 2000).astype(np.int64)
    picked[:2] = 3, 7
    qi = rng.integers(0, 5, 2000).astype(np.int64)
    qi[1] = qi[0]
    got = float64_dots(rows, picked, queries, qi, index_module.KERNEL)
    want = np.einsum("ij,ij->i", rows[picked].astype(np.float64), queries[qi])
    np.testing.assert_allclose(got, want, rtol=0, atol=dim * 2.0**-52)
    assert got[0] == got[1]

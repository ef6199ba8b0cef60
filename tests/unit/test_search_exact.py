"""Search returns exactly the float64 brute-force top k: ties to the lower index, deleted rows never."""

import numpy as np
import pytest

from nanodb.storage import index as index_module
from nanodb.storage import scan
from nanodb.storage.exact import select_top_k
from nanodb.storage.index import VectorIndex, cupy_available


def unit(rng, n, dim):
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def reference_top_k(index: VectorIndex, queries: np.ndarray, k: int):
    """Float64 scores of every live row, ordered by score then index: the definition of the answer."""
    rows = index.vectors.astype(np.float64)
    live = np.flatnonzero(~index.dead)
    out_i, out_s = [], []
    for q in np.asarray(queries, np.float64):
        scores = (rows[live] * q).sum(axis=1)  # same per-row summation as the index: equal rows tie
        order = np.lexsort((live, -scores))[:k]
        out_i.append(live[order])
        out_s.append(scores[order])
    return np.array(out_i, np.int64).reshape(len(queries), -1), np.array(out_s).reshape(len(queries), -1)


def check(index, queries, k):
    got_i, got_s = index.search(queries, k)
    want_i, want_s = reference_top_k(index, queries, k)
    np.testing.assert_array_equal(got_i, want_i)
    np.testing.assert_allclose(got_s, want_s, rtol=0, atol=1e-6)


@pytest.fixture(autouse=True, params=["int8", "float16"])
def small_segments(monkeypatch, request):
    """Small segments and scratch blocks so a few thousand rows exercise the parallel merge; every test
    runs on both CPU fast passes: the compact int8 kernel and the float16 pass (no kernel built)."""
    monkeypatch.setattr(scan, "SEGMENT_ROWS", 4096)
    monkeypatch.setattr(scan, "SCRATCH_BYTES", 256 * 4 * 64)
    if request.param == "int8":
        if index_module.KERNEL is None:
            pytest.skip("the compact-copy kernel is not built (pip install -e . builds it)")
    else:
        monkeypatch.setattr(index_module, "KERNEL", None)
    return request.param


@pytest.mark.parametrize("n, dim", [(1, 8), (700, 64), (20_000, 384)])
@pytest.mark.parametrize("nq", [1, 7])
def test_equals_float64_brute_force(n, dim, nq):
    rng = np.random.default_rng(n + dim + nq)
    index = VectorIndex(dim, "numpy")
    index.append(unit(rng, n, dim))
    check(index, unit(rng, nq, dim), 10)


def test_near_duplicates_and_exact_ties_go_to_the_lower_index():
    rng = np.random.default_rng(1)
    base = unit(rng, 3000, 128)
    base[2900:] = base[100]  # 100 identical rows: exact ties across segments
    jitter = base[100] + 1e-3 * rng.standard_normal(128).astype(np.float32)
    base[50:60] = jitter / np.linalg.norm(jitter)  # near-duplicates: scores a hair apart
    index = VectorIndex(128, "numpy")
    index.append(base)
    for k in (1, 5, 30, 150):
        check(index, base[[100, 55]], k)
    top, _ = index.search(base[2950][None], 3)
    assert top[0, 0] == 100


def test_thousands_of_identical_rows_return_the_lowest_indices():
    rng = np.random.default_rng(5)
    x = np.repeat(unit(rng, 1, 64), 20_000, axis=0)
    x[::1000] = unit(rng, 20, 64)
    index = VectorIndex(64, "numpy")
    index.append(x)
    top, _ = index.search(x[1][None], 5)
    assert top.tolist() == [[1, 2, 3, 4, 5]]


def test_deleted_rows_are_never_returned():
    rng = np.random.default_rng(2)
    x = unit(rng, 9000, 64)
    index = VectorIndex(64, "numpy")
    index.append(x)
    index.delete(range(0, 9000, 3))
    index.delete(range(4096, 8192))  # a whole segment gone
    check(index, x[[0, 1, 5000]], 20)
    top, _ = index.search(x[0][None], 1)
    assert top[0, 0] != 0


def test_k_beyond_live_rows_returns_every_live_row_once():
    rng = np.random.default_rng(3)
    x = unit(rng, 50, 32)
    index = VectorIndex(32, "numpy")
    index.append(x)
    index.delete(range(10, 50))
    got_i, got_s = index.search(x[:2], 100)
    assert got_i.shape == (2, 10)
    check(index, x[:2], 100)
    index.delete(range(10))
    assert index.search(x[:2], 5)[0].shape == (2, 0)


def test_empty_index_and_empty_query_batch():
    index = VectorIndex(16, "numpy")
    assert index.search(np.ones((3, 16), np.float32) / 4, 5)[0].shape == (3, 0)
    index.append(np.eye(16, dtype=np.float32))
    assert index.search(np.zeros((0, 16), np.float32), 5)[0].shape == (0, 0)


def test_select_top_k_breaks_boundary_ties_by_lower_index():
    scores = np.array([[0.5, 1.0, 1.0, 1.0, 0.2], [0.9, 0.9, 0.1, 0.9, 0.9]])
    indices = np.broadcast_to(np.arange(5), scores.shape)
    top_i, top_s = select_top_k(scores, indices, 2)
    np.testing.assert_array_equal(top_i, [[1, 2], [0, 1]])
    np.testing.assert_array_equal(top_s, [[1.0, 1.0], [0.9, 0.9]])


@pytest.mark.gpu
@pytest.mark.skipif(not cupy_available(), reason="needs CuPy and a CUDA GPU")
def test_cupy_backend_returns_the_numpy_results():
    rng = np.random.default_rng(4)
    x = unit(rng, 300_000, 512)
    x[299_000:] = x[7]
    cpu, gpu = VectorIndex(512, "numpy"), VectorIndex(512, "cupy")
    for index in (cpu, gpu):
        index.append(x)
        index.delete(range(0, 300_000, 5))
    queries = np.concatenate([unit(rng, 63, 512), x[7][None]])
    for k in (1, 10, 1000):
        gi, gs = gpu.search(queries, k)
        ci, cs = cpu.search(queries, k)
        np.testing.assert_array_equal(gi, ci)
        np.testing.assert_array_equal(gs, cs)

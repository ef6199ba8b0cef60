"""A search limited to allowed rows (a filter's row mask) returns exactly the float64 brute-force top k
of those rows, whether the fast pass scores the few allowed rows alone or all rows and drops the rest."""

import numpy as np
import pytest

from nanodb.storage import index as index_module
from nanodb.storage import scan
from nanodb.storage.compact import quantize_queries, quantize_rows
from nanodb.storage.index import VectorIndex, cupy_available

KERNEL = index_module.KERNEL  # the built kernel, whichever fast pass a test runs


def unit(rng, n, dim):
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute_force(index: VectorIndex, queries: np.ndarray, k: int, allowed: np.ndarray):
    """Float64 scores of the live allowed rows, ordered by score then index."""
    rows = np.flatnonzero(allowed[: index.count] & ~index.dead)
    scores = np.asarray(queries, np.float64) @ index.vectors[rows].astype(np.float64).T
    order = np.array([np.lexsort((rows, -s))[:k] for s in scores], np.int64).reshape(len(queries), -1)
    return rows[order], np.take_along_axis(scores, order, axis=1)


@pytest.fixture(autouse=True, params=["int8", "float16"])
def fast_pass(monkeypatch, request):
    """Small segments, so a few thousand rows make several; both CPU fast passes."""
    monkeypatch.setattr(scan, "SEGMENT_ROWS", 4096)
    if request.param == "int8":
        if index_module.KERNEL is None:
            pytest.skip("the compact-copy kernel is not built (pip install -e . builds it)")
    else:
        monkeypatch.setattr(index_module, "KERNEL", None)


@pytest.fixture(scope="module")
def index():
    rng = np.random.default_rng(5)
    index = VectorIndex(128, "numpy")
    index.append(unit(rng, 20_000, 128))
    index.append(index.vectors[[11, 11, 4000]])  # exact ties with rows that a mask may or may not allow
    index.delete(rng.choice(index.count, 500, replace=False))
    return index


@pytest.mark.parametrize("share", [0.0, 0.0003, 0.01, 0.2, 0.3, 0.9, 1.0])
@pytest.mark.parametrize("nq", [1, 6])
def test_allowed_rows_search_equals_brute_force_over_them(index, share, nq):
    rng = np.random.default_rng(int(share * 1e4) + nq)
    allowed = rng.random(index.count) < share
    allowed[[11, 20_000]] = share > 0  # row 11 and its copy: a tie among allowed rows
    queries = np.concatenate([unit(rng, nq - 1, index.dim), index.vectors[[11]].astype(np.float32)])
    for k in (1, 10, 300):
        got_i, got_s = index.search(queries, k, allowed=allowed)
        want_i, want_s = brute_force(index, queries, k, allowed)
        np.testing.assert_array_equal(got_i, want_i)
        np.testing.assert_allclose(got_s, want_s, rtol=0, atol=1e-6)


def test_a_mask_shorter_than_the_rows_allows_none_past_its_end(index):
    allowed = np.ones(index.count - 2, bool)
    q = index.vectors[[index.count - 1]].astype(np.float32)  # the last row, a copy of row 4000
    got, _ = index.search(q, 3, allowed=allowed)
    assert index.count - 1 not in got[0] and got[0][0] == 4000


def test_allowed_blocks_crossing_segments_keep_every_candidate(index):
    """Allowed rows in runs (one folder's files) around segment edges: the bound from the blocks' best
    scores holds for runs as for scattered rows."""
    allowed = np.zeros(index.count, bool)
    for start in (4000, 8180, 12_000):
        allowed[start : start + 300] = True
    rng = np.random.default_rng(3)
    queries = unit(rng, 4, index.dim)
    got_i, _ = index.search(queries, 50, allowed=allowed)
    np.testing.assert_array_equal(got_i, brute_force(index, queries, 50, allowed)[0])


@pytest.mark.skipif(KERNEL is None, reason="the compact-copy kernel is not built")
@pytest.mark.parametrize("dim", [128, 96, 100])  # the best loop for each: VNNI or AVX2, AVX2, plain C
def test_kernel_scores_of_listed_rows_equal_those_of_the_rows_themselves(dim):
    rng = np.random.default_rng(9)
    codes, scales = quantize_rows(unit(rng, 1000, dim).astype(np.float16))
    steps = np.ascontiguousarray(scales[:, 0])
    qc, offsets, qsteps, _, _ = quantize_queries(unit(rng, 5, dim))
    listed = np.sort(rng.choice(1000, 37, replace=False)).astype(np.int64)
    whole = np.empty((5, 1000), np.float32)
    part = np.empty((5, len(listed)), np.float32)
    args = (qc.ctypes.data, offsets.ctypes.data, qsteps.ctypes.data, 5)
    KERNEL.nanodb_scores(codes.ctypes.data, steps.ctypes.data, 1000, dim, *args, whole.ctypes.data, 1000)
    KERNEL.nanodb_scores_rows(codes.ctypes.data, steps.ctypes.data, listed.ctypes.data, len(listed), dim, *args,
                              part.ctypes.data, len(listed))
    np.testing.assert_array_equal(part, whole[:, listed])


@pytest.mark.gpu
@pytest.mark.skipif(not cupy_available(), reason="needs CuPy and a CUDA GPU")
def test_the_gpu_pass_skips_the_rows_not_allowed(index):
    gpu = VectorIndex(index.dim, "cupy")
    gpu.append(index.vectors)
    gpu.delete(np.flatnonzero(index.dead))
    rng = np.random.default_rng(8)
    queries = unit(rng, 3, index.dim)
    for share in (0.001, 0.5):
        allowed = rng.random(index.count) < share
        for k in (1, 10, 300):
            np.testing.assert_array_equal(gpu.search(queries, k, allowed=allowed)[0],
                                          brute_force(index, queries, k, allowed)[0])

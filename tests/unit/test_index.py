"""Exact search: nanodb's top-k equals a float32 brute force over the stored vectors."""

from __future__ import annotations

import numpy as np
import pytest

from nanodb.storage.index import VectorIndex, cupy_available


def test_index_matches_brute_force_across_chunks_with_deletions():
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((70_000, 32)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index = VectorIndex(32, backend="numpy")
    index.append(vectors[:40_000])
    index.append(vectors[40_000:])
    dead = rng.choice(70_000, 500, replace=False)
    index.delete(dead)
    queries = vectors[rng.choice(70_000, 16, replace=False)]
    got_i, got_s = index.search(queries, 10)
    stored = index.vectors.astype(np.float32)
    scores = queries @ stored.T
    scores[:, dead] = -np.inf
    want = np.argsort(-scores, axis=1, kind="stable")[:, :10]
    assert got_i.tolist() == want.tolist()
    np.testing.assert_allclose(got_s, np.take_along_axis(scores, want, axis=1), atol=1e-5)


def test_k_larger_than_the_index_returns_every_live_item():
    index = VectorIndex(4, backend="numpy")
    index.append(np.eye(4))
    index.delete([2])
    got, _ = index.search(np.eye(4)[:1], 10)
    assert got.tolist() == [[0, 1, 3]]


@pytest.mark.gpu
@pytest.mark.skipif(not cupy_available(), reason="needs CuPy and a CUDA GPU")
def test_cupy_backend_returns_the_same_results_as_numpy():
    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((300_000, 512)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    cpu, gpu = VectorIndex(512, backend="numpy"), VectorIndex(512, backend="cupy")
    for index in (cpu, gpu):
        index.append(vectors[:200_000])
        index.append(vectors[200_000:])
        index.delete([5, 6, 7])
    queries = vectors[rng.choice(300_000, 64, replace=False)]
    ci, cs = cpu.search(queries, 16)
    gi, gs = gpu.search(queries, 16)
    assert ci.tolist() == gi.tolist()
    np.testing.assert_allclose(cs, gs, atol=1e-4)

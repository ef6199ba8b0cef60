"""Exact search: nanodb's top-k equals a float32 brute force over the stored vectors."""

from __future__ import annotations

import numpy as np
import pytest

from nanodb import NanoDB
from nanodb.storage.index import VectorIndex, cupy_available


def brute_force(stored: np.ndarray, queries: np.ndarray, k: int):
    scores = queries.astype(np.float32) @ stored.astype(np.float32).T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(scores, order, axis=1)


def test_search_equals_float32_brute_force_over_stored_vectors(scanned_db):
    path, _ = scanned_db
    with NanoDB(path, read_only=True) as db:
        stored = db.vectors
        queries = np.stack([db.embed_query(t) for t in ["a dog", "a red car", "people at a table"]])
        for k in (1, 5, len(db)):
            want_i, want_s = brute_force(stored, queries, k)
            results = db.search(list(queries), k=k)
            assert [[r.index for r in row] for row in results] == want_i.tolist()
            np.testing.assert_allclose([[r.similarity for r in row] for row in results], want_s, atol=1e-5)


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

"""Search over a scanned database equals a float32 brute force over its stored vectors."""

from __future__ import annotations

import numpy as np
from helpers import brute_force

from nanodb import NanoDB


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

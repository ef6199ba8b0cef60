"""Fixtures of the end-to-end tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from nanodb import NanoDB


@pytest.fixture(scope="session")
def vector_db(tmp_path_factory) -> Path:
    """12 items with fixed vectors and paths: 3 clusters of 4 near-identical directions (ViT-S-32, random
    weights). Queries by item index search the stored float16 vectors only, so their results are the same
    on every machine. Copy it before writing to it."""
    path = tmp_path_factory.mktemp("snap") / "db"
    rng = np.random.default_rng(2024)
    with NanoDB(path, config="test") as db:
        centres = rng.standard_normal((3, db.dim))
        vectors = np.repeat(centres, 4, axis=0) + 0.3 * rng.standard_normal((12, db.dim))
        db.add(vectors, paths=[f"/photos/cluster{i // 4}/img{i:02d}.jpg" for i in range(12)])
        db.save()
    return path

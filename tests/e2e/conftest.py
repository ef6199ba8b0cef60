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


@pytest.fixture(scope="session")
def photo_site(tmp_path_factory):
    """(db, url, photos) of the browser tests: 24 real photos, 12 in folder a and 12 in folder b, served on
    127.0.0.1 (one server for all of them)."""
    from helpers.browser import served_photos

    with served_photos(tmp_path_factory.mktemp("site"), ("a", "b"), per_folder=12) as served:
        yield served


@pytest.fixture(scope="module")
def chromium_browser():
    """One browser for a module's tests: Playwright's sync API marks its event loop running in this thread
    while open, so later modules' asyncio.run would fail."""
    from helpers.browser import chromium

    with chromium() as browser:
        yield browser

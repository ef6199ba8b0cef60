"""The Python API as a RAG pipeline uses it: add frames with metadata, search by text, image or vector."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import coco_photos
from PIL import Image

from nanodb import NanoDB


def test_add_vectors_and_images_with_metadata_then_search(tmp_path):
    with NanoDB(tmp_path / "db", config="test") as db:
        photos = coco_photos(3)
        frames = [Image.open(p) for p in photos]
        ids = db.add(frames, metadata=[{"frame": i, "tags": ["street"]} for i in range(3)])
        assert ids == [0, 1, 2] and len(db) == 3
        vec = np.random.default_rng(0).standard_normal(db.dim)
        (vid,) = db.add(vec, metadata={"source": "vector"}, paths=["embedding-42"])
        hit = db.search(frames[1], k=1)[0]
        assert hit.index == 1 and hit.metadata == {"frame": 1, "tags": ["street"]}
        assert db.search(vec, k=1)[0].index == vid and db[vid].path == "embedding-42"
        db.save()
    with NanoDB(tmp_path / "db") as db:
        assert db[1].metadata == {"frame": 1, "tags": ["street"]}
        results = db.search(["a street", 0], k=2)
        assert len(results) == 2 and results[1][0].index == 0
        db.delete([0])
        assert 0 not in [r.index for r in db.search(db[1].vector, k=4)]
        assert len(db) == 3


def test_bad_queries_and_items_get_clear_errors(tmp_path):
    with NanoDB(tmp_path / "db", config="test") as db:
        with pytest.raises(ValueError, match="empty query"):
            db.search("   ")
        with pytest.raises(ValueError, match="k must be"):
            db.search("a cat", k=0)
        with pytest.raises(ValueError, match="shape"):
            db.add(np.zeros((2, 3)))
        with pytest.raises(ValueError, match="non-zero"):
            db.add(np.zeros(db.dim))
        with pytest.raises(ValueError, match="no item"):
            db.search(5)
        assert db.search("a cat") == []


def test_validate_accepts_near_duplicates_and_reports_misplaced_vectors(tmp_path):
    with NanoDB(tmp_path / "db", config="test") as db:
        rng = np.random.default_rng(3)
        base = rng.standard_normal((20, db.dim))
        near = base[4] + 1e-4 * rng.standard_normal(db.dim)  # the same photo embedded in another batch
        db.add(np.vstack([base, near]))
        assert db.validate().ok
        # a damaged row (not unit length) finds another item first, and is reported
        db.vectors[7] = db.vectors[3] / 2
        db.vectors[8] = db.vectors[9]
        report = db.validate()
        assert report.failures == [(7, 3)]
        assert report.duplicates == [[8, 9]]

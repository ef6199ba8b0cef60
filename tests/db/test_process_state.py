"""A library call leaves the caller's process as it found it, and a search and a compaction share one state."""

from __future__ import annotations

import threading

import numpy as np
import torch
from helpers import coco_photos

from nanodb import NanoDB
from nanodb.interfaces.search_service import SearchService


def test_an_image_query_leaves_the_callers_torch_threads_alone(tmp_path):
    photos = coco_photos(2)
    threads = torch.get_num_threads()
    with NanoDB(tmp_path / "db", config="test") as db:
        db.add(np.random.default_rng(0).standard_normal((3, db.dim)))
        db.search(image=photos[0], k=2)
        db.search(str(photos[1]), k=2)
    assert torch.get_num_threads() == threads


def test_a_compaction_waits_for_a_running_web_search(tmp_path):
    """A compaction renumbers rows: one that started while a web search ran would make the search name
    other rows than the ones it scored. Here a compaction is started from inside the search itself."""
    with NanoDB(tmp_path / "db", config="test", compact_dead_fraction=0.1) as db:
        rng = np.random.default_rng(1)
        batch = rng.standard_normal((90, db.dim)).astype(np.float32)
        batch /= np.linalg.norm(batch, axis=1, keepdims=True)
        paths = [f"/p/{i}.jpg" for i in range(90)]
        vectors = dict(zip(paths, batch.astype(np.float16).astype(np.float32)))
        db.add(batch, paths=paths)
        db.save()
        query = db.embed_query("a red car")
        index = db.store.index
        real_search = index.search_each  # the one pass every search runs (search() included)
        compaction = threading.Thread(target=lambda: (db.forget(paths[::2]), db.save()))

        def search_then_compact(queries, ks, allowed, **options):
            found = real_search(queries, ks, allowed, **options)
            compaction.start()
            compaction.join(1.0)  # a compaction that can run now renumbers the rows under this search
            return found

        index.search_each = search_then_compact
        results = SearchService(db).by_text("a red car", k=90)
        compaction.join()
        assert len(results) == 90
        for r in results:
            assert abs(float(vectors[r.path] @ query) - r.similarity) < 2e-3, r

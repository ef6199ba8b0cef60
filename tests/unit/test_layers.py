"""The layers stay one-way and a library call leaves the caller's process as it found it."""

from __future__ import annotations

import ast
import threading
from pathlib import Path

import numpy as np
import torch
from helpers import REPO, coco_photos

from nanodb import NanoDB
from nanodb.interfaces.search_service import SearchService


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_the_pipeline_imports_nothing_of_nanodb_but_the_media_layer():
    for path in (REPO / "pipeline").rglob("*.py"):
        above = [m for m in imported_modules(path)
                 if m.split(".")[0] == "nanodb" and m.split(".")[1] not in ("media", "pipeline")]
        assert not above, path


def test_no_module_imports_another_modules_private_names():
    """`from m import _name` reaches into m (ruff's SLF001 catches `obj._name`)."""
    for path in [*(REPO / "nanodb").rglob("*.py"), *(REPO / "pipeline").rglob("*.py"), *(REPO / "tests").rglob("*.py"),
                 *(REPO / "benchmarks").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module != "__future__":
                private = [a.name for a in node.names if a.name.startswith("_") and not a.name.endswith("__")]
                assert not private, f"{path.relative_to(REPO)} imports {private} from {node.module}"


def test_interfaces_never_touch_the_store_or_the_index():
    for path in (REPO / "nanodb" / "interfaces").glob("*.py"):
        text = path.read_text()
        assert "nanodb.storage.store" not in text and "nanodb.storage.index" not in text, path
        assert ".store." not in text and ".index." not in text, path


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
        real_search = index.search
        compaction = threading.Thread(target=lambda: (db.forget(paths[::2]), db.save()))

        def search_then_compact(queries, k):
            found = real_search(queries, k)
            compaction.start()
            compaction.join(1.0)  # a compaction that can run now renumbers the rows under this search
            return found

        index.search = search_then_compact
        results = SearchService(db).by_text("a red car", k=90)
        compaction.join()
        assert len(results) == 90
        for r in results:
            assert abs(float(vectors[r.path] @ query) - r.similarity) < 2e-3, r

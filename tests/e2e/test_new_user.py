"""What a new user meets first (issue 12): the README's Python example as a script, a moved checkpoint,
identical files, honest scan numbers, a rescan with nothing new, and image queries by path or URL."""

from __future__ import annotations

import http.server
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import REPO, coco_photos
from PIL import Image

from nanodb import NanoDB
from nanodb.model.clip import ModelLoadError
from nanodb.search.query import QueryError
from nanodb.storage.format import DatabaseError


# ------------------------------------------------------------------ 1. the README, as scripts
def readme_python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)


def test_readme_python_blocks_run_as_unguarded_scripts(tmp_path):
    """Each ```python block of the README, saved as a file and run with `python file.py` (no __main__
    guard), in a home with ~/Pictures; only the model is swapped for the small random one (no download)."""
    home = tmp_path / "home"
    (home / "Pictures").mkdir(parents=True)
    photos = coco_photos(5)
    for p in photos:
        shutil.copy(p, home / "Pictures")
    shutil.copy(photos[0], tmp_path / "frame0.jpg")
    blocks = readme_python_blocks()
    assert len(blocks) >= 2
    # RAY_USAGE_STATS_ENABLED: the Ray example must not try to report to the network
    env = {**os.environ, "HOME": str(home), "PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0"}
    for i, block in enumerate(blocks):
        assert 'model="ViT-B-32", pretrained="laion2b_s34b_b79k"' in block or "model=" not in block
        script = tmp_path / f"example{i}.py"
        script.write_text(block.replace('model="ViT-B-32", pretrained="laion2b_s34b_b79k"', 'config="test"'))
        run = subprocess.run([sys.executable, script.name], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=600)
        assert run.returncode == 0 and "Traceback" not in run.stderr, f"block {i}:\n{run.stdout}\n{run.stderr}"
        if i == 0:
            assert f"{len(photos)} added" in run.stdout and "0 skipped" in run.stdout, run.stdout
    with NanoDB(home / ".nanodb" / "pictures", read_only=True) as db:
        assert {db.path_of(i) for i in range(len(photos))} == {str(home / "Pictures" / p.name) for p in photos}


class DiesWhenUnpickled:
    """A pixel transform whose worker copy kills the worker as it starts."""

    def __reduce__(self):
        return (os._exit, (3,))


def test_a_decode_worker_that_cannot_start_fails_the_scan_loudly(tmp_path):
    from nanodb.pipeline.decode import ImageDecodePool

    folder = tmp_path / "photos"
    folder.mkdir()
    for p in coco_photos(3):
        shutil.copy(p, folder)
    with NanoDB(tmp_path / "db", config="test") as db:
        db.decode_pool = ImageDecodePool(DiesWhenUnpickled(), 1, db.settings.max_image_pixels)
        with pytest.raises(RuntimeError, match="could not start"):
            db.scan(folder)
        assert len(db) == 0


# ------------------------------------------------------------------ 3. a moved checkpoint
def save_checkpoint(path: Path, seed: int) -> Path:
    import open_clip
    import torch

    torch.manual_seed(seed)
    model = open_clip.create_model("ViT-S-32")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return path


def test_a_database_knows_its_weights_by_digest_not_by_path(tmp_path):
    a = save_checkpoint(tmp_path / "a" / "ck.bin", seed=1)
    with NanoDB(tmp_path / "db", model="ViT-S-32", pretrained=str(a), config="test") as db:
        db.add(np.eye(db.dim)[:2])
        text_hits = [r.index for r in db.search("a red car", k=2)]
        db.save()
    b = tmp_path / "b" / "ck.bin"
    b.parent.mkdir()
    a.rename(b)
    # no flags: it opens (a vector search needs no model); the model says where to point it
    with NanoDB(tmp_path / "db", config="test") as db:
        assert db.search(np.eye(db.dim)[1], k=1)[0].index == 1
        with pytest.raises(ModelLoadError, match=r"--pretrained"):
            db.search("a red car")
    # the same weights from their new place: everything works, and the database remembers the place
    with NanoDB(tmp_path / "db", pretrained=str(b), config="test") as db:
        assert [r.index for r in db.search("a red car", k=2)] == text_hits
    with NanoDB(tmp_path / "db", config="test") as db:
        assert [r.index for r in db.search("a red car", k=2)] == text_hits
    # other weights are refused, naming both
    other = save_checkpoint(tmp_path / "c" / "ck.bin", seed=2)
    with pytest.raises(DatabaseError) as refused:
        NanoDB(tmp_path / "db", pretrained=str(other), config="test")
    assert str(b) in str(refused.value) and str(other) in str(refused.value)
    assert str(refused.value).count("sha256:") == 2


def test_a_database_of_an_older_nanodb_opens_with_its_checkpoint_anywhere(tmp_path):
    """Manifests written before weights digests named a checkpoint by file name and size."""
    import json

    a = save_checkpoint(tmp_path / "a" / "ck.bin", seed=1)
    NanoDB(tmp_path / "db", model="ViT-S-32", pretrained=str(a), config="test").close()
    manifest = tmp_path / "db" / "nanodb.json"
    m = json.loads(manifest.read_text())
    m["weights_id"] = f"file:ck.bin:{a.stat().st_size}"
    manifest.write_text(json.dumps(m))
    moved = tmp_path / "b" / "ck.bin"
    moved.parent.mkdir()
    a.rename(moved)
    with NanoDB(tmp_path / "db", pretrained=str(moved), config="test") as db:
        assert db.search("a dog") == []


def test_a_pretrained_file_that_is_not_a_checkpoint_says_so(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("not weights\n")
    with pytest.raises(ModelLoadError, match="is not a model checkpoint"):
        NanoDB(tmp_path / "db", model="ViT-S-32", pretrained=str(notes), config="test")


# ------------------------------------------------------------------ 4. identical files
def test_identical_files_share_one_vector_tie_and_are_grouped_by_validate(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    photos = coco_photos(5)
    for p in photos:
        shutil.copy(p, folder)
    shutil.copy(photos[0], folder / "zz-copy.jpg")  # sorts last: embedded in another batch
    with NanoDB(tmp_path / "db", config="test", batch_size=2) as db:
        first = db.scan(folder)
        assert (first.added, first.failed) == (6, 0)
        original, copy = db.index_of(folder / photos[0].name), db.index_of(folder / "zz-copy.jpg")
        assert np.array_equal(db[original].vector, db[copy].vector)
        assert sorted([original, copy]) in db.validate().duplicates
        top = db.search(folder / photos[0].name, k=2)
        assert {r.index for r in top} == {original, copy} and top[0].similarity == top[1].similarity
        # a third copy is indexed with the stored vector: nothing is embedded
        shutil.copy(photos[0], folder / "zz-third.jpg")
        again = db.scan(folder)
        assert (again.added, again.unchanged, again.embedded) == (1, 6, 0)
        assert np.array_equal(db[db.index_of(folder / "zz-third.jpg")].vector, db[original].vector)


# ------------------------------------------------------------------ 6. honest numbers
def test_the_scan_summary_counts_the_whole_scan_in_words(tmp_path, monkeypatch):
    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy(coco_photos(1)[0], folder)
    with NanoDB(tmp_path / "db", config="test", autosave=True) as db:
        saves = []
        save = db.store.save
        monkeypatch.setattr(db.store, "save", lambda: (save(), saves.append(time.monotonic()))[0])
        called = time.monotonic()
        report = db.scan(folder)
        assert report.summary().startswith("scanned 1 file in ")
        assert "(1 image embedded, " in report.summary()
        assert called <= report.started and report.finished >= saves[-1]  # the scan's save is in its time
        again = db.scan(folder)
        assert "embedded" not in again.summary() and "0.0" not in again.summary().split(":")[1]
        assert "scanned 1 file in" in again.summary() and "1 unchanged" in again.summary()


def test_similarities_are_cosines_never_above_one(tmp_path):
    with NanoDB(tmp_path / "db", config="test") as db:
        db.add(np.random.default_rng(0).standard_normal((200, db.dim)))
        for i in range(200):
            assert -1.0 <= db.search(db.vectors[i].astype(np.float32), k=1)[0].similarity <= 1.0


# ------------------------------------------------------------------ 7. a rescan with nothing new
def test_a_rescan_with_nothing_new_loads_no_model_and_starts_no_process(tmp_path, monkeypatch):
    import psutil

    import nanodb.database

    folder = tmp_path / "photos"
    (folder / "trip").mkdir(parents=True)
    for i, p in enumerate(coco_photos(4)):
        shutil.copy(p, folder / ("trip" if i % 2 else "") / p.name)
    with NanoDB(tmp_path / "db", config="test") as db:
        db.scan(folder)
        db.save()
    children = {c.pid for c in psutil.Process().children(recursive=True)}

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(nanodb.database, "load_model", no_model)
    with NanoDB(tmp_path / "db", config="test") as db:
        report = db.scan(folder)
        assert (report.unchanged, report.added, report.failed) == (4, 0, 0)
        assert {c.pid for c in psutil.Process().children(recursive=True)} <= children
        # a scanned folder deleted since: its items go, in the summary, with no error
        shutil.rmtree(folder / "trip")
        gone = db.scan(folder / "trip")
        assert (gone.dropped, gone.failed) == (2, 0) and "2 gone" in gone.summary()
        assert len(db) == 2


# ------------------------------------------------------------------ 5, 8. image queries
class PhotoServer:
    """A local HTTP server over a folder; counts the requests it answers."""

    def __init__(self, folder: Path):
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(folder), **kwargs)

            def do_GET(self):
                server.requests += 1
                if self.path == "/slow.jpg":
                    time.sleep(3)
                try:
                    super().do_GET()
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (the timeout test)
                    pass

            def log_message(self, *args):
                pass

        self.requests = 0
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    folder = root / "photos"
    folder.mkdir()
    for p in coco_photos(4):
        shutil.copy(p, folder)
    (folder / "notes.txt").write_text("not an image\n")
    Image.open(coco_photos(5)[4]).save(folder / "new.png")  # not indexed
    db = NanoDB(root / "db", config="test")
    db.scan(folder)
    server = PhotoServer(folder)
    yield db, folder, server
    server.close()
    db.close()


def test_a_string_that_names_an_image_but_no_file_is_an_error_not_a_text_search(served, tmp_path):
    db, folder, _ = served
    for query in ("missing.jpg", "./holiday/beach", "~/no-such-folder/x", str(tmp_path / "gone.png")):
        with pytest.raises(QueryError, match="no such image file"):
            db.search(query)
        with pytest.raises(QueryError, match="no such image file"):
            db.search(image=query)
    assert db.search(text="missing.jpg", k=1)  # text= is always text


def test_image_queries_by_path_pil_image_and_url_agree(served):
    db, folder, server = served
    name = sorted(p.name for p in folder.glob("*.jpg"))[1]
    item = db.index_of(folder / name)
    for query in (str(folder / name), folder / name, f"{server.url}/{name}"):
        assert db.search(query, k=1)[0].index == item
        assert db.search(image=query, k=1)[0].index == item
    assert db.search(image=Image.open(folder / name), k=1)[0].index == item
    assert db.search(image=f"{server.url}/new.png", k=1)  # not indexed: fetched, decoded and embedded


def test_a_url_that_cannot_be_searched_gets_one_clear_line(served):
    from nanodb.search.fetch import fetch_url

    db, _, server = served
    for url, why in ((f"{server.url}/nope.jpg", "HTTP 404"), (f"{server.url}/notes.txt", "not an image"),
                     ("http://127.0.0.1:9/x.jpg", "cannot fetch")):
        with pytest.raises(QueryError, match=why) as e:
            db.search(url)
        assert "\n" not in str(e.value)
    with pytest.raises(QueryError, match="larger than"):
        fetch_url(f"{server.url}/new.png", max_bytes=1000)
    with pytest.raises(QueryError, match="cannot fetch"):
        fetch_url(f"{server.url}/slow.jpg", timeout=0.5)


def test_the_http_api_never_fetches_a_url(served):
    from nanodb.interfaces.search_service import SearchService

    db, _, server = served
    before = server.requests
    SearchService(db).by_text(f"{server.url}/new.png", 3)
    assert server.requests == before

"""Special files and symlinks (issue 20, items 8 and 9): a FIFO, a device or a symlink out of the scanned
folders is never read, indexed or served, by a scan, a folder watch or the server."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest
from helpers import coco_photos
from nanodb.pipeline import watch
from nanodb.pipeline.walk import DirectoryWalker

from nanodb import NanoDB
from nanodb.interfaces.server import start_server
from nanodb.media.opener import ImageRejected, open_regular_file, read_image_file
from nanodb.media.paths import OUTSIDE_ROOTS, servable_path
from nanodb.service import IngestService

BLOCKED_S = 10  # a blocking open of a FIFO or /dev/zero never returns; refusing one is a stat away


@pytest.fixture
def private(tmp_path) -> Path:
    """A photo outside every scanned folder, readable by its owner only."""
    secret = tmp_path / "private" / "file.jpg"
    secret.parent.mkdir()
    shutil.copy(coco_photos(8)[7], secret)
    secret.chmod(0o600)
    return secret


@pytest.fixture
def photos(tmp_path, private) -> Path:
    """Two photos, a link to one of them (inside), a link to the private photo (outside) and a link to
    the private folder."""
    root = tmp_path / "photos"
    root.mkdir()
    for src in coco_photos(2):
        shutil.copy(src, root / src.name)
    (root / "inside-link.jpg").symlink_to(root / coco_photos(1)[0].name)
    (root / "holiday.jpg").symlink_to(private)
    (root / "private-folder").symlink_to(private.parent)
    return root


def indexed_names(db: NanoDB) -> set[str]:
    return {Path(item.path).name for item in db}


# ------------------------------------------------------------------ the one opener (item 8)
@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "folder"])
def test_the_opener_refuses_special_files_at_once_without_reading(tmp_path, kind):
    path = tmp_path / "x.jpg"
    if kind == "fifo":
        os.mkfifo(path)  # no writer: a blocking open would wait for one forever
    elif kind == "dev-zero":
        path.symlink_to("/dev/zero")
    else:
        path.mkdir()
    start = time.monotonic()
    for opener in (read_image_file, open_regular_file):
        with pytest.raises(ImageRejected, match="not a regular file"):
            opener(str(path))
    assert time.monotonic() - start < BLOCKED_S


def test_the_opener_reads_no_more_than_its_bound(tmp_path):
    big = tmp_path / "big.jpg"
    big.write_bytes(b"x" * 5000)
    with pytest.raises(ImageRejected, match="too large"):
        read_image_file(str(big), max_bytes=4096)
    assert read_image_file(str(big), max_bytes=5000).data == b"x" * 5000


# ------------------------------------------------------------------ scans (items 8 and 9)
def test_a_scan_skips_symlinks_out_of_its_folders_with_one_line_each(tmp_path, photos, private, caplog):
    (photos / "zero.jpg").symlink_to("/dev/zero")
    with NanoDB(tmp_path / "db", config="test") as db, caplog.at_level(logging.WARNING):
        report = db.scan(photos)
        names = indexed_names(db)
    assert names == {p.name for p in coco_photos(2)} | {"inside-link.jpg"}
    failures = dict(report.failures)
    for link in ("holiday.jpg", "private-folder", "zero.jpg"):  # the device too: never opened, never read
        assert failures[str(photos / link)] == OUTSIDE_ROOTS
        assert sum(str(photos / link) in r.getMessage() for r in caplog.records) == 1, link
    assert not any(private.name in n for n in names)


def test_follow_symlinks_indexes_what_the_links_lead_to(tmp_path, photos, private):
    with NanoDB(tmp_path / "db", config="test") as db:
        db.scan(photos, follow_symlinks=True)
        assert {"holiday.jpg", "file.jpg"} <= indexed_names(db)  # the link, and the file in the linked folder
    with NanoDB(tmp_path / "db2", config="test", follow_symlinks=True) as db:  # the setting (--follow-symlinks)
        db.scan(photos)
        assert "holiday.jpg" in indexed_names(db)


def test_a_walk_follows_links_between_its_own_roots(tmp_path, photos, private):
    found = {Path(f.path).name for f in DirectoryWalker([str(photos), str(private.parent)])}
    assert {"holiday.jpg", "file.jpg"} <= found


# ------------------------------------------------------------------ the watcher (items 8 and 9)
class Watching:
    """An IngestService watching `folder` on its own event loop thread, as the CLI runs it."""

    def __init__(self, db: NanoDB, folder: Path):
        self.db = db
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.service = self.call(self._start, folder)
        assert self.ready.wait(120), "the first scan of the watched folder did not finish"

    async def _start(self, folder):
        service = IngestService(self.db)
        service.watch([str(folder)], on_ready=lambda report: self.ready.set())
        return service

    def call(self, coro_fn, *args):
        return asyncio.run_coroutine_threadsafe(coro_fn(*args), self.loop).result(60)

    def names(self) -> set[str]:
        async def names():
            return indexed_names(self.db)
        return self.call(names)

    def wait_for(self, name: str, bound: float = 10) -> None:
        deadline = time.monotonic() + bound
        while name not in self.names():
            assert time.monotonic() < deadline, f"{name} was not indexed within {bound} s"
            time.sleep(0.05)

    def stop(self):
        self.call(self.service.stop)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()


def test_a_watch_skips_fifos_and_links_out_of_its_folder_and_goes_on(tmp_path, private, monkeypatch, caplog):
    folder = tmp_path / "watched"
    folder.mkdir()
    shutil.copy(coco_photos(1)[0], folder / "first.jpg")
    opened = []
    read = watch.read_image_file
    monkeypatch.setattr(watch, "read_image_file", lambda path, *a: opened.append(path) or read(path, *a))
    with NanoDB(tmp_path / "db", config="test", autosave=True) as db, caplog.at_level(logging.WARNING):
        watching = Watching(db, folder)
        try:
            os.mkfifo(folder / "x.jpg")
            (folder / "holiday.jpg").symlink_to(private)
            (folder / "albums").symlink_to(private.parent)  # a folder's link: it was passed over without a line
            time.sleep(db.settings.settle_seconds + 0.5)
            shutil.copy(coco_photos(3)[2], folder / "later.jpg")
            watching.wait_for("later.jpg")
            time.sleep(0.5)
            assert watching.names() == {"first.jpg", "later.jpg"}
        finally:
            watching.stop()
    assert str(folder / "x.jpg") not in opened and str(folder / "holiday.jpg") not in opened
    for name, reason in (("x.jpg", "not a regular file"), ("holiday.jpg", OUTSIDE_ROOTS), ("albums", OUTSIDE_ROOTS)):
        lines = [r.getMessage() for r in caplog.records if str(folder / name) in r.getMessage()]
        assert len(lines) == 1 and reason in lines[0], lines


# ------------------------------------------------------------------ the server (items 8 and 9)
@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A server over a database whose folder was scanned following symlinks, then rescanned without."""
    tmp = tmp_path_factory.mktemp("served")
    private = tmp / "private" / "file.jpg"
    private.parent.mkdir()
    shutil.copy(coco_photos(8)[7], private)
    root = tmp / "photos"
    root.mkdir()
    for src in coco_photos(3):
        shutil.copy(src, root / src.name)
    (root / "inside-link.jpg").symlink_to(root / coco_photos(1)[0].name)
    (root / "holiday.jpg").symlink_to(private)
    db = NanoDB(tmp / "db", config="test")
    db.scan(root, follow_symlinks=True)  # indexed as a server of an earlier version would have it
    db.scan(root)  # the folder, now scanned without following: the link's item stays, but is not sent
    server = start_server(db, "127.0.0.1", 0)
    try:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            yield db, client, root
    finally:
        server.stop()
        db.close()


def test_a_file_reached_through_a_symlink_out_of_the_scanned_folders_is_refused(served):
    db, client, root = served
    holiday = db.index_of(str(root / "holiday.jpg"))
    for route in ("original", "thumbnail"):
        r = client.get(f"/api/items/{holiday}/{route}")
        assert r.status_code == 403 and "symlink" in r.json()["error"], r.text
    for name in ("inside-link.jpg", coco_photos(2)[1].name):  # a link within the folder, a plain file
        index = db.index_of(str(root / name))
        original = client.get(f"/api/items/{index}/original")
        assert original.status_code == 200 and original.content == (root / name).read_bytes()
        assert client.get(f"/api/items/{index}/thumbnail").status_code == 200


def test_an_indexed_file_swapped_for_a_fifo_is_refused_at_once(served):
    db, client, root = served
    victim = root / coco_photos(3)[2].name
    index = db.index_of(str(victim))
    st = victim.stat()
    victim.unlink()
    os.mkfifo(victim)
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    for route in ("original", "thumbnail"):
        start = time.monotonic()
        r = client.get(f"/api/items/{index}/{route}")
        assert 400 <= r.status_code < 500 and time.monotonic() - start < BLOCKED_S, (route, r.status_code)
    assert client.get("/api/stats").status_code == 200


def test_servable_paths(tmp_path):
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "a.jpg").write_bytes(b"a")
    (tmp_path / "out.jpg").write_bytes(b"o")
    (tmp_path / "root" / "in-link.jpg").symlink_to(tmp_path / "root" / "a.jpg")
    (tmp_path / "root" / "out-link.jpg").symlink_to(tmp_path / "out.jpg")
    root = str(tmp_path / "root")
    assert servable_path(f"{root}/a.jpg", {root: False})
    assert servable_path(f"{root}/in-link.jpg", {root: False})
    assert not servable_path(f"{root}/out-link.jpg", {root: False})
    assert servable_path(f"{root}/out-link.jpg", {root: True})
    assert servable_path(str(tmp_path / "out.jpg"), {root: False})  # added by name: no symlink on its way
    assert not servable_path(f"{root}/out-link.jpg", {})

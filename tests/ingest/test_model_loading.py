"""The model's load is visible: while it runs, the console's status line says so, and a query typed
meanwhile says that it waits for the model, then answers."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import threading
import time

import numpy as np
from helpers import coco_photos
from nanodb.pipeline.report import ScanReport

import nanodb.database as database
from nanodb.database import NanoDB
from nanodb.interfaces.console import Console
from nanodb.service import IngestService

LIVENESS_S = 60  # the note and the answer come within a second or two; past this, they never will


def test_status_and_a_query_during_the_model_load_say_it_is_loading(scanned_db, tmp_path, monkeypatch):
    path, _ = scanned_db
    shutil.copytree(path, tmp_path / "db")
    real_load, released = database.load_model, threading.Event()

    def held_load(config):  # the load lasts until the test has seen what the console shows meanwhile
        assert released.wait(LIVENESS_S), "the test never released the load"
        return real_load(config)

    monkeypatch.setattr(database, "load_model", held_load)

    async def session() -> list[str]:
        lines: list[str] = []
        with NanoDB(tmp_path / "db", config="test", read_only=True) as db:
            service = IngestService(db)
            console = Console(db, 3, lines.append, service=service)
            loading = asyncio.ensure_future(asyncio.to_thread(lambda: db.model))  # as a scan's first batch does
            deadline = time.monotonic() + LIVENESS_S
            while db.model_loading_for is None:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
            assert service.status().startswith("loading the model ViT-S-32 (")
            query = asyncio.ensure_future(console.execute('"a red car"'))
            while not any("loading the model" in line for line in lines):
                assert time.monotonic() < deadline and not query.done(), lines
                await asyncio.sleep(0.05)
            released.set()
            await asyncio.wait_for(asyncio.gather(loading, query), LIVENESS_S)
            assert "loading the model" not in service.status()
            await service.stop()
        return lines

    lines = asyncio.run(session())
    assert lines[0] == "loading the model ViT-S-32: the first query waits for it…"
    assert len(lines) == 4 and all(line.startswith("* index=") for line in lines[1:]), lines


def photo_taken_at(path, when: str) -> None:
    """A small JPEG whose EXIF says it was taken at `when` ('YYYY:MM:DD HH:MM:SS')."""
    from PIL import Image

    exif = Image.Exif()
    exif.get_ifd(0x8769)[36867] = when  # DateTimeOriginal
    Image.new("RGB", (96, 64), (200, 40, 90)).save(path, exif=exif)


def test_a_rescan_after_a_rename_and_a_copy_loads_no_model(tmp_path, monkeypatch):
    photos = tmp_path / "photos"
    photos.mkdir()
    for p in coco_photos(2):
        shutil.copy(p, photos)
    photo_taken_at(photos / "dated.jpg", "2019:07:14 10:30:00")
    with NanoDB(tmp_path / "db", config="test") as db:
        db.scan(photos)
        db.save()
        before = {os.path.basename(item.path): item.vector for item in db}
    first = sorted(before)[0]
    os.rename(photos / first, photos / f"renamed-{first}")
    os.rename(photos / "dated.jpg", photos / "dated-renamed.jpg")
    shutil.copy(photos / f"renamed-{first}", photos / "copy.jpg")

    def no_model(config):
        raise AssertionError("the model was loaded for files whose bytes are stored")

    monkeypatch.setattr(database, "load_model", no_model)
    with NanoDB(tmp_path / "db", config="test") as db:
        report = db.scan(photos)
        assert (report.added, report.dropped, report.unchanged, report.failed) == (3, 2, 1, 0), report.summary()
        assert not db.model_loaded and not db.decode_pool.started
        items = {os.path.basename(item.path): item for item in db}
        assert sorted(items) == sorted([f"renamed-{first}", "copy.jpg", "dated-renamed.jpg", *sorted(before)[1:2]])
        assert np.array_equal(items[f"renamed-{first}"].vector, before[first])
        assert np.array_equal(items["copy.jpg"].vector, before[first])
        assert np.array_equal(items["dated-renamed.jpg"].vector, before["dated.jpg"])
        assert items["dated-renamed.jpg"].metadata.get("taken") == "2019-07-14T10:30:00"


def test_a_scans_status_line_says_it_waits_for_the_model(scanned_db, tmp_path, monkeypatch):
    path, _ = scanned_db
    shutil.copytree(path, tmp_path / "db")
    photos = tmp_path / "photos"
    photos.mkdir()
    for p in coco_photos(44)[41:]:  # not in the database: they need the model
        shutil.copy(p, photos)
    real_load, released = database.load_model, threading.Event()

    def held_load(config):
        assert released.wait(LIVENESS_S), "the test never released the load"
        return real_load(config)

    monkeypatch.setattr(database, "load_model", held_load)

    async def session() -> tuple[str, str, ScanReport]:
        with NanoDB(tmp_path / "db", config="test") as db:
            service = IngestService(db)
            task = service.scan(str(photos))
            report = service.scans[0][1]
            deadline = time.monotonic() + LIVENESS_S
            while db.model_loading_for is None:
                assert time.monotonic() < deadline and not task.done()
                await asyncio.sleep(0.01)
            line, status = report.status(), service.status()
            released.set()
            await asyncio.wait_for(task, LIVENESS_S)
            await service.stop()
        return line, status, report

    line, status, report = asyncio.run(session())
    assert re.match(r"0/3 files, loading the model ViT-S-32 \(\d+s\), 0 errors", line), line
    assert status.count("loading the model") == 1, status  # said once, by the scan's line
    assert report.waiting is None and report.added == 3 and "images/s" in report.status()

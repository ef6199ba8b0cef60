"""Decoder time and memory bombs: every decode of an untrusted file (scan, upload, query image,
thumbnail) runs in a worker process that its limits kill, and costs only its own file or request.

The bombs are small and quick to make, and slow or hungry to decode: a progressive JPEG with one
scan repeated 20,000 times (a minute or more of decoding), a 16-bit PNG that needs ~300 MB to become
RGB. The limits are set low for these tests: 2 s and 100 MiB.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time

import httpx
import numpy as np
import pytest
from helpers import coco_photos, hostile_corpus

from nanodb.database import NanoDB
from nanodb.media.opener import open_image
from nanodb.media.paths import printable
from nanodb.media.record import FileRecord, content_hash
from nanodb.search.query import QueryError

LIMITS = {"decode_seconds": 2, "decode_memory_mb": 100}
SLACK_S = 8.0  # a bomb's answer may take its limit, plus a worker's start on a busy machine


def test_a_tiff_of_many_pages_opens_without_counting_them():
    """The opener decodes the first page; counting 20,000 pages took seconds (150,000: minutes)."""
    data = hostile_corpus.tiff_of_many_pages(20_000)
    start = time.monotonic()
    assert open_image(data).size == (1, 1)
    assert time.monotonic() - start < 1.0


@pytest.mark.timeout(180)
def test_a_scan_skips_time_and_memory_bombs_with_one_line_each_and_indexes_the_rest(tmp_path, caplog):
    folder = tmp_path / "photos"
    folder.mkdir()
    good = {str(shutil.copy2(p, folder / p.name)) for p in coco_photos(3)}
    slow, hungry = folder / "slow.jpg", folder / "hungry.png"
    slow.write_bytes(hostile_corpus.jpeg_time_bomb())
    hungry.write_bytes(hostile_corpus.png16_memory_bomb())
    with NanoDB(tmp_path / "db", config="test", **LIMITS) as db:
        db.model  # noqa: B018 (loaded now: the time below is the scan's)
        start = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="nanodb.pipeline"):
            report = db.scan(folder)
        seconds = time.monotonic() - start
        reasons = dict(report.failures)
        assert set(reasons) == {str(slow), str(hungry)}
        assert "took too long to decode (over 2 s)" in reasons[str(slow)]
        assert "needs too much memory to decode (over 100 MiB)" in reasons[str(hungry)]
        assert report.added == len(good) and {db[i].path for i in range(len(db))} == good
        for bomb in (slow, hungry):
            assert sum(printable(str(bomb)) in r.getMessage() for r in caplog.records) == 1
        # the time bomb is met twice (in the pool, then alone to tell it from the files beside it)
        assert seconds < 2 * LIMITS["decode_seconds"] + 30


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(db, client, bomb index): 3 photos, and a time bomb indexed as it would have been before the
    limits (or with higher ones), served with the test's limits."""
    from nanodb.interfaces.server import start_server

    root = tmp_path_factory.mktemp("bombs")
    photos = [shutil.copy2(p, root / p.name) for p in coco_photos(3)]
    bomb = root / "slow.jpg"
    bomb.write_bytes(hostile_corpus.jpeg_time_bomb())
    db = NanoDB(root / "db", config="test", **LIMITS)
    db.add([str(p) for p in photos])
    st = bomb.stat()
    record = FileRecord(path=str(bomb), hash=content_hash(bomb.read_bytes()), size=st.st_size, mtime=st.st_mtime)
    [index] = db.store.append(np.ones((1, db.dim), np.float32), [record])
    server = start_server(db, "127.0.0.1", 0)
    with httpx.Client(base_url=server.url, timeout=120) as client:
        yield db, client, index
    server.stop()
    db.close()


def timed(call):
    start = time.monotonic()
    result = call()
    return result, time.monotonic() - start


@pytest.mark.timeout(180)
def test_an_uploaded_time_bomb_is_refused_within_the_limit_while_others_are_answered(served):
    db, client, _ = served
    photo = coco_photos(1)[0].read_bytes()
    assert client.post("/api/search/image", files={"file": ("a.jpg", photo)}).status_code == 200  # a warm worker
    answer = {}
    upload = threading.Thread(target=lambda: answer.update(bomb=timed(lambda: client.post(
        "/api/search/image", files={"file": ("slow.jpg", hostile_corpus.jpeg_time_bomb())}))))
    upload.start()
    others = []
    with httpx.Client(base_url=client.base_url, timeout=120) as other:
        while upload.is_alive() and len(others) < 200:
            others.append(timed(lambda: other.get("/api/search/text", params={"q": "a dog", "k": 3})))
            others.append(timed(lambda: other.post("/api/search/image", files={"file": ("b.jpg", photo)})))
    upload.join()
    r, seconds = answer["bomb"]
    assert r.status_code == 400 and "took too long to decode (over 2 s)" in r.json()["error"], r.text
    assert seconds < LIMITS["decode_seconds"] + SLACK_S
    assert len(others) >= 2 and all(o.status_code == 200 for o, _ in others)
    assert max(s for _, s in others) < 5.0, [round(s, 2) for _, s in others]  # a bomb held them 160 s


def test_an_uploaded_memory_bomb_is_refused(served):
    _, client, _ = served
    r = client.post("/api/search/image", files={"file": ("hungry.png", hostile_corpus.png16_memory_bomb())})
    assert r.status_code == 413 and "needs too much memory to decode (over 100 MiB)" in r.json()["error"], r.text


@pytest.mark.timeout(180)
def test_the_thumbnail_of_an_indexed_time_bomb_is_refused_in_time_and_then_at_once(served):
    _, client, index = served
    r, seconds = timed(lambda: client.get(f"/api/items/{index}/thumbnail"))
    assert r.status_code == 404 and "took too long to decode" in r.json()["error"], r.text
    assert seconds < LIMITS["decode_seconds"] + SLACK_S
    r, seconds = timed(lambda: client.get(f"/api/items/{index}/thumbnail"))
    assert r.status_code == 404 and seconds < LIMITS["decode_seconds"]  # not decoded again
    assert client.get("/api/items/0/thumbnail").status_code == 200


@pytest.mark.timeout(180)
def test_searching_by_a_time_bomb_file_is_refused_within_the_limit(served, tmp_path):
    db, _, _ = served
    bomb = tmp_path / "other.jpg"  # not the indexed bomb, whose stored vector would be used
    bomb.write_bytes(hostile_corpus.jpeg_time_bomb(20_001))
    start = time.monotonic()
    with pytest.raises(QueryError, match="took too long to decode"):
        db.search(image=str(bomb))
    assert time.monotonic() - start < LIMITS["decode_seconds"] + SLACK_S


@pytest.mark.timeout(180)
@pytest.mark.parametrize("bomb, reason", [
    (hostile_corpus.jpeg_time_bomb, "took too long to decode (over 2 s)"),
    (hostile_corpus.png16_memory_bomb, "needs too much memory to decode (over 100 MiB)"),
], ids=["time", "memory"])
def test_adding_a_bomb_by_its_path_is_refused_by_the_decode_limits(tmp_path, bomb, reason):
    """NanoDB.add(path) decodes in the scan's limited workers: a bomb is refused with the limit's reason,
    in one line, and nothing of it is added (it used to be decoded, for a minute, in the caller's process)."""
    path = tmp_path / "bomb.png"
    path.write_bytes(bomb())
    photo = coco_photos(1)[0]
    with NanoDB(tmp_path / "db", config="test", **LIMITS) as db:
        with pytest.raises(ValueError) as refused:
            db.add([str(photo), str(path)])
        assert str(refused.value) == f"cannot add {path}: {reason}"
        assert len(db) == 0
        assert db.add(str(photo)) == [0]  # the workers go on after a bomb

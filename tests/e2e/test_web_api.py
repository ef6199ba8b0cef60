"""The HTTP API on a real server (127.0.0.1, a free port) over a small database of real photos."""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from helpers import PHOTOS
from PIL import Image

from nanodb.database import NanoDB
from nanodb.interfaces import web
from nanodb.interfaces.search_service import SearchService
from nanodb.interfaces.server import parse_auth, start_server

COCO = PHOTOS


def copy_photos(folder: Path, count: int, skip: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    photos = sorted(COCO.glob("*.jpg"))[skip : skip + count]
    return [Path(shutil.copy2(p, folder / p.name)) for p in photos]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(db, client, photos): 24 photos added, plus one item without a file, served on a free port."""
    root = tmp_path_factory.mktemp("web")
    photos = copy_photos(root / "photos", 24)
    db = NanoDB(root / "db", config="test")
    db.add([str(p) for p in photos])
    db.add(np.ones(db.dim, np.float32), paths=["/etc/passwd"])  # a label, not an indexed file
    server = start_server(db, "127.0.0.1", 0)
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield db, client, photos
    server.stop()
    db.close()


def assert_valid_top_k(db: NanoDB, query_vector: np.ndarray, results: list[dict], k: int, seen_before: int,
                       seen_after: int) -> None:
    """`results` is an exact top-k over the first n items, for some n between the two counts seen."""
    vectors = db.vectors[:seen_after].astype(np.float32)
    live = np.array([db.has_item(i) for i in range(seen_after)], bool)
    sims = vectors @ query_vector
    got = [r["index"] for r in results]
    assert min(k, int(live[:seen_before].sum())) <= len(got) <= min(k, int(live.sum()))
    assert len(set(got)) == len(got)
    assert all(0 <= i < seen_after and live[i] for i in got)
    scores = [r["similarity"] for r in results]
    assert scores == sorted(scores, reverse=True)
    assert np.allclose(scores, sims[got], atol=2e-3)
    others = np.setdiff1d(np.flatnonzero(live[:seen_before]), got)
    if len(got) and len(others):
        assert sims[others].max() <= min(scores) + 2e-3


def test_text_search_returns_exact_top_k(served):
    db, client, _ = served
    r = client.get("/api/search/text", params={"q": "a dog on a beach", "k": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["results"]) == 5 and body["items"] == len(db)
    n = db.store.rows
    assert_valid_top_k(db, db.embed_query("a dog on a beach"), body["results"], 5, n, n)


def test_combined_query_searches_the_weighted_sum(served):
    db, client, _ = served
    body = client.get("/api/search/text", params={"q": "2:dog + beach - snow", "k": 4}).json()
    d, b, s = (db.embed_query(t) for t in ("dog", "beach", "snow"))
    expected = 2 * d + b - s
    n = db.store.rows
    assert_valid_top_k(db, expected / np.linalg.norm(expected), body["results"], 4, n, n)


def test_search_by_uploaded_photo_finds_it_first(served):
    db, client, photos = served
    photo = photos[7]
    r = client.post("/api/search/image", params={"k": 3}, files={"file": (photo.name, photo.read_bytes())})
    assert r.status_code == 200, r.text
    first = r.json()["results"][0]
    assert first["path"] == str(photo) and first["similarity"] > 0.99


def test_search_by_item_finds_it_first_and_honours_min_similarity(served):
    db, client, _ = served
    body = client.get("/api/search/item/3", params={"k": 10}).json()
    assert body["results"][0]["index"] == 3
    floor = body["results"][4]["similarity"]
    filtered = client.get("/api/search/item/3", params={"k": 10, "min_similarity": floor}).json()["results"]
    assert [r["index"] for r in filtered] == [r["index"] for r in body["results"] if r["similarity"] >= floor]


def test_stats_report_items_and_timings(served):
    db, client, _ = served
    client.get("/api/search/text", params={"q": "a cat"})
    stats = client.get("/api/stats").json()
    assert stats["items"] == len(db)
    assert stats["text_encode_ms"] > 0 and stats["search_ms"] >= 0
    assert stats["scans"] == []


def test_thumbnail_is_small_jpeg_cached_beside_the_database(served):
    db, client, _ = served
    r = client.get("/api/items/2/thumbnail")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    thumb = Image.open(io.BytesIO(r.content))
    assert max(thumb.size) <= 256
    cached = list((db.path / "thumbnails").rglob("*.jpg"))
    assert any(p.read_bytes() == r.content for p in cached)


def test_original_is_the_indexed_file(served):
    db, client, photos = served
    r = client.get("/api/items/5/original")
    assert r.status_code == 200
    assert r.content == Path(db.path_of(5)).read_bytes()


def test_item_info(served):
    db, client, photos = served
    info = client.get("/api/items/1").json()
    assert info["path"] == str(photos[1]) and info["size"] == photos[1].stat().st_size


@pytest.mark.parametrize(
    "url",
    [
        "/api/items/../../../../etc/passwd",
        "/api/items/..%2F..%2F..%2Fetc%2Fpasswd/original",
        "/api/items/%2e%2e%2f%2e%2e%2fetc%2fpasswd/original",
        "/api/items/%2Fetc%2Fpasswd/original",
        "/api/items/-1/original",
        "/api/items/999999/original",
        "/api/items/24/original",  # the item added with a label only
        "/api/items/24/thumbnail",
        "/api/items/1e3/original",
        "/api/items/0x1/thumbnail",
        "/gradio_api/file=/etc/passwd",
        "/gradio_api/file=..%2F..%2F..%2Fetc%2Fpasswd",
    ],
)
def test_only_indexed_files_are_served(served, url):
    _, client, _ = served
    r = client.get(url)
    assert r.status_code in (400, 403, 404, 422), (url, r.status_code)
    assert b"root:" not in r.content


def test_a_file_swapped_for_a_symlink_is_refused(served, tmp_path):
    db, client, _ = served
    victim = tmp_path / "photo.jpg"
    shutil.copy2(sorted(COCO.glob("*.jpg"))[30], victim)
    (index,) = db.add([str(victim)])
    assert client.get(f"/api/items/{index}/original").status_code == 200
    secret = tmp_path / "secret.txt"
    secret.write_text("top secret")
    victim.unlink()
    victim.symlink_to(secret)
    for what in ("original", "thumbnail"):
        r = client.get(f"/api/items/{index}/{what}")
        assert r.status_code == 404 and b"top secret" not in r.content
    db.delete([index])


@pytest.mark.parametrize(
    "params, message",
    [
        ({"q": "dog", "k": 0}, "k must be at least 1"),
        ({"q": "dog", "k": -5}, "k must be at least 1"),
        ({"q": "dog", "k": 10**9}, "k must be at most"),
        ({"q": "dog", "k": "many"}, "k:"),
        ({"q": "dog", "min_similarity": 2}, "min_similarity must be between"),
        ({"q": "dog", "min_similarity": "nan"}, "min_similarity must be between"),
        ({"q": ""}, "empty query"),
        ({"q": "   "}, "empty query"),
        ({"q": "x" * 100_000}, "characters long"),
        ({"q": "dog + dog - 2:dog"}, "cancel out"),
        ({"q": "dog + "}, "missing"),
        ({}, "q:"),
    ],
)
def test_bad_parameters_get_one_line_errors(served, params, message):
    _, client, _ = served
    responses = [client.post("/api/search/text", json=params)]
    if len(params.get("q", "")) < 1000:
        responses.append(client.get("/api/search/text", params=params))
    for r in responses:
        assert 400 <= r.status_code < 500, r.text
        error = r.json()["error"]
        assert message in error and "\n" not in error and "Traceback" not in error


def test_bad_uploads_get_clear_errors_and_the_server_keeps_serving(served, tmp_path):
    db, client, photos = served
    truncated = photos[0].read_bytes()[:2000]
    oversized = b"\xff\xd8" + os.urandom(33 << 20)
    for name, data, message in [
        ("notes.txt", b"hello, not an image", "not an image"),
        ("empty.jpg", b"", "empty"),
        ("cut.jpg", truncated, "damaged"),
        ("huge.jpg", oversized, "at most 32 MB"),
    ]:
        r = client.post("/api/search/image", files={"file": (name, data)})
        assert r.status_code == (413 if name == "huge.jpg" else 400), (name, r.text)
        assert message in r.json()["error"]
    r = client.post("/api/search/image", params={"k": 0}, files={"file": ("a.jpg", photos[0].read_bytes())})
    assert r.status_code == 400
    assert client.get("/api/search/text", params={"q": "still serving", "k": 2}).status_code == 200


def test_openapi_schema_describes_the_endpoints(served):
    _, client, _ = served
    paths = client.get("/openapi.json").json()["paths"]
    for path in ("/api/search/text", "/api/search/image", "/api/search/item/{index}", "/api/stats",
                 "/api/items/{index}/thumbnail", "/api/items/{index}/original"):
        assert path in paths


def test_auth_is_required_when_set(tmp_path):
    db = NanoDB(tmp_path / "db", config="test")
    db.add(np.ones(db.dim, np.float32))
    server = start_server(db, "127.0.0.1", 0, auth=parse_auth("ann:s3cret:x"))
    try:
        assert httpx.get(server.url + "api/stats").status_code == 401
        assert httpx.get(server.url, auth=("ann", "wrong")).status_code == 401
        assert httpx.get(server.url + "api/stats", auth=("ann", "s3cret:x")).json()["items"] == 1
        assert httpx.get(server.url, auth=("ann", "s3cret:x")).status_code == 200
    finally:
        server.stop()
        db.close()
    with pytest.raises(ValueError, match="USER:PASS"):
        parse_auth("nopassword")


def test_twenty_clients_query_while_a_scan_runs(served, tmp_path):
    """Every answer is an exact top-k of the items indexed when it was computed; no request fails."""
    db, client, _ = served
    incoming = copy_photos(tmp_path / "incoming", 40, skip=40)
    queries = [f"a photo of {w}" for w in ("a dog", "a street", "food", "people", "a room")]
    query_vectors = {q: db.embed_query(q) for q in queries}
    scan = threading.Thread(target=db.scan, args=(str(incoming[0].parent),))
    errors: list[str] = []
    answers: list[tuple[str, list[dict], int, int]] = []
    scans_seen: list[dict] = []

    def one_client(n: int) -> None:
        with httpx.Client(base_url=client.base_url, timeout=120) as c:
            for i in range(60):  # bounded: stops after the scan, or after 60 requests at most
                if i >= 3 and not scan.is_alive():
                    break
                q = queries[(n + i) % len(queries)]
                before = db.store.rows
                r = c.get("/api/search/text", params={"q": q, "k": 10})
                after = db.store.rows
                if r.status_code != 200:
                    errors.append(r.text)
                    continue
                answers.append((q, r.json()["results"], before, after))

    def watch_stats() -> None:
        with httpx.Client(base_url=client.base_url, timeout=120) as c:
            while scan.is_alive() and not scans_seen:
                scans_seen.extend(c.get("/api/stats").json()["scans"])
                time.sleep(0.02)

    start = db.store.rows
    scan.start()
    while db.store.rows == start and scan.is_alive():  # the first batch is in: the scan is streaming
        time.sleep(0.05)
    clients = [threading.Thread(target=one_client, args=(n,)) for n in range(20)]
    clients.append(threading.Thread(target=watch_stats))
    for t in clients:
        t.start()
    for t in clients:
        t.join()
    scan.join()
    assert not errors
    assert len(answers) >= 20 * 3
    for q, results, before, after in answers:
        assert_valid_top_k(db, query_vectors[q], results, 10, before, after)
    assert db.store.rows == start + 40
    assert len({a[2] for a in answers}) > 1, "the queries did not overlap the scan"
    assert scans_seen, "the stats never showed the running scan"


def test_cli_serves_while_its_scan_runs_and_exits_on_command(tmp_path):
    """`nanodb --server --scan DIR`: the API answers during the scan; `exit` saves and stops the server."""
    photos = copy_photos(tmp_path / "photos", 20)
    proc = subprocess.Popen(
        [sys.executable, "-m", "nanodb", "--path", str(tmp_path / "db"), "--config", "test", "--server",
         "--host", "127.0.0.1", "--port", "0", "--scan", str(photos[0].parent)],
        stdin=subprocess.PIPE, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        url = None
        for line in proc.stderr:
            if m := re.search(r"web UI at (http://\S+)", line):
                url = m.group(1)
                break
        assert url, "the server did not start"
        counts = []
        while not counts or counts[-1] < 20:
            assert proc.poll() is None
            counts.append(httpx.get(url + "api/stats", timeout=60).json()["items"])
            time.sleep(0.2)
        out, err = proc.communicate("a red car\nexit\n", timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert counts[0] < 20, "the scan ended before the server answered"
    assert out.count("* index=") == 8 and "saved 20 items" in err
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "api/stats")


def test_an_item_added_as_a_bare_vector_has_null_links_and_the_web_ui_shows_no_broken_one(tmp_path):
    """Its thumbnail and original would answer 404: the API says null, and the web UI's duplicate tiles and
    lightbox show that there is no file instead of a link to None."""
    photo = copy_photos(tmp_path / "photos", 1)[0]
    db = NanoDB(tmp_path / "db", config="test")
    db.add([str(photo)])
    (bare,) = db.add(db[0].vector.astype(np.float32))  # the photo's vector: the two are near-duplicates
    server = start_server(db, "127.0.0.1", 0)
    try:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            results = client.get(f"/api/search/item/{bare}", params={"k": 2}).json()["results"]
            links = {r["index"]: (r["thumbnail"], r["original"]) for r in results}
            assert links[bare] == (None, None), results
            assert all(client.get(link).status_code == 200 for link in links[0]), results
            groups = client.get("/api/duplicates", params={"threshold": 0.99}).json()["groups"]
            members = {m["index"]: m for m in groups[0]["items"]}
            assert (members[bare]["thumbnail"], members[bare]["original"]) == (None, None), groups
            assert members[0]["thumbnail"] == links[0][0]
        page = web.duplicates_html({"groups": groups}, "http://x")
        assert "None" not in page and page.count("<img") == 1 and web.NO_FILE in page, page
        service = SearchService(db)
        try:
            lightbox = web.SearchEvents(service).lightbox_html([(bare, 1.0, 1)], 0, None)
        finally:
            service.close()
        assert "None" not in lightbox and "open original" not in lightbox and web.NO_FILE in lightbox, lightbox
    finally:
        server.stop()
        db.close()


def test_k_defaults_to_8_over_http_as_in_the_console_and_the_python_api(served):
    db, client, photos = served
    assert len(db) > 8 and db.settings.k == 8
    answers = [client.get("/api/search/text", params={"q": "a dog"}),
               client.post("/api/search/text", json={"q": "a dog"}),
               client.get("/api/search/item/3"),
               client.post("/api/search/image", files={"file": (photos[0].name, photos[0].read_bytes())})]
    assert [len(r.json()["results"]) for r in answers] == [8] * 4, [r.text[:200] for r in answers]
    assert len(db.search("a dog")) == 8

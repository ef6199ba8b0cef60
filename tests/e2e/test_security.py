"""The server attacked as a hostile client would (issue 10): no file outside the index is let out, no
request brings the server down or grows its memory without bound, and the writer lock and commit
check lose nothing. A real server on 127.0.0.1 (a free port) over a few real photos."""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
from gradio.utils import get_upload_folder
from helpers import PHOTOS, REPO
from PIL import Image

from nanodb.database import NanoDB
from nanodb.interfaces.server import start_server
from nanodb.search.query import MAX_TERMS
from nanodb.search.text_cache import TEXT_VECTORS
from nanodb.storage.commit import commit_append, commit_generation
from nanodb.storage.format import DatabaseError, Manifest, read_manifest

COCO = PHOTOS
SECRET = b"nanodb-secret-" + os.urandom(8).hex().encode() + b": never served"  # unique to this run
# The web UI's search options after the query: k, min similarity, folder, since, until, types, collapse
WEB_OPTIONS = [3, -1, "", "", "", [], True]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(db, client, root): 6 photos and a secret.txt beside them, served on a free port."""
    root = tmp_path_factory.mktemp("security")
    (root / "photos").mkdir()
    photos = [Path(shutil.copy2(p, root / "photos" / p.name)) for p in sorted(COCO.glob("*.jpg"))[:6]]
    (root / "photos" / "secret.txt").write_bytes(SECRET)
    db = NanoDB(root / "db", config="test")
    db.add([str(p) for p in photos])
    db.save()
    server = start_server(db, "127.0.0.1", 0)
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield db, client, root
    server.stop()
    db.close()


SERVE = """
import sys, time
from nanodb.database import NanoDB
from nanodb.interfaces.server import start_server
db = NanoDB(sys.argv[1], config="test", read_only=True)
print(start_server(db, "127.0.0.1", 0).url, flush=True)
time.sleep(3600)
"""


@pytest.fixture(scope="module")
def separate_server(served):
    """(client, process): the served database, read-only, served by another process, whose memory
    alone is measured."""
    db, _, _ = served

    proc = subprocess.Popen([sys.executable, "-c", SERVE, str(db.path)], stdout=subprocess.PIPE, text=True)
    try:
        url = proc.stdout.readline().strip()
        assert url.startswith("http"), "the server did not start"
        with httpx.Client(base_url=url, timeout=120) as client:
            yield client, psutil.Process(proc.pid)
    finally:
        proc.kill()
        proc.wait()


def peak_rss(process: psutil.Process) -> int:
    """The process's peak memory since the last call (Linux: VmHWM, then reset), so a spike that
    was freed again still counts."""
    status = Path(f"/proc/{process.pid}/status").read_text()
    peak = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) * 1024
    Path(f"/proc/{process.pid}/clear_refs").write_text("5")
    return peak


def png(width: int, height: int) -> bytes:
    """A small file that claims many pixels."""
    buf = io.BytesIO()
    Image.new("1", (width, height)).save(buf, "PNG", optimize=True)
    return buf.getvalue()


def file_descriptor(path: str) -> dict:
    return {"path": path, "meta": {"_type": "gradio.FileData"}}


def event_inputs(endpoint: dict, at: int, value) -> list:
    """The inputs of a web UI event with `value` at position `at` (appended past the last one)."""
    data = [p.get("parameter_default", p.get("example_input")) for p in endpoint["parameters"]]
    if at < len(data):
        data[at] = value
    else:
        data.append(value)
    return data


def secret_copies() -> list[Path]:
    folder = Path(get_upload_folder())
    return [p for p in folder.rglob("*") if p.is_file() and p.stat().st_size == len(SECRET)
            and p.read_bytes() == SECRET] if folder.is_dir() else []


def call_event(client: httpx.Client, name: str, data: list) -> tuple[int, str]:
    """Run a web UI event through Gradio's HTTP API: (status of the call, text of its outcome)."""
    r = client.post(f"/gradio_api/call/{name}", json={"data": data})
    if r.status_code != 200:
        return r.status_code, r.text
    return 200, client.get(f"/gradio_api/call/{name}/{r.json()['event_id']}").text


# ------------------------------------------------------------------ 1, 2: files named in the web UI's events
def test_every_web_ui_event_refuses_files_outside_its_uploads(served):
    db, client, root = served
    endpoints = client.get("/gradio_api/info").json()["named_endpoints"]
    assert len(endpoints) >= 4, "the web UI lost its events"
    targets = [str(root / "photos" / "secret.txt"), str(db.path / "nanodb.json"), "/etc/passwd",
               "/proc/self/environ", f"{get_upload_folder()}/../../{root}/photos/secret.txt",
               f"{client.base_url}api/stats"]
    for name, endpoint in endpoints.items():
        for at in range(len(endpoint["parameters"]) + 1):
            for target in targets:
                data = event_inputs(endpoint, at, file_descriptor(target))
                for route, body in ((f"/gradio_api/call{name}", {"data": data}),
                                    (f"/gradio_api/run{name}", {"data": data}),
                                    ("/gradio_api/queue/join", {"data": data, "fn_index": 0, "session_hash": "x"})):
                    r = client.post(route, json=body)
                    assert r.status_code == 403, (route, target, r.text)
                    assert set(r.json()) == {"error"} and "uploaded" in r.json()["error"]
    assert not secret_copies(), "a copy of a server file was made"
    for path in (root / "photos" / "secret.txt", "/etc/passwd"):
        assert client.get(f"/gradio_api/file={path}").status_code == 403


def test_dev_zero_is_refused_at_once_and_the_server_keeps_answering(served):
    _, client, _ = served
    hung = []

    def call():
        try:
            data = [file_descriptor("/dev/zero"), *WEB_OPTIONS]
            hung.append(client.post("/gradio_api/call/on_image", json={"data": data},
                                    timeout=30).status_code)
        except httpx.TimeoutException:
            hung.append("hung")

    thread = threading.Thread(target=call)
    thread.start()
    thread.join(60)
    assert hung == [403]
    assert client.get("/api/stats", timeout=30).status_code == 200


def test_gradio_file_route_sends_only_uploads_and_fetches_no_url(served):
    _, client, root = served
    photo = sorted((root / "photos").glob("*.jpg"))[0]
    uploaded = client.post("/gradio_api/upload", files={"files": (photo.name, photo.read_bytes())}).json()[0]
    assert client.get(f"/gradio_api/file={uploaded}").content == photo.read_bytes()
    for path in [f"file={photo}", "file=http://example.com/", "file=https://example.com/x.png",
                 f"file/{photo}", "proxy=http://example.com/", f"file={uploaded}/../../../{photo}"]:
        r = client.get(f"/gradio_api/{path}")
        assert r.status_code == 403 and set(r.json()) == {"error"}, (path, r.text)
    # and an upload is searchable through the web UI's event
    status, outcome = call_event(client, "/on_image".lstrip("/"), [file_descriptor(uploaded), *WEB_OPTIONS])
    assert status == 200 and "event: complete" in outcome and "/api/items/" in outcome


# ------------------------------------------------------------------ 3: text is text
def test_http_text_naming_a_server_file_is_searched_as_text(served):
    db, client, root = served
    photo = str(sorted((root / "photos").glob("*.jpg"))[0])
    fake = root / "photos" / "notes.jpg"
    fake.write_text("not an image")
    for q in (photo, str(fake)):
        r = client.get("/api/search/text", params={"q": q, "k": 6})
        assert r.status_code == 200, r.text
        assert [x["index"] for x in r.json()["results"]] == [x.index for x in db.search(text=q, k=6)]
    by_image = db.search(image=photo, k=1)[0]
    assert by_image.similarity > 0.99  # the photo itself: what a path query would have answered
    assert client.get("/api/search/text", params={"q": photo, "k": 1}).json()["results"][0]["similarity"] < 0.99


# ------------------------------------------------------------------ 4: request bodies
def test_large_bodies_are_refused_and_memory_stays_bounded(separate_server):
    client, server = separate_server
    body = b'{"q": "' + b"a" * (50 << 20) + b'"}'
    peak_rss(server)  # reset the peak
    before = server.memory_info().rss

    def post(chunked: bool):
        content = (body[i:i + (1 << 20)] for i in range(0, len(body), 1 << 20)) if chunked else body
        return client.post("/api/search/text", content=content, headers={"content-type": "application/json"})

    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(post, [False, True] * 3))
    assert all(r.status_code == 413 and "at most 1 MB" in r.json()["error"] for r in answers), answers[0].text
    assert peak_rss(server) - before < 100 << 20
    assert client.get("/api/stats").status_code == 200


# ------------------------------------------------------------------ 5, 6: image dimensions
def test_uploads_with_huge_dimensions_are_refused_from_the_header(served, separate_server):
    _, _, root = served
    client, server = separate_server
    bomb = png(9000, 9000)  # ~10 KB, 81 megapixels: under the scan limit, over the upload limit
    assert len(bomb) < 100_000
    client.get("/api/search/text", params={"q": "warm up"})
    # the image tower is loaded by the first image query (and kept while used): load it before measuring
    assert client.post("/api/search/image", files={"file": ("w.png", png(64, 64))}).status_code == 200
    peak_rss(server)  # reset the peak
    before = server.memory_info().rss
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: client.post("/api/search/image", files={"file": ("b.png", bomb)}),
                                range(4)))
    assert all(r.status_code == 413 and "resize it" in r.json()["error"] for r in answers), answers[0].text
    assert peak_rss(server) - before < 100 << 20
    strip = client.post("/api/search/image", files={"file": ("s.png", png(1, 20000))})
    assert strip.status_code == 413 and "absurd dimensions" in strip.json()["error"]
    # a big JPEG is fine: it is decoded at a reduced scale
    big = io.BytesIO()
    Image.open(sorted((root / "photos").glob("*.jpg"))[0]).resize((6000, 4500)).save(big, "JPEG")
    assert client.post("/api/search/image", files={"file": ("big.jpg", big.getvalue())}).status_code == 200


def test_web_ui_upload_is_not_decoded_before_nanodbs_checks(separate_server):
    client, server = separate_server
    uploaded = client.post("/gradio_api/upload", files={"files": ("b.png", png(13000, 13000))}).json()[0]
    peak_rss(server)  # reset the peak
    before = server.memory_info().rss
    status, outcome = call_event(client, "on_image", [file_descriptor(uploaded), *WEB_OPTIONS])
    assert status == 200 and "too large" in outcome, outcome[:300]
    assert peak_rss(server) - before < 100 << 20


def test_a_path_query_then_a_huge_upload_is_a_clear_error_not_a_500(served):
    _, client, root = served
    photo = str(sorted((root / "photos").glob("*.jpg"))[0])
    assert client.get("/api/search/text", params={"q": photo}).status_code == 200
    r = client.post("/api/search/image", files={"file": ("b.png", png(13000, 13000))})
    assert r.status_code == 413 and "too large" in r.json()["error"], r.text


# ------------------------------------------------------------------ 7: combined queries
def test_combined_queries_are_bounded_and_encoded_in_one_batch(served):
    db, client, _ = served
    r = client.get("/api/search/text", params={"q": " + ".join(["a"] * 241)})
    assert r.status_code == 400 and f"at most {MAX_TERMS}" in r.json()["error"]
    calls = []
    model = db.text_model  # what encodes words: the text tower's export, or the model
    encode = model.encode_each

    def counting(texts):
        calls.append(list(texts))
        return encode(texts)

    TEXT_VECTORS.clear()  # none of the words kept from an earlier query
    model.encode_each = counting
    try:
        db.search(text="2:dog + beach - snow + a cat", k=2)
    finally:
        del model.encode_each
    assert calls == [["dog", "beach", "snow", "a cat"]]


# ------------------------------------------------------------------ 8: a swapped original
def test_an_original_swapped_for_a_link_of_the_same_size_and_mtime_is_refused(tmp_path):
    (tmp_path / "photos").mkdir()
    photo = Path(shutil.copy2(sorted(COCO.glob("*.jpg"))[0], tmp_path / "photos" / "a.jpg"))
    with NanoDB(tmp_path / "db", config="test") as db:
        db.add([str(photo)])
        outside = tmp_path / "outside.bin"
        outside.write_bytes(SECRET.ljust(photo.stat().st_size, b"!"))
        st = photo.stat()
        os.utime(outside, ns=(st.st_atime_ns, st.st_mtime_ns))
        server = start_server(db, "127.0.0.1", 0)
        try:
            with httpx.Client(base_url=server.url, timeout=60) as client:
                assert client.get("/api/items/0/original").content == photo.read_bytes()
                photo.unlink()
                photo.symlink_to(outside)
                assert os.stat(photo).st_size == st.st_size and os.stat(photo).st_mtime == st.st_mtime
                for route in ("original", "thumbnail"):
                    r = client.get(f"/api/items/0/{route}")
                    assert r.status_code == 404 and "changed since it was indexed" in r.json()["error"], r.text
                    assert SECRET not in r.content
        finally:
            server.stop()


# ------------------------------------------------------------------ 9: two writers
def test_deleting_the_lock_file_does_not_let_a_second_writer_in(tmp_path, empty_db_path):
    root = tmp_path / "db"
    shutil.copytree(empty_db_path, root)
    with NanoDB(root, config="test") as first:
        first.add(np.eye(first.dim, dtype=np.float32)[:3], paths=["a", "b", "c"])
        (root / ".lock").unlink()
        with pytest.raises(DatabaseError, match="open for writing by another process"):
            NanoDB(root, config="test")
        first.save()
    with NanoDB(root, config="test", read_only=True) as db:
        assert len(db) == 3


def test_a_save_over_another_processs_commit_is_refused_and_loses_nothing(tmp_path, empty_db_path):
    root = tmp_path / "db"
    shutil.copytree(empty_db_path, root)
    stale = read_manifest(root)  # what writer A committed when it opened
    with NanoDB(root, config="test") as b:  # writer B, in while A's lock was defeated
        b.add(np.random.default_rng(0).standard_normal((150, b.dim)).astype(np.float32),
              paths=[f"b{i}" for i in range(150)])
        b.save()
    new = Manifest(**{**stale.__dict__, "count": 1, "paths_bytes": 1})
    appended = {"vectors": np.zeros(stale.dim, "<f2"), "items": np.zeros(1, "V48").tobytes(), "paths": b"a",
                "meta": b"", "deleted": b""}
    with pytest.raises(DatabaseError, match="another process changed it"):
        commit_append(root, stale, new, appended)
    with pytest.raises(DatabaseError, match="another process changed it"):
        commit_generation(root, stale, Manifest(**{**new.__dict__, "generation": 1}), appended)
    with NanoDB(root, config="test", read_only=True) as db:  # checksums verified at opening
        assert len(db) == 150 and db.path_of(149) == "b149"


# ------------------------------------------------------------------ 10: smaller things
def test_unknown_api_routes_answer_nanodbs_json_error(served):
    _, client, _ = served
    for method, path in (("GET", "/api/nothing"), ("POST", "/api/search/nothing"), ("DELETE", "/api/items")):
        r = client.request(method, path)
        assert r.status_code == 404 and set(r.json()) == {"error"}, (method, path, r.text)


def test_malformed_web_ui_calls_get_a_400_and_result_streams_end_whole(served):
    _, client, _ = served
    endpoints = client.get("/gradio_api/info").json()["named_endpoints"]
    name = next(n for n, e in endpoints.items() if any(not p["parameter_has_default"] for p in e["parameters"]))
    for path, kwargs in ((f"/gradio_api/call/v2{name}", {"json": {}}),  # a required input missing
                         ("/gradio_api/call/v2/no_such_event", {"json": {}}),
                         ("/gradio_api/upload", {"data": {"files": "x"}, "files": {"y": ("y", b"")}})):  # text, no file
        r = client.post(path, **kwargs)
        assert r.status_code == 400 and set(r.json()) == {"error"} and "\n" not in r.json()["error"], (path, r.text)
    r = client.get(f"/gradio_api/call{name}/no-such-id")  # read whole: not cut short
    assert r.status_code == 200 and r.text.startswith("event: error")
    assert client.get("/api/stats").status_code == 200


def test_web_ui_uploads_are_deleted_when_the_server_stops(tmp_path, empty_db_path):
    shutil.copytree(empty_db_path, tmp_path / "db")
    with NanoDB(tmp_path / "db", config="test") as db:
        server = start_server(db, "127.0.0.1", 0)
        with httpx.Client(base_url=server.url, timeout=60) as client:
            uploaded = client.post("/gradio_api/upload", files={"files": ("x.png", png(8, 8))}).json()[0]
        assert os.path.exists(uploaded)
        server.stop()
    assert not os.path.exists(uploaded)


def test_a_cli_server_keeps_uploads_in_a_private_folder_removed_when_it_stops(tmp_path, empty_db_path):
    shutil.copytree(empty_db_path, tmp_path / "db")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("GRADIO_TEMP_DIR", None)
    proc = subprocess.Popen([sys.executable, "-m", "nanodb", "--path", str(tmp_path / "db"), "--config", "test",
                             "--server", "--host", "127.0.0.1", "--port", "0"], cwd=REPO, env=env,
                            stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        url = next(line.split(" at ")[1].split()[0] for line in proc.stderr if "web UI at" in line)
        with httpx.Client(base_url=url, timeout=60) as client:
            uploaded = Path(client.post("/gradio_api/upload", files={"files": ("x.png", png(8, 8))}).json()[0])
        own = [p for p in uploaded.parents if p.name.startswith("nanodb-uploads-")]
        assert own, f"the upload went to {uploaded}, not to a folder of the server's own"
        folder = own[0]
        assert uploaded.is_file() and (folder.stat().st_mode & 0o777) == 0o700
        assert not uploaded.is_relative_to(get_upload_folder())  # not the shared /tmp/gradio
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        proc.kill()
        proc.wait()
    assert not folder.exists()


def test_failed_logins_are_rate_limited_without_checking_the_password(tmp_path, empty_db_path):
    shutil.copytree(empty_db_path, tmp_path / "db")
    with NanoDB(tmp_path / "db", config="test") as db:
        server = start_server(db, "127.0.0.1", 0, auth=("ann", "s3cret"))
        try:
            with httpx.Client(base_url=server.url, timeout=60) as client:
                assert client.get("/api/stats").status_code == 401  # no credentials: not a guess
                statuses = [client.get("/api/stats", auth=("ann", f"guess{i}")).status_code for i in range(40)]
                assert statuses.count(401) <= 12 and statuses[-1] == 429
                r = client.get("/api/stats", auth=("ann", "s3cret"))
                assert r.status_code == 429 and set(r.json()) == {"error"}  # the right one is not even tried
        finally:
            server.stop()

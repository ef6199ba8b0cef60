"""A video's items over HTTP (a real server, a real clip made with PyAV from two COCO photos): each frame's
thumbnail is its scene, the original is sent by byte ranges, results say the frame's moment, and a video
changed since its scan is refused as a changed photo is."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
from helpers import coco_photos
from helpers.videos import SCENE_S, make_clip
from PIL import Image

import nanodb.media.record
from nanodb.database import NanoDB
from nanodb.interfaces.server import start_server
from nanodb.media.video import frame_time


def media_folder(root: Path) -> tuple[Path, Path, list[Path]]:
    """(the clip, the photo, the photos used): a two-scene clip and a photo of a third scene."""
    photos = coco_photos(3)
    folder = root / "media"
    folder.mkdir(parents=True)
    clip = make_clip(folder / "two scenes.mp4", photos[:2])
    photo = Path(shutil.copy2(photos[2], folder / "photo.jpg"))
    return clip, photo, photos


def indexes_of(db, path: Path) -> list[int]:
    """The live items of a file, by their frame's time."""
    found = [i for i in range(db.store.rows) if db.has_item(i) and db[i].path == str(path)]
    return sorted(found, key=lambda i: frame_time(db[i].metadata) or 0.0)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("video-web")
    clip, photo, photos = media_folder(root)
    db = NanoDB(root / "db", config="test")
    report = db.scan(clip.parent)
    assert (report.added, report.failed) == (2, 0), report.failures
    server = start_server(db, "127.0.0.1", 0)
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield db, client, clip, photo, photos
    server.stop()
    db.close()


def small_gray(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("L").resize((32, 24)), np.float32)


def test_each_frames_thumbnail_is_its_scene(served):
    db, client, clip, _, photos = served
    frames = indexes_of(db, clip)
    assert [frame_time(db[i].metadata) < SCENE_S for i in frames] == [True, False]
    scenes = [small_gray(Image.open(p)) for p in photos[:2]]
    for scene, index in enumerate(frames):
        r = client.get(f"/api/items/{index}/thumbnail")
        assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg", r.text
        thumb = Image.open(io.BytesIO(r.content))
        assert thumb.format == "JPEG" and max(thumb.size) <= 256
        distance = [float(np.abs(small_gray(thumb) - s).mean()) for s in scenes]
        assert distance[scene] < distance[1 - scene], distance


def test_the_original_is_sent_by_ranges(served):
    db, client, clip, _, _ = served
    data, index = clip.read_bytes(), indexes_of(db, clip)[1]
    size = len(data)
    whole = client.get(f"/api/items/{index}/original")
    assert whole.status_code == 200 and whole.content == data
    assert whole.headers["accept-ranges"] == "bytes" and whole.headers["content-type"] == "video/mp4"
    part = client.get(f"/api/items/{index}/original", headers={"Range": "bytes=100-1099"})
    assert part.status_code == 206 and part.content == data[100:1100]
    assert part.headers["content-range"] == f"bytes 100-1099/{size}" and part.headers["content-length"] == "1000"
    tail = client.get(f"/api/items/{index}/original", headers={"Range": "bytes=-10"})
    assert tail.status_code == 206 and tail.content == data[-10:]
    rest = client.get(f"/api/items/{index}/original", headers={"Range": f"bytes={size - 5}-"})
    assert rest.status_code == 206 and rest.content == data[-5:]
    past = client.get(f"/api/items/{index}/original", headers={"Range": f"bytes={size}-"})
    assert past.status_code == 416 and past.headers["content-range"] == f"bytes */{size}"
    assert "error" in past.json()
    several = client.get(f"/api/items/{index}/original", headers={"Range": "bytes=0-1,5-9"})
    assert several.status_code == 200 and several.content == data  # several ranges: the whole file


def test_results_and_items_carry_the_frames_time(served):
    db, client, clip, photo, _ = served
    results = client.get("/api/search/text", params={"q": "a photo", "k": 10}).json()["results"]
    by_path = {r["path"]: r for r in results}
    assert set(by_path) == {str(clip), str(photo)}  # the video once, at its best frame
    assert by_path[str(photo)]["time"] is None
    video = by_path[str(clip)]
    assert video["time"] == frame_time(db[video["index"]].metadata)
    info = client.get(f"/api/items/{video['index']}").json()
    assert info["time"] == video["time"] and info["metadata"]["time"] == video["time"]


def test_a_changed_video_is_refused_as_a_changed_photo_is(tmp_path):
    clip, photo, _ = media_folder(tmp_path)
    with NanoDB(tmp_path / "db", config="test") as db:
        db.scan(clip.parent)
        video_index, photo_index = indexes_of(db, clip)[0], indexes_of(db, photo)[0]
        for changed in (clip, photo):  # other bytes, the same size and mtime
            st = changed.stat()
            data = bytearray(changed.read_bytes())
            data[len(data) // 2 :] = bytes(len(data) - len(data) // 2)
            changed.write_bytes(bytes(data))
            os.utime(changed, ns=(st.st_atime_ns, st.st_mtime_ns))
        server = start_server(db, "127.0.0.1", 0)
        try:
            with httpx.Client(base_url=server.url, timeout=60) as client:
                for route in ("original", "thumbnail"):
                    answers = [client.get(f"/api/items/{i}/{route}", headers={"Range": "bytes=0-9"})
                               for i in (video_index, photo_index)]
                    assert [a.status_code for a in answers] == [404, 404]
                    errors = [a.json()["error"] for a in answers]
                    assert errors == [f"the file of item {i} changed since it was indexed; scan it again"
                                      for i in (video_index, photo_index)]
        finally:
            server.stop()


def test_head_answers_as_get_without_a_body(served):
    db, client, clip, photo, _ = served
    size = clip.stat().st_size
    for index in (indexes_of(db, clip)[1], indexes_of(db, photo)[0]):
        get, head = (client.request(m, f"/api/items/{index}/original") for m in ("GET", "HEAD"))
        assert (head.status_code, head.content) == (200, b""), head.text
        for header in ("content-type", "content-length", "accept-ranges", "content-disposition"):
            assert head.headers[header] == get.headers[header]
    part = client.head(f"/api/items/{indexes_of(db, clip)[0]}/original", headers={"Range": "bytes=10-19"})
    assert (part.status_code, part.content) == (206, b"")
    assert part.headers["content-range"] == f"bytes 10-19/{size}" and part.headers["content-length"] == "10"
    thumb = client.head(f"/api/items/{indexes_of(db, clip)[0]}/thumbnail")
    assert (thumb.status_code, thumb.headers["content-type"], thumb.content) == (200, "image/jpeg", b"")
    gone = client.head(f"/api/items/{10**6}/original")
    assert gone.status_code == 404


class CountingBlake2b:
    """hashlib's blake2b that adds the bytes it hashes to `hashed` (the content hash is blake2b)."""

    hashed = 0

    def __init__(self, **options):
        self.digest_ = hashlib.blake2b(**options)

    def update(self, data) -> None:
        CountingBlake2b.hashed += len(data)
        self.digest_.update(data)

    def digest(self) -> bytes:
        return self.digest_.digest()


def test_range_requests_to_every_frame_of_a_video_hash_it_once(tmp_path, monkeypatch):
    """A browser plays a video with many range requests, to any of its frames' originals, several at once:
    the server checks the file's content hash (media.record.content_hash) once for all of them."""
    photos = coco_photos(4)
    folder = tmp_path / "media"
    folder.mkdir()
    clip = make_clip(folder / "four scenes.mp4", photos)
    with NanoDB(tmp_path / "db", config="test") as db:
        db.scan(folder)
        frames = indexes_of(db, clip)
        assert len(frames) == 4
        server = start_server(db, "127.0.0.1", 0)
        try:
            monkeypatch.setattr(nanodb.media.record, "hashlib", SimpleNamespace(blake2b=CountingBlake2b))
            with httpx.Client(base_url=server.url, timeout=60) as client, ThreadPoolExecutor(8) as pool:
                answers = list(pool.map(lambda i: client.get(f"/api/items/{i}/original",
                                                             headers={"Range": "bytes=0-0"}), frames * 4))
        finally:
            server.stop()
    assert [a.status_code for a in answers] == [206] * 16
    assert CountingBlake2b.hashed < 2 * clip.stat().st_size, "the video was hashed more than once"
    assert CountingBlake2b.hashed >= clip.stat().st_size

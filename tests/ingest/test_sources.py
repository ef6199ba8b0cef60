"""Scanning where large data sets live: an S3 prefix (a real S3-compatible server, moto's, on 127.0.0.1)
and webdataset tar shards (local and on S3). Each is compared with a scan of the same photos in a folder:
same count, each item's vector within cosine 0.999 of the folder item of the same photo."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import tarfile
from pathlib import Path

import numpy as np
import pytest
from helpers import coco_photos
from nanodb.pipeline.sources import expand_braces

from nanodb import NanoDB
from nanodb.media.remote import member_path, split_member

PHOTOS = 12
BUCKET = "photos"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server on a free port of 127.0.0.1, found by s3fs (and by the decode workers, which
    inherit the environment) through the standard AWS variables; an s3fs file system on it."""
    pytest.importorskip("moto.server")
    s3fs = pytest.importorskip("s3fs")
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        fs = s3fs.S3FileSystem(skip_instance_cache=True)
        fs.mkdir(BUCKET)
        yield fs
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("flat")
    for src in coco_photos(PHOTOS):
        shutil.copy(src, folder / src.name)
    return sorted(folder.iterdir())


@pytest.fixture(scope="module")
def folder_vectors(tmp_path_factory, photos) -> dict[str, np.ndarray]:
    """The folder scan: photo stem -> its vector."""
    with NanoDB(tmp_path_factory.mktemp("folderdb") / "db", config="test") as db:
        report = db.scan(photos[0].parent)
        assert report.added == PHOTOS
        return {Path(item.path).stem: item.vector.astype(np.float32) for item in db}


def stem_of(path: str) -> str:
    """The photo stem of an item's path: an object's or a tar member's name."""
    split = split_member(path)
    return Path(split[1] if split else path.rsplit("/", 1)[-1]).stem


def assert_same_as_folder(db: NanoDB, folder_vectors: dict[str, np.ndarray], count: int = PHOTOS) -> None:
    assert len(db) == count
    stems = [stem_of(item.path) for item in db]
    assert len(set(stems)) == count
    for item in db:
        cosine = float(item.vector.astype(np.float32) @ folder_vectors[stem_of(item.path)])
        assert cosine > 0.999, item.path


def write_shard(path: Path, photos: list[Path], bad_json: bool = False) -> Path:
    """A webdataset shard: per photo KEY.jpg, then KEY.txt (caption), then KEY.json."""
    def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    with tarfile.open(path, "w") as tar:
        for src in photos:
            key = src.stem
            add(tar, f"{key}.jpg", src.read_bytes())
            add(tar, f"{key}.txt", f"photo {key}\n".encode())
            add(tar, f"{key}.json", b"{not json" if bad_json else json.dumps({"key": key, "source": "coco"}).encode())
    return path


@pytest.fixture(scope="module")
def shards(tmp_path_factory, photos) -> Path:
    """Three shards of 4 photos each (the second's JSON is broken): shards/shard-0000.tar ... 0002."""
    folder = tmp_path_factory.mktemp("shards")
    for i in range(3):
        write_shard(folder / f"shard-{i:04d}.tar", photos[4 * i:4 * i + 4], bad_json=i == 1)
    return folder


def test_brace_patterns_and_member_paths():
    assert expand_braces("d/{00000..00002}.tar") == ["d/00000.tar", "d/00001.tar", "d/00002.tar"]
    assert expand_braces("s3://b/{a,b}-{8..10}.tar") == ["s3://b/a-8.tar", "s3://b/a-9.tar", "s3://b/a-10.tar",
                                                        "s3://b/b-8.tar", "s3://b/b-9.tar", "s3://b/b-10.tar"]
    assert expand_braces("d/{x}.tar") == ["d/{x}.tar"]
    path = member_path("s3://b/d/00001.tar", "sub/000123.jpg")
    assert path == "s3://b/d/00001.tar#sub/000123.jpg"
    assert split_member(path) == ("s3://b/d/00001.tar", "sub/000123.jpg")
    assert split_member("/photos/#1 best.jpg") is None


def test_an_s3_prefix_scan_equals_a_folder_scan_and_rescans_like_one(s3, photos, folder_vectors, tmp_path):
    for i, p in enumerate(photos):  # some in a sub-prefix; a hidden one and a text file are passed over
        s3.put(str(p), f"{BUCKET}/coco/{'sub/' if i % 2 else ''}{p.name}")
    s3.pipe(f"{BUCKET}/coco/.hidden/x.jpg", photos[0].read_bytes())
    s3.pipe(f"{BUCKET}/coco/notes.txt", b"not an image")
    s3.pipe(f"{BUCKET}/other/y.jpg", photos[0].read_bytes())  # beside the prefix: not scanned
    with NanoDB(tmp_path / "db", config="test") as db:
        report = db.scan(f"s3://{BUCKET}/coco/")
        assert (report.added, report.failed) == (PHOTOS, 0), report.failures
        assert all(item.path.startswith(f"s3://{BUCKET}/coco/") for item in db)
        assert_same_as_folder(db, folder_vectors)
        first = db[db.index_of(f"s3://{BUCKET}/coco/sub/{photos[1].name}")]
        assert first.size == photos[1].stat().st_size and first.mtime > 0

        again = db.scan(f"s3://{BUCKET}/coco/")  # unchanged objects: nothing decoded, no model needed
        assert (again.added, again.updated, again.unchanged, again.dropped) == (0, 0, PHOTOS, 0)

        s3.rm(f"{BUCKET}/coco/{photos[0].name}")
        gone = db.scan(f"s3://{BUCKET}/coco/")
        assert (gone.added, gone.unchanged, gone.dropped) == (0, PHOTOS - 1, 1)
        assert len(db) == PHOTOS - 1 and db.index_of(f"s3://{BUCKET}/coco/{photos[0].name}") is None


def test_objects_with_dot_segments_or_dot_names_are_each_one_skipped_line(s3, photos, tmp_path, caplog):
    """`a/../../etc/passwd.jpg` and `..jpg` were passed over without a word: each is one skipped line."""
    odd = {f"s3://{BUCKET}/odd/a/../../etc/passwd.jpg": "its key has a '.' or '..' segment: not indexed (as a "
                                                         "path it would name another file)",
           f"s3://{BUCKET}/odd/..jpg": "its name is only dots before the extension: not indexed"}
    for url in [*odd, f"s3://{BUCKET}/odd/ok.jpg"]:
        s3.pipe(url.removeprefix("s3://"), photos[0].read_bytes())
    assert len(s3.find(f"{BUCKET}/odd")) == 3  # stored under those very keys
    with caplog.at_level("WARNING"), NanoDB(tmp_path / "db", config="test") as db:
        report = db.scan(f"s3://{BUCKET}/odd/")
        assert report.added == 1 and db[0].path == f"s3://{BUCKET}/odd/ok.jpg"
    assert dict(report.failures) == odd
    for url, reason in odd.items():
        assert [r.getMessage() for r in caplog.records if url in r.getMessage()] == [f"skipped {url}: {reason}"]


def test_a_missing_bucket_is_one_clear_line(s3, tmp_path, empty_db_path):
    shutil.copytree(empty_db_path, tmp_path / "db")
    with NanoDB(tmp_path / "db") as db, pytest.raises(ValueError) as e:
        db.scan("s3://no-such-bucket/photos/")
    message = str(e.value)
    assert "no-such-bucket" in message and "\n" not in message


def test_tar_shards_scan_like_a_folder_with_captions_and_json(shards, folder_vectors, tmp_path):
    pattern = str(shards / "shard-{0000..0002}.tar")
    with NanoDB(tmp_path / "db", config="test") as db:
        report = db.scan(pattern)
        assert (report.found, report.added, report.failed) == (PHOTOS, PHOTOS, 0), report.failures
        assert_same_as_folder(db, folder_vectors)
        for item in db:
            tar, member = split_member(item.path)
            assert Path(tar).parent == shards and Path(tar).is_absolute() and member.endswith(".jpg")
            key = Path(member).stem
            assert item.metadata["caption"] == f"photo {key}"
            if tar.endswith("shard-0001.tar"):  # its JSON is broken: ignored, the caption kept
                assert "key" not in item.metadata
            else:
                assert (item.metadata["key"], item.metadata["source"]) == (key, "coco")

        again = db.scan(pattern)  # unchanged shards are not read again
        assert (again.added, again.updated, again.unchanged, again.failed) == (0, 0, PHOTOS, 0)


def test_a_corrupt_shard_fails_in_one_line_and_keeps_what_was_read(shards, photos, tmp_path):
    folder = tmp_path / "shards"
    shutil.copytree(shards, folder)
    bad = write_shard(folder / "shard-0003.tar", photos[:4])
    data = bad.read_bytes()
    # cut in the third photo's bytes: two samples before it read whole
    third = data.index(photos[2].read_bytes()[:4096])
    bad.write_bytes(data[:third + 1000])
    with NanoDB(tmp_path / "db", config="test") as db:
        report = db.scan(str(folder / "shard-{0000..0003}.tar"))
        assert [p for p, _ in report.failures] == [str(bad)]
        assert "truncated" in report.failures[0][1] or "corrupt" in report.failures[0][1]
        assert report.added == PHOTOS + 2
        assert sorted(split_member(p)[1] for p in db.store.indexed_paths() if p.startswith(str(bad))) == \
            sorted(f"{p.stem}.jpg" for p in photos[:2])
        again = db.scan(str(folder / "shard-{0000..0003}.tar"))
        assert (again.added, again.unchanged) == (0, PHOTOS + 2)

        write_shard(folder / "shard-0000.tar", photos[:3])  # rewritten with a photo less
        changed = db.scan(str(folder / "shard-{0000..0003}.tar"))
        assert (changed.updated, changed.dropped) == (3, 1)
        assert db.index_of(member_path(str(folder / "shard-0000.tar"), f"{photos[3].stem}.jpg")) is None


def test_tar_shards_on_s3(s3, shards, folder_vectors, tmp_path):
    for tar in sorted(shards.iterdir()):
        s3.put(str(tar), f"{BUCKET}/shards/{tar.name}")
    with NanoDB(tmp_path / "db", config="test") as db:
        report = db.scan(f"s3://{BUCKET}/shards/shard-{{0000..0002}}.tar")
        assert (report.added, report.failed) == (PHOTOS, 0), report.failures
        assert_same_as_folder(db, folder_vectors)
        assert all(split_member(item.path)[0].startswith(f"s3://{BUCKET}/shards/shard-000") for item in db)
        assert all(item.metadata["caption"].startswith("photo ") for item in db)


def test_a_removed_tar_shard_is_counted_as_removed_not_skipped(shards, tmp_path):
    folder = tmp_path / "shards"
    shutil.copytree(shards, folder)
    pattern = str(folder / "shard-{0000..0002}.tar")
    with NanoDB(tmp_path / "db", config="test") as db:
        assert db.scan(pattern).added == PHOTOS
        (folder / "shard-0001.tar").unlink()
        report = db.scan(pattern)
        assert (report.found, report.unchanged, report.failed, report.dropped) == (8, 8, 0, 4), report.failures
        assert report.tars_removed == 1 and len(db) == 8
        assert report.summary().endswith(", 0 skipped; dropped 4 gone files (1 removed tar shard)"), report.summary()
        never = db.scan(str(folder / "shard-0009.tar"))  # a shard that never was: still an error
        assert [(p, r) for p, r in never.failures] == [(str(folder / "shard-0009.tar"), "no such tar shard")]


def test_a_folder_of_tar_shards_says_how_to_scan_them(shards, tmp_path, empty_db_path):
    shutil.copytree(empty_db_path, tmp_path / "db")
    with NanoDB(tmp_path / "db") as db:
        report = db.scan(shards)
    assert (report.found, report.added, report.tars_left_out) == (0, 0, 3)
    hint = report.summary().split("--scan '")[1].rstrip("')")
    assert "3 tar files left out" in report.summary() and hint == str(shards / "shard-{0000..0002}.tar")
    assert expand_braces(hint) == [str(p) for p in sorted(shards.glob("*.tar"))]  # names exactly those


def test_a_video_behind_a_url_is_remembered_as_failed_like_a_local_file(s3, photos, tmp_path):
    """Videos are read from local folders only: one in a bucket fails, and an unchanged rescan (a new
    process) does not try it again, as a local file that failed is not."""
    s3.put(str(photos[0]), f"{BUCKET}/mixed/{photos[0].name}")
    s3.pipe(f"{BUCKET}/mixed/clip.mp4", b"\x00\x00\x00\x18ftypmp42" + bytes(1000))
    with NanoDB(tmp_path / "db", config="test") as db:
        first = db.scan(f"s3://{BUCKET}/mixed/")
        assert (first.added, [p for p, _ in first.failures]) == (1, [f"s3://{BUCKET}/mixed/clip.mp4"])
        db.save()
    with NanoDB(tmp_path / "db") as db:
        again = db.scan(f"s3://{BUCKET}/mixed/")
        assert (again.unchanged, again.failed_before, again.failed) == (1, 1, 0), again.failures
    s3.pipe(f"{BUCKET}/mixed/clip.mp4", b"\x00\x00\x00\x18ftypmp42" + bytes(2000))  # changed: tried again
    with NanoDB(tmp_path / "db") as db:
        assert db.scan(f"s3://{BUCKET}/mixed/").failed == 1


def test_remote_items_have_no_file_to_send(tmp_path, empty_db_path):
    from nanodb.interfaces.thumbnails import NotServable, check_original

    shutil.copytree(empty_db_path, tmp_path / "db")
    with NanoDB(tmp_path / "db") as db:
        [url, member] = db.add(np.eye(2, db.dim, dtype=np.float32),
                               paths=["s3://b/x.jpg", "/data/shard-1.tar#000001.jpg"])
        for index in (url, member):
            with pytest.raises(NotServable, match="URL or a tar shard"):
                check_original(db, index)


@pytest.mark.slow
@pytest.mark.ray
def test_a_ray_scan_reads_s3_objects_and_tar_shards_on_the_nodes(s3, photos, shards, folder_vectors, tmp_path):
    """One small cluster (a head that only coordinates, one 3-CPU worker node), started after the S3
    server: its workers inherit the AWS variables. An S3 prefix and local tar shards into a sharded
    database, as a local scan of the same images in a folder."""
    pytest.importorskip("ray")
    from helpers.ray_cluster import ray_cluster

    from nanodb.cluster import RayOptions

    for p in photos[:4]:
        s3.put(str(p), f"{BUCKET}/ray/{p.name}")
    with ray_cluster(workers=1) as (c, _), NanoDB(tmp_path / "db", config="test", batch_size=4,
                                                  ray=RayOptions(address=c.address, clip_actors=1, shards=2)) as db:
        report = db.scan(f"s3://{BUCKET}/ray/", str(shards / "shard-{0000..0001}.tar"))
        assert (report.found, report.added, report.failed) == (12, 12, 0), report.failures
        paths = [item.path for item in db]
        assert len(paths) == len(set(paths)) == 12
        for item in db:
            cosine = float(item.vector.astype(np.float32) @ folder_vectors[stem_of(item.path)])
            assert cosine > 0.999, item.path
        assert sum(split_member(item.path) is not None for item in db) == 8
        assert all(item.metadata["caption"].startswith("photo ") for item in db if split_member(item.path))
        again = db.scan(f"s3://{BUCKET}/ray/", str(shards / "shard-{0000..0001}.tar"))
        assert (again.added, again.unchanged) == (0, 12)

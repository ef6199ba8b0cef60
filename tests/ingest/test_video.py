"""Videos: real clips made here with PyAV from COCO photos (a scene per photo), scanned, searched,
rescanned, truncated and deleted."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from helpers import coco_photos
from helpers.videos import SCENE_S, make_clip
from PIL import Image

from nanodb import NanoDB
from nanodb.media.video import frame_time, read_video_frames


@pytest.fixture(scope="module")
def photos() -> list[Path]:
    return coco_photos(3)


@pytest.fixture
def clips(tmp_path, photos) -> Path:
    """A folder with a two-scene clip (mixed-case extension) and a photo."""
    folder = tmp_path / "media"
    folder.mkdir()
    make_clip(folder / "two scenes.MP4", photos[:2])
    Image.open(photos[2]).convert("RGB").save(folder / "photo.jpg")
    return folder


def frames_of(db, path) -> list[float]:
    return sorted(frame_time(item.metadata) for item in db if item.path == str(path))


def test_a_scene_change_is_two_frames_in_the_right_halves(tmp_path, photos):
    clip = make_clip(tmp_path / "clip.mp4", photos[:2])
    video = read_video_frames(str(clip), 10**8)
    times = [t for t, _ in video.frames]
    assert len(times) == 2
    assert times[0] < SCENE_S <= times[1] < 2 * SCENE_S
    assert all(min(image.size) <= 448 for _, image in video.frames)


def test_a_4k_video_decodes_in_a_worker_limited_to_128_mib(tmp_path, photos):
    folder = tmp_path / "4k"
    folder.mkdir()
    make_clip(folder / "uhd.mkv", photos[:2], seconds=2.0, size=(3840, 2160), fps=2)
    with NanoDB(tmp_path / "db", config="test", decode_memory_mb=128, workers=1) as db:
        report = db.scan(folder)
        assert (report.added, report.failed) == (1, 0), report.failures
        assert frames_of(db, folder / "uhd.mkv") == [0.0, 2.0]


def test_scan_indexes_frames_and_a_rescan_nothing_new(tmp_path, clips):
    with NanoDB(tmp_path / "db", config="test") as db:
        report = db.scan(clips)
        assert (report.found, report.added, report.failed) == (2, 2, 0)
        times = frames_of(db, clips / "two scenes.MP4")
        assert len(times) == 2 and times[0] < SCENE_S <= times[1]
        assert len(db) == 3
        summary = report.summary()  # photos and videos apart, frames apart from images
        assert summary.startswith("scanned 1 photo and 1 video in "), summary
        assert "(1 image and 2 video frames embedded, " in summary, summary
        assert (report.embedded, report.frames_embedded) == (3, 2)
        db.save()
        again = db.scan(clips)
        assert (again.unchanged, again.added, again.updated, again.embedded) == (2, 0, 0, 0)
        assert len(db) == 3


def test_a_changed_video_replaces_its_frames(tmp_path, clips, photos):
    clip = clips / "two scenes.MP4"
    with NanoDB(tmp_path / "db", config="test") as db:
        db.scan(clips)
        make_clip(clip, photos[:3])  # three scenes now
        os.utime(clip, (1e9, 1e9))
        report = db.scan(clips)
        assert (report.updated, report.added) == (1, 0)
        assert len(frames_of(db, clip)) == 3
        assert len(db) == 4


def test_query_by_the_second_scene_finds_the_video_at_that_moment(tmp_path, clips, photos):
    with NanoDB(tmp_path / "db", config="test") as db:
        db.scan(clips)
        results = db.search(str(photos[1]), k=3)
        assert results[0].path == str(clips / "two scenes.MP4")
        assert SCENE_S <= results[0].metadata["time"] < 2 * SCENE_S
        assert [r.path for r in results].count(results[0].path) == 1  # the video once, at its best frame


def test_truncated_and_bogus_videos_are_skipped_and_counted(tmp_path, clips):
    data = (clips / "two scenes.MP4").read_bytes()
    (clips / "cut.mov").write_bytes(data[: len(data) // 2])
    (clips / "noise.webm").write_bytes(os.urandom(4096))
    with NanoDB(tmp_path / "db", config="test") as db:
        report = db.scan(clips)
        assert report.added == 2
        skipped = sorted(p.rsplit("/", 1)[1] for p, _ in report.failures)
        assert skipped == ["cut.mov", "noise.webm"]
        assert all("video" in reason for _, reason in report.failures)
        assert len(db) == 3


def test_a_deleted_or_moved_video_takes_all_its_frames(tmp_path, clips):
    clip = clips / "two scenes.MP4"
    with NanoDB(tmp_path / "db", config="test") as db:
        db.scan(clips)
        moved = clips / "renamed.mp4"
        assert db.store.move_paths([(str(clip), str(moved))]) == 1
        assert len(frames_of(db, moved)) == 2 and frames_of(db, clip) == []
        clip.rename(moved)
        moved.unlink()
        report = db.scan(clips)
        assert report.dropped == 1
        assert len(db) == 1 and [item.path for item in db] == [str(clips / "photo.jpg")]


def test_one_shot_output_names_the_moment(tmp_path, clips, photos, capsys):
    from nanodb.interfaces.cli import main

    with NanoDB(tmp_path / "db", config="test") as db:
        db.scan(clips)
        db.save()
    assert main(["similar", "--path", str(tmp_path / "db"), str(photos[1]), "-k", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("* index=") and f"two scenes.MP4 @ 00:00:0{int(SCENE_S) + 1}  similarity=" in lines[0]
    assert "photo.jpg  similarity=" in lines[1] and " @ " not in lines[1]
    assert main(["similar", "--path", str(tmp_path / "db"), str(photos[1]), "-k", "2", "--json"]) == 0
    first, second = map(json.loads, capsys.readouterr().out.splitlines())
    assert first["path"].endswith("two scenes.MP4") and SCENE_S <= first["time"] < 2 * SCENE_S
    assert "time" not in second


def test_watch_indexes_renames_and_forgets_a_video(tmp_path, photos):
    from test_service import WATCH_BOUND_S, BackgroundService, wait_for

    folder = tmp_path / "watched"
    folder.mkdir()
    Image.open(photos[2]).convert("RGB").save(folder / "photo.jpg")
    clip = make_clip(tmp_path / "outside.mov", photos[:2])
    db = NanoDB(tmp_path / "db", config="test")
    bg = BackgroundService(db, [folder])
    try:
        assert bg.ready.wait(120), "the first scan of the watched folder did not finish"
        frames = lambda path: bg.query(lambda: len(db.store.rows_of(str(path))))  # noqa: E731
        arrived = folder / "arrived.mov"
        clip.rename(arrived)
        wait_for(lambda: frames(arrived) == 2, WATCH_BOUND_S + 10, "a video's frames")
        renamed = folder / "renamed.mov"
        arrived.rename(renamed)
        wait_for(lambda: frames(renamed) == 2 and frames(arrived) == 0, WATCH_BOUND_S, "a renamed video")
        renamed.unlink()
        wait_for(lambda: frames(renamed) == 0, WATCH_BOUND_S, "a deleted video")
        assert bg.query(lambda: len(db)) == 1
    finally:
        bg.stop()
        db.close()


def test_frames_arriving_in_several_batches_are_one_file(tmp_path):
    from dataclasses import replace

    import numpy as np

    from nanodb.media.record import FileRecord
    from nanodb.media.video import frame_hash

    path = str(tmp_path / "v.mp4")
    frames = [FileRecord(path=path, size=10, mtime=1.0, hash=frame_hash(b"v1", t), metadata={"time": t})
              for t in (0.0, 2.0, 4.0)]
    with NanoDB(tmp_path / "db", config="test") as db:
        vectors = np.random.default_rng(0).normal(size=(3, db.dim)).astype(np.float32)
        assert db.store.add_files(frames[:2], vectors[:2]) == (1, 0)
        assert db.store.add_files(frames[2:], vectors[2:]) == (0, 0)  # more frames of the same version
        assert len(db.store.rows_of(path)) == 3 and db.index_of(path) is not None
        newer = replace(frames[0], mtime=2.0, hash=frame_hash(b"v2", 0.0))
        assert db.store.add_files([newer], vectors[:1]) == (0, 1)  # a new version replaces every frame
        assert [db[i].metadata for i in db.store.rows_of(path)] == [{"time": 0.0}]
        assert db.forget([path]) == 1 and len(db) == 0


def test_add_a_video_adds_its_frames_as_a_scan_does(tmp_path, clips):
    clip, photo = clips / "two scenes.MP4", clips / "photo.jpg"
    with NanoDB(tmp_path / "scanned", config="test") as scanned:
        scanned.scan(clips)
        want = {(item.path, frame_time(item.metadata)): item.vector for item in scanned}
    with NanoDB(tmp_path / "db", config="test") as db:
        added = db.add([photo, clip], metadata=[{"album": "a"}, {"album": "b"}])
        assert len(added) == 3 and len(db) == 3
        items = [db[i] for i in added]
        assert [(item.path, item.metadata.get("album")) for item in items] == \
               [(str(photo), "a"), (str(clip), "b"), (str(clip), "b")]
        assert frames_of(db, clip) == sorted(t for p, t in want if p == str(clip))
        for item in items:  # the same frames, embedded alike (batches may round the last bit apart)
            other = want[item.path, frame_time(item.metadata)]
            assert float(item.vector.astype(np.float32) @ other.astype(np.float32)) > 0.999
        results = db.search(db[added[1]].vector, k=3)  # the video's frames are one result
        assert sorted(r.path for r in results) == sorted([str(clip), str(photo)])


def test_a_video_as_query_image_is_a_one_line_error_naming_a_frames_item(tmp_path, clips):
    from nanodb.search.query import QueryError

    clip = clips / "two scenes.MP4"
    with NanoDB(tmp_path / "db", config="test") as db:
        with pytest.raises(QueryError, match=r"^a video cannot be a query image; scan .*#N\)$"):
            db.search(str(clip))
        db.scan(clips)
        first = min((item for item in db if item.path == str(clip)), key=lambda item: frame_time(item.metadata))
        message = f"a video cannot be a query image; search by one of its frames' items (#{first.index})"
        for query in [str(clip), clip, f"2:{clip} + dog"]:
            with pytest.raises(QueryError) as error:
                db.search(query)
            assert str(error.value) == message, query
        with pytest.raises(QueryError, match=r"^a video cannot be a query image"):
            db.search(image=str(clip))
        with pytest.raises(QueryError, match=r"^no such image file"):
            db.search("missing clip.mp4")  # a video's name is a file, never a silent text search

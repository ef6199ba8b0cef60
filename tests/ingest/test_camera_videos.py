"""Videos as cameras and phones write them: H.264 High and HEVC with B-frames, whose decoder gives a
packet's frame later, two at once or out of order, and holds the last ones until it is drained. Every
scene keeps a frame, short clips and clips with one keyframe index (clips made here with PyAV)."""

from __future__ import annotations

import os

import numpy as np
import pytest
from helpers import coco_photos
from helpers.videos import encoder_missing, make_camera_clip
from PIL import Image

import nanodb.media.video
from nanodb import NanoDB
from nanodb.media.video import frame_thumbnail, frame_time, read_video_frames

MAX_PIXELS = 10**8


@pytest.fixture(scope="module")
def photos():
    return coco_photos(7)


def kept_times(path) -> list[float]:
    return [t for t, _ in read_video_frames(str(path), MAX_PIXELS).frames]


def scenes_kept(times: list[float], keyframes: list[float], seconds: float) -> list[bool]:
    """For each scene (from its keyframe to the next), whether a kept frame lies in it."""
    ends = [*keyframes[1:], seconds]
    return [any(start <= t < end for t in times) for start, end in zip(keyframes, ends)]


@pytest.mark.parametrize(("codec", "keyframes", "seconds"), [
    ("libx264", [0, 10, 18, 27, 37, 45, 54], 60),  # the slideshow
    ("libx265", [0, 9, 17], 25),
])
def test_a_b_frame_clip_keeps_a_frame_of_every_scene(tmp_path, photos, codec, keyframes, seconds):
    if reason := encoder_missing(codec):
        pytest.skip(reason)
    clip = make_camera_clip(tmp_path / f"{codec}.mp4", photos, keyframes, seconds, codec=codec)
    times = kept_times(clip)
    assert all(scenes_kept(times, keyframes, seconds)), f"kept {times} of scenes starting at {keyframes}"
    assert times == sorted(times) and len(times) == len(keyframes)


def test_a_hevc_frames_thumbnail_shows_the_scene_at_its_moment(tmp_path, photos):
    """HEVC's decoder gives its keyframes out of order: the thumbnail at a scene's moment must still
    be that scene's frame (the photo it shows is the nearest of all)."""
    if reason := encoder_missing("libx265"):
        pytest.skip(reason)
    keyframes = [0, 9, 17]
    clip = make_camera_clip(tmp_path / "hevc.mp4", photos, keyframes, 25, codec="libx265")
    st = os.stat(clip)
    identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    scenes = [np.asarray(Image.open(p).convert("L").resize((160, 120)), float) for p in photos[:3]]
    for scene, t in enumerate(keyframes):
        shown = np.asarray(frame_thumbnail(str(clip), identity, t, 160, MAX_PIXELS).convert("L"), float)
        differences = [np.abs(shown - s).mean() for s in scenes]
        assert int(np.argmin(differences)) == scene, f"the thumbnail at {t} s shows another scene"


def test_a_short_clip_and_a_clip_with_one_keyframe_are_indexed(tmp_path, photos):
    folder = tmp_path / "phone"
    folder.mkdir()
    make_camera_clip(folder / "short.mp4", photos, [0, 2.5], 5)  # 150 frames at 30 fps
    make_camera_clip(folder / "one key.mp4", photos, [0], 12)
    with NanoDB(tmp_path / "db", config="test", workers=1) as db:
        report = db.scan(folder)
        assert (report.added, report.failed) == (2, 0), report.failures
        frames = {os.path.basename(item.path): [] for item in db}
        for item in db:
            frames[os.path.basename(item.path)].append(frame_time(item.metadata))
    assert sorted(frames["short.mp4"]) == [0.0, 2.5]
    assert frames["one key.mp4"] == [0.0]


def test_the_first_frame_is_kept_when_hashing_took_the_whole_budget(tmp_path, photos, monkeypatch):
    """A large video's hashing can take the sampling budget: its first frame is still decoded, so it
    is not skipped as 'no frame decoded' (which is not the reason)."""
    monkeypatch.setattr(nanodb.media.video, "SAMPLE_SECONDS", 0.0)
    clip = make_camera_clip(tmp_path / "large.mp4", photos, [0, 10], 20)
    assert kept_times(clip) == [0.0]

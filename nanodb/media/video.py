"""Videos, a media kind of their own: which files are videos, and the frames of one that a scan indexes.

A video is indexed as a few of its frames, each an item of its own with the video's path, size and mtime
and its moment in the metadata ({"time": 83.2}, seconds from the start). Frames are taken at scene
changes: keyframes (encoders put one at each cut) at least MIN_GAP_S apart are compared by a tiny gray
thumbnail, and a frame is kept when it differs enough from the last one kept; the first frame always is.
At most MAX_FRAMES are kept per video and at most MAX_CANDIDATES keyframes are decoded, so a two-hour film
costs a bounded number of decodes and embeddings; sampling also stops SAMPLE_SECONDS after the file was
opened (hashing included), with the frames kept so far, but never before the first keyframe is decoded
(the decode worker's own time limit, 10 s by default, still holds above it). Every frame the decoder
gives back is a candidate at its own time, those it holds back until the end of the stream too: with
B-frames (H.264 High, HEVC) a packet's frame comes out later, two at once, or out of order.

Bounded in memory: one decoder thread, only keyframes decoded, each frame scaled down (to FRAME_SIDE on
its short side) as soon as it is decoded, and dimensions checked against the pixel limit before any
frame is decoded. The file is read through the media opener (open_regular_file), never by name.

Each frame's content hash is derived from the video's (content_hash of the bytes, read in chunks) and the
frame's time: identical copies of a video share their frames' vectors, and no two frames of one video
share a hash. Frames of one file are told by their path: searches show a video once, at its best frame.
"""

from __future__ import annotations

import heapq
import os
import time as clock
from dataclasses import dataclass
from typing import Any

import numpy as np

from nanodb.media.opener import ImageRejected, check_dimensions, open_regular_file
from nanodb.media.record import content_hash

VIDEO_EXTENSIONS = frozenset({".mp4", ".mov", ".m4v", ".mkv", ".avi", ".webm", ".3gp", ".mts"})

MAX_VIDEO_BYTES = 1 << 40  # videos are read in chunks and streamed to the demuxer, never whole
MIN_GAP_S = 2.0  # at most one frame every this many seconds
MAX_FRAMES = 64  # frames kept per video
MAX_CANDIDATES = 256  # keyframes decoded per video at most (spread over its duration when it is known)
SAMPLE_SECONDS = 6.0  # stop decoding candidates after this long (the kept frames so far are used)
SCENE_CHANGE = 0.08  # mean absolute difference (0..1) of the gray thumbnails that makes a new scene
FRAME_SIDE = 448  # short side of a kept frame (the model's transform resizes it further)
SIGNATURE = (16, 16)  # the gray thumbnail a frame is compared by
REORDER = 8  # candidate frames held to be put in time order (a decoder may give them out of order)
HASH_CHUNK = 1 << 20
TIME_KEY = "time"  # the metadata key of a frame's moment, in seconds


def is_video_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in VIDEO_EXTENSIONS


def preload_video_libraries() -> None:
    """Import PyAV (and map FFmpeg's libraries, tens of MiB) now: a decode worker does it before it
    limits its memory, so that the limit counts what a video's decode allocates, not the libraries."""
    import av  # noqa: F401


def frame_time(metadata: dict[str, Any] | None) -> float | None:
    """A frame's moment (seconds) from an item's metadata; None for an item that is not a video frame."""
    value = (metadata or {}).get(TIME_KEY)
    return float(value) if isinstance(value, (int, float)) else None


def frame_hash(video_hash: bytes, time: float) -> bytes:
    """The content hash of the frame at `time` of the video whose bytes hash to `video_hash`."""
    return content_hash(video_hash + f"@{time:.3f}".encode())


def timestamp(seconds: float) -> str:
    """`00:01:23` (hours always shown)."""
    s = int(max(seconds, 0.0))
    return f"{s // 3600:02d}:{s // 60 % 60:02d}:{s % 60:02d}"


@dataclass
class VideoFrames:
    """The frames a scan keeps of one video: (time in seconds, 8-bit RGB PIL image), in time order."""

    size: int
    mtime: float
    hash: bytes  # of the video file's bytes
    frames: list[tuple[float, Any]]


def _file_hash(path: str) -> tuple[bytes, os.stat_result]:
    f, st = open_regular_file(path, MAX_VIDEO_BYTES)
    with f:
        try:
            return content_hash(iter(lambda: f.read(HASH_CHUNK), b"")), st
        except OSError as e:
            raise ImageRejected(f"unreadable: {e.strerror or e}") from None


def _signature(frame) -> np.ndarray:
    w, h = SIGNATURE
    return frame.to_ndarray(width=w, height=h, format="gray").astype(np.float32) / 255.0


def _scaled(frame):
    """The frame as RGB, its short side at most FRAME_SIDE (scaled by libswscale, not in Python)."""
    w, h = frame.width, frame.height
    scale = min(1.0, FRAME_SIDE / max(1, min(w, h)))
    return frame.to_image(width=max(1, round(w * scale)), height=max(1, round(h * scale)))


def keyframe_stream(container, max_pixels: int) -> tuple[Any, float]:
    """The container's first video stream set to decode its keyframes only, on one thread, once its
    dimensions passed `max_pixels`; and its start time in seconds. Raises ImageRejected."""
    if not container.streams.video:
        raise ImageRejected("no video stream")
    stream = container.streams.video[0]
    ctx = stream.codec_context
    check_dimensions(ctx.width, ctx.height, max_pixels)
    ctx.thread_type = "NONE"
    ctx.thread_count = 1
    ctx.skip_frame = "NONKEY"
    base = stream.time_base
    return stream, float(stream.start_time * base) if stream.start_time is not None and base else 0.0


def read_video_frames(path: str, max_pixels: int) -> VideoFrames:
    """The frames of the video at `path` taken at scene changes (see the module's doc). Raises
    ImageRejected with a short reason for a file that is not a readable video, or has no frame."""
    import av

    began = clock.monotonic()  # the sampling budget counts the hashing too (a large file takes seconds)
    digest, st = _file_hash(path)
    f, _ = open_regular_file(path, MAX_VIDEO_BYTES)
    try:
        with f, av.open(f, mode="r") as container:
            stream, start = keyframe_stream(container, max_pixels)
            frames = _scene_frames(container, stream, start, began)
    except (ImageRejected, MemoryError):
        raise
    except Exception as e:  # FFmpeg's errors (av.FFmpegError) and anything a damaged container makes it raise
        raise ImageRejected(f"corrupt or unsupported video ({type(e).__name__}: {e})") from None
    if not frames:
        raise ImageRejected("corrupt or unsupported video (no frame decoded)")
    if len(frames) > MAX_FRAMES:  # spread evenly over the video
        frames = [frames[i] for i in np.linspace(0, len(frames) - 1, MAX_FRAMES).round().astype(int)]
    return VideoFrames(st.st_size, st.st_mtime, digest, frames)


def _scene_frames(container, stream, start: float, began: float) -> list[tuple[float, Any]]:
    """The scene frames of `stream` (set up by keyframe_stream), in time order. Keyframe packets at least
    `gap` apart are handed to the decoder (and every packet before the first keyframe: a stream may not
    start on one). Every frame it gives back is a candidate at its own pts, the frames it holds back for
    B-frame reordering too (drained at the end): a decoder of B-frame streams gives a packet's frame later,
    two at once, or out of time order (HEVC), so the last REORDER candidates wait, scaled, to be compared
    in time order. The budget (SAMPLE_SECONDS since `began`) ends the decoding only once a keyframe was
    handed over (or a frame came out), so the first one is decoded however long the hashing took."""
    base = stream.time_base
    duration = float(stream.duration * base) if stream.duration and base else (
        container.duration / 1e6 if container.duration else None)
    gap = max(MIN_GAP_S, (duration or 0.0) / MAX_CANDIDATES)
    frames: list[tuple[float, Any]] = []
    waiting: list[tuple[float, int, np.ndarray, Any]] = []  # a heap of (time, arrival, signature, image)
    arrived = 0  # frames the decoder gave (ties in time keep their arrival order)
    last_tried: float | None = None
    last_kept_sig = None

    def decide(candidate: tuple[float, int, np.ndarray, Any]) -> None:
        nonlocal last_tried, last_kept_sig
        t, _, sig, image = candidate
        if last_tried is not None and t < last_tried + gap:
            return
        last_tried = t
        if last_kept_sig is None or float(np.abs(sig - last_kept_sig).mean()) > SCENE_CHANGE:
            frames.append((max(t, 0.0), image))
            last_kept_sig = sig

    def arrive(frame, sent: float) -> None:
        nonlocal arrived
        t = float(frame.pts * base) - start if frame.pts is not None and base else sent
        arrived += 1
        heapq.heappush(waiting, (t, arrived, _signature(frame), _scaled(frame)))
        if len(waiting) > REORDER:
            decide(heapq.heappop(waiting))

    last_key: float | None = None  # the time of the last keyframe handed to the decoder
    decoded = 0
    sent = 0.0  # the time of the last packet handed to the decoder (a frame without a pts is given it)
    for packet in container.demux(stream):
        if packet.pts is None or packet.size == 0:
            continue  # (demux's last, empty packet among them: the decoder is drained below)
        t = float(packet.pts * base) - start if base else 0.0
        if last_key is not None and (not packet.is_keyframe or t < last_key + gap):
            continue
        if packet.is_keyframe:
            last_key, decoded = t, decoded + 1
        sent = t
        for frame in stream.decode(packet):
            arrive(frame, sent)
        if (last_key is not None or arrived) and (
                max(decoded, arrived) >= MAX_CANDIDATES or clock.monotonic() - began > SAMPLE_SECONDS):
            break
    for frame in stream.decode(None):  # the frames the decoder still holds
        arrive(frame, sent)
    while waiting:
        decide(heapq.heappop(waiting))
    return frames


def is_video_frame(path: str | None, metadata: dict[str, Any] | None) -> bool:
    """Whether an item with this path and metadata is a frame of a video (a scan made it so)."""
    return bool(path) and is_video_name(path) and frame_time(metadata) is not None


def indexed_content_hash(path: str | None, metadata: dict[str, Any] | None, file_hash: bytes) -> bytes:
    """The content hash that an item with this path and metadata was indexed with, if its file's bytes
    hash to `file_hash` (content_hash, of the bytes the caller read through the opener): that hash for a
    photo, the hash derived from it and the frame's time (frame_hash) for a video's frame. What the server
    compares with an item's stored hash to tell that its file is still the one indexed (the file hashed
    once for all the frames of a video)."""
    return frame_hash(file_hash, frame_time(metadata)) if is_video_frame(path, metadata) else file_hash


def frame_thumbnail(path: str, identity: tuple[int, int, int, int], time: float, size: int, max_pixels: int):
    """The frame at `time` (seconds) of the video at `path` as an RGB PIL image of at most `size` pixels a
    side: the keyframe at or just after `time` (a scan's frames are keyframes), else the last one before.

    Run in a limited worker process (media.sandbox). The file is opened through open_regular_file and must
    be the very file the caller checked: `identity` is its (st_dev, st_ino, st_size, st_mtime_ns), so a
    path swapped since (for a symlink, another file) is refused. One decoder thread, keyframes only,
    dimensions checked against `max_pixels` before any frame is decoded. Raises ImageRejected."""
    import av

    f, st = open_regular_file(path, MAX_VIDEO_BYTES)
    try:
        with f:
            if (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) != tuple(identity):
                raise ImageRejected("the file changed since it was checked")
            with av.open(f, mode="r") as container:
                stream, start = keyframe_stream(container, max_pixels)
                base = stream.time_base
                if base and time > 0:
                    try:  # to the keyframe at or before the moment (backward); a file that cannot seek decodes on
                        container.seek(int((time + start) / base), stream=stream, backward=True)
                    except Exception:  # FFmpeg cannot seek in some files: they are decoded from the start
                        pass
                found = _frame_at(container.decode(stream), base, start, time)
                if found is None:
                    raise ImageRejected("no frame decoded")
                w, h = found.width, found.height
                scale = min(1.0, size / max(1, w, h))
                return found.to_image(width=max(1, round(w * scale)), height=max(1, round(h * scale)))
    except (ImageRejected, MemoryError):
        raise
    except Exception as e:  # FFmpeg's errors (av.FFmpegError) and anything a damaged container makes it raise
        raise ImageRejected(f"corrupt or unsupported video ({type(e).__name__}: {e})") from None


def _frame_at(decoded, base, start: float, time: float):
    """Of the `decoded` frames, the first at or after `time`, else the last before. A decoder may give
    frames out of time order (HEVC's keyframes alone): a frame at the very moment ends the search, else
    REORDER more frames are looked at after the first one past it."""
    after = before = None
    after_t = before_t = 0.0
    past = 0
    for frame in decoded:
        t = float(frame.pts * base) - start if frame.pts is not None and base else 0.0
        if abs(t - time) <= 0.001:  # a frame's stored time is rounded to milliseconds
            return frame
        if t > time and (after is None or t < after_t):
            after, after_t = frame, t
        elif t < time and (before is None or t > before_t):
            before, before_t = frame, t
        if after is not None:
            past += 1
            if past > REORDER:
                break
    return after if after is not None else before

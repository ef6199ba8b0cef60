"""Real video clips made here with PyAV from photos (a scene per photo), for the video tests."""

from __future__ import annotations

from pathlib import Path

SCENE_S = 3.0  # each photo is a scene this long
FPS = 10


def make_clip(path: Path, photos: list[Path], seconds: float = SCENE_S, size=(320, 240), fps: int = FPS,
              codec: str = "mpeg4") -> Path:
    """A clip (MPEG-4 Part 2 by default; "libvpx" makes VP8 for a .webm a browser plays) showing each photo
    for `seconds`, a keyframe every second."""
    import av
    from PIL import Image

    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.codec_context.gop_size = fps
        n = 0
        for photo in photos:
            with Image.open(photo) as im:
                picture = im.convert("RGB").resize(size)
            for _ in range(int(seconds * fps)):
                frame = av.VideoFrame.from_image(picture)
                frame.pts = n
                n += 1
                for packet in stream.encode(frame):
                    container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def encoder_missing(codec: str) -> str | None:
    """Why the bundled FFmpeg cannot encode with `codec`, or None when it can (a test skips with it)."""
    import av

    return None if codec in av.codecs_available else f"the av wheel's FFmpeg has no {codec} encoder"


def make_camera_clip(path: Path, photos: list[Path], keyframes: list[float], seconds: float,
                     codec: str = "libx264", size=(160, 120), fps: int = 30) -> Path:
    """A clip encoded as cameras and phones do, with B-frames: H.264 High ("libx264") or HEVC ("libx265"),
    three B-frames between references. Scene i shows photos[i] from keyframes[i] on (the first at 0), and
    the encoder puts a keyframe (an IDR frame) at each scene's first frame and nowhere else."""
    import av
    from PIL import Image

    assert keyframes[0] == 0 and len(keyframes) <= len(photos)
    starts = {round(t * fps): i for i, t in enumerate(keyframes)}
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.codec_context.gop_size = 10 * round(seconds * fps)  # no keyframe but the forced ones
        if codec == "libx264":
            stream.profile = "High"
            stream.options = {"bf": "3", "forced-idr": "1", "x264-params": "scenecut=0:bframes=3:b-pyramid=normal"}
        else:
            stream.options = {"forced-idr": "1", "x265-params": "bframes=3:scenecut=0:log-level=error"}
        picture = None
        for n in range(round(seconds * fps)):
            if n in starts:
                with Image.open(photos[starts[n]]) as im:
                    picture = im.convert("RGB").resize(size)
            frame = av.VideoFrame.from_image(picture)
            frame.pts = n
            frame.pict_type = av.video.frame.PictureType.I if n in starts else av.video.frame.PictureType.NONE
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path

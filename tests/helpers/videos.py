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

"""A generated folder of messy and hostile files, with what a scan must make of each.

`build(root)` returns `good` (file path -> the PIL image its vector must match: EXIF orientation
applied, first frame of an animation) and `bad` (paths that must be skipped, each counted once).
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def _photo(w: int = 96, h: int = 64, seed: int = 0) -> Image.Image:
    """A picture with structure (so orientation and frames change its embedding), not noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 / w, y * 255 / h, np.full_like(x, rng.integers(0, 255))], -1)
    base[: h // 3, : w // 4] = rng.integers(0, 255, 3)  # a block in one corner
    return Image.fromarray(base.astype(np.uint8))


def _encoded(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels (a decompression bomb)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * (width + 1) * 16, 9)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def build(root: Path) -> tuple[dict[str, Image.Image], list[str]]:
    root.mkdir(parents=True, exist_ok=True)
    good: dict[str, Image.Image] = {}
    bad: list[str] = []

    def put(name: str | bytes, data: bytes) -> str:
        path = os.path.join(os.fsencode(root), name) if isinstance(name, bytes) else str(root / name)
        with open(path, "wb") as f:
            f.write(data)
        return os.fsdecode(path)

    photo = _photo()
    jpeg = _encoded(photo, "JPEG", quality=95)

    # Good files, in every mode and with awkward names.
    good[put("plain.jpg", jpeg)] = photo
    good[put("with spaces.jpg", jpeg)] = photo
    good[put("emoji 📷.png", _encoded(photo, "PNG"))] = photo
    good[put("new\nline.png", _encoded(photo, "PNG"))] = photo
    good[put(b"latin1-caf\xe9.png", _encoded(photo, "PNG"))] = photo
    good[put("png-bytes-named.jpg", _encoded(photo, "PNG"))] = photo  # a wrong extension, but an image
    good[put("photo.webp", _encoded(photo, "WEBP", lossless=True))] = photo
    good[put("photo.tiff", _encoded(photo, "TIFF"))] = photo
    good[put("photo.bmp", _encoded(photo, "BMP"))] = photo
    cmyk = photo.convert("CMYK")
    good[put("cmyk.jpg", _encoded(cmyk, "JPEG", quality=95))] = cmyk
    gray16 = Image.fromarray(np.asarray(photo.convert("L"), np.uint16) * 257)
    good[put("gray16.png", _encoded(gray16, "PNG"))] = gray16
    palette = photo.convert("P", palette=Image.Palette.ADAPTIVE)
    good[put("palette.png", _encoded(palette, "PNG"))] = palette
    rgba = photo.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(photo.size))
    good[put("alpha.png", _encoded(rgba, "PNG"))] = rgba
    good[put("tiny-1x1.png", _encoded(Image.new("RGB", (1, 1), (200, 30, 30)), "PNG"))] = Image.new(
        "RGB", (1, 1), (200, 30, 30))
    good[put("panorama-1600x100.png", _encoded(_photo(1600, 100), "PNG"))] = _photo(1600, 100)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: the camera was turned; viewers rotate 90 degrees clockwise
    good[put("exif-rotated.jpg", _encoded(photo, "JPEG", quality=95, exif=exif))] = photo.transpose(
        Image.Transpose.ROTATE_270)
    frames = [_photo(seed=1), _photo(seed=2).transpose(Image.Transpose.FLIP_TOP_BOTTOM)]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    good[put("animated.gif", gif.getvalue())] = frames[0].convert("P", palette=Image.Palette.ADAPTIVE)

    # Bad files.
    bad.append(put("zero-bytes.jpg", b""))
    bad.append(put("truncated.jpg", jpeg[: len(jpeg) // 2]))
    png = _encoded(photo, "PNG")
    bad.append(put("truncated.png", png[: len(png) // 2]))
    bad.append(put("text-named.png", b"this is not an image at all\n" * 20))
    bad.append(put("pdf-named.jpg", b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\n%%EOF\n"))
    bad.append(put("zip-named.webp", b"PK\x03\x04" + b"\0" * 200))
    bad.append(put("header-only.gif", b"GIF89a"))
    bad.append(put("bomb.png", png_bomb(100_000, 100_000)))
    bad.append(put("absurd-65535x65535.png", png_bomb(65_535, 65_535)))
    bad.append(put("zero-width.png", png_bomb(0, 10)))
    bad.append(put("strip-100000x1.png", _encoded(_photo(100_000, 1), "PNG")))  # resized: 22 G pixels
    bad.append(put("garbage.tiff", os.urandom(4096)))

    # Things that are not regular files, or lead nowhere.
    os.mkfifo(root / "fifo.jpg")
    bad.append(str(root / "fifo.jpg"))
    os.symlink("/dev/zero", root / "zero-device.jpg")
    bad.append(str(root / "zero-device.jpg"))
    os.symlink(root / "no-such-file.png", root / "broken-link.png")
    bad.append(str(root / "broken-link.png"))
    (root / "loop").mkdir()
    os.symlink(root, root / "loop" / "back-to-root")  # a symlink loop: must not be walked forever
    os.symlink(root / "loop", root / "loop" / "self")
    return good, bad

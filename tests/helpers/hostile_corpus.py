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


def _jpeg_segments(data: bytes) -> list[tuple[int, bytes]]:
    """A JPEG's (marker, whole segment) list; a scan's segment runs on to the next marker."""
    segments, i = [], 2
    while data[i + 1] != 0xD9:  # EOI
        marker, end = data[i + 1], i + 2 + struct.unpack(">H", data[i + 2 : i + 4])[0]
        if marker == 0xDA:  # SOS: entropy-coded data follows, up to a marker that is not a stuffed 0 or RSTn
            while not (data[end] == 0xFF and data[end + 1] != 0 and not 0xD0 <= data[end + 1] <= 0xD7):
                end += 1
        segments.append((marker, data[i:end]))
        i = end
    return segments


def jpeg_time_bomb(repeats: int = 20_000, side: int = 4000) -> bytes:
    """A valid progressive JPEG whose smallest scan is repeated `repeats` times: each repeat walks all
    (side/8)^2 blocks again, so the default (20,000 of a 4000x4000 image, ~650 KB, made in well under a
    second) takes about a minute to decode, at any scale (a progressive JPEG is decoded whole)."""
    noise = np.random.default_rng(0).integers(0, 255, (16, 16), np.uint8)
    data = _encoded(Image.fromarray(noise).resize((side, side)), "JPEG", progressive=True, quality=50)
    segments = _jpeg_segments(data)
    smallest = min((s for m, s in segments if m == 0xDA), key=len)
    return b"\xff\xd8" + b"".join(s for _, s in segments) + smallest * repeats + b"\xff\xd9"


def tiff_of_many_pages(pages: int = 20_000) -> bytes:
    """A little-endian TIFF of `pages` 1x1 grey pages (one IFD each, all sharing one pixel). Counting its
    pages (Pillow's `n_frames`) takes time quadratic in their number: 20,000 take seconds."""
    entries = [(256, 3, 1), (257, 3, 1), (258, 3, 8), (259, 3, 1), (262, 3, 1), (273, 4, 8), (277, 3, 1),
               (278, 3, 1), (279, 4, 1)]  # width, height, bits, no compression, black is 0, strip at 8...
    ifd = struct.pack("<H", len(entries)) + b"".join(
        struct.pack("<HHI", tag, kind, 1) + (struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value))
        for tag, kind, value in entries)
    first = 12  # the header (8 bytes) and the pixel (4) come first
    offsets = [first + (page + 1) * (len(ifd) + 4) for page in range(pages - 1)] + [0]
    return b"II*\x00" + struct.pack("<I", first) + b"\x80\0\0\0" + b"".join(ifd + struct.pack("<I", o) for o in offsets)


def png16_memory_bomb(side: int = 4000) -> bytes:
    """A small 16-bit grey PNG (side^2 pixels, one value) that needs ~20 bytes a pixel to become 8-bit
    RGB (over 300 MB for 4000x4000): legal by its pixel count, a test of the memory limit."""
    raw = zlib.compress((b"\0" + b"\x12\x34" * side) * side, 9)
    ihdr = struct.pack(">IIBBBBB", side, side, 16, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", raw) + _png_chunk(b"IEND", b"")


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
    good[put("many-pages.tiff", tiff_of_many_pages())] = Image.new("L", (1, 1), 128)  # only its first is read

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

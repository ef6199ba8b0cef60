"""Opening an image safely: the one place that turns bytes into pixels, for decode workers, uploads and
query images alike.

Every check happens on the header, before any pixel is decoded: file size, pixel count and aspect
ratio. Then the first frame is decoded, EXIF orientation applied, and the mode made 8-bit RGB.
Nothing here changes process-wide state (no Pillow settings, no warning filters) beyond teaching Pillow
to read HEIF (pillow-heif's opener; Pillow reads AVIF itself). Camera RAW files, recognised by their
bytes (never by their name, so no caller has to tell), are read with rawpy: the embedded preview JPEG
where it is large enough, else the raw data developed at half size.
"""

from __future__ import annotations

import io
import os
import stat
from dataclasses import dataclass

import numpy as np

from nanodb.media.formats import is_camera_raw, register_plugins

MAX_FILE_BYTES = 1 << 30  # no real photo is larger; reading such a file whole would hurt
# Resizing the short side to the model's input multiplies the pixels by the aspect ratio: a 1x100000
# strip (a small file) would become gigabytes. Real panoramas stay far below this.
MAX_ASPECT_RATIO = 200
DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own default limit

# A RAW file's embedded preview is used when its short side has at least this many pixels.
MIN_PREVIEW_SIDE = 256


class ImageRejected(ValueError):
    """A file or upload that is not opened as an image; the message says why in a few words."""


@dataclass(frozen=True)
class FileBytes:
    data: bytes
    size: int
    mtime: float


def open_regular_file(path: str, max_bytes: int = MAX_FILE_BYTES):
    """`path` opened for reading and checked on its descriptor, before a byte is read, to be a non-empty
    regular file of at most `max_bytes`: (binary file, its fstat). The one way nanodb opens a user's file.

    Never blocks: O_NONBLOCK (a FIFO, or a file swapped for one since the walk, opens at once), O_NOCTTY
    (a terminal never becomes this process's). Raises ImageRejected for FIFOs, devices, sockets, folders,
    empty or oversized files and unreadable paths."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as e:
        raise ImageRejected(f"unreadable: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ImageRejected("not a regular file")
        if st.st_size == 0:
            raise ImageRejected("empty file")
        if st.st_size > max_bytes:
            raise ImageRejected(f"file too large ({st.st_size >> 20} MiB)")
        return open(fd, "rb"), st
    except BaseException:
        os.close(fd)
        raise


def read_image_file(path: str, max_bytes: int = MAX_FILE_BYTES) -> FileBytes:
    """A regular file's bytes, read through open_regular_file, at most `max_bytes` of them (a file that
    grew past it since the check is refused); raises ImageRejected."""
    f, st = open_regular_file(path, max_bytes)
    with f:
        try:
            data = f.read(st.st_size + 1)  # a buffer of the file's size, not of the limit (a memory limit)
            if len(data) > st.st_size:  # it grew since the check
                data += f.read(max_bytes + 1 - len(data))
        except OSError as e:
            raise ImageRejected(f"unreadable: {e.strerror or e}") from None
    if len(data) > max_bytes:
        raise ImageRejected(f"file too large (over {max_bytes >> 20} MiB)")
    return FileBytes(data, st.st_size, st.st_mtime)


def check_dimensions(width: int, height: int, max_pixels: int) -> None:
    """Refuse decompression bombs and absurd strips from the header's size alone."""
    if width <= 0 or height <= 0:
        raise ImageRejected(f"invalid dimensions ({width}x{height} pixels)")
    if width * height > max_pixels:
        raise ImageRejected(f"image too large ({width}x{height} pixels; at most {max_pixels:,} are read)")
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise ImageRejected(f"absurd dimensions ({width}x{height} pixels)")


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, draft_size: int | None = None):
    """Bytes -> an 8-bit RGB PIL image of the first frame, EXIF orientation applied.

    `draft_size`: where the format can decode at a reduced scale (JPEG), decode at no less than this
    many pixels on the short side. A camera RAW file is developed (see is_camera_raw).
    Raises ImageRejected with a short reason for anything else.
    """
    from PIL import Image, UnidentifiedImageError

    if is_camera_raw(data) and (developed := open_raw(data, max_pixels, draft_size)) is not None:
        return developed
    register_plugins()
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageRejected("not an image (or an unsupported format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageRejected("image too large (decompression bomb?)") from None
    except Exception as e:  # a broken header can make a plugin raise anything
        raise ImageRejected(f"corrupt image header ({type(e).__name__}: {e})") from None
    try:
        check_dimensions(*image.size, max_pixels)
        if draft_size and image.format == "JPEG":
            w, h = image.size
            scale = min(w, h) / draft_size
            if scale >= 2:
                image.draft("RGB", (int(w / scale) + 1, int(h / scale) + 1))
        image.load()
        rgb = to_rgb(image)
        if (taken := date_taken(image)) is not None:
            rgb.info["taken"] = taken
        return rgb
    except (ImageRejected, MemoryError):  # a memory limit (media.sandbox) is reported as such
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageRejected(f"image too large ({e})") from None
    except Exception as e:  # a broken file can make a decoder raise anything; the caller must go on
        raise ImageRejected(f"corrupt or truncated image ({type(e).__name__}: {e})") from None


EXIF_IFD, DATE_TIME_ORIGINAL, DATE_TIME = 0x8769, 36867, 306  # EXIF tags


def date_taken(image) -> str | None:
    """When a photo was taken, from its EXIF (DateTimeOriginal, else DateTime), as ISO 8601 local time
    (EXIF names no time zone); None without one. Read here, from the bytes the opener has already
    checked, so nothing else opens a photo again to show its date."""
    from datetime import datetime

    try:
        exif = image.getexif()
        value = exif.get_ifd(EXIF_IFD).get(DATE_TIME_ORIGINAL) or exif.get(DATE_TIME)
        return datetime.strptime(str(value).strip()[:19], "%Y:%m:%d %H:%M:%S").isoformat() if value else None
    except Exception:  # a damaged EXIF block costs the date only
        return None


def open_raw(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, draft_size: int | None = None):
    """A camera RAW file's bytes -> 8-bit RGB: its embedded preview, else the raw data developed.
    None when LibRaw does not know the format (the caller tries Pillow)."""
    import rawpy
    from PIL import Image

    try:
        with rawpy.imread(io.BytesIO(data)) as raw:
            try:
                thumb = raw.extract_thumb()
            except (rawpy.LibRawNoThumbnailError, rawpy.LibRawUnsupportedThumbnailError):
                thumb = None
            if thumb is not None and thumb.format == rawpy.ThumbFormat.JPEG:
                preview = open_image(thumb.data, max_pixels, draft_size)
                if min(preview.size) >= MIN_PREVIEW_SIDE:
                    # LibRaw's orientation, unless the preview carries its own
                    return preview if _has_orientation(thumb.data) else _flip(preview, raw.sizes.flip)
            elif (thumb is not None and thumb.format == rawpy.ThumbFormat.BITMAP
                  and min(thumb.data.shape[:2]) >= MIN_PREVIEW_SIDE):
                return _flip(Image.fromarray(thumb.data).convert("RGB"), raw.sizes.flip)
            check_dimensions(raw.sizes.width // 2, raw.sizes.height // 2, max_pixels)  # half size
            return Image.fromarray(raw.postprocess(half_size=True, use_camera_wb=True, output_bps=8))
    except (ImageRejected, MemoryError):
        raise
    except rawpy.LibRawFileUnsupportedError:
        return None
    except Exception as e:  # LibRaw raises many kinds of errors on a damaged file
        raise ImageRejected(f"corrupt or unsupported RAW file ({type(e).__name__}: {e})") from None


def _has_orientation(jpeg: bytes) -> bool:
    from PIL import Image

    with Image.open(io.BytesIO(jpeg)) as im:
        return im.getexif().get(0x0112, 1) != 1


def _flip(image, flip: int):
    """Apply LibRaw's `sizes.flip` (0 none, 3 180 degrees, 5 90 degrees counter-clockwise, 6 clockwise)."""
    from PIL import Image

    turn = {3: Image.Transpose.ROTATE_180, 5: Image.Transpose.ROTATE_90, 6: Image.Transpose.ROTATE_270}.get(flip)
    return image.transpose(turn) if turn is not None else image


def to_rgb(image):
    """First frame, EXIF orientation applied, as 8-bit RGB (16-bit, CMYK, palette and alpha handled)."""
    from PIL import Image, ImageOps

    if getattr(image, "tell", lambda: 0)() != 0:  # not `n_frames > 1`: that walks every page of a TIFF
        image.seek(0)
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        image = Image.fromarray((np.asarray(image, np.float64) / 256).clip(0, 255).astype(np.uint8))
    elif image.mode == "F":
        image = Image.fromarray(np.asarray(image).clip(0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
    return image.convert("RGB")


def model_pixels(image, transform) -> np.ndarray:
    """An RGB image through the model's pixel transform, as (H, W, 3) uint8."""
    return np.asarray(transform(image), np.uint8)

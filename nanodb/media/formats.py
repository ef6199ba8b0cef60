"""Every image format nanodb reads, declared once: the file names a scan looks for, the Pillow plugins
that teach Pillow a format, and how camera RAW bytes are recognised (LibRaw reads them, Pillow the rest).

Adding a format is one edit here (its extensions; a plugin to register, or a RAW signature), its
dependency in pyproject.toml where it needs one, a line of the README's format table, and a file in
tests/ingest/test_formats.py.
"""

from __future__ import annotations

import io

# Camera RAW file names: a scan looks for them (the opener recognises RAW bytes by their content, not by name).
RAW_EXTENSIONS = frozenset({
    ".dng", ".arw", ".cr2", ".cr3", ".nef", ".raf", ".orf", ".rw2",
    ".nrw", ".pef", ".srw", ".rwl", ".3fr", ".iiq", ".crw", ".erf", ".mos", ".raw",
})
# A rendering of the same shot beside a RAW file: the camera's own (IMG_0001.CR2 beside IMG_0001.JPG, or a
# HEIF), or an export of it under the same name (a PNG, TIFF, WebP or AVIF a raw developer wrote): a scan
# indexes the rendering alone unless told to index both (setting raw_pairs). Only formats a scan indexes.
RENDERING_EXTENSIONS = frozenset({
    ".jpg", ".jpeg", ".jpe", ".jfif", ".heic", ".heif", ".png", ".tif", ".tiff", ".webp", ".avif",
})
# The files a scan indexes: what Pillow reads (with pillow-heif for HEIF/HEIC), and camera RAW (rawpy).
IMAGE_EXTENSIONS = frozenset({
    ".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".tiff", ".tif", ".bmp", ".gif", ".webp",
    ".jp2", ".j2k", ".jpx", ".jpf", ".pnm", ".ppm", ".pgm", ".pbm",
    ".heic", ".heif", ".avif", ".tga", ".psd", ".ico",
}) | RAW_EXTENSIONS
# Image files nanodb cannot read: each is reported as skipped (never ignored without a word).
UNSUPPORTED_IMAGE_EXTENSIONS = frozenset({
    ".jxl", ".svg", ".svgz", ".eps", ".exr", ".hdr", ".xcf", ".kra", ".heics", ".avifs", ".x3f",
})

# Camera RAW formats with a signature of their own, as (offset, bytes); LibRaw reads them.
RAW_SIGNATURES = (
    (4, b"ftypcrx "),  # Canon CR3
    (0, b"FUJIFILMCCD-RAW"),  # Fujifilm RAF
    (0, b"IIRO"), (0, b"IIRS"), (0, b"MMOR"),  # Olympus ORF
    (0, b"IIU\x00"),  # Panasonic RW2, Leica RWL
    (6, b"HEAPCCDR"),  # Canon CRW
    (0, b"\x00MRM"),  # Minolta MRW
)
# DNG, NEF, CR2, ARW, PEF, SRW... begin as any TIFF does.
TIFF_SIGNATURES = (b"II*\x00", b"MM\x00*")
TIFF_MAKE, TIFF_BITS, TIFF_PHOTOMETRIC, TIFF_DNG_VERSION = 271, 258, 262, 50706
# Photometric interpretations of plain pictures (grayscale, RGB, CMYK), as opposed to a sensor's CFA.
PICTURE_PHOTOMETRICS = (0, 1, 2, 5)

_plugins_ready = False


def register_plugins() -> None:
    """Teach Pillow to open HEIF/HEIC (once per process; pillow-heif's public opener)."""
    global _plugins_ready
    if not _plugins_ready:
        from pillow_heif import register_heif_opener

        register_heif_opener()
        _plugins_ready = True


def is_camera_raw(data: bytes) -> bool:
    """Bytes that LibRaw, not Pillow, should read first: a RAW format's own signature, or a TIFF that a
    camera wrote (a DNG, or one naming its camera's maker whose first image is not a deep picture).

    Plain TIFFs go to Pillow without asking LibRaw: it would develop a 16-bit grayscale, RGBA or CMYK
    TIFF as if it were a sensor's mosaic. A TIFF sent to LibRaw that it refuses (an 8-bit photo exported
    with its camera's EXIF) still opens with Pillow."""
    if any(data[at : at + len(sig)] == sig for at, sig in RAW_SIGNATURES):
        return True
    if data[:4] not in TIFF_SIGNATURES:
        return False
    from PIL import TiffImagePlugin

    try:
        ifd = TiffImagePlugin.ImageFileDirectory_v2(data[:8])
        header = io.BytesIO(data)
        header.seek(ifd.next)
        ifd.load(header)
        deep = max(ifd.get(TIFF_BITS) or (8,)) > 8
        picture = deep and ifd.get(TIFF_PHOTOMETRIC) in PICTURE_PHOTOMETRICS
        return TIFF_DNG_VERSION in ifd or (TIFF_MAKE in ifd and not picture)
    except Exception:  # a damaged header: Pillow says what is wrong with it
        return False

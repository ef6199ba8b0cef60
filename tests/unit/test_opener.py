"""The one opener decides from the bytes alone how to read a file: a camera RAW is developed whatever its
name (issue 19, bug 5: callers had to pass a RAW flag, and uploads did not), a plain TIFF still opens
with Pillow as it did, and the one content hash stays the digest stored databases hold."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import helpers
import numpy as np
import pytest
from PIL import Image

from nanodb.media.formats import is_camera_raw
from nanodb.media.opener import ImageRejected, open_image, to_rgb
from nanodb.media.record import content_hash

DNG = Path(helpers.__file__).parent / "data" / "gradient.dng"


def tiff_bytes(image: Image.Image, **save) -> bytes:
    out = io.BytesIO()
    image.save(out, "TIFF", **save)
    return out.getvalue()


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    rng = np.random.default_rng(0)
    smooth = np.kron(rng.integers(0, 256, (12, 16, 3)), np.ones((8, 8, 1)))
    return Image.fromarray(smooth.astype(np.uint8))


def test_a_dng_opens_as_the_developed_photo_without_being_told():
    import rawpy

    data = DNG.read_bytes()
    with rawpy.imread(str(DNG)) as raw:
        developed = raw.postprocess(half_size=True, use_camera_wb=True, output_bps=8)
    np.testing.assert_array_equal(np.asarray(open_image(data)), developed)


def test_a_plain_tiff_still_opens_with_pillow(photo):
    np.testing.assert_array_equal(np.asarray(open_image(tiff_bytes(photo))), np.asarray(photo))


def test_a_16_bit_grayscale_tiff_is_not_developed_as_a_sensor_mosaic(photo):
    """LibRaw accepts such a TIFF as a raw sensor image; it must open as the picture Pillow reads."""
    gray16 = Image.fromarray(np.asarray(photo.convert("L"), np.uint16) * 257)
    data = tiff_bytes(gray16)
    np.testing.assert_array_equal(np.asarray(open_image(data)), np.asarray(to_rgb(Image.open(io.BytesIO(data)))))


def test_a_tiff_naming_its_camera_but_not_raw_opens_with_pillow(photo):
    """An 8-bit photo exported with its camera's Make: LibRaw is asked first, refuses, Pillow reads it."""
    data = tiff_bytes(photo, tiffinfo={271: "NIKON CORPORATION"})
    assert is_camera_raw(data)
    np.testing.assert_array_equal(np.asarray(open_image(data)), np.asarray(photo))


def test_raw_formats_are_recognised_by_their_signatures(photo):
    headers = {
        "cr3": b"\x00\x00\x00\x18ftypcrx \x00\x00\x00\x01",
        "raf": b"FUJIFILMCCD-RAW 0201FF383501",
        "orf": b"IIRO\x08\x00\x00\x00",
        "rw2": b"IIU\x00\x18\x00\x00\x00",
    }
    for name, header in headers.items():
        assert is_camera_raw(header + bytes(64)), name
    assert is_camera_raw(DNG.read_bytes())
    jpeg = io.BytesIO()
    photo.save(jpeg, "JPEG")
    assert not is_camera_raw(jpeg.getvalue()) and not is_camera_raw(tiff_bytes(photo))


def test_a_damaged_tiff_based_raw_is_refused_with_a_reason():
    with pytest.raises(ImageRejected):
        open_image(b"II*\x00" + b"\x17" * 500)
    with pytest.raises(ImageRejected):
        open_image(DNG.read_bytes()[:3000])


def test_the_content_hash_is_blake2b_128_of_the_bytes_whole_or_in_chunks():
    data = DNG.read_bytes()
    assert content_hash(data) == hashlib.blake2b(data, digest_size=16).digest()
    assert content_hash(data[i : i + 1000] for i in range(0, len(data), 1000)) == content_hash(data)
    assert content_hash(b"nanodb").hex() == "d6f46c8fae1abc9860c1b1afb9f5f643"  # what databases store

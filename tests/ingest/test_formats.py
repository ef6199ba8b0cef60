"""Photo formats (issue 12): JPEG 2000, PNM, HEIC/HEIF, AVIF, camera RAW and the rest are indexed by a
folder scan; an image file that cannot be read is counted and logged once, never ignored silently.

The RAW file is tests/helpers/data/gradient.dng: a real 128x96 DNG (a 16-bit RGGB gradient, no embedded preview),
written with pidng (`RAW2DNG` with the usual DNG tags); LibRaw develops it. No RAW with an embedded
preview could be made here, so the preview path is tested only with the real camera files you scan.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import helpers
import numpy as np
import pytest
from helpers import coco_photos
from PIL import Image

from nanodb import NanoDB

DNG = Path(helpers.__file__).parent / "data" / "gradient.dng"


def write_formats(folder: Path) -> dict[str, Image.Image]:
    """One photo in each format a scan must index; returns file name -> the image Pillow/rawpy reads."""
    from pillow_heif import register_heif_opener

    register_heif_opener()
    folder.mkdir(parents=True)
    photo = Image.open(coco_photos(1)[0]).convert("RGB").resize((320, 240))
    saves = {
        "a.jp2": dict(format="JPEG2000"), "b.J2K": dict(format="JPEG2000"), "c.jpx": dict(format="JPEG2000"),
        "d.ppm": {}, "e.pnm": dict(format="PPM"), "f.heic": dict(format="HEIF", quality=90),
        "g.HEIF": dict(format="HEIF", quality=90), "h.avif": dict(format="AVIF", quality=90),
        "i.tga": {}, "j.ico": dict(sizes=[(128, 128)]),
    }
    for name, kwargs in saves.items():
        photo.save(folder / name, **kwargs)
    photo.convert("L").save(folder / "k.pgm")
    photo.convert("1").save(folder / "l.pbm")
    shutil.copy(DNG, folder / "m.dng")
    return {p.name: p for p in folder.iterdir()}


@pytest.fixture(scope="module")
def scanned(tmp_path_factory):
    root = tmp_path_factory.mktemp("formats")
    good = write_formats(root / "photos")
    bad = root / "photos" / "bad"
    bad.mkdir()
    (bad / "broken.heic").write_bytes(b"\x00\x00\x00\x18ftypheic" + b"\x00" * 200)
    (bad / "damaged.cr2").write_bytes(b"II*\x00" + b"\x17" * 500)  # beside broken.heic, broken.cr2 would be left out
    shutil.copy(coco_photos(1)[0], bad / "photo.jxl")  # an image format nanodb cannot read
    (bad / "drawing.svg").write_text("<svg xmlns='http://www.w3.org/2000/svg'/>")
    (root / "photos" / "notes.txt").write_text("not an image\n")
    db = NanoDB(root / "db", config="test")
    handler = Records()
    logging.getLogger().addHandler(handler)
    try:
        report = db.scan(root / "photos")
    finally:
        logging.getLogger().removeHandler(handler)
    yield db, report, good, bad, handler.records
    db.close()


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records: list[str] = []

    def emit(self, record):
        self.records.append(record.getMessage())


def test_every_photo_format_is_indexed_by_a_folder_scan(scanned):
    db, report, good, _, _ = scanned
    assert {db.path_of(i) for i in range(len(db))} == {str(p) for p in good.values()}
    assert report.added == len(good) == 13


def test_each_format_is_decoded_as_its_own_reader_sees_it(scanned):
    import rawpy

    db, _, good, _, _ = scanned
    for name, path in good.items():
        if name.endswith(".dng"):
            with rawpy.imread(str(path)) as raw:
                image = Image.fromarray(raw.postprocess(half_size=True, use_camera_wb=True, output_bps=8))
        else:
            image = Image.open(path)
        expected = db.model.encode_images([image])[0]
        stored = db[db.index_of(path)].vector.astype(np.float32)
        assert float(stored @ expected) > 0.999, name


def test_an_unreadable_or_unsupported_image_file_is_counted_and_logged_once(scanned):
    _, report, _, bad, records = scanned
    failed = dict(report.failures)
    assert set(failed) == {str(p) for p in bad.iterdir()}
    assert "unsupported image format" in failed[str(bad / "photo.jxl")]
    for path in failed:
        assert sum(Path(path).name in r for r in records) == 1, path
    assert not any("notes.txt" in r for r in records)  # not an image: passed over


def test_each_format_scans_as_a_single_file_too(scanned, tmp_path):
    _, _, good, _, _ = scanned
    with NanoDB(tmp_path / "db", config="test") as db:
        for path in good.values():
            assert db.scan(path).added == 1, path.name


def test_the_web_ui_makes_thumbnails_of_every_format(scanned):
    from nanodb.interfaces.thumbnails import ThumbnailCache

    db, _, good, _, _ = scanned
    cache = ThumbnailCache(db, size=64)
    for path in good.values():
        with Image.open(cache.get(db.index_of(path))) as thumb:
            assert max(thumb.size) <= 64 and thumb.mode == "RGB", path.name


def test_an_uploaded_raw_file_searches_and_finds_itself(scanned):
    """Issue 19, bug 5: the HTTP API refused RAW uploads (400, "not an image"): only the scan told the
    opener that a file was RAW. The opener now knows from the bytes."""
    import httpx

    from nanodb.interfaces.server import start_server

    db, _, good, _, _ = scanned
    server = start_server(db, "127.0.0.1", 0)
    try:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            r = client.post("/api/search/image", params={"k": 1}, files={"file": ("photo", DNG.read_bytes())})
    finally:
        server.stop()
    assert r.status_code == 200, r.text
    [hit] = r.json()["results"]
    assert hit["index"] == db.index_of(good["m.dng"]) and hit["similarity"] > 0.99

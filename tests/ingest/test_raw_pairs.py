"""RAW + JPEG pairs: a camera writes IMG_0001.CR2 beside IMG_0001.JPG, two files of one shot. A scan and
a watch index one item per pair by default, the JPEG (the camera's own rendering); raw_pairs="both"
(--raw-pairs both) indexes both. The RAW files are tests/helpers/data/gradient.dng, a real DNG."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import helpers
import pytest
from helpers import coco_photos
from nanodb.pipeline.walk import DirectoryWalker

from nanodb import NanoDB
from nanodb.interfaces.cli import build_parser

DNG = Path(helpers.__file__).parent / "data" / "gradient.dng"


def walked(*roots, **options) -> set[str]:
    return {Path(f.path).name for f in DirectoryWalker([str(r) for r in roots], **options)}


def test_the_walk_leaves_out_a_raw_file_beside_its_jpeg_or_heif(tmp_path):
    names = ["IMG_0001.CR2", "img_0001.JPG",  # stems compared in any letter case
             "IMG_0002.NEF", "IMG_0002.HEIC",  # a camera that writes HEIF beside its RAW
             "IMG_0003.DNG", "IMG_0003.gif",  # a GIF is no export of a photo
             "IMG_0004.arw", "IMG_0001.jpg.txt"]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "IMG_0001.dng").write_bytes(b"x")  # the same stem in another folder: no pair
    walker = DirectoryWalker([str(tmp_path)])
    assert {Path(f.path).name for f in walker} == {
        "img_0001.JPG", "IMG_0002.HEIC", "IMG_0003.DNG", "IMG_0003.gif", "IMG_0004.arw", "IMG_0001.dng"}
    assert walker.raw_left_out == 2
    assert "IMG_0001.CR2" in walked(tmp_path, index_paired_raw=True)
    # a JPEG that is not indexed (excluded) pairs with nothing; a RAW named as a root is indexed
    assert "IMG_0001.CR2" in walked(tmp_path, excludes=("*.JPG",))
    assert walked(tmp_path / "IMG_0001.CR2") == {"IMG_0001.CR2"}


@pytest.mark.parametrize("export", ["png", "PNG", "tif", "tiff", "webp", "avif", "heif", "jpeg"])
def test_a_raw_beside_an_export_of_its_name_is_one_item_the_export(tmp_path, export):
    """Raw developers export to PNG, TIFF, WebP, AVIF... under the RAW's name: one shot, one item."""
    (tmp_path / "IMG_0007.NEF").write_bytes(b"x")
    (tmp_path / f"IMG_0007.{export}").write_bytes(b"x")
    walker = DirectoryWalker([str(tmp_path)])
    assert {Path(f.path).name for f in walker} == {f"IMG_0007.{export}"}
    assert walker.raw_left_out == 1
    assert walked(tmp_path, index_paired_raw=True) == {"IMG_0007.NEF", f"IMG_0007.{export}"}


def camera_card(root: Path) -> Path:
    """A camera's folder: a RAW+JPEG pair, a RAW alone, and a RAW of the pair's name in another folder."""
    (root / "other").mkdir(parents=True)
    shutil.copy(DNG, root / "IMG_0001.CR2")  # LibRaw reads it by its bytes, whatever its name
    shutil.copy(coco_photos(1)[0], root / "IMG_0001.JPG")
    shutil.copy(DNG, root / "IMG_0002.DNG")
    shutil.copy(DNG, root / "other" / "IMG_0001.dng")
    return root


def test_a_scan_indexes_the_jpeg_of_a_pair_and_both_when_asked(tmp_path):
    card = camera_card(tmp_path / "card")
    with NanoDB(tmp_path / "db", config="test", workers=1) as db:
        report = db.scan(card)
        assert sorted(item.path for item in db) == [
            str(card / "IMG_0001.JPG"), str(card / "IMG_0002.DNG"), str(card / "other" / "IMG_0001.dng")]
        assert (report.added, report.failed, report.raw_left_out) == (3, 0, 1)
        assert "1 RAW pair: JPEG/export only" in report.summary()
        both = db.scan(card, raw_pairs="both")
        assert (both.added, both.unchanged, both.failed) == (1, 3, 0)
        assert db.index_of(card / "IMG_0001.CR2") is not None
        with pytest.raises(ValueError, match="raw_pairs"):
            db.scan(card, raw_pairs="raw")


def test_the_setting_and_the_flag_choose_both(tmp_path):
    card = camera_card(tmp_path / "card")
    with NanoDB(tmp_path / "db", config="test", workers=1, raw_pairs="both") as db:
        assert db.scan(card).added == 4
    assert build_parser().parse_args(["--raw-pairs", "both"]).raw_pairs == "both"


async def handed_on(db: NanoDB, folder: Path, steps) -> list[str]:
    """The files a watch of `folder` hands on to be embedded while `steps` run: each step is (a function
    that changes the folder, the name of a file it must hand on last)."""
    feed: asyncio.Queue = asyncio.Queue()
    watcher = db.watcher([folder], feed)
    watcher.start()
    task = asyncio.create_task(watcher.run())
    names: list[str] = []
    try:
        for change, last in steps:
            change()
            while not names or names[-1] != last:  # files settle in the order they arrived
                names.append(Path((await asyncio.wait_for(feed.get(), 60)).path).name)
    finally:
        task.cancel()
        watcher.stop()
    return names


def test_a_watch_follows_the_rule_of_the_walk(tmp_path):
    folder = tmp_path / "watched"
    folder.mkdir()
    photos = coco_photos(4)

    def copy(*files):
        return lambda: [shutil.copy(src, folder / name) for src, name in files]

    with NanoDB(tmp_path / "db", config="test", settle_seconds=0.3) as db:
        names = asyncio.run(handed_on(db, folder, [
            (copy((DNG, "IMG_0001.CR2"), (photos[1], "IMG_0001.JPG")), "IMG_0001.JPG"),  # written by a camera
            (copy((DNG, "img_0001.nef"), (photos[2], "IMG_0002.jpg")), "IMG_0002.jpg"),  # a RAW beside a JPEG
            (copy((DNG, "IMG_0003.DNG")), "IMG_0003.DNG"),
            (copy((photos[3], "IMG_0003.jpg")), "IMG_0003.jpg"),  # a JPEG later (an export): both stay
        ]))
    assert names == ["IMG_0001.JPG", "IMG_0002.jpg", "IMG_0003.DNG", "IMG_0003.jpg"]

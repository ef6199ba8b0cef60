"""The EXIF date a photo was taken is read once, by the opener during the scan, and kept with the item."""

from __future__ import annotations

from helpers import coco_photos
from PIL import Image

from nanodb import NanoDB


def photo_taken_at(path, when: str | None) -> None:
    image = Image.open(coco_photos(1)[0]).convert("RGB")
    exif = Image.Exif()
    if when:
        exif.get_ifd(0x8769)[36867] = when  # DateTimeOriginal
    image.save(path, exif=exif)


def test_a_scan_keeps_the_exif_date_taken_and_a_moved_copy_keeps_it_too(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    photo_taken_at(photos / "beach.jpg", "2019:07:14 10:30:00")
    photo_taken_at(photos / "undated.jpg", None)
    (photos / "garbled.jpg").write_bytes((photos / "beach.jpg").read_bytes().replace(b"2019:07:14", b"20x9:07:14"))
    with NanoDB(tmp_path / "db", config="test") as db:
        db.scan(photos)
        assert db[db.index_of(photos / "beach.jpg")].metadata == {"taken": "2019-07-14T10:30:00"}
        assert db[db.index_of(photos / "undated.jpg")].metadata == {}
        assert db[db.index_of(photos / "garbled.jpg")].metadata == {}  # a bad date costs the date only
        (photos / "beach.jpg").rename(photos / "renamed.jpg")
        assert db.store.move_paths([(str(photos / "beach.jpg"), str(photos / "renamed.jpg"))]) == 1
        assert db[db.index_of(photos / "renamed.jpg")].metadata == {"taken": "2019-07-14T10:30:00"}


def test_metadata_given_to_add_joins_the_date_taken(tmp_path):
    photo_taken_at(tmp_path / "beach.jpg", "2021:01:02 03:04:05")
    with NanoDB(tmp_path / "db", config="test") as db:
        [i] = db.add(str(tmp_path / "beach.jpg"), metadata={"album": "holiday"})
        assert db[i].metadata == {"taken": "2021-01-02T03:04:05", "album": "holiday"}


def test_the_web_ui_shows_the_kept_date_without_opening_the_file(tmp_path):
    from nanodb.interfaces.web import taken_date

    photos = tmp_path / "photos"
    photos.mkdir()
    photo_taken_at(photos / "beach.jpg", "2019:07:14 10:30:00")
    photo_taken_at(photos / "undated.jpg", None)
    with NanoDB(tmp_path / "db", config="test") as db:
        db.scan(photos)
        beach, undated = db[db.index_of(photos / "beach.jpg")], db[db.index_of(photos / "undated.jpg")]
        (photos / "beach.jpg").unlink()  # the date comes from the database, not from the file
        assert taken_date(beach) == ("2019-07-14 10:30", "taken")
        assert taken_date(undated)[1] == "file time"
        [added] = db.add(db.vectors[beach.index].astype("float32"))
        assert taken_date(db[added]) == ("unknown", "date")

"""Shared fixtures: real photos from ../shared/data, a few bad files, and a scanned database."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def data_dir(name: str) -> Path:
    path = DATA / name
    if not path.is_dir():
        pytest.skip(f"test photos not found at {path} (clone the repo next to shared/)")
    return path


def coco_photos(n: int) -> list[Path]:
    return sorted(data_dir("coco-val2017/images").glob("*.jpg"))[:n]


def write_bad_files(folder: Path) -> dict[str, str]:
    """Files a scan must skip, each with the reason it is bad."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    good = coco_photos(1)[0].read_bytes()
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (folder / "notes.jpg").write_text("this is a text file with an image name\n")
    (folder / "garbage.PNG").write_bytes(os.urandom(4096))
    os.symlink(folder / "does-not-exist.jpg", folder / "broken-link.jpg")
    # A decompression bomb: a tiny PNG that claims ~400 megapixels.
    Image.new("1", (20000, 20000)).save(folder / "bomb.png", optimize=True)
    return {p.name: "bad" for p in folder.iterdir()}


@pytest.fixture(scope="session")
def photo_tree(tmp_path_factory) -> Path:
    """40 real photos in nested folders (mixed-case extensions), plus bad files."""
    root = tmp_path_factory.mktemp("photos")
    for i, src in enumerate(coco_photos(40)):
        sub = root / f"set{i % 3}" / ("deep" if i % 2 else "")
        sub.mkdir(parents=True, exist_ok=True)
        name = src.stem + (".JPG" if i % 5 == 0 else ".jpg")
        shutil.copy(src, sub / name)
    write_bad_files(root / "bad")
    return root


@pytest.fixture(scope="session")
def scanned_db(tmp_path_factory, photo_tree):
    """A saved database of photo_tree (ViT-S-32, random weights), and its scan report."""
    from nanodb import NanoDB

    path = tmp_path_factory.mktemp("db") / "db"
    with NanoDB(path, config="test") as db:
        report = db.scan(photo_tree)
        db.save()
    return path, report


@pytest.fixture(scope="session")
def empty_db_path(tmp_path_factory) -> Path:
    """An empty database (ViT-S-32, random weights) to copy."""
    from nanodb import NanoDB

    path = tmp_path_factory.mktemp("empty") / "template"
    NanoDB(path, config="test").close()
    return path

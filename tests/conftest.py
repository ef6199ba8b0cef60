"""Shared fixtures: the repository's real photos (tests/data/photos), a few bad files, and a scanned database."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from helpers import coco_photos, write_bad_files


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


@pytest.fixture
def query_image(tmp_path) -> Path:
    """A photo-sized image that no database holds (an image query the model must embed)."""
    import numpy as np
    from PIL import Image

    path = tmp_path / "query.jpg"
    rng = np.random.default_rng(7)
    Image.fromarray(rng.integers(0, 255, (300, 420, 3), np.uint8)).resize((840, 600)).save(path)
    return path


@pytest.fixture(scope="session")
def empty_db_path(tmp_path_factory) -> Path:
    """An empty database (ViT-S-32, random weights) to copy."""
    from nanodb import NanoDB

    path = tmp_path_factory.mktemp("empty") / "template"
    NanoDB(path, config="test").close()
    return path


@pytest.fixture(scope="module", autouse=True)
def no_event_loop_left_running():
    """A test module (or the code it runs) that leaves an event loop marked running in this thread breaks
    every later asyncio.run: name it here, where it happens. (Playwright's sync API marks its loop running
    while it is open: a browser lives for one module at most.)"""
    import asyncio

    yield
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # none: as it should be
        return
    pytest.fail(f"an event loop was left running in the main thread: {loop!r}")

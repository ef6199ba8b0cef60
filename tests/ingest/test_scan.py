"""Scanning real photos: one vector per good image, bad files skipped and counted, fidelity."""

from __future__ import annotations

import asyncio
import shutil

import numpy as np
import pytest
import torch
from helpers import coco_photos
from PIL import Image

from nanodb import NanoDB
from nanodb.media.paths import is_image_name


def good_images(tree):
    return sorted(str(p) for p in tree.rglob("*") if p.is_file() and is_image_name(p.name) and p.parent.name != "bad")


def test_scan_indexes_each_good_image_once_and_skips_bad_files(scanned_db, photo_tree):
    path, report = scanned_db
    expected = good_images(photo_tree)
    bad = sorted(p.name for p in (photo_tree / "bad").iterdir())
    assert report.added == len(expected) == 40
    assert sorted(p.rsplit("/", 1)[1] for p, _ in report.failures) == bad
    assert all(reason for _, reason in report.failures)
    with NanoDB(path, read_only=True) as db:
        assert len(db) == len(expected)
        assert sorted(item.path for item in db) == expected


def test_reopened_database_gives_same_results(scanned_db, photo_tree):
    path, _ = scanned_db
    query = good_images(photo_tree)[7]
    with NanoDB(path, read_only=True) as db:
        first_text = db.search("a photo of a dog", k=5)
        first_image = db.search(query, k=5)
    with NanoDB(path, read_only=True) as db:
        assert db.search("a photo of a dog", k=5) == first_text
        assert db.search(query, k=5) == first_image
    assert first_image[0].path == query and first_image[0].similarity == pytest.approx(1.0, abs=2e-3)


def reference_embedding(db, path: str) -> np.ndarray:
    """The model's embedding of a file computed directly with open_clip's own preprocess."""
    model = db.model
    with torch.no_grad(), Image.open(path) as im:
        x = model.preprocess(im).unsqueeze(0)
        v = model.model.encode_image(x).float().numpy()[0]
    return v / np.linalg.norm(v)


@pytest.mark.parametrize("workers", [1, 3])
def test_stored_vectors_equal_the_models_embedding_of_their_file(tmp_path, photo_tree, workers):
    with NanoDB(tmp_path / "db", config="test", workers=workers, batch_size=7) as db:
        db.scan(photo_tree)
        assert len(db) == 40
        for item in db:  # every row: a vector stored under the wrong path would fail here
            ref = reference_embedding(db, item.path)
            assert float(item.vector.astype(np.float32) @ ref) >= 0.999, item.path


def test_rescan_adds_nothing_for_unchanged_files_and_reembeds_changed_ones(tmp_path, photo_tree):
    tree = tmp_path / "photos"
    shutil.copytree(photo_tree, tree, symlinks=True)
    with NanoDB(tmp_path / "db", config="test") as db:
        db.scan(tree)
        again = db.scan(tree)
        assert (again.added, again.updated, again.unchanged) == (0, 0, 40)
        target = good_images(tree)[0]
        old = db.index_of(target)
        with Image.open(target) as im:
            im.rotate(90, expand=True).save(target, "JPEG")
        changed = db.scan(tree)
        assert (changed.added, changed.updated) == (0, 1)
        assert len(db) == 40
        new = db.index_of(target)
        assert new != old and db[old].deleted
        assert db.search(target, k=1)[0].index == new


def test_resized_copy_of_a_photo_finds_the_original_first(scanned_db, photo_tree, tmp_path):
    path, _ = scanned_db
    with NanoDB(path, read_only=True) as db:
        for original in good_images(photo_tree)[::8]:
            copy = tmp_path / "copy.png"
            with Image.open(original) as im:
                im.resize((im.width // 2, im.height // 2), Image.LANCZOS).save(copy)
            assert db.search(copy, k=3)[0].path == original


def test_a_scan_holds_a_bounded_number_of_images_in_flight(tmp_path):
    """Memory stays flat however large the folder: files found but not yet indexed (decoding, decoded
    or embedding) never exceed what the bounded queues between the stages can hold."""
    from nanodb.pipeline.report import ScanReport

    photos = coco_photos(20)
    tree = tmp_path / "many"
    tree.mkdir()
    for i in range(800):
        (tree / f"{i:04d}.jpg").symlink_to(photos[i % len(photos)])
    backlog = []
    report = ScanReport(on_change=lambda r: backlog.append(r.found - r.done))
    with NanoDB(tmp_path / "db", config="test", workers=2, batch_size=16) as db:
        asyncio.run(db.scan_async(tree, report=report, follow_symlinks=True))  # links to the shared photos
        assert len(db) == 800
    queue, slots, batch = 64, 2 * 4, 16  # ScanPipeline's queue size, decode slots, batch size
    assert max(backlog) <= queue + slots + queue + batch + 4 * batch + 1

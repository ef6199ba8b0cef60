"""What the tests and benchmarks share: where the repository and the real photos are, and small
builders of test files. The default suite's photos are in the repository (tests/data/photos); this is the
one place that names ../shared/data, the optional large data sets (benchmarks import it too)."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data"
PHOTOS = REPO / "tests" / "data" / "photos"  # 96 COCO photos with redistributable licences (see its README)


def data_dir(name: str) -> Path:
    """A folder of the optional large data sets; skips the test when it is absent. Call it inside a test
    or fixture, never at import (pytest.skip there skips, or breaks, the whole module)."""
    path = DATA / name
    if not path.is_dir():
        import pytest

        pytest.skip(f"test photos not found at {path} (the optional data sets sit in ../shared/data)")
    return path


def coco_photos(n: int) -> list[Path]:
    """The first n of the repository's real photos (JPEGs of 320-640 px), by name."""
    photos = sorted(PHOTOS.glob("*.jpg"))
    if n > len(photos):
        raise ValueError(f"asked for {n} photos; tests/data/photos holds {len(photos)} (use data_dir for more)")
    return photos[:n]


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


def brute_force(stored, queries, k: int):
    """The exact top k by a float32 matrix product: what every search must equal (ties in row order)."""
    import numpy as np

    scores = queries.astype(np.float32) @ stored.astype(np.float32).T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(scores, order, axis=1)


def save_vectors_db(path: Path, rows: int) -> Path:
    """A database of `rows` random unit vectors with paths (the first half with metadata), saved in two
    saves, item 5 deleted: the template the damage tests copy and break."""
    import numpy as np

    from nanodb import NanoDB

    rng = np.random.default_rng(0)
    half = rows // 2
    with NanoDB(path, config="test") as db:
        db.add(rng.standard_normal((half, db.dim)), metadata={"n": 1}, paths=[f"/p/{i}" for i in range(half)])
        db.save()
        db.add(rng.standard_normal((half, db.dim)), paths=[f"/q/{i}" for i in range(half)])
        db.delete([5])
        db.save()
    return path


def data_file(path: Path, kind: str) -> Path:
    """The database's data file of a kind ("vectors", "items", ...)."""
    return next(path.glob(f"{kind}.*"))

"""How fast a 64-result gallery of 20-megapixel JPEGs loads: thumbnails made on demand, then cached.

    PYTHONPATH=. python benchmarks/web_thumbnails.py /tmp/bench20

Makes 64 upscaled COCO photos (5472x3648) in the folder on first use, scans them (ViT-S-32, random
weights), serves them on 127.0.0.1 and fetches the 64 thumbnails as a browser would (6 connections).
"""

from __future__ import annotations

import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from helpers import DATA  # noqa: E402

from nanodb.database import NanoDB  # noqa: E402
from nanodb.interfaces.server import start_server  # noqa: E402

COCO = DATA / "coco-val2017" / "images"
SIZE = (5472, 3648)  # 20 megapixels


def make_photos(folder: Path, count: int = 64) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    photos = []
    for src in sorted(COCO.glob("*.jpg"))[:count]:
        out = folder / src.name
        if not out.exists():
            Image.open(src).convert("RGB").resize(SIZE, Image.BICUBIC).save(out, quality=90)
        photos.append(out)
    return photos


def fetch_gallery(url: str, indices: list[int]) -> tuple[float, int]:
    start = time.perf_counter()
    with httpx.Client(base_url=url, timeout=120) as client, ThreadPoolExecutor(6) as pool:
        sizes = list(pool.map(lambda i: len(client.get(f"/api/items/{i}/thumbnail").content), indices))
    return time.perf_counter() - start, sum(sizes)


def main(root: Path) -> None:
    photos = make_photos(root / "photos")
    shutil.rmtree(root / "db", ignore_errors=True)
    with NanoDB(root / "db", config="test") as db:
        db.scan(str(root / "photos"))
        server = start_server(db, "127.0.0.1", 0)
        try:
            indices = [r.index for r in db.search("a photo", k=64)]
            cold, thumb_bytes = fetch_gallery(server.url, indices)
            warm, _ = fetch_gallery(server.url, indices)
        finally:
            server.stop()
    originals = sum(p.stat().st_size for p in photos)
    print(f"64 thumbnails of {SIZE[0]}x{SIZE[1]} JPEGs: first view {cold:.2f} s, cached {warm:.3f} s; "
          f"{thumb_bytes / 1e3:.0f} KB sent instead of {originals / 1e6:.0f} MB of originals")


if __name__ == "__main__":  # the scan's decode workers are spawned processes: they import this file
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/nanodb-bench-thumbnails"))

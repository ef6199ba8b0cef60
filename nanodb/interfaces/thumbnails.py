"""Files the server may send: an indexed item's original, and its thumbnail cached beside the database.

A file is only ever found by item index, never from a path in a request, and only while it is still
the file that was indexed (same size and modification time), so a path that was swapped for a symlink
or another file since the scan is refused.
"""

from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path

from pipeline.imaging import is_raw_name, open_image, read_image_file

THUMBNAIL_SIZE = 256  # longest side, in pixels: sharp in a gallery tile, ~10-20 KB as JPEG


class NotServable(LookupError):
    """The item has no file that may be sent; the message says why."""


def original_file(db, index: int) -> Path:
    """The file of live item `index`, checked to be the one that was indexed."""
    if not db.has_item(index):
        raise NotServable(f"no item with index {index}")
    item = db[index]
    if item.path is None or item.size < 0:
        raise NotServable(f"item {index} was added without a file")
    path = Path(item.path)
    try:
        st = path.stat()
    except OSError:
        raise NotServable(f"the file of item {index} is gone") from None
    if st.st_size != item.size or st.st_mtime != item.mtime or not path.is_file():
        raise NotServable(f"the file of item {index} changed since it was indexed; scan it again")
    return path


class ThumbnailCache:
    """JPEG thumbnails in `<database>/thumbnails/`, made on first request and kept."""

    def __init__(self, db, size: int = THUMBNAIL_SIZE):
        self.db = db
        self.size = size
        self.folder = db.path / "thumbnails"
        self._making: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def get(self, index: int) -> Path:
        """The thumbnail of item `index`, made now if it is not cached yet."""
        original = original_file(self.db, index)
        key = f"{self.db[index].hash}_{self.size}"
        thumb = self.folder / key[:2] / f"{key}.jpg"
        if thumb.is_file():
            return thumb
        with self._guard:
            lock = self._making.setdefault(key, threading.Lock())
        with lock:  # two requests for the same new thumbnail decode the original once
            if not thumb.is_file():
                self._make(original, thumb)
        with self._guard:
            self._making.pop(key, None)
        return thumb

    def _make(self, original: Path, thumb: Path) -> None:
        try:
            # the scan's own opener (HEIF, RAW...); JPEG decodes at 1/2..1/8 scale, much faster
            im = open_image(read_image_file(str(original)).data, draft_size=self.size, raw=is_raw_name(str(original)))
            im.thumbnail((self.size, self.size))
        except (OSError, ValueError) as e:  # ImageRejected is a ValueError
            raise NotServable(f"cannot make a thumbnail of {original.name}: {e}") from None
        thumb.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=thumb.parent, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                im.save(f, "JPEG", quality=85)
            os.replace(tmp, thumb)  # readers see a whole thumbnail or none
        except BaseException:
            os.unlink(tmp)
            raise

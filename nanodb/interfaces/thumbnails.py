"""Files the server may send: an indexed item's original, and its thumbnail cached beside the database.

A file is only ever found by item index, never from a path in a request, and only while it is still
the file that was indexed: same size, modification time and content hash, checked on the very file
descriptor that is then sent (for a video's frame, the hash derived from the video's: media.video). A
file's hash is remembered for its identity (path, device, inode, size, mtime and ctime, which no writer
can set back), and requests for one file at once wait for one hashing: the many range requests a
browser makes while playing a video, to any of its frames, hash the file once. So a path swapped for a
symlink to another file, or for another file with the same size and mtime, is refused.
It is opened by the media layer's one opener (never blocks, a regular file checked before a byte is read).
And a file reached through a symlink out of the folders the database was scanned from is refused (403),
unless those were scanned following symlinks.
"""

from __future__ import annotations

import os
import stat
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path

from nanodb.media.opener import MAX_FILE_BYTES, ImageRejected, open_image, open_regular_file
from nanodb.media.paths import servable_path
from nanodb.media.record import content_hash
from nanodb.media.remote import is_remote_item
from nanodb.media.sandbox import DecodeLimits, DecodeSandbox
from nanodb.media.video import (
    MAX_VIDEO_BYTES,
    frame_thumbnail,
    frame_time,
    indexed_content_hash,
    is_video_frame,
    preload_video_libraries,
)

THUMBNAIL_SIZE = 256  # longest side, in pixels: sharp in a gallery tile, ~10-20 KB as JPEG
THUMBNAIL_DECODERS = 2  # worker processes making thumbnails, each decode limited (media.sandbox)
VIDEO_DECODERS = 1  # worker processes making thumbnails of video frames (PyAV loaded before the limits)
HASHED_FILES = 1024  # file identities whose content hash is remembered


class NotServable(LookupError):
    """The item has no file that may be sent; the message says why."""

    status_code = 404


class OutsideRoots(NotServable):
    """The item's file is reached through a symlink out of the scanned folders: it may not be sent."""

    status_code = 403


def item_links(index: int, path: str | None) -> dict[str, str | None]:
    """The API paths of an item's thumbnail and original; None for both when it has no file this server
    could send (added without one, or read from a URL or a tar shard), so that a client shows no link
    that can only answer 404."""
    if path is None or is_remote_item(path):
        return {"thumbnail": None, "original": None}
    return {"thumbnail": f"/api/items/{index}/thumbnail", "original": f"/api/items/{index}/original"}


def _indexed_item(db, index: int):
    if not db.has_item(index):
        raise NotServable(f"no item with index {index}")
    item = db[index]
    if is_remote_item(item.path):  # never opened from here: no local file of its own
        raise NotServable(f"item {index} was read from a URL or a tar shard: its file is not available here")
    if item.path is None or item.size < 0:
        raise NotServable(f"item {index} was added without a file")
    return item


def _check_stat(st: os.stat_result, item, index: int) -> None:
    if not stat.S_ISREG(st.st_mode) or st.st_size != item.size or st.st_mtime != item.mtime:
        raise NotServable(f"the file of item {index} changed since it was indexed; scan it again")


def _check_inside_roots(db, item, index: int) -> None:
    if not servable_path(item.path, db.scanned_roots):
        raise OutsideRoots(f"the file of item {index} is reached through a symlink out of the scanned folders")


def _hashed(f, limit: int):
    """The file's chunks, at most `limit` bytes in all: a file that grew since its check is not read whole."""
    while limit > 0 and (chunk := f.read(min(1 << 20, limit))):
        limit -= len(chunk)
        yield chunk


def check_original(db, index: int) -> None:
    """Cheap: the file of live item `index` still has its indexed size and mtime."""
    item = _indexed_item(db, index)
    try:
        _check_stat(os.stat(item.path), item, index)
    except OSError:
        raise NotServable(f"the file of item {index} is gone") from None


_file_hashes: OrderedDict[tuple, bytes] = OrderedDict()  # file identity -> its bytes' hash, latest last
_hashing: dict[tuple, threading.Lock] = {}  # file identity -> held while one request hashes it
_hashes_lock = threading.Lock()


def _remembered_hash(key: tuple) -> bytes | None:
    with _hashes_lock:
        digest = _file_hashes.get(key)
        if digest is not None:
            _file_hashes.move_to_end(key)
        return digest


def _file_hash(f, st: os.stat_result, path: str) -> bytes:
    """The content hash of the open file's bytes, read once per file identity (a video's frames and
    range requests share it); a request that comes while another hashes the same file waits for it."""
    key = (path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if (digest := _remembered_hash(key)) is not None:
        return digest
    with _hashes_lock:
        hashing = _hashing.setdefault(key, threading.Lock())
    try:
        with hashing:
            if (digest := _remembered_hash(key)) is not None:
                return digest
            digest = content_hash(_hashed(f, st.st_size + 1))
            with _hashes_lock:
                _file_hashes[key] = digest
                while len(_file_hashes) > HASHED_FILES:
                    _file_hashes.popitem(last=False)
            return digest
    finally:
        with _hashes_lock:
            _hashing.pop(key, None)


def _check_content(f, st: os.stat_result, item, index: int) -> None:
    """The open file's bytes hash to the item's stored hash (media.video.indexed_content_hash)."""
    if indexed_content_hash(item.path, item.metadata, _file_hash(f, st, item.path)).hex() != item.hash:
        raise NotServable(f"the file of item {index} changed since it was indexed; scan it again")


def open_original(db, index: int):
    """The file of live item `index`, opened and checked to be the one that was indexed (its content
    hash included, on this very descriptor); returned open at its start for the caller to read and close."""
    item = _indexed_item(db, index)
    try:  # non-blocking, and checked to be a regular file before a byte is read (a FIFO, a device)
        f, st = open_regular_file(item.path, MAX_VIDEO_BYTES if is_video_frame(item.path, item.metadata) else
                                  MAX_FILE_BYTES)
    except ImageRejected as e:  # gone, or no longer a regular file
        raise NotServable(f"the file of item {index} cannot be sent ({e})") from None
    try:
        _check_stat(st, item, index)
        _check_content(f, st, item, index)
        _check_inside_roots(db, item, index)
        f.seek(0)
        return f
    except BaseException:
        f.close()
        raise


def small_image(data: bytes, size: int):
    """An image's bytes as an RGB image of at most `size` pixels a side, by the scan's own opener (HEIF,
    RAW...); a JPEG decodes at 1/2..1/8 scale, much faster. Run in a limited worker process."""
    image = open_image(data, draft_size=size)
    image.thumbnail((size, size))
    return image


class ThumbnailCache:
    """JPEG thumbnails in `<database>/thumbnails/`, made on first request and kept."""

    def __init__(self, db, size: int = THUMBNAIL_SIZE):
        self.db = db
        self.size = size
        self.folder = db.path / "thumbnails"
        self._making: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        # originals are decoded in limited worker processes: a time bomb costs one request, at most
        # the decode_seconds setting, and is then refused at once (by content hash: the same bytes)
        self.decoder = DecodeSandbox(THUMBNAIL_DECODERS, DecodeLimits.of(db.settings))
        # a video's frame: decoded in a worker of its own (started on first need) with the same limits
        self.video_decoder = DecodeSandbox(VIDEO_DECODERS, DecodeLimits.of(db.settings), preload_video_libraries)
        self._refused: dict[str, str] = {}

    def get(self, index: int) -> Path:
        """The thumbnail of item `index`, made now if it is not cached yet."""
        check_original(self.db, index)
        item = self.db[index]
        key = f"{item.hash}_{self.size}"
        thumb = self.folder / key[:2] / f"{key}.jpg"
        if thumb.is_file():  # made from the indexed content (the key is its hash)
            _check_inside_roots(self.db, item, index)
            return thumb
        with self._guard:
            lock = self._making.setdefault(key, threading.Lock())
        with lock:  # two requests for the same new thumbnail decode the original once
            if key in self._refused:
                raise NotServable(self._refused[key])
            if not thumb.is_file():
                with open_original(self.db, index) as original:
                    self._make(original, thumb, item)
        with self._guard:
            self._making.pop(key, None)
        return thumb

    def _make(self, original, thumb: Path, item) -> None:
        name = Path(item.path).name
        try:
            if is_video_frame(item.path, item.metadata):
                # a video is not sent whole to the worker: it opens the path through the opener and
                # decodes only if it finds the very file checked here (device, inode, size, mtime)
                st = os.fstat(original.fileno())
                identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
                im = self.video_decoder.run(frame_thumbnail, item.path, identity, frame_time(item.metadata),
                                            self.size, int(self.db.settings.max_image_pixels))
            else:  # from the verified descriptor: never reopened by path, which may have been swapped since
                im = self.decoder.run(small_image, original.read(), self.size)
        except (OSError, ValueError) as e:  # ImageRejected is a ValueError
            self._refused[thumb.stem] = f"cannot make a thumbnail of {name}: {e}"
            raise NotServable(self._refused[thumb.stem]) from None
        thumb.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=thumb.parent, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                im.save(f, "JPEG", quality=85)
            os.replace(tmp, thumb)  # readers see a whole thumbnail or none
        except BaseException:
            os.unlink(tmp)
            raise

    def close(self) -> None:
        """Stop the thumbnail decoders' worker processes."""
        self.decoder.close()
        self.video_decoder.close()

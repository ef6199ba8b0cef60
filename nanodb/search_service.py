"""Searching on behalf of web clients: checks every parameter, times each step, and keeps the stats.

The HTTP API and the web UI both go through one `SearchService`, so they accept and refuse the same
inputs with the same one-line messages.
"""

from __future__ import annotations

import io
import threading
import time
from dataclasses import dataclass, field

from PIL import Image, UnidentifiedImageError

from pipeline.decode import to_rgb

MAX_K = 1000
MAX_QUERY_CHARS = 1000
MAX_UPLOAD_BYTES = 32 << 20


class BadRequest(ValueError):
    """A client's input that cannot be searched; the message is shown to the client as is."""


@dataclass
class Found:
    index: int
    path: str | None
    similarity: float


@dataclass
class Outcome:
    results: list[Found]
    encode_ms: float
    search_ms: float


@dataclass
class _Timings:
    """The latest duration of each step, shown in the stats line."""

    text_encode_ms: float | None = None
    image_encode_ms: float | None = None
    search_ms: float | None = None
    searches: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


class SearchService:
    def __init__(self, db, max_k: int = MAX_K, max_query_chars: int = MAX_QUERY_CHARS,
                 max_upload_bytes: int = MAX_UPLOAD_BYTES):
        self.db = db
        self.max_k = max_k
        self.max_query_chars = max_query_chars
        self.max_upload_bytes = max_upload_bytes
        self.timings = _Timings()

    # ------------------------------------------------------------ checks
    def check_k(self, k) -> int:
        try:
            k = int(k)
        except (TypeError, ValueError):
            raise BadRequest(f"k must be a whole number, not {str(k)[:40]!r}") from None
        if k < 1:
            raise BadRequest("k must be at least 1")
        if k > self.max_k:
            raise BadRequest(f"k must be at most {self.max_k}")
        return k

    @staticmethod
    def check_min_similarity(value) -> float:
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise BadRequest(f"min_similarity must be a number, not {str(value)[:40]!r}") from None
        if not -1.0 <= value <= 1.0:
            raise BadRequest("min_similarity must be between -1 and 1")
        return value

    def check_text(self, text) -> str:
        text = (text or "").strip()
        if not text:
            raise BadRequest("empty query: type some words")
        if len(text) > self.max_query_chars:
            raise BadRequest(f"the query is {len(text)} characters long; at most {self.max_query_chars} are searched")
        return text

    def check_index(self, index) -> int:
        try:
            index = int(index)
        except (TypeError, ValueError):
            raise BadRequest(f"an item index is a whole number, not {str(index)[:40]!r}") from None
        if not 0 <= index < self.db.index.count or self.db.index.dead[index]:
            raise BadRequest(f"no item with index {index}")
        return index

    def open_upload(self, data: bytes):
        """An uploaded file as an RGB image; refuses non-images, oversized files and decompression bombs."""
        if len(data) > self.max_upload_bytes:
            raise BadRequest(f"the upload is {len(data) >> 20} MB; at most {self.max_upload_bytes >> 20} MB")
        if not data:
            raise BadRequest("the upload is empty")
        limit = self.db.settings.max_image_pixels
        try:
            image = Image.open(io.BytesIO(data))
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError):
            raise BadRequest("the upload is not an image nanodb can read (JPEG, PNG, WebP, GIF, BMP, TIFF...)") from None
        if image.width * image.height > limit:
            raise BadRequest(f"the image has {image.width}x{image.height} pixels; at most {limit:,} are read")
        try:
            return to_rgb(image)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise BadRequest(f"the uploaded image is damaged: {e}") from None

    # ------------------------------------------------------------ searching
    def by_text(self, text, k, min_similarity=-1.0) -> Outcome:
        text = self.check_text(text)
        return self._search(text, "text", k, min_similarity)

    def by_image(self, data: bytes, k, min_similarity=-1.0) -> Outcome:
        return self._search(self.open_upload(data), "image", k, min_similarity)

    def by_item(self, index, k, min_similarity=-1.0) -> Outcome:
        return self._search(self.check_index(index), None, k, min_similarity)

    def _search(self, query, kind: str | None, k, min_similarity) -> Outcome:
        k = self.check_k(k)
        min_similarity = self.check_min_similarity(min_similarity)
        t0 = time.perf_counter()
        try:
            vector = self.db.embed_query(query)
        except ValueError as e:  # e.g. a combined query whose terms cancel out
            raise BadRequest(str(e)) from None
        t1 = time.perf_counter()
        indices, scores = self.db.index.search(vector[None], k)
        t2 = time.perf_counter()
        results = [
            Found(int(i), self.db.path_of(int(i)), float(s))
            for i, s in zip(indices[0], scores[0])
            if s >= min_similarity
        ]
        encode_ms, search_ms = (t1 - t0) * 1000, (t2 - t1) * 1000
        with self.timings.lock:
            if kind == "text":
                self.timings.text_encode_ms = encode_ms
            elif kind == "image":
                self.timings.image_encode_ms = encode_ms
            self.timings.search_ms = search_ms
            self.timings.searches += 1
        return Outcome(results, encode_ms, search_ms)

    # ------------------------------------------------------------ stats
    def stats(self) -> dict:
        db = self.db
        scans = [
            {
                "found": r.found,
                "done": r.done,
                "added": r.added,
                "updated": r.updated,
                "failed": r.failed,
                "walking": r.walking,
                "seconds": round(r.seconds, 1),
            }
            for r in list(getattr(db, "active_scans", ()))
        ]
        t = self.timings
        return {
            "items": len(db),
            "unsaved": db.unsaved,
            "model": db.spec.describe(),
            "dim": db.dim,
            "text_encode_ms": _round(t.text_encode_ms),
            "image_encode_ms": _round(t.image_encode_ms),
            "search_ms": _round(t.search_ms),
            "searches": t.searches,
            "scans": scans,
        }


def stats_line(stats: dict) -> str:
    """The stats as one line of text for the web UI."""

    def ms(v):
        return "-" if v is None else f"{v:.1f} ms"

    line = (
        f"{stats['items']:,} items indexed · text encode {ms(stats['text_encode_ms'])} · "
        f"image encode {ms(stats['image_encode_ms'])} · search {ms(stats['search_ms'])}"
    )
    for scan in stats["scans"]:
        total = f"{scan['found']:,}{'+' if scan['walking'] else ''}"
        line += f" · scanning: {scan['done']:,}/{total} ({scan['added']:,} added, {scan['failed']:,} skipped)"
    return line


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 2)


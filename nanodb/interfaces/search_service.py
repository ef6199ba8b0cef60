"""Searching on behalf of web clients: what the HTTP API and the web UI share.

Both go through one `SearchService`, which builds SearchRequests for `NanoDB.find`, so they accept and refuse
the same inputs with the same one-line messages. Over HTTP, text is only ever text: an image comes
as an upload or as an item index (`#12` in a combined query), never as a path on the server or a URL.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from nanodb.database import NanoDB, SearchResults
from nanodb.interfaces.thumbnails import item_links
from nanodb.media.opener import ImageRejected, open_image
from nanodb.media.sandbox import DecodeLimits, DecodeSandbox
from nanodb.media.video import frame_time
from nanodb.search.batcher import SearchBusy
from nanodb.search.duplicates import DuplicateGroup, check_threshold
from nanodb.search.query import MAX_K, MAX_QUERY_CHARS, QueryError, QueryTerm, TypedQuery
from nanodb.search.request import Filters, SearchRequest

MAX_UPLOAD_BYTES = 32 << 20
# A query image needs few pixels (the model sees ~224x224). JPEGs decode at a reduced scale (draft), so
# they keep the scan's limit; other formats decode whole (~8 bytes a pixel at peak), so they get less.
MAX_UPLOAD_PIXELS = 16_000_000
# Uploads decoded at once, each in its own limited worker process (a time bomb costs its own request,
# at most the decode_seconds setting); the others wait, so memory stays bounded.
MAX_CONCURRENT_DECODES = 2

# Near-duplicates over HTTP and in the web UI: an answer holds at most this many groups and items.
MAX_DUPLICATE_GROUPS = 100
MAX_DUPLICATE_ITEMS = 1000
DUPLICATES_RETRY_AFTER_S = 5

__all__ = ["MAX_K", "MAX_QUERY_CHARS", "BadRequest", "TooLarge", "DuplicatesBusy", "DuplicateFinder",
           "SearchService"]

NO_FILTERS = Filters()
BadRequest = QueryError  # a client's input that cannot be searched; the message is shown as is


class TooLarge(BadRequest):
    """An upload over a size limit (bytes or pixels): HTTP 413."""


class DuplicatesBusy(SearchBusy):
    """Near-duplicates are being computed for another request: try again shortly (503 with Retry-After)."""

    def __init__(self, running_s: float, retry_after: int = DUPLICATES_RETRY_AFTER_S):
        QueryError.__init__(self, f"near-duplicates are being computed for another request (for {running_s:.0f} s "
                                  f"now); try again in {retry_after} s")
        self.retry_after = retry_after


@dataclass(frozen=True)
class Duplicates:
    """Near-duplicate groups at a threshold, all of at least two items, largest first."""

    threshold: float
    groups: list[DuplicateGroup]
    seconds: float  # the computation's time
    cached: bool = False

    def answer(self, db: NanoDB, min_size: int = 2, limit: int = MAX_DUPLICATE_GROUPS,
               max_items: int = MAX_DUPLICATE_ITEMS) -> dict:
        """The groups of at least `min_size` items as JSON: the first `limit` of them, and no more than
        `max_items` items in all (a group larger than that is cut), with the totals of all of them."""
        groups = [g for g in self.groups if len(g) >= min_size]
        shown, items = [], 0
        for g in groups[:limit]:
            if shown and items + len(g) > max_items:
                break
            members = g.items[: max_items - items]
            items += len(members)
            shown.append({"size": len(g), "items": [_member(db, m) for m in members]})
        return {"threshold": self.threshold, "min_size": min_size, "total_groups": len(groups),
                "total_items": sum(len(g) for g in groups), "groups": shown,
                "truncated": len(shown) < len(groups) or items < sum(len(g) for g in groups[: len(shown)]),
                "seconds": round(self.seconds, 3), "cached": self.cached}


def _member(db: NanoDB, m) -> dict:
    time_ = frame_time(db[m.index].metadata) if db.has_item(m.index) else None
    return {"index": m.index, "path": m.path, "similarity": round(m.similarity, 5),
            **item_links(m.index, m.path), "time": time_}


class DuplicateFinder:
    """Near-duplicates for web clients: one computation at a time (a request that comes while one runs
    is refused with DuplicatesBusy, not queued: the self-join takes minutes at 100K+ items), run without
    the store's lock so that searches and scans go on; the last result is kept, keyed by the threshold
    and the database's state, so that asking again is instant until items are added or deleted."""

    def __init__(self, db: NanoDB):
        self.db = db
        self._running = threading.Lock()
        self._started = 0.0
        self._last: tuple[tuple, Duplicates] | None = None

    def find(self, threshold) -> Duplicates:
        try:
            threshold = check_threshold(threshold)
        except ValueError as e:
            raise BadRequest(str(e)) from None
        key = (threshold, self.db.state)
        last = self._last
        if last is not None and last[0] == key:
            return Duplicates(threshold, last[1].groups, last[1].seconds, cached=True)
        if not self._running.acquire(blocking=False):
            raise DuplicatesBusy(time.monotonic() - self._started)
        try:
            self._started = time.monotonic()
            key = (threshold, self.db.state)  # the state the join starts from
            groups = self.db.near_duplicates(threshold, unlocked=True)
            found = Duplicates(threshold, groups, time.monotonic() - self._started)
            self._last = (key, found)
            return found
        finally:
            self._running.release()


class SearchService:
    def __init__(self, db: NanoDB, max_upload_bytes: int = MAX_UPLOAD_BYTES):
        self.db = db
        self.max_query_chars = MAX_QUERY_CHARS
        self.max_upload_bytes = max_upload_bytes
        self.decoder = DecodeSandbox(MAX_CONCURRENT_DECODES, DecodeLimits.of(db.settings))
        self.duplicates = DuplicateFinder(db)

    def check_index(self, index) -> int:
        try:
            index = int(index)
        except (TypeError, ValueError):
            raise BadRequest(f"an item index is a whole number, not {str(index)[:40]!r}") from None
        if not self.db.has_item(index):
            raise BadRequest(f"no item with index {index}")
        return index

    def open_upload(self, data: bytes):
        """An uploaded file as an RGB image; refuses non-images, oversized files and decompression bombs."""
        if len(data) > self.max_upload_bytes:
            raise TooLarge(f"the upload is {len(data) >> 20} MB; at most {self.max_upload_bytes >> 20} MB")
        if not data:
            raise BadRequest("the upload is empty")
        jpeg = data[:3] == b"\xff\xd8\xff"
        max_pixels = self.db.settings.max_image_pixels
        if not jpeg:  # a JPEG decodes at reduced scale; other formats decode whole
            max_pixels = min(MAX_UPLOAD_PIXELS, max_pixels)
        try:
            return self.decoder.run(open_image, data, max_pixels, max(self.db.image_size))
        except ImageRejected as e:
            reason = str(e)
            if reason.startswith("not an image"):
                raise BadRequest("the upload is not an image nanodb can read (JPEG, PNG, WebP, GIF, TIFF...)") from None
            if reason.startswith(("image too large", "absurd dimensions", "needs too much memory")):
                raise TooLarge(f"the uploaded image is refused: {reason}; resize it (a query image needs no "
                               f"more than a few megapixels)") from None
            raise BadRequest(f"the uploaded image is damaged or refused: {reason}") from None

    def close(self) -> None:
        """Stop the upload decoder's worker processes."""
        self.decoder.close()

    # `filters` and `collapse`: as in the SearchRequest each of these builds
    def by_text(self, text, k, min_similarity=None, filters=NO_FILTERS, collapse=False) -> SearchResults:
        """Words, `#12` items, and combined queries of them (`#12 + night - 2:fence`); a path or URL in
        the text is words: the server never opens or fetches what a client names."""
        query = TypedQuery.parse(text if isinstance(text, str) else "", on_server=True)
        return self.db.find(SearchRequest(query, k=k, min_similarity=min_similarity, filters=filters,
                                          collapse=collapse))

    def by_image(self, data: bytes, k, min_similarity=None, filters=NO_FILTERS, collapse=False,
                 terms: str = "") -> SearchResults:
        """An uploaded image, combined with `terms` as by_text reads them (`- 3:cat + 2:bee`, or `night`)."""
        image = self.open_upload(data)
        query = TypedQuery.parse(terms, on_server=True, first=QueryTerm(1.0, "image", image)) if terms else None
        return self.db.find(SearchRequest(query, image=None if query else image, k=k, min_similarity=min_similarity,
                                          filters=filters, collapse=collapse))

    def by_item(self, index, k, min_similarity=None, filters=NO_FILTERS, collapse=False) -> SearchResults:
        return self.db.find(SearchRequest(self.check_index(index), k=k, min_similarity=min_similarity,
                                          filters=filters, collapse=collapse))

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
            for r in list(db.active_scans)
        ]
        t = db.timings
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


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 2)

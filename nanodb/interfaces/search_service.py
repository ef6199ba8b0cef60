"""Searching on behalf of web clients: what the HTTP API and the web UI share.

Both go through one `SearchService`, which builds SearchRequests for `NanoDB.find`, so they accept and refuse
the same inputs with the same one-line messages. Over HTTP, text is only ever text: an image comes
as an upload or as an item index (`#12` in a combined query), never as a path on the server or a URL.
"""

from __future__ import annotations

from nanodb.database import NanoDB, SearchResults
from nanodb.media.opener import ImageRejected, open_image
from nanodb.media.sandbox import DecodeLimits, DecodeSandbox
from nanodb.search.query import MAX_K, MAX_QUERY_CHARS, QueryError, QueryTerm, TypedQuery
from nanodb.search.request import Filters, SearchRequest

MAX_UPLOAD_BYTES = 32 << 20
# A query image needs few pixels (the model sees ~224x224). JPEGs decode at a reduced scale (draft), so
# they keep the scan's limit; other formats decode whole (~8 bytes a pixel at peak), so they get less.
MAX_UPLOAD_PIXELS = 16_000_000
# Uploads decoded at once, each in its own limited worker process (a time bomb costs its own request,
# at most the decode_seconds setting); the others wait, so memory stays bounded.
MAX_CONCURRENT_DECODES = 2

__all__ = ["MAX_K", "MAX_QUERY_CHARS", "BadRequest", "TooLarge", "SearchService"]

NO_FILTERS = Filters()
BadRequest = QueryError  # a client's input that cannot be searched; the message is shown as is


class TooLarge(BadRequest):
    """An upload over a size limit (bytes or pixels): HTTP 413."""


class SearchService:
    def __init__(self, db: NanoDB, max_upload_bytes: int = MAX_UPLOAD_BYTES):
        self.db = db
        self.max_query_chars = MAX_QUERY_CHARS
        self.max_upload_bytes = max_upload_bytes
        self.decoder = DecodeSandbox(MAX_CONCURRENT_DECODES, DecodeLimits.of(db.settings))

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
            return self.decoder.run(open_image, data, max_pixels, max(self.db.model.image_size))
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

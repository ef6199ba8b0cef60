"""Queries turned into unit vectors: `QueryEncoder` decides what a query is (text, an image file, an
http(s) image URL, a PIL image, a stored item or a vector) and embeds it for NanoDB.search.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nanodb.media.opener import ImageRejected, read_image_file
from nanodb.media.paths import absolute_path, printable
from nanodb.media.record import content_hash
from nanodb.media.sandbox import DecodeLimits, DecodeSandbox, model_input
from nanodb.model.clip import ClipModel
from nanodb.search.fetch import fetch_url
from nanodb.search.query import QueryError, check_text, combined_vector, is_combined, is_image_reference, is_url
from nanodb.storage.store import ItemStore


@dataclass
class SearchTimings:
    """The latest duration of each step of a search, for stats displays."""

    text_encode_ms: float | None = None
    image_encode_ms: float | None = None
    search_ms: float | None = None
    searches: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(self, kind: str | None, encode_ms: float, search_ms: float) -> None:
        with self.lock:
            if kind == "text":
                self.text_encode_ms = encode_ms
            elif kind == "image":
                self.image_encode_ms = encode_ms
            self.search_ms = search_ms
            self.searches += 1


def is_image_object(value: Any) -> bool:
    """A PIL image (or anything that behaves as one)."""
    return hasattr(value, "convert") and hasattr(value, "size")


class QueryEncoder:
    """Turns queries into unit float32 vectors with the store's model (loaded only when needed).

    `limits`: a query image's bytes (a file, a URL) are decoded in a worker process within these
    limits (media.sandbox), started on the first such query; None decodes them in this process."""

    def __init__(self, store: ItemStore, model: Callable[[], ClipModel], max_image_pixels: int,
                 limits: DecodeLimits | None = None):
        self.store = store
        self.model = model
        self.max_image_pixels = max_image_pixels
        self.decoder = DecodeSandbox(1, limits) if limits is not None else None

    def classify(self, query: Any, text: str | None, image: Any) -> tuple[Any, str | None]:
        """(query, kind) from NanoDB.search's arguments; kind is "text", "image" or None (items, vectors)."""
        if text is not None:
            return check_text(text), "text"
        if image is not None:
            if isinstance(image, str) and not is_url(image):
                return Path(image), "image"
            if isinstance(image, (str, os.PathLike)) or is_image_object(image):
                return image, "image"
            what = type(image).__name__
            raise QueryError(f"image= takes a file path, an http(s) URL or a PIL image, not a {what}")
        if isinstance(query, str):
            return query, "image" if is_image_reference(query) else "text"
        return query, "image" if isinstance(query, os.PathLike) or is_image_object(query) else None

    def embed(self, query: Any) -> np.ndarray:
        """A query as a unit float32 vector: text, image path or URL, PIL image, item index or vector."""
        store = self.store
        if isinstance(query, np.ndarray):
            v = np.asarray(query, np.float32).reshape(-1)
            if v.shape != (store.dim,):
                raise QueryError(f"a query vector must have {store.dim} values, not {v.size}")
        elif isinstance(query, (int, np.integer)) and not isinstance(query, bool):
            if not store.is_live(int(query)):
                raise QueryError(f"no item with index {query}")
            v = store.vectors[int(query)].astype(np.float32)
        elif isinstance(query, str) and is_url(query):
            v = self.embed_image_bytes(fetch_url(query), query)
        elif isinstance(query, os.PathLike) or (isinstance(query, str) and is_image_reference(query)):
            path = absolute_path(os.fspath(query).strip() if isinstance(query, str) else query)
            if not os.path.lexists(path):
                raise QueryError(f"no such image file: {printable(os.fspath(query))}")
            try:
                data = read_image_file(path).data
            except ImageRejected as e:
                raise QueryError(f"cannot search by {printable(path)}: {e}") from None
            v = self.embed_image_bytes(data, path)
        elif isinstance(query, str):
            v = self.embed_text(query)
        elif is_image_object(query):
            v = self.model().encode_images([query])[0]
        else:
            raise TypeError(f"cannot search by a {type(query).__name__}")
        norm = np.linalg.norm(v)
        if not np.isfinite(norm) or norm == 0:
            raise QueryError("the query vector must be finite and non-zero")
        return v / norm

    def embed_image_bytes(self, data: bytes, name: str) -> np.ndarray:
        """An image file's bytes as a query vector: the stored vector of an indexed identical file (so
        it ties with it exactly), else the model's embedding, made as a scan makes it."""
        known = self.store.row_with_hash(content_hash(data))
        if known is not None:
            return self.store.vectors[known].astype(np.float32)
        model = self.model()
        try:
            if self.decoder is None:
                pixels = model_input(data, self.max_image_pixels, model.pixel_transform)
            else:
                pixels = self.decoder.run(model_input, data, self.max_image_pixels, model.pixel_transform)
        except ImageRejected as e:
            raise QueryError(f"cannot search by {printable(name)}: {e}") from None
        return model.encode_pixels(pixels[None])[0]

    def embed_text(self, text: str) -> np.ndarray:
        text = check_text(text)
        model = self.model()
        if is_combined(text):
            return combined_vector(text, model.encode_text)
        return model.encode_text([text])[0]

    def close(self) -> None:
        """Stop the query image decoder's worker process, if one was started."""
        if self.decoder is not None:
            self.decoder.close()

"""Queries turned into unit vectors: `QueryEncoder` decides what a query is (text, an image file, an
http(s) image URL, a PIL image, a stored item, a vector, or a combination of them typed as one string)
and embeds it for NanoDB.search.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nanodb.media.opener import ImageRejected, model_pixels, read_image_file, to_rgb
from nanodb.media.paths import absolute_path, printable
from nanodb.media.record import content_hash
from nanodb.media.sandbox import DecodeLimits, DecodeSandbox, model_input
from nanodb.media.video import frame_time, is_video_name
from nanodb.model.clip import ClipModel
from nanodb.search.fetch import fetch_url
from nanodb.search.query import (
    QueryError,
    QueryTerm,
    TypedQuery,
    check_text,
    combined_vector,
    is_combined,
    is_url,
    weighted_sum,
)
from nanodb.search.text_cache import encode_cached
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


def video_query_message(store: ItemStore, path: str) -> str:
    """Why a video is no query image, one line: with the item of its first indexed frame to search by."""
    frames = sorted(store.rows_of(path), key=lambda row: frame_time(store.metadata_of(row)) or 0.0)
    if frames:
        return f"a video cannot be a query image; search by one of its frames' items (#{frames[0]})"
    return f"a video cannot be a query image; scan {printable(path)}, then search by one of its frames' items (#N)"


def is_image_object(value: Any) -> bool:
    """A PIL image (or anything that behaves as one)."""
    return hasattr(value, "convert") and hasattr(value, "size")


def unit(v: np.ndarray) -> np.ndarray:
    """`v` scaled to length 1; a QueryError for a zero or non-finite vector."""
    norm = np.linalg.norm(v)
    if not np.isfinite(norm) or norm == 0:
        raise QueryError("the query vector must be finite and non-zero")
    return v / norm


class QueryEncoder:
    """Turns queries into unit float32 vectors with the store's model (loaded only when needed).

    `limits`: a query image's bytes (a file, a URL) are decoded in a worker process within these
    limits (media.sandbox), started on the first such query; None decodes them in this process.
    `text_model`: what encodes words (anything with ClipModel's `encode_each`, such as the text tower's
    export that runs without torch; cached where it has a `text_model_id` and a `text_key`);
    `image_model`: what encodes an image file's or URL's bytes or an image object (ClipModel's
    `pixel_transform` and `encode_pixels`, such as a converted image tower run without torch); the model
    by default."""

    def __init__(self, store: ItemStore, model: Callable[[], ClipModel], max_image_pixels: int,
                 limits: DecodeLimits | None = None, text_model: Callable[[], Any] | None = None,
                 image_model: Callable[[], Any] | None = None):
        self.store = store
        self.model = model
        self.text_model = text_model or model
        self.image_model = image_model or model
        self.max_image_pixels = max_image_pixels
        self.decoder = DecodeSandbox(1, limits) if limits is not None else None

    def classify(self, query: Any, text: str | None, image: Any) -> tuple[Any, str | None]:
        """(query, kind) from NanoDB.search's arguments; kind is "text", "image" or None (items, vectors,
        mixed terms). A string query is read term by term (search.query.TypedQuery)."""
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
            query = TypedQuery.parse(query)
        if isinstance(query, TypedQuery):
            return query, query.kind
        return query, "image" if isinstance(query, os.PathLike) or is_image_object(query) else None

    def embed(self, query: Any) -> np.ndarray:
        """A query as a unit float32 vector: a typed query (words, image paths and URLs, `#12` items, and
        combinations of them), an image path, a PIL image, an item index or a vector."""
        store = self.store
        if isinstance(query, str):
            query = TypedQuery.parse(query)
        if isinstance(query, TypedQuery):
            v = self.embed_typed(query)
        elif isinstance(query, np.ndarray):
            v = np.asarray(query, np.float32).reshape(-1)
            if v.shape != (store.dim,):
                raise QueryError(f"a query vector must have {store.dim} values, not {v.size}")
        elif isinstance(query, (int, np.integer)) and not isinstance(query, bool):
            if not store.is_live(int(query)):
                raise QueryError(f"no item with index {query}")
            v = store.vector(int(query)).astype(np.float32)
        elif isinstance(query, os.PathLike):
            v = self.embed_file(query)
        elif is_image_object(query):
            model = self.image_model()
            v = model.encode_pixels(model_pixels(to_rgb(query), model.pixel_transform)[None])[0]
        else:
            raise TypeError(f"cannot search by a {type(query).__name__}")
        return unit(v)

    def embed_typed(self, query: TypedQuery) -> np.ndarray:
        """A typed query's vector: its words encoded in one batch, each other term on its own, then the
        weighted sum of the terms' unit vectors (a plain query: its one term's vector)."""
        terms = query.terms
        others = {i: unit(self.embed_term(term)) for i, term in enumerate(terms) if term.kind != "text"}  # errors first
        words = [term.value for term in terms if term.kind == "text"]
        encoded = iter(self.encode_texts(words) if words else ())
        vectors = [others[i] if i in others else next(encoded) for i in range(len(terms))]
        if query.single is not None:
            return vectors[0]
        return weighted_sum([term.weight for term in terms], np.stack(vectors), query.text)

    def embed_term(self, term: QueryTerm) -> np.ndarray:
        """The vector of an image, URL or item term."""
        if term.kind == "url":
            return self.embed_image_bytes(fetch_url(term.value), term.value)
        if term.kind == "image" and isinstance(term.value, str):
            return self.embed_file(term.value)
        return self.embed(term.value)  # an item index, or an image object (an upload)

    def embed_file(self, name: str | os.PathLike) -> np.ndarray:
        """An image file as a query vector; a missing or unreadable file is a QueryError naming it."""
        path = absolute_path(name.strip() if isinstance(name, str) else name)
        if not os.path.lexists(path):
            raise QueryError(f"no such image file: {printable(os.fspath(name))}")
        if is_video_name(path):
            raise QueryError(video_query_message(self.store, path))
        try:
            data = read_image_file(path).data
        except ImageRejected as e:
            raise QueryError(f"cannot search by {printable(path)}: {e}") from None
        return self.embed_image_bytes(data, path)

    def embed_image_bytes(self, data: bytes, name: str) -> np.ndarray:
        """An image file's bytes as a query vector: the stored vector of an indexed identical file (so
        it ties with it exactly), else the model's embedding, made as a scan makes it."""
        known = self.store.row_with_hash(content_hash(data))
        if known is not None:
            return self.store.vector(known).astype(np.float32)
        model = self.image_model()
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
        if is_combined(text):
            return combined_vector(text, self.encode_texts)
        return self.encode_texts([text])[0]

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """Each text's unit vector, the same bits alone or with others, from the process's cache of text
        vectors where it holds them (search/text_cache.py)."""
        return encode_cached(self.text_model(), texts)

    def close(self) -> None:
        """Stop the query image decoder's worker process, if one was started."""
        if self.decoder is not None:
            self.decoder.close()

"""NanoDB: the Python API. It composes the item store, the CLIP model and the ingestion pipeline; the
command line, the console, the HTTP API and the web UI are thin layers over it."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from datetime import time as dt_time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from nanodb.config import Settings, load_settings
from nanodb.model import ClipModel, ModelSpec, as_pretrained, load_model
from nanodb.query import (
    QueryError,
    check_k,
    check_min_similarity,
    check_text,
    combined_vector,
    is_combined,
    looks_like_image_file,
)
from nanodb.storage import DatabaseError, Manifest, RepairReport, read_manifest
from nanodb.store import Item, ItemStore, RowFilter, ValidationReport
from pipeline.coordinator import ScanPipeline, ScanReport, progress_bar
from pipeline.decode import DecodeFailure, ImageDecodePool, decode_file
from pipeline.walk import absolute_path, printable
from pipeline.watch import FolderWatcher

if TYPE_CHECKING:
    from nanodb.ray_cluster import RayOptions

log = logging.getLogger(__name__)

__all__ = ["NanoDB", "SearchResult", "SearchResults", "Item", "ValidationReport", "SearchTimings"]


@dataclass
class SearchResult:
    """One result of NanoDB.search, the one result type of every interface."""

    index: int
    path: str | None
    similarity: float
    metadata: dict[str, Any] = field(default_factory=dict)
    duplicates: list[int] = field(default_factory=list)  # other items with the same file content

    def __str__(self) -> str:
        return f"* index={self.index}  {printable(self.path or '')}  similarity={self.similarity:.4f}"


class SearchResults(list):
    """The results of one query (a list of SearchResult, best first), with how long each step took."""

    encode_ms: float = 0.0
    search_ms: float = 0.0


@dataclass
class SearchTimings:
    """The latest duration of each step of a search, for stats displays."""

    text_encode_ms: float | None = None
    image_encode_ms: float | None = None
    search_ms: float | None = None
    searches: int = 0


class NanoDB:
    """A folder of CLIP embeddings of images, searchable by text, image or vector.

    >>> db = NanoDB("~/.nanodb/photos", model="ViT-B-32", pretrained="laion2b_s34b_b79k")
    >>> db.scan("~/Pictures")
    >>> for r in db.search("a girl riding a horse", k=4): print(r)
    >>> db.save()

    `model`/`pretrained` default to what an existing database was built with, else to configs/.
    `ray` (an address such as "auto", "HOST:PORT", "ray://HOST:PORT" or "local", or RayOptions): scans
    decode and embed on that Ray cluster and searches run on shard actors (pip install 'nanodb[ray]').
    Opening with a different model than the database was built with raises DatabaseError.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        model: str | None = None,
        pretrained: str | None = None,
        *,
        seed: int | None = None,
        config: str | os.PathLike | None = None,
        read_only: bool = False,
        autosave: bool = False,
        settings: Settings | None = None,
        ray: str | RayOptions | None = None,
        **overrides: Any,
    ):
        self.path = Path(path).expanduser().absolute()
        self.settings = settings or load_settings(config, **overrides)
        self.read_only = read_only
        self.autosave = autosave
        self.timings = SearchTimings()
        self._timings_lock = threading.Lock()
        self._model: ClipModel | None = None
        self._decode_pool: ImageDecodePool | None = None
        self.active_scans: list[ScanReport] = []  # the scans running now, for live progress displays
        # `ray`: a Ray cluster address or RayOptions: scans decode and embed there, searches fan out to shards
        self.cluster = None
        if ray is not None:
            from nanodb.ray_cluster import RayCluster

            self.cluster = RayCluster(ray)
        self._shards = None

        manifest = read_manifest(self.path) if self.path.is_dir() else None
        if manifest is None:
            if read_only:
                raise DatabaseError(f"no nanodb database at {self.path}")
            self.spec = ModelSpec(
                model or self.settings.model,
                as_pretrained(pretrained or self.settings.pretrained),
                self.settings.seed if seed is None else seed,
            )
            # a new database needs the model (for its dimension): fail before creating files
            manifest = Manifest(self.spec.name, self.spec.pretrained, self.spec.weights_id, self.spec.seed,
                                self.model.dim, precision=self.model.precision_id)
        else:
            self.spec = ModelSpec(manifest.model, manifest.pretrained, manifest.seed)
            _check_same_model(manifest, model, pretrained, seed)
        self.store = ItemStore(self.path, manifest, read_only=read_only,
                               compact_dead_fraction=self.settings.compact_dead_fraction)

    @property
    def precision(self) -> str:
        """How the stored vectors were computed when the database was built, e.g. 'bfloat16/openvino'."""
        return self.store.manifest.precision

    @property
    def model(self) -> ClipModel:
        """The CLIP model, loaded on first use (searching by vector needs none)."""
        if self._model is None:
            s = self.settings
            self._model = load_model(self.spec, s.device, s.precision, s.backend)
        return self._model

    # ----------------------------------------------------------------- size and items
    def __len__(self) -> int:
        """Number of live (not deleted) items."""
        return len(self.store)

    @property
    def dim(self) -> int:
        return self.store.dim

    @property
    def unsaved(self) -> int:
        """Items added or deleted since the last save."""
        return self.store.unsaved

    @property
    def vectors(self) -> np.ndarray:
        """All stored float16 vectors (deleted rows included; see Item.deleted)."""
        return self.store.vectors

    def __getitem__(self, index: int) -> Item:
        return self.store.item(index)

    def __iter__(self):
        for i in self.store.live_rows():
            yield self.store.item(int(i))

    def has_item(self, index: int) -> bool:
        """True for the index of a live item."""
        return self.store.is_live(index)

    def path_of(self, index: int) -> str | None:
        return self.store.path_of(index)

    def metadata_of(self, index: int) -> dict[str, Any]:
        return self.store.metadata_of(index)

    def index_of(self, path: str | os.PathLike) -> int | None:
        """The live item stored for a file path, if any."""
        return self.store.index_of(path)

    # ----------------------------------------------------------------- adding
    @property
    def autosave_every(self) -> int | None:
        """Save after this many unsaved changes (None: autosave is off)."""
        return self.settings.autosave_every if self.autosave else None

    def add(
        self,
        items: Any,
        metadata: dict[str, Any] | Sequence[dict[str, Any] | None] | None = None,
        paths: Sequence[str | None] | None = None,
    ) -> list[int]:
        """Add items that are not files of a scanned folder; returns their indices.

        `items`: a vector (dim,), a batch of vectors (n, dim), a PIL image, an image file path, or a
        list of images/paths. `metadata`: one dict for all, or one per item. `paths`: optional labels.
        """
        self.store.check_writable()
        records: list[dict[str, Any]] = []
        if isinstance(items, np.ndarray) or (isinstance(items, list) and items and _is_number_list(items)):
            vectors = np.asarray(items, np.float32)
            if vectors.ndim == 1:
                vectors = vectors[None]
            if vectors.ndim != 2 or vectors.shape[1] != self.dim:
                raise ValueError(f"vectors must have shape (n, {self.dim}), not {vectors.shape}")
            records = [{"hash": ItemStore.vector_hash(v)} for v in vectors]
        else:
            images = items if isinstance(items, (list, tuple)) else [items]
            decoded = []
            for im in images:
                if isinstance(im, (str, os.PathLike)):
                    result = self._decode(absolute_path(im))
                    if isinstance(result, DecodeFailure):
                        raise ValueError(f"cannot add {result.path}: {result.reason}")
                    decoded.append(result.pixels)
                    records.append({"path": result.path, "size": result.size, "mtime": result.mtime,
                                    "hash": result.hash})
                else:
                    decoded.append(self.model.image_pixels(im))
                    records.append({"hash": ItemStore.vector_hash(decoded[-1])})
            vectors = self.model.encode_pixels(np.stack(decoded)) if decoded else np.zeros((0, self.dim))
        n = len(records)
        metas = [metadata] * n if isinstance(metadata, dict) or metadata is None else list(metadata)
        if len(metas) != n:
            raise ValueError(f"got {len(metas)} metadata entries for {n} items")
        if paths is not None:
            if len(paths) != n:
                raise ValueError(f"got {len(paths)} paths for {n} items")
            for rec, p in zip(records, paths):
                rec["path"] = p
        for rec, meta in zip(records, metas):
            rec["metadata"] = meta
        indices = self.store.append(vectors, records)
        if self.autosave_every and self.unsaved >= self.autosave_every:
            self.save()
        return indices

    def _decode(self, path: str):
        """Decode one file in this process, exactly as a decode worker would."""
        return decode_file(path, self.model.pixel_transform, self.settings.max_image_pixels)

    def delete(self, indices: Iterable[int]) -> None:
        """Remove items from search results and from the database at the next save."""
        self.store.delete(indices)

    def forget(self, paths: Iterable[str | os.PathLike]) -> int:
        """Delete the items of these files, and of every file under those that are folders."""
        return self.store.forget(os.fspath(p) for p in paths)

    # ----------------------------------------------------------------- scanning and watching
    def scan(self, *paths: str | os.PathLike, progress: bool = False, excludes=None) -> ScanReport:
        """Add the images under folders (recursively) or single files; returns a ScanReport.

        Files already indexed with the same size and mtime are skipped; changed ones are re-embedded.
        """
        return asyncio.run(self.scan_async(*paths, progress=progress, excludes=excludes))

    async def scan_async(self, *paths, progress: bool = False, excludes=None, report=None, running=None,
                         feed: asyncio.Queue | None = None) -> ScanReport:
        """A scan of `paths`, or, given a `feed` (a folder watcher's), the files put on it until None."""
        self.store.check_writable()
        report = report or ScanReport()
        bar = progress_bar(report) if progress else None
        remote = None
        if self.cluster is not None:
            remote = await asyncio.to_thread(
                self.cluster.embed_stage, self.spec, self.settings.device, self.model.pixel_transform,
                self.settings.max_image_pixels, self.settings.batch_size)
        pipeline = ScanPipeline(
            self.store, self.model, paths, self.decode_pool, self.settings.batch_size, excludes=excludes,
            autosave_every=self.autosave_every, report=report, running=running, feed=feed, remote=remote,
        )
        shown = feed is None  # a watch's endless pipeline is not a scan in progress
        if shown:
            self.active_scans.append(report)
        try:
            await pipeline.run()
        finally:
            if shown:
                self.active_scans.remove(report)
            if bar is not None:
                bar.close()
        if self.autosave:
            await asyncio.to_thread(self.save)
        return report

    def watcher(self, folders, feed: asyncio.Queue, excludes=None) -> FolderWatcher:
        """A watcher that keeps this database in step with `folders`, handing new files to `feed`."""
        self.store.check_writable()
        return FolderWatcher(self.store, folders, feed, settle_seconds=self.settings.settle_seconds,
                             excludes=excludes)

    @property
    def decode_pool(self) -> ImageDecodePool:
        """The decode worker processes, started on first need and kept for later scans."""
        if self._decode_pool is None:
            self._decode_pool = ImageDecodePool(
                self.model.pixel_transform, self.settings.decode_workers, self.settings.max_image_pixels
            )
        return self._decode_pool

    @decode_pool.setter
    def decode_pool(self, pool: ImageDecodePool) -> None:
        if self._decode_pool is not None:
            self._decode_pool.close()
        self._decode_pool = pool

    # ----------------------------------------------------------------- searching
    def embed_query(self, query: Any) -> np.ndarray:
        """A query as a unit float32 vector: text, image path, PIL image, item index (int) or vector."""
        if isinstance(query, np.ndarray):
            v = np.asarray(query, np.float32).reshape(-1)
            if v.shape != (self.dim,):
                raise QueryError(f"a query vector must have {self.dim} values, not {v.size}")
        elif isinstance(query, (int, np.integer)) and not isinstance(query, bool):
            if not self.store.is_live(int(query)):
                raise QueryError(f"no item with index {query}")
            v = self.store.vectors[int(query)].astype(np.float32)
        elif isinstance(query, os.PathLike) or (isinstance(query, str) and looks_like_image_file(query)):
            result = self._decode(absolute_path(query))
            if isinstance(result, DecodeFailure):
                raise QueryError(f"cannot search by {result.path}: {result.reason}")
            v = self.model.encode_pixels(result.pixels[None])[0]
        elif isinstance(query, str):
            v = self._embed_text(query)
        elif hasattr(query, "convert") and hasattr(query, "size"):  # a PIL image
            v = self.model.encode_images([query])[0]
        else:
            raise TypeError(f"cannot search by a {type(query).__name__}")
        norm = np.linalg.norm(v)
        if not np.isfinite(norm) or norm == 0:
            raise QueryError("the query vector must be finite and non-zero")
        return v / norm

    def _embed_text(self, text: str) -> np.ndarray:
        text = check_text(text)
        if is_combined(text):
            return combined_vector(text, self.model.encode_text)
        return self.model.encode_text([text])[0]

    def search(self, query: Any = None, k: int | None = None, *, text: str | None = None, image: Any = None,
               min_similarity: float | None = None, folder: str | None = None, since: Any = None,
               until: Any = None, types: Iterable[str] | None = None,
               collapse_duplicates: bool = False) -> SearchResults:
        """The k nearest items by cosine similarity, best first: the one search entry point.

        `query`: text, an image path, a PIL image, an item index, a vector (dim,), or a batch: a list of
        those or a (Q, dim) array, which returns one list of results per query. `text=` is always text
        (never opened as a path); `image=` is a PIL image or an image file. Bad input raises QueryError.

        Filters keep the search exact among the items they allow: `folder` (an absolute folder, or a
        folder name anywhere in the path), `since`/`until` (file modification time: a date, datetime,
        `YYYY-MM-DD` or seconds; `until` a date includes that day), `types` (extensions, e.g. ["jpg"]).
        `collapse_duplicates` returns one result per file content, the copies in SearchResult.duplicates.
        """
        given = [q for q in (query, text, image) if q is not None]
        if len(given) != 1:
            raise QueryError("give one query: text, an image or an item")
        k = check_k(self.settings.k if k is None else k)
        min_similarity = check_min_similarity(min_similarity)
        if text is not None:
            query, kind = check_text(text), "text"
        elif image is not None:
            kind = "image"
            query = image if not isinstance(image, str) else Path(image)
        elif isinstance(query, str):
            kind = "image" if looks_like_image_file(query) else "text"
        else:
            kind = "image" if isinstance(query, os.PathLike) or hasattr(query, "convert") else None
        batched = isinstance(query, list) or (isinstance(query, np.ndarray) and query.ndim == 2)
        queries = list(query) if batched else [query]
        t0 = time.perf_counter()
        if text is not None:
            vectors = self._embed_text(query)[None]  # text is text: never opened as a file
        elif queries:
            vectors = np.stack([self.embed_query(q) for q in queries])
        else:
            vectors = np.zeros((0, self.dim))
        t1 = time.perf_counter()
        where = row_filter(folder, since, until, types)
        if where or collapse_duplicates:  # filtered searches run on the local store (exact either way)
            hits = self.store.search(vectors, k, where, collapse_duplicates)
        else:
            hits = self._searcher().search(vectors, k)
        t2 = time.perf_counter()
        results = SearchResults(
            SearchResults(SearchResult(h.index, h.path, min(h.similarity, 1.0), h.metadata, h.duplicates)
                          for h in row
                          if min_similarity is None or h.similarity >= min_similarity)
            for row in hits
        )
        for r in [results, *results]:
            r.encode_ms, r.search_ms = (t1 - t0) * 1000, (t2 - t1) * 1000
        self._record_timing(None if batched else kind, results.encode_ms, results.search_ms)
        return results if batched else results[0]

    def _searcher(self):
        """The store, or with a Ray cluster the shard actors serving its vectors (made on first search)."""
        if self.cluster is None:
            return self.store
        with self.store.lock:
            if self._shards is None:
                self._shards = self.cluster.sharded_search(self.store)
        return self._shards

    def _record_timing(self, kind: str | None, encode_ms: float, search_ms: float) -> None:
        with self._timings_lock:
            t = self.timings
            if kind == "text":
                t.text_encode_ms = encode_ms
            elif kind == "image":
                t.image_encode_ms = encode_ms
            t.search_ms = search_ms
            t.searches += 1

    def validate(self, batch: int = 256) -> ValidationReport:
        """Query every stored vector; each must find itself (or an identical item) first."""
        return self.store.validate(batch)

    # ----------------------------------------------------------------- saving and repairing
    def save(self) -> bool:
        """Commit everything added or deleted since the last save; crash-safe, cost ~ new items.
        Returns False when there was nothing to save. Compacts when many rows are deleted."""
        return self.store.save()

    @classmethod
    def repair(cls, path: str | os.PathLike, model: str | None = None, pretrained: str | None = None, *,
               seed: int | None = None, settings: Settings | None = None) -> RepairReport:
        """Make a damaged database openable: commit the longest consistent prefix of its items.

        `model`/`pretrained`/`seed` (else the settings) are used only when the manifest is unreadable.
        Items lost this way come back by rescanning their folders."""
        settings = settings or load_settings()

        def from_settings() -> Manifest:
            spec = ModelSpec(model or settings.model, as_pretrained(pretrained or settings.pretrained),
                             settings.seed if seed is None else seed)
            dim = load_model(spec, settings.device).dim
            return Manifest(spec.name, spec.pretrained, spec.weights_id, spec.seed, dim)

        return ItemStore.repair(Path(path).expanduser().absolute(), from_settings)

    def close(self) -> None:
        if self.cluster is not None:
            self.cluster.close()
        if self._decode_pool is not None:
            self._decode_pool.close()
            self._decode_pool = None
        if getattr(self, "store", None) is not None:
            self.store.close()

    def __enter__(self) -> NanoDB:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"NanoDB({str(self.path)!r}, {self.spec.describe()}, {len(self)} items)"


def _check_same_model(m: Manifest, model, pretrained, seed) -> None:
    asked = ModelSpec(model or m.model, as_pretrained(pretrained or m.pretrained), m.seed if seed is None else seed)
    if asked.name != m.model or asked.weights_id != m.weights_id:
        raise DatabaseError(
            f"this database was built with {ModelSpec(m.model, m.pretrained, m.seed).describe()}, "
            f"not {asked.describe()}: its vectors would not be comparable. Open it without --model/--pretrained, "
            f"or use another --path for the other model"
        )


def row_filter(folder: str | None = None, since: Any = None, until: Any = None,
               types: Iterable[str] | None = None) -> RowFilter:
    """Search filters as the store's RowFilter; a bad value raises QueryError."""
    if folder is not None:
        folder = folder.strip()
        if not folder:
            folder = None
        elif folder.startswith(("/", "~")):
            folder = os.path.normpath(os.path.expanduser(folder))
    if types is not None:
        if isinstance(types, str):
            types = types.replace(",", " ").split()
        aliases = {"jpg": {"jpg", "jpeg"}, "jpeg": {"jpg", "jpeg"}, "tif": {"tif", "tiff"}, "tiff": {"tif", "tiff"}}
        wanted = set()
        for t in types:
            t = t.strip().lower().lstrip(".")
            wanted |= aliases.get(t, {t})
        types = frozenset(wanted) if wanted else None
    return RowFilter(folder, _timestamp(since, "since"), _timestamp(until, "until"), types)


def _timestamp(value: Any, name: str) -> float | None:
    """A date bound as seconds since the epoch (local time); a date given for `until` includes that day."""
    if value is None or value == "":
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        try:
            value = date.fromisoformat(text) if len(text) == 10 else datetime.fromisoformat(text)
        except ValueError:
            raise QueryError(f"{name}: {text[:40]!r} is not a date (YYYY-MM-DD)") from None
    if isinstance(value, datetime):
        return value.timestamp()
    if isinstance(value, date):
        day = datetime.combine(value, dt_time())
        return (day + timedelta(days=1) if name == "until" else day).timestamp()
    raise QueryError(f"{name} must be a date, not a {type(value).__name__}")


def _is_number_list(items: list) -> bool:
    first = items[0]
    return isinstance(first, (int, float, np.floating)) or (
        isinstance(first, (list, tuple, np.ndarray)) and len(first) and isinstance(first[0], (int, float, np.floating))
    )

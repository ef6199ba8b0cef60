"""NanoDB: the Python API. It composes the item store, the CLIP model and the ingestion pipeline; the
command line, the console, the HTTP API and the web UI are thin layers over it."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from nanodb.config import Settings, load_settings
from nanodb.media.paths import absolute_path
from nanodb.media.record import FileRecord, content_hash
from nanodb.media.sandbox import DecodeLimits
from nanodb.model.announce import announced
from nanodb.model.clip import ClipModel, ModelConfig, ModelLoadError, ModelSpec, as_pretrained, load_model, unload_model
from nanodb.model.idle import IdleFreed
from nanodb.model.image_export import ExportedImageTower, exported_image_tower
from nanodb.model.text_export import ExportedTextTower, text_encoder
from nanodb.pipeline.coordinator import ScanPipeline
from nanodb.pipeline.decode import DecodedImage, DecodeFailure, ImageDecodePool
from nanodb.pipeline.report import ScanReport, progress_bar
from nanodb.pipeline.walk import RAW_PAIRS
from nanodb.pipeline.watch import FolderWatcher
from nanodb.search.batcher import QueryBatcher
from nanodb.search.duplicates import DuplicateGroup, NearDuplicate, near_duplicates
from nanodb.search.encoder import QueryEncoder, SearchTimings
from nanodb.search.local import LocalSearcher, ValidationReport
from nanodb.search.request import Filters, Searcher, SearchRequest, SearchResult, SearchResults
from nanodb.search.sharded import ShardedSearcher, ShardedStore
from nanodb.storage.cluster_manifest import is_sharded, read_cluster_manifest
from nanodb.storage.format import DatabaseError, Manifest, read_manifest
from nanodb.storage.repair import RepairReport, repair_folder
from nanodb.storage.store import Item, ItemStore

if TYPE_CHECKING:
    from nanodb.cluster import RayOptions


__all__ = ["NanoDB", "SearchRequest", "Filters", "SearchResult", "SearchResults", "Item", "ValidationReport",
           "SearchTimings", "DuplicateGroup", "NearDuplicate"]


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
        self._model: ClipModel | None = None
        self._text_model: ExportedTextTower | ClipModel | None = None
        self._model_lock = threading.RLock()
        self._image_size: tuple[int, int] | None = None
        self._loading_since: float | None = None  # monotonic time the model's load began
        self._decode_pool: ImageDecodePool | None = None
        self.active_scans: list[ScanReport] = []  # the scans running now, for live progress displays
        # `ray`: a Ray cluster address or RayOptions: scans decode and embed there, searches fan out to shards
        self.cluster = None
        if ray is not None:
            from nanodb.cluster import RayCluster

            self.cluster = RayCluster(ray)
            # now, in this thread: Ray's local processes die with the thread that starts them, and a
            # scan or a server request runs in a short-lived worker thread
            self.cluster.connect()

        manifest = read_manifest(self.path) if self.path.is_dir() else None
        # the one description of the model, for every loader (this process's, Ray actors'): the model asked
        # for, or an existing database's own, run on the settings' device, precision and backend
        self.model_config = ModelConfig.from_settings(self.settings, model, pretrained, seed)
        self.store: ItemStore | ShardedStore | None = None
        if manifest is None and is_sharded(self.path):
            if self.cluster is None:
                raise DatabaseError(f"{self.path} is a sharded database: open it on its Ray cluster (--ray ADDRESS)")
            manifest = read_cluster_manifest(self.path).model
        if manifest is not None:
            self.model_config = self.model_config.with_spec(_model_of(manifest, model, pretrained, seed))
        if self.cluster is not None:
            # a sharded database's shards, reconnected or made: the model is loaded for a new one's dimension
            self.store = self.cluster.sharded_store(self.path, read_only, lambda: _new_manifest(self.model),
                                                    self.settings.compact_dead_fraction)
            if self.store is not None:
                manifest = self.store.manifest
        if self.store is None:
            if manifest is None:
                if read_only:
                    raise DatabaseError(f"no nanodb database at {self.path}")
                # a new database needs the model (for its dimension): fail before creating files
                manifest = _new_manifest(self.model)
            self.store = ItemStore(self.path, manifest, read_only=read_only,
                                   compact_dead_fraction=self.settings.compact_dead_fraction)
        # a query image's tower, run without torch where it can be, held while image queries come
        self._image_towers = IdleFreed(self._load_image_tower, self.settings.image_tower_idle_seconds,
                                       f"the image tower of {self.spec.name}")
        self.queries = QueryEncoder(self.store, lambda: self.model, self.settings.max_image_pixels,
                                    DecodeLimits.of(self.settings), text_model=lambda: self.text_model,
                                    image_model=lambda: self.image_model)
        # single queries from concurrent callers share encode and search passes (search.batcher)
        self.batcher = QueryBatcher(self.queries, self._searcher, self.timings)
        if self.spec.pretrained != manifest.pretrained and not read_only:
            # the database's checkpoint, moved: remember where it is now
            self.store.record_weights(self.spec.pretrained, self.spec.weights_id)

    @property
    def spec(self) -> ModelSpec:
        """The model of this database's embedding space (name, weights, seed)."""
        return self.model_config.spec

    @property
    def precision(self) -> str:
        """How the stored vectors were computed when the database was built, e.g. 'bfloat16/openvino'."""
        return self.store.manifest.precision

    @property
    def model(self) -> ClipModel:
        """The CLIP model, loaded on first use (searching by vector needs none)."""
        with self._model_lock:  # the decode pool and the CLIP stage may both ask first, from two threads
            return self._load_model()

    def _load_model(self) -> ClipModel:
        if self._model is None:
            weights = self.store.manifest.weights_id if getattr(self, "store", None) else None
            if weights and self.spec.is_file and not (
                Path(self.spec.pretrained).is_file() and self.spec.has_weights(weights)
            ):
                raise ModelLoadError(
                    f"this database's weights {self.spec.describe(weights)} are not at {self.spec.pretrained} "
                    f"any more: pass the checkpoint's path with --pretrained (NanoDB(..., pretrained=PATH))"
                )
            self._loading_since = time.monotonic()
            try:
                with announced(f"loading the model {self.spec.name}"):
                    self._model = load_model(self.model_config)
            finally:
                self._loading_since = None
        return self._model

    @property
    def text_model(self) -> ExportedTextTower | ClipModel:
        """What encodes text queries (`encode_text`): the text tower's export, run without torch, so a
        fresh process answers a text query in about a second (model.text_export: made by the model's
        first text query); the model itself where no export can be made."""
        with self._model_lock:
            if self._text_model is None:
                loaded = self._model is not None
                self._text_model = text_encoder(self.model_config, self.store.manifest.weights_id, self._load_model)
                if not loaded and self._text_model is not self._model:
                    self._release_model()  # loaded only to make the export: never hold both
            return self._text_model

    def _release_model(self) -> None:
        """Drop the torch model (loaded again when needed)."""
        self._model = None
        unload_model(self.model_config)

    @property
    def image_model(self) -> ExportedImageTower | ClipModel:
        """What turns a query image into its vector (`pixel_transform`, `encode_pixels`, `image_size`): the
        model while it is loaded (for a scan); else the image tower a scan converted, where it gives the
        vectors the model would (model.image_export: no torch, a fraction of the model's memory and load
        time), loaded on the first image query and freed after `image_tower_idle_seconds` unused; else the
        model."""
        with self._model_lock:
            if self._model is not None:
                return self._model
        return self._image_towers.get()

    @property
    def image_size(self) -> tuple[int, int]:
        """The image tower's input size (what a query image is decoded for), remembered once known."""
        if self._image_size is None:
            self._image_size = tuple(self.image_model.image_size)
        return self._image_size

    @property
    def image_tower_loaded(self) -> bool:
        """A query image's tower is held (loaded by an image query, not yet freed as idle)."""
        return self._image_towers.held

    def _load_image_tower(self) -> ExportedImageTower | ClipModel:
        manifest = self.store.manifest
        with self._model_lock:
            tower = exported_image_tower(self.model_config, manifest.precision, manifest.weights_id)
            if tower is None and self._model is None:
                self._load_model()  # converts the tower and records it where it runs without the model
                tower = exported_image_tower(self.model_config, manifest.precision, manifest.weights_id)
                if tower is not None:
                    self._release_model()
            return tower or self._load_model()

    @property
    def model_loaded(self) -> bool:
        return self._model is not None

    @property
    def model_loading_for(self) -> float | None:
        """Seconds the model has been loading (a progress display shows it), None when no load runs."""
        since = self._loading_since
        return None if since is None else time.monotonic() - since

    def indexed_under(self, path: str | os.PathLike) -> int:
        """How many live items are the file `path` or lie under the folder `path`."""
        path = absolute_path(path)
        return sum(1 for p in self.store.indexed_paths() if p == path or p.startswith(path + os.sep))

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
        """All stored float16 vectors (deleted rows included; see Item.deleted); not of a sharded
        database, whose vectors stay on its shards (iterate over its items)."""
        if isinstance(self.store, ShardedStore):
            raise ValueError("a sharded database's vectors stay on its shards: iterate over its items")
        return self.store.vectors

    def __getitem__(self, index: int) -> Item:
        return self.store.item(index)

    def __iter__(self):
        return self.store.live_items()

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

        `items`: a vector (dim,), a batch of vectors (n, dim), a PIL image, an image or video file path,
        or a list of images/paths. A video adds its frames, sampled as a scan samples them: one item each,
        with the video's path and metadata {"time": seconds}. A path is decoded as a scan decodes it, in the
        decode workers within their time and memory limits: a file they refuse raises ValueError with the
        reason. `metadata`: one dict for all, or one per
        given item (a video's applies to each of its frames). `paths`: optional labels, likewise.
        """
        self.store.check_writable()
        records: list[FileRecord] = []
        sources: list[int] = []  # the given item of each record: a video gives several
        if isinstance(items, np.ndarray) or (isinstance(items, list) and items and _is_number_list(items)):
            vectors = np.asarray(items, np.float32)
            if vectors.ndim == 1:
                vectors = vectors[None]
            if vectors.ndim != 2 or vectors.shape[1] != self.dim:
                raise ValueError(f"vectors must have shape (n, {self.dim}), not {vectors.shape}")
            records = [FileRecord(path=None, hash=content_hash(v.tobytes())) for v in vectors]
            sources = list(range(len(records)))
            given = len(records)
        else:
            images = items if isinstance(items, (list, tuple)) else [items]
            given = len(images)
            decoded = []
            files = self._decode([absolute_path(im) for im in images if isinstance(im, (str, os.PathLike))])
            for j, im in enumerate(images):
                if isinstance(im, (str, os.PathLike)):
                    result = next(files)
                    if isinstance(result, DecodeFailure):
                        raise ValueError(f"cannot add {result.path}: {result.reason}")
                    for one in result:
                        if isinstance(one, DecodeFailure):  # a tar shard's member
                            raise ValueError(f"cannot add {one.path}: {one.reason}")
                        decoded.append(one.pixels)
                        records.append(one.record)
                        sources.append(j)
                else:
                    decoded.append(self.model.image_pixels(im))
                    records.append(FileRecord(path=None, hash=content_hash(np.asarray(decoded[-1]).tobytes())))
                    sources.append(j)
            vectors = self.model.encode_pixels(np.stack(decoded)) if decoded else np.zeros((0, self.dim))
        metas = [metadata] * given if isinstance(metadata, dict) or metadata is None else list(metadata)
        if len(metas) != given:
            raise ValueError(f"got {len(metas)} metadata entries for {given} items")
        if paths is not None and len(paths) != given:
            raise ValueError(f"got {len(paths)} paths for {given} items")
        labels = [r.path for r in records] if paths is None else [paths[j] for j in sources]
        records = [dataclasses.replace(r, path=p, metadata={**(r.metadata or {}), **(metas[j] or {})} or None)
                   for r, p, j in zip(records, labels, sources)]
        indices = self.store.append(vectors, records)
        if self.autosave_every and self.unsaved >= self.autosave_every:
            self.save()
        return indices

    def _decode(self, paths: list[str]) -> Iterator[list[DecodedImage | DecodeFailure] | DecodeFailure]:
        """Each file's items (a video's frames), decoded by the scan's decode workers within the same time
        and memory limits: a decoder bomb added by name is refused as a scan refuses it."""
        return iter(self.decode_pool.decode_now(paths) if paths else [])

    def delete(self, indices: Iterable[int]) -> None:
        """Remove items from search results and from the database at the next save."""
        self.store.delete(indices)

    def forget(self, paths: Iterable[str | os.PathLike]) -> int:
        """Delete the items of these files, and of every file under those that are folders."""
        return self.store.forget(os.fspath(p) for p in paths)

    # ----------------------------------------------------------------- scanning and watching
    def scan(self, *paths: str | os.PathLike, progress: bool = False, excludes=None,
             follow_symlinks: bool | None = None, retry_failed: bool = False,
             raw_pairs: str | None = None) -> ScanReport:
        """Add the images under folders (recursively) or single files; returns a ScanReport. A path may
        also be an fsspec URL prefix (`s3://bucket/photos/`: its objects) or webdataset tar shards
        (`data/{00000..00099}.tar`, local or behind a URL: their image members, `<tar>#<member>`).

        Files already indexed with the same size and mtime are skipped; changed ones are re-embedded.
        A file that failed to decode is remembered with its size and mtime and tried again only once it
        changes, or with `retry_failed`. A symlink that leads outside `paths` is skipped unless
        `follow_symlinks` (default: the setting). `raw_pairs` (default: the setting): "jpeg" indexes a
        camera RAW file beside a JPEG, HEIF or export (PNG, TIFF, WebP, AVIF) of the same name as one
        item, that file; "both" indexes both.
        """
        return asyncio.run(self.scan_async(*paths, progress=progress, excludes=excludes,
                                           follow_symlinks=follow_symlinks, retry_failed=retry_failed,
                                           raw_pairs=raw_pairs))

    async def scan_async(self, *paths, progress: bool = False, excludes=None, report=None, running=None,
                         feed: asyncio.Queue | None = None, follow_symlinks: bool | None = None,
                         retry_failed: bool = False, raw_pairs: str | None = None) -> ScanReport:
        """A scan of `paths`, or, given a `feed` (a folder watcher's), the files put on it until None."""
        self.store.check_writable()
        follow = self.settings.follow_symlinks if follow_symlinks is None else follow_symlinks
        index_paired_raw = self._index_paired_raw(raw_pairs)
        self._record_roots(paths, follow)
        report = report or ScanReport()
        bar = progress_bar(report) if progress else None
        remote = None
        if self.cluster is not None:
            remote = await asyncio.to_thread(
                self.cluster.embed_stage, self.model_config, self.model.pixel_transform,
                self.settings.max_image_pixels, self.settings.batch_size, DecodeLimits.of(self.settings))
        # the model and the decode workers start only once a file needs them: a rescan that finds
        # nothing new loads neither
        pipeline = ScanPipeline(
            self.store, lambda: self.model, paths, self.decode_pool, self.settings.batch_size, excludes=excludes,
            autosave_every=self.autosave_every, report=report, running=running, feed=feed, remote=remote,
            follow_symlinks=follow, retry_failed=retry_failed, index_paired_raw=index_paired_raw,
            model_name=self.spec.name,
        )
        shown = feed is None  # a watch's endless pipeline is not a scan in progress
        if shown:
            self.active_scans.append(report)
        try:
            await pipeline.run()
        finally:
            self.store.save_failures()  # remembered now, saved or not: a rescan does not try them again
            if shown:
                self.active_scans.remove(report)
            if bar is not None:
                bar.close()
        if self.autosave:
            await asyncio.to_thread(self.save)
            report.finished = time.monotonic()  # the scan's wall time includes its save
        return report

    def watcher(self, folders, feed: asyncio.Queue, excludes=None,
                follow_symlinks: bool | None = None, raw_pairs: str | None = None) -> FolderWatcher:
        """A watcher that keeps this database in step with `folders`, handing new files to `feed`."""
        self.store.check_writable()
        follow = self.settings.follow_symlinks if follow_symlinks is None else follow_symlinks
        index_paired_raw = self._index_paired_raw(raw_pairs)
        self._record_roots(folders, follow)
        return FolderWatcher(self.store, folders, feed, settle_seconds=self.settings.settle_seconds,
                             excludes=excludes, follow_symlinks=follow, index_paired_raw=index_paired_raw)

    def _index_paired_raw(self, raw_pairs: str | None) -> bool:
        """Whether a camera RAW file beside its JPEG is indexed too: `raw_pairs` (else the setting) "both"."""
        value = self.settings.raw_pairs if raw_pairs is None else raw_pairs
        if value not in RAW_PAIRS:
            raise ValueError(f"raw_pairs must be one of {', '.join(RAW_PAIRS)}, not {value!r}")
        return value == "both"

    @property
    def scanned_roots(self) -> dict[str, bool]:
        """The folders (or files) scanned or watched, each with whether symlinks out of it were followed."""
        return dict(self.store.manifest.roots)

    def _record_roots(self, paths, follow_symlinks: bool) -> None:
        """The folders (or files) scanned, remembered: the server sends only files under them."""
        roots = {absolute_path(p): follow_symlinks for p in paths}
        self.store.record_roots({p: f for p, f in roots.items() if os.path.lexists(p)})

    @property
    def decode_pool(self) -> ImageDecodePool:
        """The decode worker processes, started on first need and kept for later scans."""
        if self._decode_pool is None:
            self._decode_pool = ImageDecodePool(
                workers=self.settings.decode_workers, max_pixels=self.settings.max_image_pixels,
                get_transform=lambda: self.model.pixel_transform, limits=DecodeLimits.of(self.settings),
            )
        return self._decode_pool

    @decode_pool.setter
    def decode_pool(self, pool: ImageDecodePool) -> None:
        if self._decode_pool is not None:
            self._decode_pool.close()
        self._decode_pool = pool

    # ----------------------------------------------------------------- searching
    def embed_query(self, query: Any) -> np.ndarray:
        """A query as a unit float32 vector: text, image path or URL, PIL image, item index or vector."""
        return self.queries.embed(query)

    def search(self, query: Any = None, k: int | None = None, *, text: str | None = None, image: Any = None,
               min_similarity: float | None = None, folder: str | None = None, since: Any = None,
               until: Any = None, types: Iterable[str] | None = None,
               collapse_duplicates: bool = False) -> SearchResults:
        """The k nearest items by cosine similarity, best first (the keyword form of `find`).

        `query`: text, an image path, an http(s) image URL, a PIL image, an item index, a vector (dim,),
        or a batch: a list of those or a (Q, dim) array, which returns one list of results per query. A
        string is an image when it is a URL, has an image extension, or starts with / ./ ../ ~/ (the rule
        of every interface: search.query.is_image_reference), `#12` is item 12, "quoted" is text; one
        that names no file raises QueryError (never a silent text search). A combined query reads each term
        by that rule: `./cat.jpg - 3:cat + 2:bee`, `2:#12 + night` (search.query.TypedQuery; a TypedQuery
        is a query too). `text=` is always text, every term of it (never
        opened as a path or fetched); `image=` is a path, a URL or a PIL image. Bad input raises QueryError.

        Filters keep the search exact among the items they allow: `folder` (an absolute folder, or a
        folder name anywhere in the path), `since`/`until` (file modification time: a date, datetime,
        `YYYY-MM-DD` or seconds; `until` a date includes that day), `types` (extensions, e.g. ["jpg"]).
        `collapse_duplicates` returns one result per file content, the copies in SearchResult.duplicates.
        """
        return self.find(SearchRequest(query, k, text=text, image=image, min_similarity=min_similarity,
                                       filters=Filters(folder, since, until, types), collapse=collapse_duplicates))

    def find(self, request: SearchRequest) -> SearchResults:
        """Answer a SearchRequest, the form every interface builds (NanoDB.search is its keyword form):
        embed its query, then search with the local store, or with the shards on a Ray cluster."""
        request = request.checked(self.settings.k)
        query, kind = self.queries.classify(request.query, request.text, request.image)
        batched = isinstance(query, list) or (isinstance(query, np.ndarray) and query.ndim == 2)
        if not batched:  # answered with the single queries of other callers that arrive meanwhile
            return self.batcher.find(request, query, kind)
        queries = list(query)
        t0 = time.perf_counter()
        if queries:
            vectors = np.stack([self.queries.embed(q) for q in queries])
        else:
            vectors = np.zeros((0, self.dim))
        t1 = time.perf_counter()
        results = SearchResults(self._searcher().search(dataclasses.replace(request, vectors=vectors)))
        t2 = time.perf_counter()
        for r in [results, *results]:
            r.encode_ms, r.search_ms = (t1 - t0) * 1000, (t2 - t1) * 1000
        self.timings.record(None, results.encode_ms, results.search_ms)
        return results

    def _searcher(self) -> Searcher:
        """The local searcher, or a sharded database's, which the shards answer."""
        if isinstance(self.store, ShardedStore):
            return ShardedSearcher(self.store)
        return LocalSearcher(self.store)

    def validate(self, batch: int = 256) -> ValidationReport:
        """Query every stored vector; each must find itself (or an identical item) first (in a sharded
        database, within its shard)."""
        return self._searcher().validate(batch)

    @property
    def state(self) -> tuple[int, int, int]:
        """A marker that changes whenever items are added or deleted or renumbered (a compaction)."""
        return self.store.state

    def near_duplicates(self, threshold: float = 0.95, *, min_size: int = 2,
                        unlocked: bool = False) -> list[DuplicateGroup]:
        """Groups of near-duplicate items (bursts, resized or re-encoded copies, light edits), largest first.

        Exact for the threshold: every two live items whose similarity (the float64 dot product of their
        stored vectors) is at least `threshold` are in one group; a group is a connected component of
        that relation, so a member can be less similar to another through a chain. Items with identical
        vectors (byte-identical files share one) are always one group. Two frames of one video (items of
        one video's path) are never paired: a group holds both only through another item. Each DuplicateGroup lists
        NearDuplicate(index, path, similarity): its lowest index first, the others by their similarity to
        that one. `threshold` in (0, 1]; groups smaller than `min_size` (at least 2) are left out.
        Computed by a self-join with the exact search, in blocks of queries (memory: one block's results
        and 8 bytes a row); it holds the store's lock, so writers and searches wait for it, unless
        `unlocked` (a server): then it joins the rows live when it starts while others go on, drops the
        rows deleted meanwhile, and starts over if a compaction renumbered the rows meanwhile."""
        if isinstance(self.store, ShardedStore):
            raise NotImplementedError("near-duplicates of a sharded database are not available yet (they need a "
                                      "join across the shards)")
        return near_duplicates(self.store, threshold, min_size=min_size, unlocked=unlocked)

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
        Items lost this way come back by rescanning their folders. A sharded database's shards are
        repaired each in its folder, which must be reachable from here."""
        settings = settings or load_settings()

        def from_settings() -> Manifest:
            return _new_manifest(load_model(ModelConfig.from_settings(settings, model, pretrained, seed)))

        root = Path(path).expanduser().absolute()
        if is_sharded(root):  # each shard's folder, where this machine reaches it (a shared filesystem)
            cluster = read_cluster_manifest(root)
            return RepairReport.combined([repair_folder(Path(s.folder), lambda: cluster.model)
                                          for s in cluster.shards])
        return repair_folder(root, from_settings)

    def close(self) -> None:
        if self._decode_pool is not None:
            self._decode_pool.close()
            self._decode_pool = None
        if getattr(self, "queries", None) is not None:
            self.queries.close()
            self._image_towers.close()
        if getattr(self, "store", None) is not None:
            self.store.close()  # a sharded database's shards, before the cluster they run on
        if self.cluster is not None:
            self.cluster.close()

    def __enter__(self) -> NanoDB:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"NanoDB({str(self.path)!r}, {self.spec.describe()}, {len(self)} items)"


def _new_manifest(model: ClipModel) -> Manifest:
    """The manifest of an empty database of `model`'s vectors (a new one's, or a repair's that lost its own)."""
    spec = model.spec
    return Manifest(spec.name, spec.pretrained, spec.weights_id, spec.seed, model.dim, precision=model.precision_id)


def _model_of(m: Manifest, model, pretrained, seed) -> ModelSpec:
    """The model to open a database with: the one it was built with, from wherever its weights are now.

    A model asked for must be the same (name and weights: a checkpoint's digest, from any path), else
    DatabaseError naming both."""
    built = ModelSpec(m.model, m.pretrained, m.seed)
    asked = ModelSpec(model or m.model, as_pretrained(pretrained) if pretrained else m.pretrained,
                      m.seed if seed is None else seed)
    if asked == built:
        return built  # its weights are checked when the model is loaded
    if asked.name != m.model or not asked.has_weights(m.weights_id):
        raise DatabaseError(
            f"this database was built with {built.describe(m.weights_id)}, not {asked.describe(asked.weights_id)}: "
            f"its vectors would not be comparable. Open it without --model/--pretrained, or use another --path "
            f"for the other model"
        )
    return asked


def _is_number_list(items: list) -> bool:
    first = items[0]
    return isinstance(first, (int, float, np.floating)) or (
        isinstance(first, (list, tuple, np.ndarray)) and len(first) and isinstance(first[0], (int, float, np.floating))
    )

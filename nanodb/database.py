"""NanoDB: the Python API. The command line, the console and the web UI are thin layers over it."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import threading
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from nanodb.config import Settings, load_settings
from nanodb.index import VectorIndex
from nanodb.model import ClipModel, ModelSpec, load_model
from nanodb.query import combined_vector, is_combined
from nanodb.storage import (
    DATA_FILES,
    SCALES_BYTES,
    ITEM_DTYPE,
    REPAIR_HINT,
    DatabaseError,
    Manifest,
    RepairReport,
    WriteLock,
    append_at,
    read_exact,
    read_manifest,
    repair,
    remove_other_generations,
    write_generation,
    write_manifest,
)
from pipeline.decode import DecodeFailure, _init_worker, decode_file, to_rgb
from pipeline.walk import is_image_name, printable

log = logging.getLogger(__name__)


# Similarities closer than this are a tie: float16 storage rounds each value by up to ~5e-4 relative.
SCORE_TIE = 1e-4


@dataclass
class SearchResult:
    index: int
    path: str | None
    similarity: float
    metadata: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"* index={self.index}  {printable(self.path or '')}  similarity={self.similarity:.4f}"


@dataclass
class Item:
    """One stored item: its vector, where it came from, and its metadata."""

    index: int
    path: str | None
    size: int
    mtime: float
    hash: str
    metadata: dict[str, Any]
    deleted: bool
    vector: np.ndarray = field(repr=False)  # float16, unit length


class NanoDB:
    """A folder of CLIP embeddings of images, searchable by text, image or vector.

    >>> db = NanoDB("~/.nanodb/photos", model="ViT-B-32", pretrained="laion2b_s34b_b79k")
    >>> db.scan("~/Pictures")
    >>> for r in db.search("a girl riding a horse", k=4): print(r)
    >>> db.save()

    `model`/`pretrained` default to what an existing database was built with, else to configs/.
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
        **overrides: Any,
    ):
        self.path = Path(path).expanduser().absolute()
        self.settings = settings or load_settings(config, **overrides)
        self.read_only = read_only
        self.autosave = autosave
        self._lock = threading.RLock()
        self._save_lock = threading.Lock()
        self._write_lock: WriteLock | None = None
        self._model: ClipModel | None = None
        self._decode_pool = None
        self._path_index: dict[str, int] | None = None
        self.active_scans: list = []  # ScanReports of the scans running now, for live progress displays

        manifest = read_manifest(self.path) if self.path.is_dir() else None
        if manifest is None:
            if read_only:
                raise DatabaseError(f"no nanodb database at {self.path}")
            spec = ModelSpec(
                model or self.settings.model,
                _as_pretrained(pretrained or self.settings.pretrained),
                self.settings.seed if seed is None else seed,
            )
        else:
            spec = ModelSpec(manifest.model, manifest.pretrained, manifest.seed)
            self._check_same_model(manifest, model, pretrained, seed)
        self.spec = spec
        if manifest is None:
            self.model  # a new database needs the model (for its dimension): fail before creating files
        if not read_only:
            try:
                self.path.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise DatabaseError(f"cannot create the database folder {self.path}: {e.strerror}") from None
            self._write_lock = WriteLock(self.path)
            self._write_lock.acquire()
        try:
            if manifest is None:
                manifest = Manifest(spec.name, spec.pretrained, spec.weights_id, spec.seed, self.model.dim)
                self._manifest = manifest
                self._load_empty()
                self._commit_manifest(manifest)
            else:
                self._manifest = manifest
                self._load()
                if not read_only:
                    remove_other_generations(self.path, manifest.generation)
        except BaseException:
            self.close()
            raise

    # ----------------------------------------------------------------- opening
    @staticmethod
    def _check_same_model(m: Manifest, model, pretrained, seed) -> None:
        asked = ModelSpec(model or m.model, _as_pretrained(pretrained or m.pretrained), m.seed if seed is None else seed)
        if asked.name != m.model or asked.weights_id != m.weights_id:
            raise DatabaseError(
                f"this database was built with {ModelSpec(m.model, m.pretrained, m.seed).describe()}, "
                f"not {asked.describe()}: its vectors would not be comparable. Open it without --model/--pretrained, "
                f"or use another --path for the other model"
            )

    def _load_empty(self) -> None:
        m = self._manifest
        self.index = VectorIndex(m.dim)
        self._items = np.zeros(0, ITEM_DTYPE)
        self._paths = bytearray()
        self._meta = bytearray()
        self._deleted: list[int] = []
        self._hash_index: dict[bytes, int] | None = None

    def _load(self) -> None:
        """Read the committed part of each data file with one binary read (no per-item parsing)."""
        m = self._manifest
        root = self.path
        self._load_empty()
        self.index.reserve(m.count)
        self.index.count = m.count
        crc = m.checksums or {}
        self.index.load(
            lambda view: read_exact(m.file(root, "vectors"), m.count * m.dim * 2, view, crc.get("vectors")),
            m.compact_reader(root),
        )
        self._items = np.zeros(max(m.count, 1024), ITEM_DTYPE)
        if m.count:
            items_view = memoryview(self._items[: m.count]).cast("B")
            read_exact(m.file(root, "items"), m.count * ITEM_DTYPE.itemsize, items_view, crc.get("items"))
        self._paths = bytearray(read_exact(m.file(root, "paths"), m.paths_bytes, checksum=crc.get("paths")))
        self._meta = bytearray(read_exact(m.file(root, "meta"), m.meta_bytes, checksum=crc.get("meta")))
        deleted = np.frombuffer(read_exact(m.file(root, "deleted"), m.deleted * 8, checksum=crc.get("deleted")), "<i8")
        if ((deleted < 0) | (deleted >= m.count)).any():
            raise DatabaseError(f"{m.file(root, 'deleted')} names items that do not exist; {REPAIR_HINT}")
        self._deleted = deleted.tolist()
        if self._deleted:
            self.index.delete(self._deleted)
        items = self._items[: m.count]
        if m.count and (
            int((items["path_off"] + items["path_len"]).max()) > m.paths_bytes
            or int((items["meta_off"] + items["meta_len"]).max()) > m.meta_bytes
        ):
            raise DatabaseError(
                f"{m.file(root, 'items')} points past the end of its path or metadata file; {REPAIR_HINT}"
            )

    def _commit_manifest(self, manifest: Manifest) -> None:
        try:
            write_manifest(self.path, manifest)
        except OSError as e:
            raise DatabaseError(f"cannot write {self.path / 'nanodb.json'}: {e.strerror}") from None

    @property
    def model(self) -> ClipModel:
        """The CLIP model, loaded on first use (searching by vector needs none)."""
        if self._model is None:
            self._model = load_model(self.spec, self.settings.device)
        return self._model

    # ----------------------------------------------------------------- size and items
    def __len__(self) -> int:
        """Number of live (not deleted) items."""
        return self.index.count - len(self._deleted)

    @property
    def dim(self) -> int:
        return self._manifest.dim

    @property
    def unsaved(self) -> int:
        """Items added or deleted since the last save."""
        return (self.index.count - self._manifest.count) + (len(self._deleted) - self._manifest.deleted)

    @property
    def vectors(self) -> np.ndarray:
        """All stored float16 vectors (deleted rows included; see Item.deleted)."""
        return self.index.vectors

    def path_of(self, index: int) -> str | None:
        rec = self._items[index]
        if rec["path_len"] == 0:
            return None
        off = int(rec["path_off"])
        return os.fsdecode(bytes(self._paths[off : off + int(rec["path_len"])]))

    def metadata_of(self, index: int) -> dict[str, Any]:
        rec = self._items[index]
        if rec["meta_len"] == 0:
            return {}
        off = int(rec["meta_off"])
        return json.loads(self._meta[off : off + int(rec["meta_len"])])

    def __getitem__(self, index: int) -> Item:
        if not -self.index.count <= index < self.index.count:
            raise IndexError(f"item {index} does not exist (the database has {self.index.count} rows)")
        index %= self.index.count
        rec = self._items[index]
        return Item(
            index=index,
            path=self.path_of(index),
            vector=self.index.vectors[index].copy(),
            size=int(rec["size"]),
            mtime=float(rec["mtime"]),
            hash=bytes(rec["hash"]).hex(),
            metadata=self.metadata_of(index),
            deleted=bool(self.index.dead[index]),
        )

    def __iter__(self):
        for i in range(self.index.count):
            if not self.index.dead[i]:
                yield self[i]

    def index_of(self, path: str | os.PathLike) -> int | None:
        """The live item stored for a file path, if any."""
        return self._paths_to_index().get(os.path.abspath(os.path.expanduser(os.fspath(path))))

    def _paths_to_index(self) -> dict[str, int]:
        with self._lock:
            if self._path_index is None:
                dead = self.index.dead
                self._path_index = {
                    p: i for i in range(self.index.count) if not dead[i] and (p := self.path_of(i)) is not None
                }
            return self._path_index

    # ----------------------------------------------------------------- adding
    def _append(self, vectors: np.ndarray, records: list[dict[str, Any]]) -> list[int]:
        """Append rows: `records` hold path, size, mtime, hash (bytes) and metadata (dict) per vector."""
        self._check_writable()
        vectors = np.asarray(vectors, np.float32).reshape(-1, self.dim)
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        if not np.isfinite(vectors).all() or (norms == 0).any():
            raise ValueError("vectors must be finite and non-zero")
        vectors = vectors / norms
        with self._lock:
            start = self.index.count
            n = start + len(vectors)
            if n > len(self._items):
                grown = np.zeros(max(n, int(len(self._items) * 1.5)), ITEM_DTYPE)
                grown[:start] = self._items[:start]
                self._items = grown
            path_index = self._path_index
            for i, rec in enumerate(records):
                row = self._items[start + i]
                path = rec.get("path")
                pbytes = os.fsencode(path) if path else b""
                row["path_off"], row["path_len"] = len(self._paths), len(pbytes)
                self._paths += pbytes
                meta = rec.get("metadata")
                mbytes = json.dumps(meta, ensure_ascii=False, default=str).encode() if meta else b""
                row["meta_off"], row["meta_len"] = len(self._meta), len(mbytes)
                self._meta += mbytes
                row["size"], row["mtime"], row["hash"] = rec.get("size", -1), rec.get("mtime", 0.0), rec["hash"]
                if path and path_index is not None:
                    path_index[path] = start + i
                if self._hash_index is not None:
                    self._hash_index[bytes(rec["hash"])] = start + i
            self.index.append(vectors)  # last: a concurrent search sees complete rows only
        return list(range(start, n))

    def _add_scanned(self, images, vectors: np.ndarray) -> tuple[int, int]:
        """Append decoded files; a file indexed before is replaced. Returns (added, updated)."""
        with self._lock:
            paths = self._paths_to_index()
            old = [paths.get(im.path) for im in images]
            records = [
                {"path": im.path, "size": im.size, "mtime": im.mtime, "hash": im.hash} for im in images
            ]
            self._append(vectors, records)
            replaced = [i for i in old if i is not None]
            if replaced:
                self._delete_rows(replaced)
        return len(images) - len(replaced), len(replaced)

    def _is_unchanged(self, found) -> bool:
        i = self._paths_to_index().get(found.path)
        if i is None:
            return False
        rec = self._items[i]
        return int(rec["size"]) == found.size and float(rec["mtime"]) == found.mtime

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
        self._check_writable()
        records: list[dict[str, Any]] = []
        if isinstance(items, np.ndarray) or (isinstance(items, list) and items and _is_number_list(items)):
            vectors = np.asarray(items, np.float32)
            if vectors.ndim == 1:
                vectors = vectors[None]
            if vectors.ndim != 2 or vectors.shape[1] != self.dim:
                raise ValueError(f"vectors must have shape (n, {self.dim}), not {vectors.shape}")
            records = [{"hash": hashlib.blake2b(v.tobytes(), digest_size=16).digest()} for v in vectors]
        else:
            images = items if isinstance(items, (list, tuple)) else [items]
            decoded, vectors = [], None
            for im in images:
                if isinstance(im, (str, os.PathLike)):
                    p = os.path.abspath(os.path.expanduser(os.fspath(im)))
                    result = self._decode_here(p)
                    if isinstance(result, DecodeFailure):
                        raise ValueError(f"cannot add {p}: {result.reason}")
                    decoded.append(result.pixels)
                    records.append({"path": p, "size": result.size, "mtime": result.mtime, "hash": result.hash})
                else:
                    decoded.append(np.asarray(self.model.pixel_transform(to_rgb(im)), np.uint8))
                    records.append({"hash": hashlib.blake2b(decoded[-1].tobytes(), digest_size=16).digest()})
            vectors = self.model.encode_pixels(np.stack(decoded)) if decoded else np.zeros((0, self.dim))
        n = len(records)
        if isinstance(metadata, dict) or metadata is None:
            metas = [metadata] * n
        else:
            metas = list(metadata)
            if len(metas) != n:
                raise ValueError(f"got {len(metas)} metadata entries for {n} items")
        if paths is not None:
            if len(paths) != n:
                raise ValueError(f"got {len(paths)} paths for {n} items")
            for rec, p in zip(records, paths):
                rec["path"] = p
        for rec, meta in zip(records, metas):
            rec["metadata"] = meta
        indices = self._append(vectors, records)
        if self.autosave and self.unsaved >= self.settings.autosave_every:
            self.save()
        return indices

    def _decode_here(self, path: str):
        """Decode one file in this process, exactly as a decode worker would."""
        _init_worker(self.model.pixel_transform, self.settings.max_image_pixels)
        return decode_file(path)

    def delete(self, indices: Iterable[int]) -> None:
        """Remove items from search results and from the database at the next save."""
        self._check_writable()
        with self._lock:
            self._delete_rows([int(i) for i in indices])

    def _delete_rows(self, indices: list[int]) -> None:
        fresh = [i for i in indices if 0 <= i < self.index.count and not self.index.dead[i]]
        if not fresh:
            return
        if self._path_index is not None:
            for i in fresh:
                p = self.path_of(i)
                if p is not None and self._path_index.get(p) == i:
                    del self._path_index[p]
        self.index.delete(fresh)
        self._deleted.extend(fresh)

    # ----------------------------------------------------------------- scanning
    def scan(self, *paths: str | os.PathLike, progress: bool = False, excludes=None):
        """Add the images under folders (recursively) or single files; returns a ScanReport.

        Files already indexed with the same size and mtime are skipped; changed ones are re-embedded.
        """
        return asyncio.run(self.scan_async(*paths, progress=progress, excludes=excludes))

    async def scan_async(self, *paths, progress: bool = False, excludes=None, report=None, running=None):
        from pipeline.coordinator import ScanPipeline, ScanReport

        self._check_writable()
        report = report or ScanReport()
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=0, unit="img", desc="scanning", dynamic_ncols=True, disable=None)

            def show(r):
                bar.total = r.found
                bar.n = r.done
                bar.set_postfix(added=r.added, skipped=r.failed, refresh=False)
                bar.refresh()

            report.on_change = show
        pipeline = ScanPipeline(
            self,
            paths,
            self.decode_pool,
            self.settings.batch_size,
            excludes=excludes,
            autosave_every=self.settings.autosave_every if self.autosave else None,
            report=report,
            running=running,
        )
        self.active_scans.append(report)
        try:
            await pipeline.run()
        finally:
            self.active_scans.remove(report)
            if bar is not None:
                bar.close()
        if self.autosave:
            await asyncio.to_thread(self.save)
        return report

    @property
    def decode_pool(self):
        from pipeline.decode import ImageDecodePool

        if self._decode_pool is None:
            self._decode_pool = ImageDecodePool(
                self.model.pixel_transform, self.settings.decode_workers, self.settings.max_image_pixels
            )
        return self._decode_pool

    # ----------------------------------------------------------------- searching
    def embed_query(self, query: Any) -> np.ndarray:
        """A query as a unit float32 vector: text, image path, PIL image, item index (int) or vector."""
        if isinstance(query, np.ndarray):
            v = np.asarray(query, np.float32).reshape(-1)
            if v.shape != (self.dim,):
                raise ValueError(f"a query vector must have {self.dim} values, not {v.size}")
        elif isinstance(query, (int, np.integer)) and not isinstance(query, bool):
            if not 0 <= query < self.index.count or self.index.dead[query]:
                raise ValueError(f"no item with index {query}")
            v = self.index.vectors[query].astype(np.float32)
        elif isinstance(query, os.PathLike) or (isinstance(query, str) and _looks_like_image_file(query)):
            p = os.path.abspath(os.path.expanduser(os.fspath(query)))
            result = self._decode_here(p)
            if isinstance(result, DecodeFailure):
                raise ValueError(f"cannot search by {p}: {result.reason}")
            v = self.model.encode_pixels(result.pixels[None])[0]
        elif isinstance(query, str):
            text = query.strip()
            if not text:
                raise ValueError("empty query: type some words, or give an image path")
            v = combined_vector(text, self.embed_query) if is_combined(text) else self.model.encode_text([text])[0]
        elif hasattr(query, "convert") and hasattr(query, "size"):  # a PIL image
            v = self.model.encode_images([query])[0]
        else:
            raise TypeError(f"cannot search by a {type(query).__name__}")
        norm = np.linalg.norm(v)
        if not np.isfinite(norm) or norm == 0:
            raise ValueError("the query vector must be finite and non-zero")
        return v / norm

    def search(self, query: Any, k: int | None = None) -> list[SearchResult] | list[list[SearchResult]]:
        """The k nearest items by cosine similarity, best first.

        `query`: text, an image path, a PIL image, an item index, a vector (dim,), or a batch: a list of
        those or a (Q, dim) array, which returns one list of results per query.
        """
        k = self.settings.k if k is None else int(k)
        if k <= 0:
            raise ValueError("k must be at least 1")
        batched = isinstance(query, list) or (isinstance(query, np.ndarray) and query.ndim == 2)
        queries = list(query) if batched else [query]
        vectors = np.stack([self.embed_query(q) for q in queries]) if queries else np.zeros((0, self.dim))
        with self._lock:  # a compaction renumbers rows: indices and paths must come from one state
            indices, scores = self.index.search(vectors, k)
            results = [
                [SearchResult(int(i), self.path_of(int(i)), float(s), self.metadata_of(int(i))) for i, s in zip(ri, rs)]
                for ri, rs in zip(indices, scores)
            ]
        return results if batched else results[0]

    def validate(self, batch: int = 256) -> "ValidationReport":
        """Query every stored vector; each must find itself (or a duplicate) first.

        A duplicate is a row whose similarity ties with the item's own: the same image embedded in two
        batches can differ in the last float16 bit, and either may then come first."""
        dead = self.index.dead
        live = np.flatnonzero(~dead)
        vectors = self.index.vectors
        groups: dict[bytes, list[int]] = {}
        for i in live:
            groups.setdefault(vectors[i].tobytes(), []).append(int(i))
        failures = []
        for lo in range(0, len(live), batch):
            ids = live[lo : lo + batch]
            queries = vectors[ids].astype(np.float32)
            top, scores = self.index.search(queries, 1)
            own = np.einsum("ij,ij->i", queries, queries)
            for i, t, best, self_score in zip(ids, top[:, 0], scores[:, 0], own):
                if t != i and best > self_score + SCORE_TIE:
                    failures.append((int(i), int(t)))
        dups = [g for g in groups.values() if len(g) > 1]
        return ValidationReport(len(live), failures, dups)

    # ----------------------------------------------------------------- saving
    def save(self) -> bool:
        """Commit everything added or deleted since the last save; crash-safe, cost ~ new items.
        Returns False when there was nothing to save."""
        self._check_writable()
        with self._save_lock:
            with self._lock:  # a consistent snapshot; appends may go on while the bytes are written
                m = self._manifest
                n = self.index.count
                if n == m.count and len(self._deleted) == m.deleted:
                    return False
                if len(self._deleted) > self.settings.compact_dead_fraction * n:
                    self._compact()
                    return True
                new = Manifest(**{**m.__dict__})
                vecs = self.index.vectors[m.count : n].copy()
                items = self._items[m.count : n].copy()
                paths = bytes(self._paths[m.paths_bytes :])
                meta = bytes(self._meta[m.meta_bytes :])
                deleted = np.asarray(self._deleted[m.deleted :], "<i8")
                codes, scales = self.index.codes[m.compact : n].ravel(), self.index.scales[m.compact : n].astype("<f4")
                new.count, new.paths_bytes, new.meta_bytes = n, m.paths_bytes + len(paths), m.meta_bytes + len(meta)
                new.compact = n
                new.deleted = len(self._deleted)
            log.info("saving %s: %d items", self.path, n)
            # 1-D vectors: an empty 2-D array (a save of deletions alone) cannot be cast to bytes
            appended = {"vectors": vecs.astype("<f2").ravel(), "items": items, "paths": paths, "meta": meta, "deleted": deleted,
                        "codes": codes, "scales": scales.ravel()}
            if m.checksums is not None:
                new.checksums = {k: zlib.crc32(memoryview(appended[k]).cast("B"), m.checksums[k]) for k in DATA_FILES}
            try:
                append_at(m.file(self.path, "vectors"), m.count * m.dim * 2, appended["vectors"])
                append_at(m.file(self.path, "items"), m.count * ITEM_DTYPE.itemsize, items)
                append_at(m.file(self.path, "paths"), m.paths_bytes, paths)
                append_at(m.file(self.path, "meta"), m.meta_bytes, meta)
                append_at(m.file(self.path, "deleted"), m.deleted * 8, deleted)
                append_at(m.file(self.path, "codes"), m.compact * m.dim, appended["codes"])
                append_at(m.file(self.path, "scales"), m.compact * SCALES_BYTES, appended["scales"])
                write_manifest(self.path, new)
            except OSError as e:
                raise DatabaseError(
                    f"save to {self.path} failed ({e.strerror or e}); the previous save is intact and "
                    f"nothing is lost from memory: free some space and save again"
                ) from None
            self._manifest = new
            log.info("saved %s: %d items", self.path, len(self))
            return True

    @classmethod
    def repair(cls, path: str | os.PathLike, model: str | None = None, pretrained: str | None = None, *,
               seed: int | None = None, settings: Settings | None = None) -> RepairReport:
        """Make a damaged database openable: commit the longest consistent prefix of its items.

        `model`/`pretrained`/`seed` (else the settings) are used only when the manifest is unreadable.
        Items lost this way come back by rescanning their folders."""
        root = Path(path).expanduser().absolute()
        settings = settings or load_settings()
        if not root.is_dir():
            raise DatabaseError(f"no nanodb database at {root}")
        lock = WriteLock(root)
        lock.acquire()
        try:
            def from_settings() -> Manifest:
                spec = ModelSpec(model or settings.model, _as_pretrained(pretrained or settings.pretrained),
                                 settings.seed if seed is None else seed)
                dim = load_model(spec, settings.device).dim
                return Manifest(spec.name, spec.pretrained, spec.weights_id, spec.seed, dim)

            try:
                return repair(root, from_settings)
            except OSError as e:
                raise DatabaseError(f"cannot repair {root}: {e.strerror or e}") from None
        finally:
            lock.release()

    def _compact(self) -> None:
        """Rewrite the database without its deleted rows as generation G+1; the caller holds both locks.

        Crash-safe: the new files are complete and fsynced before the manifest names them, and the old
        generation is deleted only after. Renumbers the items (indices shown earlier become stale).
        """
        m = self._manifest
        live = np.flatnonzero(~self.index.dead)
        dropped = self.index.count - len(live)
        vectors = self.index.vectors[live]
        items = np.zeros(max(len(live), 1024), ITEM_DTYPE)
        items[: len(live)] = self._items[live]
        paths, meta = bytearray(), bytearray()
        for row in items[: len(live)]:
            for off, length, data, old in (("path_off", "path_len", paths, self._paths), ("meta_off", "meta_len", meta, self._meta)):
                start = int(row[off])
                row[off] = len(data)
                data += old[start : start + int(row[length])]
        new = Manifest(**{**m.__dict__})
        new.generation, new.count, new.deleted, new.compact = m.generation + 1, len(live), 0, len(live)
        new.paths_bytes, new.meta_bytes = len(paths), len(meta)
        data = {
            "vectors": vectors.astype("<f2").ravel(), "items": items[: len(live)], "paths": bytes(paths),
            "meta": bytes(meta), "deleted": b"", "codes": self.index.codes[live].ravel(),
            "scales": self.index.scales[live].astype("<f4").ravel(),
        }
        new.checksums = {kind: zlib.crc32(memoryview(data[kind]).cast("B")) for kind in DATA_FILES}
        log.info("compacting %s: %d items", self.path, len(live))
        try:
            write_generation(self.path, new, data)
            write_manifest(self.path, new)
        except OSError as e:
            raise DatabaseError(
                f"compacting {self.path} failed ({e.strerror or e}); the previous save is intact and "
                f"nothing is lost from memory: free some space and save again"
            ) from None
        index = VectorIndex(self.dim, self.index.backend)
        index.append(vectors)
        self.index, self._items, self._paths, self._meta = index, items, paths, meta
        self._deleted, self._path_index, self._hash_index = [], None, None
        self._manifest = new
        try:
            remove_other_generations(self.path, new.generation)
        except OSError as e:  # harmless: they are removed at the next open
            log.warning("could not remove old data files in %s: %s", self.path, e)
        log.info("compacted %s: %d deleted rows dropped, %d kept", self.path, dropped, len(live))

    # ----------------------------------------------------------------- changes seen in watched folders
    def move_paths(self, moves: Iterable[tuple[str, str]]) -> int:
        """Re-point items to new file paths (renames, moves) without re-embedding: each gets a new row
        that copies its vector and record, and the old row is deleted. Returns how many moved."""
        self._check_writable()
        with self._lock:
            paths = self._paths_to_index()
            rows, records, replaced = [], [], []
            for old, new in moves:
                i = paths.get(_absolute(old))
                if i is None:
                    continue
                new = _absolute(new)
                rec = self._items[i]
                rows.append(i)
                if new in paths:
                    replaced.append(paths[new])
                # The old size and mtime (a rename keeps both), not the file's now: if it has changed
                # since the move, the next scan sees the difference and re-embeds it.
                records.append({"path": new, "size": int(rec["size"]), "mtime": float(rec["mtime"]),
                                "hash": bytes(rec["hash"]),
                                "metadata": self.metadata_of(i) or None})
            if rows:
                self._append(self.index.vectors[rows], records)
                self._delete_rows(rows + replaced)
        return len(rows)

    def move_folder(self, old: str, new: str) -> int:
        """Re-point every item under folder `old` to the same place under `new`."""
        old, new = _absolute(old) + os.sep, _absolute(new) + os.sep
        with self._lock:
            moves = [(p, new + p[len(old):]) for p in self._paths_to_index() if p.startswith(old)]
        return self.move_paths(moves)

    def forget(self, paths: Iterable[str]) -> int:
        """Delete the items of these files, and of every file under those that are folders."""
        self._check_writable()
        with self._lock:
            index = self._paths_to_index()
            rows = []
            for p in paths:
                p = _absolute(p)
                if p in index:
                    rows.append(index[p])
                prefix = p + os.sep
                rows.extend(i for q, i in index.items() if q.startswith(prefix))
            self._delete_rows(rows)
        return len(rows)

    def add_known_file(self, path: str, size: int, mtime: float, content_hash: bytes) -> int | None:
        """Index a file whose exact bytes are already known (a copy, or a move that arrived as a delete
        then a create) with the stored vector, without decoding. Returns its index, None if unknown."""
        self._check_writable()
        with self._lock:
            if self._hash_index is None:  # deleted rows too: their vectors stay until compaction
                hashes = self._items["hash"][: self.index.count]
                self._hash_index = {bytes(h): i for i, h in enumerate(hashes)}
            i = self._hash_index.get(bytes(content_hash))
            if i is None:
                return None
            found = DecodedFile(_absolute(path), size, mtime, bytes(content_hash))
            self._add_scanned([found], self.index.vectors[i : i + 1])
            return self._paths_to_index()[found.path]

    def _check_writable(self) -> None:
        if self.read_only:
            raise DatabaseError(f"{self.path} is open read-only")

    def close(self) -> None:
        if self._decode_pool is not None:
            self._decode_pool.close()
            self._decode_pool = None
        if self._write_lock is not None:
            self._write_lock.release()
            self._write_lock = None

    def __enter__(self) -> "NanoDB":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"NanoDB({str(self.path)!r}, {self.spec.describe()}, {len(self)} items)"


@dataclass
class ValidationReport:
    checked: int
    failures: list[tuple[int, int]]  # (item, what it found first instead)
    duplicates: list[list[int]]  # groups of items with identical vectors

    @property
    def ok(self) -> bool:
        return not self.failures


@dataclass
class DecodedFile:
    """What the appender needs to know of a file, besides its vector."""

    path: str
    size: int
    mtime: float
    hash: bytes


def _absolute(path: str | os.PathLike) -> str:
    return os.path.abspath(os.path.expanduser(os.fspath(path)))


def _as_pretrained(value: str) -> str:
    """A checkpoint file is remembered by absolute path; tags and 'none' as they are."""
    if value and value.lower() != "none" and (os.sep in value or os.path.isfile(value)):
        return os.path.abspath(os.path.expanduser(value))
    return "none" if not value or value.lower() == "none" else value


def _is_number_list(items: list) -> bool:
    first = items[0]
    return isinstance(first, (int, float, np.floating)) or (
        isinstance(first, (list, tuple, np.ndarray)) and len(first) and isinstance(first[0], (int, float, np.floating))
    )


def _looks_like_image_file(text: str) -> bool:
    return "\n" not in text and len(text) < 4096 and is_image_name(text.strip()) and os.path.isfile(
        os.path.expanduser(text.strip())
    )

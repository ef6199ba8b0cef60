"""A sharded database on a Ray cluster: the items live in N shards, each an ordinary nanodb store folder
owned by one Ray actor (`Shard`, search.shard); the coordinator (`ShardedStore`, in the NanoDB process)
holds no per-item table and no saved vectors, only the actors (and each shard's writes until it saves).

Routing: a file goes to the shard its content hash names, so byte-identical files meet in one shard and
share one vector there; a video's frames go by the video's path, so they stay together. A changed file
whose new content lands in another shard is dropped from the others after it is added (a coordinator
killed in between leaves it in two shards: a rescan sees that and indexes it again, once).

Item indices are global: row r of shard s is item r * N + s. A search is answered by every shard within
its own rows (the local searcher: filters, minimum similarity, collapsed duplicates, a video's frames as
one result) and merged best first, ties to the lower index; as a content group and a video never span
two shards, the merge equals one store's answer.

Losing a node: a shard's actor is restarted by Ray (on another node where its folder is on shared
storage) and reopens its folder, losing what it had not saved. The coordinator keeps each shard's
writes since its last save (a journal: the vectors of its unsaved items), and every call carries the
actor instance it is meant for: a restarted actor refuses calls meant for its predecessor until the
coordinator has replayed the journal to it, so nothing a scan counted as added is lost. Calls wait up
to `timeout` seconds for it, then fail with ShardUnavailable naming the shard.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from nanodb.media.paths import absolute_path
from nanodb.media.record import FileRecord
from nanodb.search.local import ValidationReport
from nanodb.search.request import SearchRequest, SearchResult, SearchResults
from nanodb.search.shard import RESTARTED, WRITES, Shard, route_key, shard_of
from nanodb.storage.cluster_manifest import (
    ClusterManifest,
    ShardLocation,
    read_cluster_manifest,
    write_cluster_manifest,
)
from nanodb.storage.format import DatabaseError, Manifest
from nanodb.storage.store import Item

log = logging.getLogger(__name__)

SHARD_TIMEOUT_S = 60.0  # how long a call waits for a restarting shard before ShardUnavailable
ITEMS_PER_CALL = 4096  # items fetched at a time when iterating over a sharded database
# the unsaved items kept per shard to send again after a restart: past it, a restart is an error instead
JOURNAL_MAX_ITEMS = 20_000


class ShardUnavailable(DatabaseError):
    """A shard did not answer (its node is down and its actor could not be restarted in time)."""


class ShardedStore:
    """The coordinator's view of a sharded database: the subset of ItemStore that NanoDB, the query
    encoder and the interfaces use, and the pipeline's IndexSink, each call sent to the shards that hold
    the items (routed by content hash, or asked all at once). Indices are global (module docstring)."""

    def __init__(self, root: Path, manifest: ClusterManifest, *, read_only: bool, create: bool,
                 compact_dead_fraction: float, gpus: float = 0, timeout: float = SHARD_TIMEOUT_S):
        import ray

        self.root = root
        self.path = str(root)  # for the pipeline: never scanned
        self.read_only = read_only
        self.cluster_manifest = manifest
        self.manifest = dataclasses.replace(manifest.model, roots=manifest.roots)
        self.timeout = timeout
        self.actors = []
        # per shard: its actor instance, its writes since its last save [(sequence, method, args)], what its
        # folder held then, and the saves sent and not answered yet [(sequence, that save's mark)]
        self._instances: list[str | None] = [None] * len(manifest.shards)
        self._journal: list[list[tuple[int, str, tuple]]] = [[] for _ in manifest.shards]
        self._marks: list[tuple | None] = [None] * len(manifest.shards)
        self._saving: list[list[int]] = [[] for _ in manifest.shards]
        self._saved_upto = [0] * len(manifest.shards)  # the sequence number of each shard's last save
        self._overflow: list[int | None] = [None] * len(manifest.shards)  # the write that overflowed the journal
        self._journaled = [0] * len(manifest.shards)  # the items in each shard's journal
        self._sequence = 0
        self._lock = threading.RLock()
        for where in manifest.shards:
            pinned = {} if where.node is None else {"resources": {f"node:{where.node}": 0.001}}
            actor = ray.remote(Shard).options(
                num_cpus=0, num_gpus=gpus, max_restarts=-1, max_task_retries=-1,
                scheduling_strategy="SPREAD" if where.node is None else "DEFAULT", **pinned)
            self.actors.append(actor.remote(where.folder, manifest.model, read_only, compact_dead_fraction))
        try:
            if create:
                self.each_shard("create")
            self._instances = [i for i, _ in self._get([a.call.remote(None, "info") for a in self.actors],
                                                     range(self.shards))]
            self._marks = self.each_shard("saved_mark")
        except BaseException:
            self.close()
            raise

    @classmethod
    def create(cls, root: Path, model: Manifest, shards: int, shard_dir: str | None, *,
               compact_dead_fraction: float, gpus: float = 0) -> ShardedStore:
        """A new sharded database at `root`: shard folders `root/shard-NNN`, or, with `shard_dir`, folders
        on the disk of the node each shard starts on (pinned to that node from then on)."""
        if shards < 1:
            raise ValueError(f"shards must be at least 1, not {shards}")
        locations = [ShardLocation(str(root / f"shard-{i:03d}")) for i in range(shards)]
        if shard_dir is not None:
            locations = [ShardLocation(os.path.join(shard_dir, f"{root.name}-shard-{i:03d}"), node)
                         for i, node in enumerate(_spread_nodes(shards))]
        manifest = ClusterManifest(dataclasses.replace(model, roots={}), locations)
        write_cluster_manifest(root, manifest)
        return cls(root, manifest, read_only=False, create=True, compact_dead_fraction=compact_dead_fraction,
                   gpus=gpus)

    @classmethod
    def open(cls, root: Path, *, read_only: bool, compact_dead_fraction: float, gpus: float = 0) -> ShardedStore:
        return cls(root, read_cluster_manifest(root), read_only=read_only, create=False,
                   compact_dead_fraction=compact_dead_fraction, gpus=gpus)

    # ----------------------------------------------------------------- calling the shards
    @property
    def shards(self) -> int:
        return len(self.actors)

    def _get(self, refs: list, shards: Sequence[int]) -> list:
        import ray

        try:
            return ray.get(refs, timeout=self.timeout)
        except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError) as e:
            names = ", ".join(f"{s} ({self.cluster_manifest.shards[s].folder})" for s in shards)
            raise ShardUnavailable(f"shard {names} did not answer within {self.timeout:.0f} s: its node may be "
                                   f"down ({str(e).splitlines()[0][:200]}); try again once it is back") from None
        except ray.exceptions.RayTaskError as e:  # the shard's own error (a DatabaseError, ...): as itself
            raise (e.cause if isinstance(e.cause, Exception) else e.as_instanceof_cause()) from None

    def each_shard(self, method: str, *args) -> list:
        """Call `method` on every shard at once; their answers in shard order."""
        answers = self._on({s: (method, *args) for s in range(self.shards)})
        return [answers[s] for s in range(self.shards)]

    def _on(self, calls: dict[int, tuple]) -> dict[int, Any]:
        """{shard: (method, *args)} -> {shard: answer}, the calls made at once, each to the shard's actor
        instance the journal is in step with; a shard restarted meanwhile gets its journal replayed,
        then the call again. A write is journaled once answered; a save empties the journal of what it
        committed (the calls sent before it: a shard runs its calls in the order they were sent)."""
        answers: dict[int, Any] = {}
        while calls:
            shards = list(calls)
            with self._lock:  # numbered in the order sent
                self._sequence += 1
                sequence = self._sequence
                instances = {s: self._instances[s] for s in shards}
                for s in shards:
                    if calls[s][0] == "save":
                        self._saving[s].append(sequence)
                refs = [self.actors[s].call.remote(instances[s], *calls[s]) for s in shards]
            try:
                got = self._get(refs, shards)
            finally:
                with self._lock:
                    for s in shards:
                        if calls[s][0] == "save":
                            self._saving[s].remove(sequence)
            again = {}
            for s, (instance, answer) in zip(shards, got):
                if instance == RESTARTED:
                    self._replay(s, instances[s], answer)
                    again[s] = calls[s]
                    continue
                answers[s] = answer
                if calls[s][0] == "save":
                    mark = self._get([self.actors[s].saved_mark.remote()], [s])[0]
                with self._lock:
                    if calls[s][0] in WRITES and sequence > self._saved_upto[s]:
                        self._journal[s].append((sequence, calls[s][0], calls[s][1:]))
                        self._journaled[s] += _items(calls[s][0], calls[s][1:])
                        if self._journaled[s] > JOURNAL_MAX_ITEMS:  # too many to keep: dropped
                            self._journal[s], self._journaled[s], self._overflow[s] = [], 0, sequence
                    elif calls[s][0] == "save" and self._instances[s] == instance:
                        self._journal[s] = [e for e in self._journal[s] if e[0] > sequence]
                        self._journaled[s] = sum(_items(m, a) for _, m, a in self._journal[s])
                        self._marks[s], self._saved_upto[s] = mark, max(self._saved_upto[s], sequence)
                        if self._overflow[s] is not None and self._overflow[s] < sequence:
                            self._overflow[s] = None
            calls = again
        return answers

    def _replay(self, s: int, lost: str | None, instance: str) -> None:
        """Shard `s` restarted (its actor instance `lost` is gone, `instance` runs now): send it the
        writes it lost, the ones since its last save, in order; once per restart, however many calls
        found it. Where a save that no one answered reached the folder, what it saved is not sent."""
        with self._lock:
            if self._instances[s] != lost:
                return  # replayed already by another call
            journal = self._journal[s]
            if self._overflow[s] is not None:
                self._instances[s], self._journal[s], self._journaled[s], self._overflow[s] = instance, [], 0, None
                raise DatabaseError(f"shard {s} ({self.cluster_manifest.shards[s].folder}) restarted and lost what it "
                                    f"had not saved (over {JOURNAL_MAX_ITEMS} items, too many to keep to send "
                                    f"again): save more often (--autosave) and scan again to add them")
            while True:
                mark = self._get([self.actors[s].saved_mark.remote()], [s])[0]
                if mark != self._marks[s] and self._saving[s]:  # a save in flight committed before the restart
                    journal = [e for e in journal if e[0] > self._saving[s][0]]
                log.warning("shard %d (%s) restarted: sending it again the %d changes it had not saved", s,
                            self.cluster_manifest.shards[s].folder, len(journal))
                for _, method, args in journal:
                    answer = self._get([self.actors[s].call.remote(instance, method, *args)], [s])[0]
                    if answer[0] == RESTARTED:  # restarted again meanwhile: from the start
                        instance = answer[1]
                        break
                else:
                    break
            self._instances[s], self._journal[s], self._marks[s] = instance, journal, mark
            self._journaled[s] = sum(_items(m, a) for _, m, a in journal)

    def _split(self, index: int) -> tuple[int, int]:
        """Global item index -> (shard, row)."""
        if index < 0:
            raise IndexError(f"item {index} does not exist (a sharded database counts no items from the end)")
        return index % self.shards, index // self.shards

    def _global(self, shard: int, row: int) -> int:
        return row * self.shards + shard

    def _route(self, records: Sequence[FileRecord]) -> list[int]:
        return [shard_of(route_key(r), self.shards) for r in records]

    # ----------------------------------------------------------------- reading
    @property
    def dim(self) -> int:
        return self.manifest.dim

    def __len__(self) -> int:
        return sum(i["items"] for i in self.each_shard("info"))

    @property
    def unsaved(self) -> int:
        return sum(i["unsaved"] for i in self.each_shard("info"))

    @property
    def state(self) -> tuple[int, int, int]:
        infos = self.each_shard("info")
        return hash(tuple(tuple(i["state"]) for i in infos)), sum(i["rows"] for i in infos), \
            sum(i["items"] for i in infos)

    def _item(self, index: int) -> Item | None:
        shard, row = self._split(index)
        item = self._on({shard: ("items", [row])})[shard][0]
        return None if item is None else dataclasses.replace(item, index=index)

    def item(self, index: int) -> Item:
        item = self._item(index)
        if item is None:
            raise IndexError(f"item {index} does not exist or was deleted")
        return item

    def is_live(self, index: int) -> bool:
        return index >= 0 and self._item(index) is not None

    def path_of(self, index: int) -> str | None:
        item = self._item(index)
        return None if item is None else item.path

    def metadata_of(self, index: int) -> dict[str, Any]:
        item = self._item(index)
        return {} if item is None else item.metadata

    def vector(self, index: int) -> np.ndarray:
        return self.item(index).vector

    def live_items(self) -> Iterator[Item]:
        """Every live item, shard by shard, fetched ITEMS_PER_CALL at a time."""
        for s in range(self.shards):
            after = -1
            while batch := self._on({s: ("live_items", after, ITEMS_PER_CALL)})[s]:
                for item in batch:
                    yield dataclasses.replace(item, index=self._global(s, item.index))
                after = batch[-1].index

    def rows_of(self, path: str) -> list[int]:
        return sorted(self._global(s, r) for s, rows in enumerate(self.each_shard("rows_of", path)) for r in rows)

    def index_of(self, path: str | os.PathLike) -> int | None:
        rows = self.rows_of(absolute_path(path))
        return rows[0] if rows else None

    def row_with_hash(self, content_hash: bytes) -> int | None:
        s = shard_of(bytes(content_hash), self.shards)
        row = self._on({s: ("row_with_hash", bytes(content_hash))})[s]
        return None if row is None else self._global(s, row)

    def has_content(self, content_hash: bytes) -> bool:
        return self.row_with_hash(content_hash) is not None

    def metadata_of_content(self, content_hash: bytes) -> dict[str, Any] | None:
        row = self.row_with_hash(content_hash)
        return None if row is None else self.metadata_of(row)

    def indexed_paths(self) -> list[str]:
        return [p for paths in self.each_shard("indexed_paths") for p in paths]

    def unchanged_files(self, files: Iterable[tuple[str, int, float]]) -> set[str]:
        """Asked of every shard at once: a path held by two shards (a coordinator killed between adding
        a changed file to its new shard and dropping it from the old one) counts as changed."""
        files = list(files)
        if not files:
            return set()
        answers = self.each_shard("known_files", files)
        held: dict[str, int] = {}
        for paths, _ in answers:
            for p in paths:
                held[p] = held.get(p, 0) + 1
        return {p for _, unchanged in answers for p in unchanged if held[p] == 1}

    def failed_before(self, files: Iterable[tuple[str, int, float]]) -> set[str]:
        by_shard: dict[int, list] = {}
        for f in files:
            by_shard.setdefault(self._path_shard(f[0]), []).append(f)
        return {p for paths in self._on({s: ("failed_before", fs) for s, fs in by_shard.items()}).values()
                for p in paths}

    def _path_shard(self, path: str) -> int:
        """The shard that remembers a file's decode failure (by its path: it has no content hash)."""
        return shard_of(hashlib.blake2b(os.fsencode(path), digest_size=16).digest(), self.shards)

    def validate(self, batch: int = 256) -> ValidationReport:
        reports = self.each_shard("validate", batch)
        return ValidationReport(
            sum(r.checked for r in reports),
            [(self._global(s, a), self._global(s, b)) for s, r in enumerate(reports) for a, b in r.failures],
            [[self._global(s, i) for i in g] for s, r in enumerate(reports) for g in r.duplicates])

    # ----------------------------------------------------------------- writing
    def check_writable(self) -> None:
        if self.read_only:
            raise DatabaseError(f"{self.root} is open read-only")

    def append(self, vectors: np.ndarray, records: Sequence[FileRecord]) -> list[int]:
        """Each vector to the shard of its record's route key; returns the new items' global indices."""
        self.check_writable()
        vectors = np.asarray(vectors, np.float32).reshape(-1, self.dim)
        route = np.asarray(self._route(records), int)
        parts = {s: ("append", vectors[route == s], [r for r, t in zip(records, route) if t == s])
                 for s in np.unique(route).tolist()}
        rows = self._on(parts)
        indices = np.empty(len(records), np.int64)
        for s, got in rows.items():
            indices[route == s] = [self._global(s, r) for r in got]
        return indices.tolist()

    def add_files(self, files: Sequence[FileRecord], vectors: np.ndarray | None) -> tuple[int, int]:
        """Each file to its shard; then its path dropped from the other shards (a changed file whose
        content moved it), which makes an added file there an updated one here."""
        self.check_writable()
        route = np.asarray(self._route(files), int)
        calls = {}
        for s in np.unique(route).tolist():
            mine = np.flatnonzero(route == s)
            calls[s] = ("add_files", [files[i] for i in mine], None if vectors is None else vectors[mine])
        counts = self._on(calls)
        added, updated = (sum(c[i] for c in counts.values()) for i in (0, 1))
        paths_of = {s: sorted({files[i].path for i in np.flatnonzero(route == s) if files[i].path is not None})
                    for s in calls}
        drops = {}
        for s in range(self.shards):
            elsewhere = [p for t, paths in paths_of.items() if t != s for p in paths]
            if elsewhere:
                drops[s] = ("drop_files", elsewhere)
        moved = len({p for paths in self._on(drops).values() for p in paths}) if drops else 0
        moved = min(moved, added)
        return added - moved, updated + moved

    def add_known_file(self, file: FileRecord) -> int | None:
        s = shard_of(route_key(file), self.shards)
        row = self._on({s: ("add_known_file", file)})[s]
        if row is None:
            return None
        others = {t: ("drop_files", [absolute_path(file.path)]) for t in range(self.shards) if t != s}
        if others:
            self._on(others)
        return self._global(s, row)

    def delete(self, indices: Iterable[int]) -> None:
        self.check_writable()
        by_shard: dict[int, list[int]] = {}
        for i in indices:
            if int(i) >= 0:
                s, row = self._split(int(i))
                by_shard.setdefault(s, []).append(row)
        self._on({s: ("delete", rows) for s, rows in by_shard.items()})

    def forget(self, paths: Iterable[str]) -> int:
        self.check_writable()
        return sum(self.each_shard("forget", [os.fspath(p) for p in paths]))

    def move_paths(self, moves: Iterable[tuple[str, str]]) -> int:
        return sum(self.each_shard("move_paths", list(moves)))

    def move_folder(self, old: str, new: str) -> int:
        return sum(self.each_shard("move_folder", old, new))

    def remember_failure(self, path: str, size: int, mtime: float, reason: str) -> None:
        """Remembered by the path's shard; the file's stale items dropped from every shard (a photo's
        items are routed by their content hash, not by path)."""
        s = self._path_shard(path)
        self._on({s: ("remember_failure", path, size, mtime, reason)})
        self.each_shard("drop_stale", path, size, mtime)

    def save_failures(self) -> None:
        if not self.read_only:
            self.each_shard("save_failures")

    def save(self) -> bool:
        """Every shard commits what it holds (each crash-safe on its own)."""
        self.check_writable()
        return any(self.each_shard("save"))

    def record_roots(self, roots: dict[str, bool]) -> None:
        self.check_writable()
        merged = {**self.cluster_manifest.roots, **roots}
        if merged != self.cluster_manifest.roots:
            self.cluster_manifest = dataclasses.replace(self.cluster_manifest, roots=merged)
            write_cluster_manifest(self.root, self.cluster_manifest)
            self.manifest = dataclasses.replace(self.manifest, roots=merged)

    def record_weights(self, pretrained: str, weights_id: str) -> None:
        self.check_writable()
        model = dataclasses.replace(self.cluster_manifest.model, pretrained=pretrained, weights_id=weights_id)
        self.cluster_manifest = dataclasses.replace(self.cluster_manifest, model=model)
        write_cluster_manifest(self.root, self.cluster_manifest)
        self.manifest = dataclasses.replace(self.manifest, pretrained=pretrained, weights_id=weights_id)

    def close(self) -> None:
        """Release the shards' folders and end their actors (what was not saved is lost, as with a store)."""
        import ray

        if not self.actors:
            return
        try:
            ray.get([a.close.remote() for a in self.actors], timeout=self.timeout)
        except ray.exceptions.RayError as e:
            log.warning("a shard did not close cleanly: %s", str(e).splitlines()[0])
        for a in self.actors:
            ray.kill(a, no_restart=True)
        self.actors = []


def _items(method: str, args: tuple) -> int:
    """How many items a journaled write holds (the vectors kept to send again)."""
    return len(args[1]) if method == "append" else len(args[0]) if method == "add_files" else 1


def merge_results(parts: list[list[list[tuple]]], k: int, shards: int) -> list[SearchResults]:
    """Per-shard results of each query -> the overall best k of each, ties to the lower global index."""
    merged = []
    for q in range(len(parts[0]) if parts else 0):
        candidates = [(row * shards + s, sim, path, meta, [d * shards + s for d in dups])
                      for s, part in enumerate(parts) for row, sim, path, meta, dups in part[q]]
        candidates.sort(key=lambda c: (-c[1], c[0]))
        merged.append(SearchResults(SearchResult(index=i, path=path, similarity=sim, metadata=meta, duplicates=dups)
                                    for i, sim, path, meta, dups in candidates[:k]))
    return merged


class ShardedSearcher:
    """The Searcher of a sharded database: every shard answers within its rows, the answers merged."""

    def __init__(self, store: ShardedStore):
        self.store = store

    def search(self, request: SearchRequest) -> list[SearchResults]:
        parts = self.store.each_shard("search", request)
        return merge_results(parts, request.k, self.store.shards)

    def search_each(self, requests: list[SearchRequest]) -> list[list[SearchResults] | Exception]:
        """Every shard answers all the requests in shared passes; each request's answers merged (a bad
        filter is the same error on every shard: the first shard's)."""
        answers = self.store.each_shard("search_each", requests)
        return [by_shard[0] if isinstance(by_shard[0], Exception) else merge_results(by_shard, r.k, self.store.shards)
                for r, by_shard in zip(requests, zip(*answers))]

    def validate(self, batch: int = 256) -> ValidationReport:
        return self.store.validate(batch)


def _spread_nodes(n: int) -> list[str]:
    """The IP addresses of n nodes for n new shards on node-local disks: the alive nodes with CPUs, in
    turn (a head node that only coordinates holds none)."""
    import ray

    nodes = sorted({node["NodeManagerAddress"] for node in ray.nodes()
                    if node["Alive"] and node["Resources"].get("CPU", 0) > 0})
    if not nodes:
        raise DatabaseError("the Ray cluster has no node with CPUs to hold a shard")
    return [nodes[i % len(nodes)] for i in range(n)]

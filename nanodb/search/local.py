"""The local searcher: the exact top k of one ItemStore's rows, with the filters and collapsed duplicates,
and the check that every stored vector finds itself.

Requests searched together (`LocalSearcher.search_each`: the query batcher's pass) share each pass over
the rows, each query with its own k, filters, minimum similarity and collapse (VectorIndex.search_each),
and each gets exactly its lone results. The sharded searcher runs the same on each shard's rows.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from datetime import time as dt_time
from typing import Any

import numpy as np

from nanodb.media.video import is_video_name
from nanodb.search.query import QueryError
from nanodb.search.request import DATE_RANGE, Filters, SearchRequest, SearchResult, SearchResults
from nanodb.storage.columns import store_columns
from nanodb.storage.store import ItemStore

# Similarities closer than this are a tie: float16 storage rounds each value by up to ~5e-4 relative.
SCORE_TIE = 1e-4

Chosen = list[tuple[int, float, list[int]]]  # (row, similarity, rows of the same content)


@dataclass(frozen=True)
class RowFilter:
    """Filters resolved for the rows: a folder (an absolute path prefix, or a folder name anywhere in the
    path), a modification-time range [since, until) in seconds, and file extensions (lowercase, no dot)."""

    folder: str | None = None
    since: float | None = None
    until: float | None = None
    types: frozenset[str] | None = None

    def __bool__(self) -> bool:
        return any(v is not None for v in (self.folder, self.since, self.until, self.types))

    @classmethod
    def of(cls, filters: Filters) -> RowFilter:
        """The filters as users gave them, resolved; a bad value raises QueryError."""
        filters = filters.checked()
        return cls(_folder(filters.folder), _timestamp(filters.since, "since"), _timestamp(filters.until, "until"),
                   _extensions(filters.types))

    def allows_folder(self, folder: str) -> bool:
        """Whether the folder filter allows a file directly in `folder` (its path before the last separator)."""
        start = folder + os.sep  # what the file's path starts with: the test reads no further
        if os.path.isabs(self.folder):
            return start.startswith(self.folder if self.folder.endswith(os.sep) else self.folder + os.sep)
        return f"{os.sep}{self.folder.strip(os.sep)}{os.sep}" in os.path.dirname(start) + os.sep


def _folder(folder: str | None) -> str | None:
    folder = (folder or "").strip()
    if folder.startswith(("/", "~")):
        return os.path.normpath(os.path.expanduser(folder))
    return folder or None


def _extensions(types: Iterable[str] | str | None) -> frozenset[str] | None:
    if types is None:
        return None
    if isinstance(types, str):
        types = types.replace(",", " ").split()
    aliases = {"jpg": {"jpg", "jpeg"}, "jpeg": {"jpg", "jpeg"}, "tif": {"tif", "tiff"}, "tiff": {"tif", "tiff"}}
    wanted: set[str] = set()
    for t in types:
        t = t.strip().lower().lstrip(".")
        wanted |= aliases.get(t, {t})
    return frozenset(wanted) if wanted else None


def _timestamp(value: Any, name: str) -> float | None:
    """A date bound as seconds since the epoch (local time); a date given for `until` includes that day.
    A date outside DATE_RANGE, or a number that is no time, is a QueryError (never an overflow)."""
    if value is None or value == "":
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not abs(value) < 1e18:  # NaN, infinite, or past any file time: it would overflow
            raise QueryError(f"{name}: {str(value)[:40]} is not a time in seconds")
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        try:
            value = date.fromisoformat(text) if len(text) == 10 else datetime.fromisoformat(text)
        except ValueError:
            raise QueryError(f"{name}: {text[:40]!r} is not a date (YYYY-MM-DD)") from None
    if not isinstance(value, date):
        raise QueryError(f"{name} must be a date, not a {type(value).__name__}")
    first, last = DATE_RANGE
    out_of_range = QueryError(f"{name}: {value.isoformat()[:40]} is out of range: give a date from "
                              f"{first.isoformat()} to {last.isoformat()}")
    if not first <= (value.date() if isinstance(value, datetime) else value) <= last:
        raise out_of_range
    try:
        if isinstance(value, datetime):
            return value.timestamp()
        start = datetime.combine(value, dt_time())
        return (start + timedelta(days=1) if name == "until" else start).timestamp()
    except (OverflowError, ValueError, OSError):  # a time zone can still push an edge date over
        raise out_of_range from None


def allowed_rows(store: ItemStore, where: RowFilter) -> np.ndarray | None:
    """A boolean mask over the store's rows: those `where` allows (deleted rows are excluded by the
    index); None when it allows all. Vectorised over the store's filter columns (storage.columns): call
    store_columns(store) first without the store's lock, which the caller holds here."""
    if not where:
        return None
    columns = store_columns(store)
    mask = np.ones(columns.count, bool)
    if where.since is not None:
        mask &= columns.mtime[: columns.count] >= where.since
    if where.until is not None:
        mask &= columns.mtime[: columns.count] < where.until
    if where.folder is not None:
        mask &= columns.folder_rows(where.folder, where.allows_folder)
    if where.types is not None:
        mask &= columns.extension_rows(where.types)
    return mask


def video_key(store: ItemStore, row: int) -> tuple[str, str] | None:
    """The key that collapses a video's frames into one result (its path); None for other items."""
    path = store.path_of(row)
    return ("video", path) if path is not None and is_video_name(path) else None


class Choice:
    """One query's results, chosen from its exact top rows, fetched in rounds until they decide: its top k;
    or, when a video's frames are among them (always one result, the best frame) or with collapse (one
    result per file content, with the rows of its copies), the k best rows of distinct keys. Those ask
    for more, doubling, until every copy of the k-th kept row was seen (they all score within SCORE_TIE
    of it) or no row is left. The rounds depend on the query alone, so its results do too."""

    def __init__(self, store: ItemStore, k: int, collapse: bool):
        self.store, self.k = store, k
        self.key_of: Callable[[int], Any] | None = None
        if collapse:
            hashes = store.column("hash")
            self.keyed(lambda i: video_key(store, i) or bytes(hashes[i]))
        else:
            self.fetch = k
        self.chosen: Chosen = []

    def keyed(self, key_of: Callable[[int], Any]) -> None:
        self.key_of, self.fetch = key_of, int(self.k * 1.5) + 16

    def take(self, rows: np.ndarray, scores: np.ndarray) -> bool:
        """Whether the query's exact top `fetch` rows decide its results (then in `chosen`); else `fetch`
        grows for the next round."""
        store = self.store
        if self.key_of is None:
            if not any(video_key(store, int(i)) for i in rows):
                self.chosen = [(int(i), float(s), []) for i, s in zip(rows, scores)]
                return True
            self.keyed(lambda i: video_key(store, i) or i)  # frames of a video among them: collapsed
            return False
        groups: dict[Any, tuple[int, float, list[int]]] = {}
        for i, s in zip(rows, scores):
            key = self.key_of(int(i))
            if key in groups:
                if not isinstance(key, tuple):  # a copy of the file (not another frame of the video)
                    groups[key][2].append(int(i))
            elif len(groups) < self.k:
                groups[key] = (int(i), float(s), [])
        chosen = list(groups.values())
        if len(rows) < self.fetch or (len(chosen) >= self.k and scores[-1] < chosen[-1][1] - SCORE_TIE):
            self.chosen = chosen
            return True
        self.fetch *= 2
        return False


def answer_each(store: ItemStore, asked: list[tuple[SearchRequest, np.ndarray | None]]) -> list[list[SearchResults]]:
    """Embedded requests, each with its allowed rows (`allowed_rows`), answered from shared passes over
    the index (each query's rounds, see Choice, in the pass of that round), with the paths and metadata
    of the rows as they are now: the caller holds the store's lock."""
    vectors, masks, choices, owners = [], [], [], []
    for n, (request, allowed) in enumerate(asked):
        for q in np.asarray(request.vectors, np.float32).reshape(-1, store.dim):
            vectors.append(q)
            masks.append(allowed)
            choices.append(Choice(store, request.k, request.collapse))
            owners.append(n)
    waiting = list(range(len(choices)))
    while waiting:
        found = store.index.search_each(np.stack([vectors[j] for j in waiting]),
                                        [choices[j].fetch for j in waiting], [masks[j] for j in waiting])
        waiting = [j for j, (rows, scores) in zip(waiting, found) if not choices[j].take(rows, scores)]
    answers: list[list[SearchResults]] = [[] for _ in asked]
    for choice, n in zip(choices, owners):
        request = asked[n][0]
        answers[n].append(SearchResults(
            SearchResult(i, store.path_of(i), min(max(s, -1.0), 1.0), store.metadata_of(i), copies)
            for i, s, copies in choice.chosen if request.keeps(s)))
    return answers


class LocalSearcher:
    """Exact search over the store's rows in this process."""

    def __init__(self, store: ItemStore):
        self.store = store

    def search(self, request: SearchRequest) -> list[SearchResults]:
        answer = self.search_each([request])[0]
        if isinstance(answer, Exception):
            raise answer
        return answer

    def search_each(self, requests: list[SearchRequest]) -> list[list[SearchResults] | QueryError]:
        """Each request's results (or its own error: a bad filter) from shared passes over the rows."""
        store = self.store
        store.checks.raise_if_failed()
        wheres: list[RowFilter | QueryError] = []
        for request in requests:
            try:
                wheres.append(RowFilter.of(request.filters))
            except QueryError as e:
                wheres.append(e)
        if any(isinstance(w, RowFilter) and w for w in wheres):
            store_columns(store)  # derived on first use, not under the lock: writers go on meanwhile
        with store.lock:  # a compaction renumbers rows: indices and paths must come from one state
            masks = {w: allowed_rows(store, w) for w in set(wheres) if isinstance(w, RowFilter)}  # one per filter
            asked = [(r, masks[w]) for r, w in zip(requests, wheres) if isinstance(w, RowFilter)]
            answers = iter(answer_each(store, asked))
        return [w if isinstance(w, QueryError) else next(answers) for w in wheres]

    def validate(self, batch: int = 256) -> ValidationReport:
        return validate(self.store, batch)


@dataclass
class ValidationReport:
    checked: int
    failures: list[tuple[int, int]]  # (item, what it found first instead)
    duplicates: list[list[int]]  # groups of items with identical vectors

    @property
    def ok(self) -> bool:
        return not self.failures


def validate(store: ItemStore, batch: int = 256) -> ValidationReport:
    """Query every stored vector; each must find itself (or a duplicate) first.

    A duplicate is a row whose similarity ties with the item's own: the same image embedded in two
    batches can differ in the last float16 bit, and either may then come first. Every checksum is
    verified first (the background check of big files is waited for)."""
    store.checks.wait()
    with store.lock:
        live = store.live_rows()
        vectors = store.vectors
        groups: dict[bytes, list[int]] = {}
        for i in live:
            groups.setdefault(vectors[i].tobytes(), []).append(int(i))
        failures = []
        for lo in range(0, len(live), batch):
            ids = live[lo : lo + batch]
            queries = vectors[ids].astype(np.float32)
            top, scores = store.index.search(queries, 1)
            own = np.einsum("ij,ij->i", queries, queries)
            for i, t, best, self_score in zip(ids, top[:, 0], scores[:, 0], own):
                if t != i and best > self_score + SCORE_TIE:
                    failures.append((int(i), int(t)))
    dups = [g for g in groups.values() if len(g) > 1]
    return ValidationReport(len(live), failures, dups)

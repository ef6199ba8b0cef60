"""Near-duplicates: groups of items whose vectors are at least a similarity threshold apart, found
exactly by a self-join of the stored vectors with the index's exact search (VectorIndex.search).

The groups are the connected components of the graph whose edges are the pairs of live items with
similarity >= threshold (the float64 dot product of their stored float16 vectors, as a brute force
computes it), plus the pairs of items with identical vectors (byte-identical files share one vector:
such copies are always one group, whatever the threshold), except the pairs of two frames of one video
(items of one video's path): similar scenes of one shot are not duplicates to clean up. Frames of two
videos, or a frame and a photo, pair like any two items; so two frames of one video can still be in one
group through other items (a photo like both).

How: the live rows are queried in blocks against the index. Each query asks for its top k among the
rows from its block's first row on (a pair of rows is found once, by the earlier row's block); while a
query's k-th best still reaches the threshold, it asks again with twice k, so every row at or above
the threshold is seen. The index's scores are exact float64 scores rounded to float32: every pair
within SLACK of the threshold is scored again in float64, which decides. The pairs are joined as each
search answers. Memory: one search's results at a time (RESULTS_BUDGET), the union-find parents (8
bytes a row), whatever the threshold; a threshold that joins every live row stops at that point.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from nanodb.media.paths import printable
from nanodb.media.video import VIDEO_EXTENSIONS
from nanodb.search.local import video_key
from nanodb.storage.columns import store_columns
from nanodb.storage.store import ItemStore

BLOCK_ROWS = 256  # queries per self-join step
FIRST_K = 8  # neighbours asked for first; doubled for the queries whose k-th best still qualifies
RESULTS_BUDGET = 1 << 22  # (queries x k) of one search: bounds its results when k grows
RESCORE_PAIRS = 1 << 12  # candidate pairs near the threshold rescored in float64 at a time
SLACK = 1e-5  # float32 rounding of the index's float64 scores is ~6e-8 near 1: pairs this close are rescored


@dataclass(frozen=True)
class NearDuplicate:
    """One item of a group: its index, its path, and its similarity to the group's first item."""

    index: int
    path: str | None
    similarity: float

    def to_dict(self) -> dict:
        return {"index": self.index, "path": self.path, "similarity": round(self.similarity, 6)}

    def __str__(self) -> str:  # a search result's line
        return f"* index={self.index}  {printable(self.path or '')}  similarity={self.similarity:.4f}"


@dataclass(frozen=True)
class DuplicateGroup:
    """Items that are near-duplicates of each other: the first is the group's lowest index, the others
    follow by their similarity to it, highest first. A member may be less similar to the first than
    the threshold: it is in the group through another member (a chain of near-duplicates)."""

    items: tuple[NearDuplicate, ...]

    @property
    def indices(self) -> list[int]:
        return [m.index for m in self.items]

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[NearDuplicate]:
        return iter(self.items)

    def to_dict(self) -> dict:
        return {"size": len(self.items), "items": [m.to_dict() for m in self.items]}


def check_threshold(threshold) -> float:
    """The threshold as a float in (0, 1]; ValueError otherwise (a lower one joins almost every pair)."""
    try:
        value = float(threshold)
    except (TypeError, ValueError):
        raise ValueError(f"threshold must be a number, not {str(threshold)[:40]!r}") from None
    if not 0 < value <= 1:  # NaN too
        raise ValueError(f"threshold must be more than 0 and at most 1, not {value}")
    return value


def near_duplicates(store: ItemStore, threshold: float = 0.95, *, min_size: int = 2,
                    block: int = BLOCK_ROWS, unlocked: bool = False) -> list[DuplicateGroup]:
    """The groups of at least `min_size` live items that are near-duplicates at `threshold` (see the
    module's docstring), largest first (then by first index). Holds the store's lock throughout: a
    compaction renumbers rows.

    `unlocked` (a server): the join runs on the rows live when it starts, without the store's lock, so
    searches and writers go on meanwhile. Rows added meanwhile are left out, rows deleted meanwhile are
    dropped from the groups at the end; a compaction meanwhile (it renumbers rows) makes it start over."""
    threshold = check_threshold(threshold)
    store.checks.raise_if_failed()
    size = max(2, min_size)
    store_columns(store)  # derived on first use, not under the lock: writers go on meanwhile
    if not unlocked:
        with store.lock:
            live = store.live_rows()
            components = similar_components(store.index.vectors, live, threshold, store.index.search, block,
                                            videos=video_ids(store, live))
            groups = [_group(store, rows) for rows in components if len(rows) >= size]
    else:
        while True:
            with store.lock:
                index, live = store.index, store.live_rows()
                vectors, videos = index.vectors, video_ids(store, live)
            components = similar_components(vectors, live, threshold, index.search, block, videos=videos)
            with store.lock:
                if store.index is not index:  # compacted meanwhile: the rows were renumbered
                    continue
                components = [rows[~index.dead[rows]] for rows in components]
                groups = [_group(store, rows) for rows in components if len(rows) >= size]
                break
    groups.sort(key=lambda g: (-len(g), g.items[0].index))
    return groups


def video_ids(store: ItemStore, live: np.ndarray) -> np.ndarray:
    """For each row of the store, a number shared by the live frames of one video (its path), -1 for
    any other row. The caller holds the store's lock."""
    ids = np.full(store.rows, -1, np.int64)
    named = store_columns(store).extension_rows(frozenset(e.lstrip(".") for e in VIDEO_EXTENSIONS))
    candidates = live[live < len(named)]
    numbers: dict = {}
    for row in candidates[named[candidates]].tolist():
        if (key := video_key(store, row)) is not None:
            ids[row] = numbers.setdefault(key, len(numbers))
    return ids


def similar_components(vectors: np.ndarray, live: np.ndarray, threshold: float, search,
                       block: int = BLOCK_ROWS, queried: int | None = None,
                       videos: np.ndarray | None = None) -> list[np.ndarray]:
    """The connected components of more than one row among `live` (sorted row numbers of `vectors`),
    joined by pairs scoring >= threshold in float64 or with identical vectors, except pairs of rows with
    the same `videos` number (>= 0: frames of one video; None: no video). `search(queries, k,
    allowed=mask)` is the exact top k of VectorIndex.search, which skips the deleted rows itself.
    `queried` (benchmarks): query only the first that many live rows, the join's costliest part.

    The pairs found are joined as each search answers, never gathered: memory stays that of one
    search's results whatever the threshold. Once every live row is in one component (a threshold that
    nearly every pair reaches), no later pair can change it: the join stops there."""
    parent = np.arange(len(vectors), dtype=np.int64)
    for lo in range(0, len(live) if queried is None else min(queried, len(live)), block):
        _join_block(parent, vectors, live[lo : lo + block], threshold, search, videos)
        if len(live) > 1 and (_roots(parent, live) == _roots(parent, live[:1])[0]).all():
            break  # one component of every live row (and videos' frames can only join through others)
    roots = _roots(parent, live)
    shared = np.bincount(roots, minlength=len(vectors))[roots] > 1  # rows in a component of two or more
    roots, members = roots[shared], live[shared]
    order = np.argsort(roots, kind="stable")
    roots, members = roots[order], members[order]
    return np.split(members, np.flatnonzero(np.diff(roots)) + 1) if len(members) else []


def _join_block(parent: np.ndarray, vectors: np.ndarray, rows: np.ndarray, threshold: float, search,
                videos: np.ndarray | None = None) -> None:
    """Join the pairs (row of `rows`, other row from rows[0] on) that qualify: float64 score >= threshold,
    or identical vectors (which score the row's own score, its squared norm, possibly under the
    threshold); never two frames of one video (the same `videos` number >= 0). A query whose k-th best
    still qualifies asks again with twice k (what it found is joined again, harmlessly)."""
    queries = vectors[rows].astype(np.float32)
    own = np.einsum("ij,ij->i", queries.astype(np.float64), queries.astype(np.float64))
    reach = np.minimum(threshold, own) - SLACK  # fast scores at or above this are rescored in float64
    allowed = np.zeros(len(vectors), bool)
    allowed[rows[0] :] = True
    pending, k = np.arange(len(rows)), FIRST_K
    while len(pending):
        again = []
        step = max(1, RESULTS_BUDGET // k)
        for s in range(0, len(pending), step):
            part = pending[s : s + step]
            top, scores = search(queries[part], k, allowed=allowed)
            if top.shape[1] == 0:
                continue
            hit = scores >= reach[part, None]
            qi, col = np.nonzero(hit)
            _join_pairs(parent, vectors, rows, part[qi], top[qi, col], scores[qi, col], threshold, own, videos)
            if top.shape[1] == k:  # fewer than k: every allowed row was returned
                again.append(part[hit[:, -1]])
        pending, k = (np.concatenate(again) if again else np.zeros(0, np.int64)), k * 2


def _join_pairs(parent: np.ndarray, vectors: np.ndarray, rows: np.ndarray, qi: np.ndarray, other: np.ndarray,
                scores: np.ndarray, threshold: float, own: np.ndarray, videos: np.ndarray | None) -> None:
    """Join the candidate pairs (rows[qi], other) that qualify. A fast score (exact, rounded to float32)
    SLACK above the threshold qualifies as it is; the others are rescored in float64, RESCORE_PAIRS at a
    time (a pair's two vectors in float64: never every candidate's at once)."""
    mine = rows[qi]
    keep = other != mine
    if videos is not None:
        keep &= (videos[mine] < 0) | (videos[mine] != videos[other])
    qi, mine, other, scores = qi[keep], mine[keep], other[keep], scores[keep]
    joins = scores >= threshold + SLACK
    close = np.flatnonzero(~joins)
    for lo in range(0, len(close), RESCORE_PAIRS):
        part = close[lo : lo + RESCORE_PAIRS]
        a, b = vectors[mine[part]].astype(np.float64), vectors[other[part]].astype(np.float64)
        exact = np.einsum("ij,ij->i", a, b)
        joins[part] = (exact >= threshold) | ((exact >= own[qi[part]] - SLACK) & (a == b).all(axis=1))
    _union(parent, mine[joins], other[joins])


def _roots(parent: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The root of each row (every parent is a lower row: following parents ends at the root)."""
    roots = parent[rows]
    while not np.array_equal(up := parent[roots], roots):
        roots = up
    parent[rows] = roots  # path compression: a root is an ancestor, so parents stay lower rows
    return roots


def _union(parent: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
    """Join the components of each pair (a[i], b[i]): the higher root points to the lower, repeated until
    every pair shares its root (a root that several pairs lower keeps the lowest; the rest join next round)."""
    while len(a):
        ra, rb = _roots(parent, a), _roots(parent, b)
        apart = ra != rb
        if not apart.any():
            return
        ra, rb, a, b = ra[apart], rb[apart], a[apart], b[apart]
        np.minimum.at(parent, np.maximum(ra, rb), np.minimum(ra, rb))


def _group(store: ItemStore, rows: np.ndarray) -> DuplicateGroup:
    """A group's items, the lowest index first, the others by their float64 similarity to it."""
    rows = np.sort(rows)
    vectors = store.index.vectors
    first = vectors[rows[0]].astype(np.float64)
    members = vectors[rows]
    similarity = members.astype(np.float64) @ first
    similarity[(members == members[0]).all(axis=1)] = 1.0  # the first and its copies: the same vector
    order = np.concatenate([[0], 1 + np.lexsort((rows[1:], -similarity[1:]))])
    return DuplicateGroup(tuple(NearDuplicate(int(rows[j]), store.path_of(int(rows[j])),
                                              min(max(float(similarity[j]), -1.0), 1.0)) for j in order))

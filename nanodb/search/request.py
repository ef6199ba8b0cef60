"""What a search takes and gives: the SearchRequest every interface builds and every searcher answers,
the filter vocabulary, and the one result type.

The filters are declared once, here: the HTTP API's parameters, the command line's flags and the web
UI's controls are made from `Filters.described()`, so a new filter is one new field (and its test in
the local searcher's RowFilter).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date
from typing import Any, Protocol

import numpy as np

from nanodb.media.paths import printable
from nanodb.media.video import frame_time, timestamp
from nanodb.search.query import QueryError, check_k, check_min_similarity

FILE_TYPES = ("jpg", "png", "webp", "gif", "heic", "tiff", "bmp")  # the types offered as choices
DATE_RANGE = (date(1900, 1, 1), date(9998, 12, 31))  # the dates `since` and `until` accept
MAX_PATH_CHARS = 4096  # PATH_MAX: no folder filter longer than this can match
MAX_DATE_CHARS = 32  # an ISO date and time with microseconds and a UTC offset
MAX_TYPES = 32  # file types asked for at once
COLLAPSE_HELP = "one result per file content; the copies are listed in `duplicates`"


@dataclass(frozen=True)
class FilterField:
    """How one filter is named and explained to users, whatever the interface."""

    name: str  # the Filters field, NanoDB.search's keyword
    flag: str  # the command line's --flag and the HTTP query parameter
    help: str
    examples: tuple[Any, ...]
    label: str  # the web UI's label
    placeholder: str  # the web UI's hint
    metavar: str  # the command line's name for the value
    choices: tuple[str, ...] = ()  # values to pick several of (the web UI's check boxes; a repeatable flag)
    max_length: int | None = None  # the most characters (a typed value) or values (choices) it takes


def _described(**description: Any) -> Any:
    return field(default=None, metadata={"describe": description})


@dataclass(frozen=True)
class Filters:
    """Which items a search may return; None (or blank) allows all. The search stays exact among the
    items they allow. Values are as users type them; the searchers resolve them (search.local.RowFilter),
    raising QueryError for a bad one."""

    folder: str | None = _described(
        flag="folder", label="Folder", placeholder="/photos/2024 or holidays", metavar="FOLDER",
        examples=("/photos/2024", "holidays"), max_length=MAX_PATH_CHARS,
        help="only files under this folder: an absolute path, or a folder name anywhere in the path")
    since: Any = _described(
        flag="since", label="From date", placeholder="YYYY-MM-DD", metavar="YYYY-MM-DD", examples=("2024-01-01",),
        max_length=MAX_DATE_CHARS, help="only files modified on or after this date (YYYY-MM-DD)")
    until: Any = _described(
        flag="until", label="To date", placeholder="YYYY-MM-DD", metavar="YYYY-MM-DD", examples=("2024-12-31",),
        max_length=MAX_DATE_CHARS, help="only files modified on or before this date (YYYY-MM-DD)")
    types: Sequence[str] | str | None = _described(
        flag="type", label="File types (none: all)", placeholder="", metavar="EXT", examples=(["jpg", "png"],),
        choices=FILE_TYPES, max_length=MAX_TYPES, help="only these file types, e.g. jpg (repeatable)")

    @classmethod
    def described(cls) -> list[FilterField]:
        """Every filter, in order, with its name, flag, help and web UI label."""
        return [FilterField(name=f.name, **f.metadata["describe"]) for f in dataclasses.fields(cls)]

    def __bool__(self) -> bool:
        return any(value not in (None, "", [], ()) for value in dataclasses.astuple(self))

    def checked(self) -> Filters:
        """These filters, each no longer than its declared `max_length`; QueryError otherwise."""
        for f in self.described():
            value = getattr(self, f.name)
            if f.max_length is not None and isinstance(value, (str, Sequence)) and len(value) > f.max_length:
                unit = "values" if f.choices and not isinstance(value, str) else "characters"
                raise QueryError(f"{f.flag}: at most {f.max_length} {unit}, not {len(value)}")
        return self


@dataclass
class SearchResult:
    """One result of a search, the one result type of every searcher and interface."""

    index: int
    path: str | None
    similarity: float
    metadata: dict[str, Any] = field(default_factory=dict)
    duplicates: list[int] = field(default_factory=list)  # other items with the same file content

    @property
    def time(self) -> float | None:
        """The moment of a video's frame (seconds from its start); None for any other item."""
        return frame_time(self.metadata)

    def __str__(self) -> str:
        at = f" @ {timestamp(self.time)}" if self.time is not None else ""  # a video's moment: path @ 00:01:23
        return f"* index={self.index}  {printable(self.path or '')}{at}  similarity={self.similarity:.4f}"


class SearchResults(list):
    """The results of one query (a list of SearchResult, best first), with how long each step took."""

    encode_ms: float = 0.0
    search_ms: float = 0.0


@dataclass(frozen=True)
class SearchRequest:
    """One search, as an interface asks it (give one of query, text or image; see NanoDB.search) and
    as a searcher answers it, once NanoDB has set `vectors`."""

    query: Any = None  # text (a typed query, its terms read by the one rule: search.query.TypedQuery), an image
    #                    path or URL, a PIL image, an item index, a vector, or a batch
    k: int | None = None  # None: the database's settings decide
    text: str | None = None  # always text, never opened as a path or fetched
    image: Any = None  # an image path, an http(s) URL or a PIL image
    min_similarity: float | None = None
    filters: Filters = Filters()
    collapse: bool = False  # one result per file content, the copies in SearchResult.duplicates
    vectors: np.ndarray | None = field(default=None, compare=False, repr=False)  # (Q, dim) unit queries

    def checked(self, default_k: int) -> SearchRequest:
        """This request with k (default_k when unset) and min_similarity checked; QueryError if not
        exactly one query is given."""
        if sum(q is not None for q in (self.query, self.text, self.image)) != 1:
            raise QueryError("give one query: text, an image or an item")
        return dataclasses.replace(self, k=check_k(default_k if self.k is None else self.k),
                                   min_similarity=check_min_similarity(self.min_similarity))

    def keeps(self, similarity: float) -> bool:
        """Whether a result this similar is shown."""
        return self.min_similarity is None or similarity >= self.min_similarity


class Searcher(Protocol):
    """Answers an embedded SearchRequest exactly, one list of results per query vector: the local store
    (search.local.LocalSearcher) or shards on a Ray cluster (search.sharded.ShardedSearcher).
    `search_each` answers several requests in shared passes over the rows, each exactly as `search`
    would, or with its own error (a QueryError: a bad filter)."""

    def search(self, request: SearchRequest) -> list[SearchResults]: ...

    def search_each(self, requests: list[SearchRequest]) -> list[list[SearchResults] | QueryError]: ...

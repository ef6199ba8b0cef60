"""What a typed query means, one rule for every interface: words, or an image (a path, a URL), or a
stored item (`#12`), and combined queries of those (`./cat.jpg - 3:cat + 2:bee`, `2:dog + beach`).

A combined query is the weighted sum of the unit vectors of its terms, renormalised: adding a term
pulls the results towards it, subtracting one pushes them away.
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from nanodb.media.paths import absolute_path, is_indexed_name


class QueryError(ValueError):
    """A query that cannot be searched; the message is shown to the user as is."""


# An operator is a + or - with whitespace on both sides, so `t-shirt` or `x+y` stay one term.
_OPERATOR = re.compile(r"\s+([+-])(?=\s)")
_WEIGHT = re.compile(r"^([+-]?(?:\d+(?:\.\d*)?|\.\d+)):\s*(\S.*)$", re.DOTALL)
_ITEM = re.compile(r"#(\d{1,18})")  # a stored item, e.g. `#12` (the index= of a result)


def parse_query(text: str, continues: bool = False) -> list[tuple[float, str]]:
    """Split a query into (weight, term) pairs; a plain query is [(1.0, text)]. At most MAX_TERMS terms:
    each one is an encoding. `continues`: the text adds to a term given apart (an upload), so it may
    start with an operator (`- 3:cat + 2:bee`)."""
    parts = _OPERATOR.split(" " + text.strip() + " ")
    sign = 1.0
    if continues and len(parts) > 2 and not parts[0].strip():  # a leading operator: its sign, then terms
        sign, parts = (1.0 if parts[1] == "+" else -1.0), parts[2:]
    if len(parts) > 2 * MAX_TERMS - 1:
        raise QueryError(f"the query has {(len(parts) + 1) // 2} terms; at most {MAX_TERMS} can be combined")
    # parts alternates term, operator, term, ...; the leading space makes the first part a term.
    terms: list[tuple[float, str]] = []
    for i, part in enumerate(parts):
        if i % 2:
            sign = 1.0 if part == "+" else -1.0
            continue
        term = part.strip()
        if not term:
            raise QueryError(f"a term is missing around an operator in {text.strip()!r}")
        weight = 1.0
        if m := _WEIGHT.match(term):
            weight, term = float(m.group(1)), m.group(2).strip()
        terms.append((sign * weight, term))
    return terms


def is_combined(text: str) -> bool:
    """True when the text uses + / - operators or a weight, i.e. is more than one plain query."""
    terms = parse_query(text)
    return len(terms) > 1 or terms[0][0] != 1.0


def weighted_sum(weights, vectors: np.ndarray, text: str) -> np.ndarray:
    """The unit vector of a combined query: its terms' unit vectors, weighted, summed, renormalised."""
    total = np.asarray(weights, np.float32) @ np.asarray(vectors, np.float32)
    norm = float(np.linalg.norm(total))
    if not np.isfinite(norm) or norm < 1e-6:
        raise QueryError(f"the terms of {text.strip()!r} cancel out: nothing is left to search for")
    return total / norm


def combined_vector(text: str, embed: Callable[[list[str]], np.ndarray]) -> np.ndarray:
    """The unit vector of a combined query of words; `embed` turns a list of terms into unit vectors (one batch)."""
    terms = parse_query(text)
    return weighted_sum([weight for weight, _ in terms], embed([term for _, term in terms]), text)


# ------------------------------------------------------------------ path or text: one rule for every interface
PATH_STARTS = ("/", "./", "../", "~/")


def is_url(text: str) -> bool:
    """An http(s) URL (what `search.fetch.fetch_url` fetches)."""
    text = text.strip()
    return text.lower().startswith(("http://", "https://")) and not any(c.isspace() for c in text)


def is_image_reference(text: str) -> bool:
    """A query string that names an image rather than words, for NanoDB.search, the console and the
    command line alike: an http(s) URL, a name with an image or video extension (`a dog.jpg` too), or a
    path's start (/ ./ ../ ~/). A missing file so named is an error, never a silent text search; a video
    is one too (it is no query image: its frames' items are)."""
    text = text.strip()
    if is_url(text):
        return True
    return "\n" not in text and len(text) < 4096 and (is_indexed_name(text) or text.startswith(PATH_STARTS))


def unquoted(text: str) -> str | None:
    """The words inside quotes when `text` is one quoted string (`"a dog.jpg"`), else None: quotes
    force words, in every interface."""
    text = text.strip()
    if len(text) < 2 or text[0] != text[-1] or text[0] not in "'\"":
        return None
    try:
        words = shlex.split(text)
    except ValueError:  # unbalanced quotes inside
        return None
    return words[0] if len(words) == 1 else None


@dataclass(frozen=True)
class QueryTerm:
    """One term of a query. `kind`: "text" (words), "image" (a file path, or an image object such as an
    upload), "url" (an http(s) image to fetch) or "item" (a stored item's index)."""

    weight: float
    kind: str
    value: Any


def read_term(term: str, on_server: bool = False) -> tuple[str, Any]:
    """(kind, value) of one typed term, by the one rule: quoted is words; `#12` is stored item 12; then
    (not on a server, which never opens a path or fetches a URL a client names) a URL, or a string that
    names an image (`is_image_reference`); anything else is words."""
    if (words := unquoted(term)) is not None:
        return "text", check_text(words)
    if m := _ITEM.fullmatch(term):
        return "item", int(m.group(1))
    if not on_server and is_url(term):
        return "url", term
    if not on_server and is_image_reference(term):
        return "image", term
    return "text", check_text(term)


@dataclass(frozen=True)
class TypedQuery:
    """A query typed as a string, read term by term: words, image paths, image URLs and items (`#12`),
    combined with + and - and weighted with `W:`, e.g. `./cat.jpg - 3:cat + 2:bee` or `2:#12 + night`.
    A plain query is one term of weight 1."""

    text: str  # as typed, for messages
    terms: tuple[QueryTerm, ...]

    @classmethod
    def parse(cls, text: Any, *, on_server: bool = False, first: QueryTerm | None = None) -> TypedQuery:
        """The terms of `text`. Not `on_server`, a string that is the name of an existing image file is
        that file, whatever it holds (`./Holiday - Beach.jpg`). `first`: a term given apart (an upload),
        which `text` continues (`- 3:cat + 2:bee`, or just `night`)."""
        if not isinstance(text, str):
            check_text(text)  # raises the one message for a query that is no string
        text = text.strip()
        if first is not None:
            text = check_text(text) if text else ""
        elif not on_server and is_image_reference(text):  # a path may be longer than words may
            if os.path.isfile(absolute_path(text)):
                return cls(text, (QueryTerm(1.0, "image", text),))
        else:
            text = check_text(text)  # empty, or too long
        pairs = parse_query(text, continues=first is not None) if text else []
        terms = [QueryTerm(weight, *read_term(term, on_server)) for weight, term in pairs]
        if first is not None:
            terms.insert(0, first)
            if len(terms) > MAX_TERMS:
                raise QueryError(f"the query has {len(terms)} terms; at most {MAX_TERMS} can be combined")
        return cls(text, tuple(terms))

    @property
    def single(self) -> QueryTerm | None:
        """The one term of a plain query (weight 1), else None."""
        return self.terms[0] if len(self.terms) == 1 and self.terms[0].weight == 1.0 else None

    @property
    def kind(self) -> str | None:
        """"text" when every term is words, "image" when every term is an image, else None (for timings)."""
        kinds = {"image" if term.kind == "url" else term.kind for term in self.terms}
        return kinds.pop() if len(kinds) == 1 and kinds <= {"text", "image"} else None


# ------------------------------------------------------------------ input limits, one set for every interface
MAX_K = 1000
MAX_QUERY_CHARS = 1000
MAX_TERMS = 16  # terms of a combined query


def check_k(k) -> int:
    try:
        k = int(k)
    except (TypeError, ValueError):
        raise QueryError(f"k must be a whole number, not {str(k)[:40]!r}") from None
    if k < 1:
        raise QueryError("k must be at least 1")
    if k > MAX_K:
        raise QueryError(f"k must be at most {MAX_K}")
    return k


def check_text(text) -> str:
    text = (text or "").strip() if isinstance(text, str) or text is None else text
    if not isinstance(text, str):
        raise QueryError(f"a text query is a string, not a {type(text).__name__}")
    if not text:
        raise QueryError("empty query: type some words, or give an image")
    if len(text) > MAX_QUERY_CHARS:
        raise QueryError(f"the query is {len(text)} characters long; at most {MAX_QUERY_CHARS} are searched")
    return text


def check_min_similarity(value) -> float | None:
    if value is None:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise QueryError(f"min_similarity must be a number, not {str(value)[:40]!r}") from None
    if not -1.0 <= value <= 1.0:
        raise QueryError("min_similarity must be between -1 and 1")
    return value

"""Combined text queries: `dog + beach - snow`, with optional weights (`2:dog + 0.5:beach`).

A combined query is the weighted sum of the unit vectors of its terms, renormalised: adding a term
pulls the results towards it, subtracting one pushes them away.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np

from nanodb.media.paths import is_image_name


class QueryError(ValueError):
    """A query that cannot be searched; the message is shown to the user as is."""


# An operator is a + or - with whitespace on both sides, so `t-shirt` or `x+y` stay one term.
_OPERATOR = re.compile(r"\s+([+-])(?=\s)")
_WEIGHT = re.compile(r"^([+-]?(?:\d+(?:\.\d*)?|\.\d+)):\s*(\S.*)$", re.DOTALL)


def parse_query(text: str) -> list[tuple[float, str]]:
    """Split a query into (weight, term) pairs; a plain query is [(1.0, text)]. At most MAX_TERMS terms:
    each one is a text encoding."""
    parts = _OPERATOR.split(" " + text.strip() + " ")
    if len(parts) > 2 * MAX_TERMS - 1:
        raise QueryError(f"the query has {(len(parts) + 1) // 2} terms; at most {MAX_TERMS} can be combined")
    # parts alternates term, operator, term, ...; the leading space makes the first part a term.
    terms: list[tuple[float, str]] = []
    sign = 1.0
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


def combined_vector(text: str, embed: Callable[[list[str]], np.ndarray]) -> np.ndarray:
    """The unit vector of a combined query; `embed` turns a list of terms into unit vectors (one batch)."""
    terms = parse_query(text)
    vectors = np.asarray(embed([term for _, term in terms]), np.float32)
    total = np.asarray([weight for weight, _ in terms], np.float32) @ vectors
    norm = float(np.linalg.norm(total))
    if not np.isfinite(norm) or norm < 1e-6:
        raise QueryError(f"the terms of {text.strip()!r} cancel out: nothing is left to search for")
    return total / norm


# ------------------------------------------------------------------ path or text: one rule for every interface
PATH_STARTS = ("/", "./", "../", "~/")


def is_url(text: str) -> bool:
    """An http(s) URL (what `search.fetch.fetch_url` fetches)."""
    text = text.strip()
    return text.lower().startswith(("http://", "https://")) and not any(c.isspace() for c in text)


def is_image_reference(text: str) -> bool:
    """A query string that names an image rather than words, for NanoDB.search, the console and the
    command line alike: an http(s) URL, a name with an image extension (`a dog.jpg` too), or a path's
    start (/ ./ ../ ~/). A missing file so named is an error, never a silent text search."""
    text = text.strip()
    if is_url(text):
        return True
    return "\n" not in text and len(text) < 4096 and (is_image_name(text) or text.startswith(PATH_STARTS))


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

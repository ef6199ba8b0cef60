"""Combined text queries: `dog + beach - snow`, with optional weights (`2:dog + 0.5:beach`).

A combined query is the weighted sum of the unit vectors of its terms, renormalised: adding a term
pulls the results towards it, subtracting one pushes them away.
"""

from __future__ import annotations

import re
from typing import Callable

import numpy as np

# An operator is a + or - with whitespace on both sides, so `t-shirt` or `x+y` stay one term.
_OPERATOR = re.compile(r"\s+([+-])(?=\s)")
_WEIGHT = re.compile(r"^([+-]?(?:\d+(?:\.\d*)?|\.\d+)):\s*(\S.*)$", re.DOTALL)


def parse_query(text: str) -> list[tuple[float, str]]:
    """Split a query into (weight, term) pairs; a plain query is [(1.0, text)]."""
    parts = _OPERATOR.split(" " + text.strip() + " ")
    # parts alternates term, operator, term, ...; the leading space makes the first part a term.
    terms: list[tuple[float, str]] = []
    sign = 1.0
    for i, part in enumerate(parts):
        if i % 2:
            sign = 1.0 if part == "+" else -1.0
            continue
        term = part.strip()
        if not term:
            raise ValueError(f"a term is missing around an operator in {text.strip()!r}")
        weight = 1.0
        if m := _WEIGHT.match(term):
            weight, term = float(m.group(1)), m.group(2).strip()
        terms.append((sign * weight, term))
    return terms


def is_combined(text: str) -> bool:
    """True when the text uses + / - operators or a weight, i.e. is more than one plain query."""
    terms = parse_query(text)
    return len(terms) > 1 or terms[0][0] != 1.0


def combined_vector(text: str, embed: Callable[[str], np.ndarray]) -> np.ndarray:
    """The unit vector of a combined query; `embed` turns one term into a unit vector."""
    total = sum(weight * np.asarray(embed(term), np.float32) for weight, term in parse_query(text))
    norm = float(np.linalg.norm(total))
    if not np.isfinite(norm) or norm < 1e-6:
        raise ValueError(f"the terms of {text.strip()!r} cancel out: nothing is left to search for")
    return total / norm

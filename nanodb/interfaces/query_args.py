"""What a person typed, as NanoDB.search arguments: the console's queries and `similar`, and the words of
`nanodb search`. Each string is read by the one rule of every interface (search.query.TypedQuery)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from nanodb.search.query import QueryError, TypedQuery, is_combined, is_url, unquoted


def unquote(text: str) -> str:
    """The words inside quotes when `text` is one quoted string, else `text` stripped."""
    words = unquoted(text)
    return text.strip() if words is None else words


def is_combined_query(line: str) -> bool:
    """Whether a line is a combined query (`./cat.jpg - 3:cat`); a malformed one is not."""
    try:
        return is_combined(line)
    except QueryError:
        return False


def words_query(words: str, text: bool = False) -> dict:
    """Words typed to search (`nanodb search`) as NanoDB.search arguments: with `text` (--text), or
    "quoted", words; else a query NanoDB.search reads by the rule of every interface
    (search.query.TypedQuery): an image path or URL, `#12`, words, or a combined query of them."""
    quoted = unquoted(words)
    if text or quoted is not None:
        return {"text": words if quoted is None else quoted}
    return {"query": words}


def similar_query(arg: str) -> dict:
    """`similar`'s argument as NanoDB.search arguments: an item index (`12` or `#12`), an image URL, an
    image file, or a combined query (`./cat.jpg - 3:cat`, read as NanoDB.search reads it)."""
    arg = unquote(arg)
    if not arg:
        raise ValueError("similar needs an image path, an item index or an image URL, e.g.  similar 12")
    if re.fullmatch(r"[+-]?\d+", arg):
        if int(arg) < 0:
            raise ValueError(f"similar {arg}: an item index is 0 or more (the index= of a result)")
        return {"query": int(arg)}
    if is_url(arg):
        return {"image": arg}
    path = os.path.expanduser(arg)
    if os.path.isfile(path):
        return {"image": Path(path)}
    if re.fullmatch(r"#\d+", arg) or (is_combined_query(arg) and TypedQuery.parse(arg).kind != "text"):
        return {"query": arg}  # an item, or a combined query with an image or an item in it
    raise ValueError(f"no such image file: {arg}")

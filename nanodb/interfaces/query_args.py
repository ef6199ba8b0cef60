"""What a person typed, as NanoDB.search arguments: the console's queries and `similar`, and the words of
`nanodb search`. Each string is read by the one rule of every interface (search.query.TypedQuery)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from nanodb.media.paths import printable
from nanodb.search.query import QueryError, TypedQuery, is_combined, is_image_reference, is_url, unquoted


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
        return {"text": utf8_words(words if quoted is None else quoted)}
    if not is_image_reference(words) and not is_combined_query(words):
        utf8_words(words)
    return {"query": words}


def command_query(words: str, text: bool) -> dict:
    """`nanodb search`'s words (joined), as words_query reads them; a path that names no file is the
    console's error, saying how to search the words instead."""
    query = words_query(words, text)
    typed = query.get("query", "")
    if (is_image_reference(typed) and not is_url(typed) and not is_combined_query(typed)
            and not os.path.lexists(os.path.expanduser(typed.strip()))):
        raise ValueError(missing_path(typed, f"""'"{typed}"' or add --text"""))
    return query


def utf8_words(words: str) -> str:
    """Words to search, refused when they hold bytes that are not UTF-8 (read from a terminal or shell in
    another encoding, or a file name pasted as words): the model would search replacement characters."""
    if any("\udc80" <= c <= "\udcff" for c in words):
        raise ValueError(f"the query is not UTF-8 text: {printable(words)} (is the terminal set to UTF-8?)")
    return words


def missing_path(typed: str, quoted: str) -> str:
    """The one message for a typed path that names no file, in the console and `nanodb search`:
    `quoted` is how to type the words so that they are searched as words there."""
    return f"no such file or folder: {typed} (to search for these words, quote them: {quoted})"


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

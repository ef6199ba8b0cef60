"""Combined queries (`dog + beach - snow`, `2:dog`, `./cat.jpg - 3:cat + 2:bee`): parsing, and the one
rule for whether a query (or each of its terms) names an image, an item or words."""

from __future__ import annotations

import numpy as np
import pytest

from nanodb.search.query import (
    QueryTerm,
    TypedQuery,
    combined_vector,
    is_combined,
    is_image_reference,
    parse_query,
    unquoted,
)


@pytest.mark.parametrize(
    "text, terms",
    [
        ("a dog", [(1.0, "a dog")]),
        ("dog + beach - snow", [(1.0, "dog"), (1.0, "beach"), (-1.0, "snow")]),
        ("2:dog + 0.5:beach", [(2.0, "dog"), (0.5, "beach")]),
        ("  dog   -  1.5: snow ", [(1.0, "dog"), (-1.5, "snow")]),
        ("a t-shirt + x+y", [(1.0, "a t-shirt"), (1.0, "x+y")]),
        ("-1:cat", [(-1.0, "cat")]),
    ],
)
def test_parse_query(text, terms):
    assert parse_query(text) == terms


def test_plain_text_is_not_combined():
    assert not is_combined("a girl riding a horse")
    assert not is_combined("well-lit room")
    assert is_combined("dog + cat") and is_combined("2:dog")


@pytest.mark.parametrize("text", ["dog + ", "+ dog", "dog + - cat"])
def test_a_missing_term_is_a_clear_error(text):
    with pytest.raises(ValueError, match="missing"):
        parse_query(text)


def test_combined_vector_is_the_normalised_weighted_sum():
    basis = {"dog": np.eye(4)[0], "beach": np.eye(4)[1], "snow": np.eye(4)[2]}
    v = combined_vector("2:dog + beach - snow", lambda terms: np.stack([basis[t] for t in terms]))
    assert np.allclose(v, np.array([2, 1, -1, 0]) / np.sqrt(6))
    with pytest.raises(ValueError, match="cancel out"):
        combined_vector("dog - dog", lambda terms: np.stack([basis[t] for t in terms]))


@pytest.mark.parametrize("text, names_an_image", [
    ("a dog.jpg", True), ("Holiday 2024.PNG", True), ("./beach", True), ("../up", True), ("/photos/x", True),
    ("~/Pictures/cat", True), ("https://example.com/cat", True), ("cat.heic", True),
    ("a dog", False), ("a dog.jpg on a beach", False), ("dog + beach", False), ("see https://x.org/a b", False),
    ("two\nlines.jpg", False),
])
def test_one_rule_says_whether_a_query_names_an_image(text, names_an_image):
    assert is_image_reference(text) == names_an_image


def kinds(query: TypedQuery) -> list[tuple[float, str, object]]:
    return [(t.weight, t.kind, t.value) for t in query.terms]


@pytest.mark.parametrize("text, terms", [
    ("./cat.jpg - 3:cat + 2:bee", [(1.0, "image", "./cat.jpg"), (-3.0, "text", "cat"), (2.0, "text", "bee")]),
    ("2:./cat.jpg + night", [(2.0, "image", "./cat.jpg"), (1.0, "text", "night")]),
    ("#12 + night - 0.5:#3", [(1.0, "item", 12), (1.0, "text", "night"), (-0.5, "item", 3)]),
    ("https://example.com/a.png - dog", [(1.0, "url", "https://example.com/a.png"), (-1.0, "text", "dog")]),
    ('"./cat.jpg" + "a dog.jpg"', [(1.0, "text", "./cat.jpg"), (1.0, "text", "a dog.jpg")]),
    ("kitty + 2:night - 0.5:fence", [(1.0, "text", "kitty"), (2.0, "text", "night"), (-0.5, "text", "fence")]),
    ("#hashtag", [(1.0, "text", "#hashtag")]),
    ("a dog", [(1.0, "text", "a dog")]),
])
def test_each_term_of_a_query_is_read_by_the_one_rule(text, terms):
    assert kinds(TypedQuery.parse(text)) == terms


def test_on_a_server_paths_and_urls_are_words_and_items_are_items():
    query = TypedQuery.parse("/etc/passwd.jpg - 2:https://example.com/a.png + #4", on_server=True)
    assert kinds(query) == [(1.0, "text", "/etc/passwd.jpg"), (-2.0, "text", "https://example.com/a.png"),
                            (1.0, "item", 4)]
    assert kinds(TypedQuery.parse("./cat.jpg", on_server=True)) == [(1.0, "text", "./cat.jpg")]


def test_an_existing_file_named_with_an_operator_is_that_file(tmp_path, monkeypatch):
    (tmp_path / "Holiday - Beach.jpg").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    assert kinds(TypedQuery.parse("./Holiday - Beach.jpg")) == [(1.0, "image", "./Holiday - Beach.jpg")]
    assert kinds(TypedQuery.parse("./Holiday - Sea.jpg")) == [(1.0, "image", "./Holiday"), (-1.0, "image", "Sea.jpg")]
    assert len(TypedQuery.parse("./Holiday - Beach.jpg", on_server=True).terms) == 2  # a server opens no path


def test_an_upload_continues_with_terms():
    upload = QueryTerm(1.0, "image", object())
    query = TypedQuery.parse("- 3:cat + 2:bee", on_server=True, first=upload)
    assert query.terms[0] is upload and kinds(query)[1:] == [(-3.0, "text", "cat"), (2.0, "text", "bee")]
    assert kinds(TypedQuery.parse("night", on_server=True, first=upload))[1:] == [(1.0, "text", "night")]
    assert TypedQuery.parse("", on_server=True, first=upload).terms == (upload,)
    with pytest.raises(ValueError, match="at most 16"):
        TypedQuery.parse(" + ".join(["a"] * 16), on_server=True, first=upload)


def test_what_a_typed_query_is_for_the_timings():
    assert TypedQuery.parse("dog + cat").kind == "text"
    assert TypedQuery.parse("./a.jpg - https://x.org/b.jpg").kind == "image"
    assert TypedQuery.parse("./a.jpg - cat").kind is None and TypedQuery.parse("#1").kind is None
    assert TypedQuery.parse("2:dog").single is None and TypedQuery.parse("dog").single.value == "dog"


@pytest.mark.parametrize("text, words", [
    ('"a dog"', "a dog"), ("'a dog.jpg'", "a dog.jpg"), ('"a" + "b"', None), ("it's", None), ("dog", None),
])
def test_only_one_whole_quoted_string_is_unquoted(text, words):
    assert unquoted(text) == words


@pytest.mark.parametrize("text", ["", "   ", "dog + ''"])
def test_an_empty_query_or_term_is_a_clear_error(text):
    with pytest.raises(ValueError, match="empty query"):
        TypedQuery.parse(text)

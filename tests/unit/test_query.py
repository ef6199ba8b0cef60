"""Combined queries (`dog + beach - snow`, `2:dog`): parsing, and searching with them from the console;
and the one rule for whether a query names an image or is words."""

from __future__ import annotations

import numpy as np
import pytest

from nanodb.search.query import combined_vector, is_combined, is_image_reference, parse_query


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

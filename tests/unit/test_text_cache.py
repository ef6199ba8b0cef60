"""The process's cache of text vectors (search.text_cache): a kept vector is the one its model gives, bit
for bit, never another model's, and the cache stays within its bound, keeping the latest used."""

from __future__ import annotations

import numpy as np

from nanodb.search.text_cache import ENTRY_OVERHEAD, TextVectorCache, encode_cached


class StandInTextModel:
    """Vectors made from the text as it reads it (lower case) and its own seed; records what it encodes."""

    dim = 4

    def __init__(self, seed: int):
        self.text_model_id = ("stand-in", seed)
        self.seed = seed
        self.encoded: list[list[str]] = []

    def text_key(self, text: str) -> str:
        return text.lower()

    def encode_each(self, texts):
        self.encoded.append(list(texts))
        rng = [np.random.default_rng([self.seed, *self.text_key(t).encode()]) for t in texts]
        return np.stack([r.standard_normal(self.dim).astype(np.float32) for r in rng])


def test_a_kept_vector_is_the_computed_one_bit_for_bit_and_texts_read_alike_share_it():
    cache, model = TextVectorCache(), StandInTextModel(0)
    first = encode_cached(model, ["a red car", "Dog"], cache)
    np.testing.assert_array_equal(first, model.encode_each(["a red car", "Dog"]))
    model.encoded.clear()
    again = encode_cached(model, ["A Red Car", "beach", "dog", "beach"], cache)
    assert model.encoded == [["beach"]]  # the others kept; "beach" encoded once
    np.testing.assert_array_equal(again, model.encode_each(["a red car", "beach", "dog", "beach"]))
    again[0] = 0  # a caller's array is its own
    np.testing.assert_array_equal(encode_cached(model, ["a red car"], cache)[0], first[0])


def test_the_cache_never_serves_another_models_vector():
    cache, one, other = TextVectorCache(), StandInTextModel(1), StandInTextModel(2)
    mine = encode_cached(one, ["a red car"], cache)
    theirs = encode_cached(other, ["a red car"], cache)
    assert other.encoded == [["a red car"]] and not np.array_equal(mine, theirs)
    np.testing.assert_array_equal(theirs, other.encode_each(["a red car"]))
    np.testing.assert_array_equal(encode_cached(one, ["a red car"], cache), mine)


def test_a_model_that_does_not_say_which_it_is_is_not_cached():
    cache, model = TextVectorCache(), StandInTextModel(3)
    del model.text_model_id
    for _ in range(2):
        encode_cached(model, ["a red car"], cache)
    assert len(model.encoded) == 2 and len(cache) == 0


def test_the_cache_keeps_the_latest_used_within_its_bound():
    entry = 4 * 4 + len("text 00") + ENTRY_OVERHEAD
    cache, model = TextVectorCache(max_bytes=10 * entry), StandInTextModel(4)
    encode_cached(model, [f"text {i:02}" for i in range(10)], cache)
    assert len(cache) == 10 and cache.bytes == 10 * entry
    encode_cached(model, ["text 00"], cache)  # used again: the latest
    encode_cached(model, [f"text {i:02}" for i in range(10, 15)], cache)
    assert len(cache) == 10 and cache.bytes <= cache.max_bytes
    model.encoded.clear()
    encode_cached(model, ["text 00", "text 01", "text 06", "text 14"], cache)
    assert model.encoded == [["text 01"]]  # 1 to 5 went first; 0 was used since

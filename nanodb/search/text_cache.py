"""Text vectors kept for the texts asked again: search as you type repeats its prefixes, and many users
ask the same queries. A text's vector is a function of its model and of the text as the model's tokenizer
reads it (the text tower runs each text in shapes that give it the same bits alone or with others:
model/text_shapes.py), so a kept vector is the one the model would give, bit for bit.

One cache per process, shared by its databases: an entry's key holds its model's identity (which weights,
run by what), so a vector is never served for another model. It keeps the most recently used vectors
within a bound on their bytes."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable

import numpy as np

MAX_BYTES = 16 << 20  # ~8,000 vectors of 512 float32 values
ENTRY_OVERHEAD = 200  # bytes an entry costs beyond its vector and text (the key's tuple, the dict's slot)


class TextVectorCache:
    """The latest text vectors used, within `max_bytes`, by (model identity, text as its tokenizer reads it)."""

    def __init__(self, max_bytes: int = MAX_BYTES):
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = self.misses = 0
        self._entries: OrderedDict[tuple[Hashable, str], np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def cost(key: tuple[Hashable, str], vector: np.ndarray) -> int:
        return vector.nbytes + len(key[1]) + ENTRY_OVERHEAD

    def get(self, key: tuple[Hashable, str]) -> np.ndarray | None:
        with self._lock:
            vector = self._entries.get(key)
            if vector is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return vector

    def put(self, key: tuple[Hashable, str], vector: np.ndarray) -> None:
        vector = np.array(vector, np.float32)  # its own copy, read-only: callers get copies
        vector.flags.writeable = False
        cost = self.cost(key, vector)
        if cost > self.max_bytes:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.bytes -= self.cost(key, old)
            self._entries[key] = vector
            self.bytes += cost
            while self.bytes > self.max_bytes:
                dropped_key, dropped = self._entries.popitem(last=False)
                self.bytes -= self.cost(dropped_key, dropped)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.bytes = 0


TEXT_VECTORS = TextVectorCache()  # the process's


def encode_cached(model, texts: list[str], cache: TextVectorCache = TEXT_VECTORS) -> np.ndarray:
    """Each text's unit vector as `model.encode_each` gives it, those kept in `cache` taken from it and
    the others encoded together (and kept). A model that does not say which it is (`text_model_id`) and
    how it reads a text (`text_key`) is not cached."""
    model_id, text_key = getattr(model, "text_model_id", None), getattr(model, "text_key", None)
    if model_id is None or text_key is None:
        return model.encode_each(texts)
    keys = [(model_id, text_key(text)) for text in texts]
    found = {key: vector for key in dict.fromkeys(keys) if (vector := cache.get(key)) is not None}
    missing = {key: text for key, text in zip(keys, texts) if key not in found}
    if missing:
        for key, vector in zip(missing, model.encode_each(list(missing.values()))):
            cache.put(key, vector)
            found[key] = vector
    return np.stack([found[key] for key in keys]) if keys else np.empty((0, model.dim), np.float32)

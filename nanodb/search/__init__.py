"""The search layer: queries (text, images, items, vectors) turned into vectors, filters, and the
searchers that answer them (one store, or shards on a Ray cluster)."""

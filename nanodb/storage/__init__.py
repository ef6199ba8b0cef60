"""The storage layer: the on-disk format and commit protocol (`format`), the vector index and its C
kernel (`index`), and the item store that keeps one database folder (`store`)."""

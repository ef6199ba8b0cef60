"""The storage layer: the on-disk format and its migrations (`format`), the commit protocol (`commit`),
damage detection (`checks`) and `repair`; the vector index (`index`) and its C kernel (`kernel`); and the
item store that keeps one database folder (`store`)."""

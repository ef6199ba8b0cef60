"""The storage layer: the on-disk format and its migrations (`format`), the commit protocol (`commit`),
damage detection (`checks`) and `repair`; the vector index (`index`) with its compact copy (`compact`),
fast passes (`scan`, over the C kernel `_scan.c` loaded by `kernel`), exact pass (`exact`) and mapped
rows (`mapped_rows`); and the item store that keeps one database folder (`store`)."""

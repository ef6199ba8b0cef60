"""The filter columns find each path's folder and extension as os.path does, however the path bytes lie."""

import os

import numpy as np

from nanodb.storage.columns import FilterColumns

PATHS = ["/a/b/c.jpg", "/a/b/.hidden.PNG", "/a/b/..jpg", "/a//b/x.tar.gz", "bare.gif", "/top", "/a/b/", None,
         "/a/b.d/noext", "/a/\udcff/x.Jpeg", "//x/y.webp", "/a/b/c.Longer-Than-8", "/a/b/c.", "/a/.b/.c"]


def derived(paths, order):
    """Columns derived from the paths' bytes laid out in `order` (offsets need not follow each other)."""
    encoded = [b"" if p is None else os.fsencode(p) for p in paths]
    offsets, data = np.zeros(len(paths), np.int64), b""
    for i in order:
        offsets[i], data = len(data), data + encoded[i]
    lengths = np.array([len(e) for e in encoded], np.int64)
    return FilterColumns.derive(data, offsets, lengths, np.arange(len(paths), dtype=np.float64))


def test_folders_and_extensions_are_those_os_path_finds():
    for order in (range(len(PATHS)), reversed(range(len(PATHS)))):  # stored in turn, and scattered
        columns = derived(PATHS, list(order))
        folders = [columns.folders[i] for i in columns.folder[: columns.count]]
        extensions = [columns.extensions[i] for i in columns.extension[: columns.count]]
        assert folders == ["/a/b", "/a/b", "/a/b", "/a//b", None, "", "/a/b", None, "/a/b.d", "/a/\udcff", "//x",
                           "/a/b", "/a/b", "/a/.b"]
        assert extensions == [None if p is None else os.path.splitext(p)[1][1:].lower() for p in PATHS]
        np.testing.assert_array_equal(columns.mtime[: columns.count], np.arange(len(PATHS)))

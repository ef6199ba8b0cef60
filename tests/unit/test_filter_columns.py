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


def test_labels_without_a_folder_cost_memory_linear_in_their_bytes():
    """Tar members, S3 keys and bare names hold no separator: deriving their columns once sliced the rest of
    the path bytes for every such row (1.8 GB at 20K items)."""
    import tracemalloc

    paths = [f"member-{i:06d}.jpg" for i in range(5000)]
    tracemalloc.start()
    try:
        columns = derived(paths, range(len(paths)))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    size = sum(len(p) for p in paths)
    assert peak < 50 * size, f"{peak} bytes traced for {size} bytes of paths"
    assert {columns.folders[i] for i in columns.folder[: columns.count]} == {None}
    assert {columns.extensions[i] for i in columns.extension[: columns.count]} == {"jpg"}


def test_rows_without_paths_have_no_folder_and_no_extension():
    columns = derived([None] * 4, range(4))
    assert columns.count == 4
    assert [columns.folders[i] for i in columns.folder[:4]] == [None] * 4
    assert not columns.extension_rows(frozenset({"jpg"})).any()
    assert not columns.folder_rows("x", lambda f: True).any()

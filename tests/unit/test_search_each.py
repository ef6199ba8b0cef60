"""Queries searched in one pass, each with its own k and allowed rows (VectorIndex.search_each), get exactly
what each gets searched alone (the same rows in the same order, the same scores bit for bit), and the rows
are scored once for all of them."""

import numpy as np
import pytest
from test_search_allowed import brute_force, unit

from nanodb.storage import index as index_module
from nanodb.storage import scan
from nanodb.storage.index import VectorIndex

KERNEL = index_module.KERNEL


@pytest.fixture(autouse=True, params=["int8", "float16"])
def fast_pass(monkeypatch, request):
    """Small segments, so a few thousand rows make several; both CPU fast passes."""
    monkeypatch.setattr(scan, "SEGMENT_ROWS", 4096)
    if request.param == "int8":
        if KERNEL is None:
            pytest.skip("the compact-copy kernel is not built (pip install -e . builds it)")
    else:
        monkeypatch.setattr(index_module, "KERNEL", None)


@pytest.fixture(scope="module")
def index():
    rng = np.random.default_rng(11)
    index = VectorIndex(128, "numpy")
    index.append(unit(rng, 20_000, 128))
    index.append(index.vectors[[11, 11, 4000]])  # exact ties
    index.delete(rng.choice(index.count, 500, replace=False))
    return index


def masks(index: VectorIndex) -> list:
    """Allowed rows of every kind: all, most (scored with all rows), few (scored alone), runs across
    segments, none, and a mask shorter than the rows."""
    rng = np.random.default_rng(2)
    most = rng.random(index.count) < 0.7
    few = rng.random(index.count) < 0.004
    runs = np.zeros(index.count, bool)
    for start in (4000, 8180, 12_000):
        runs[start : start + 300] = True
    most[[11, 20_000]] = few[[11, 20_000]] = True  # a tie among allowed rows
    return [None, most, few, runs, np.zeros(index.count, bool), np.ones(index.count - 2, bool)]


@pytest.mark.parametrize("kinds", ["all", "scored with all rows"])
def test_each_query_of_a_mixed_pass_gets_its_lone_results(index, kinds):
    rng = np.random.default_rng(4)
    kinds = masks(index) if kinds == "all" else [m for i, m in enumerate(masks(index)) if i in (0, 1, 5)]
    nq = 30
    queries = np.concatenate([unit(rng, nq - 2, index.dim), index.vectors[[11, 4000]].astype(np.float32)])
    ks = [(1, 3, 10, 57, 300, 30_000)[j % 6] for j in range(nq)]
    allowed = [kinds[(j * 5) % len(kinds)] for j in range(nq)]  # masks interleaved, not grouped
    found = index.search_each(queries, ks, allowed)
    assert len(found) == nq
    for j, (rows, scores) in enumerate(found):
        lone_rows, lone_scores = index.search(queries[j : j + 1], ks[j], allowed=allowed[j])
        np.testing.assert_array_equal(rows, lone_rows[0])
        assert scores.dtype == lone_scores.dtype and scores.tobytes() == lone_scores[0].tobytes()
        mask = np.ones(index.count, bool)
        if allowed[j] is not None:  # none past its end
            mask[:] = False
            mask[: len(allowed[j])] = allowed[j]
        np.testing.assert_array_equal(rows, brute_force(index, queries[j : j + 1], ks[j], mask)[0][0])


def test_a_query_asking_for_no_row_gets_none_and_leaves_the_others_alone(index):
    rng = np.random.default_rng(6)
    queries = unit(rng, 3, index.dim)
    found = index.search_each(queries, [5, 0, 2], [None] * 3)
    assert [len(r) for r, _ in found] == [5, 0, 2]
    np.testing.assert_array_equal(found[2][0], index.search(queries[2:], 2)[0][0])


class CountedKernel:
    """The kernel, counting the calls that score a run of rows (not a list of them) and the queries each took."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.runs: list[int] = []

    def __getattr__(self, name):
        return getattr(self.kernel, name)

    def nanodb_scores(self, *args):
        self.runs.append(args[7])  # nq
        return self.kernel.nanodb_scores(*args)


def test_the_rows_are_scored_once_for_all_the_queries_of_a_pass(index, monkeypatch, request):
    if request.node.callspec.params["fast_pass"] != "int8":
        pytest.skip("counts the compact kernel's calls")
    counted = CountedKernel(KERNEL)
    monkeypatch.setattr(index_module, "KERNEL", counted)
    rng = np.random.default_rng(8)
    queries = unit(rng, 12, index.dim)
    most = masks(index)[1]
    index.search(queries[:1], 5)
    alone = len(counted.runs)  # the segments of a lone query's pass
    counted.runs.clear()
    index.search_each(queries, [1, 5, 40, 300] * 3, [None, most, None, most] * 3)
    assert counted.runs == [12] * alone  # each segment scored once, for the 12 queries together

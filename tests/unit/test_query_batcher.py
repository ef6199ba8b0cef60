"""The query batcher's scheduling (search.batcher), with a stand-in encoder and searcher: a lone query runs
at once in its caller's thread; queries arriving during a pass share the next one; a caller that gives up
while waiting leaves no one stuck."""

from __future__ import annotations

import threading
import time

import numpy as np

from nanodb.search.batcher import Pending, QueryBatcher
from nanodb.search.encoder import SearchTimings
from nanodb.search.request import SearchRequest, SearchResult, SearchResults

STALLED_S = 60


class StandInEncoder:
    def embed(self, query):
        return np.asarray(query, np.float32)


class StandInSearcher:
    """Answers each query vector with one result naming its first value; records each pass (search_each: all
    the requests of a pass in one call)."""

    def __init__(self):
        self.passes: list[tuple[int, str]] = []  # (queries, the thread that ran the pass)
        self.entered = threading.Event()
        self.release = threading.Event()
        self.release.set()

    def search(self, request: SearchRequest) -> list[SearchResults]:
        self.passes.append((len(request.vectors), threading.current_thread().name))
        self.entered.set()
        assert self.release.wait(STALLED_S)
        return [SearchResults([SearchResult(int(v[0]), None, 1.0)]) for v in request.vectors]

    def search_each(self, requests: list[SearchRequest]) -> list[list[SearchResults]]:
        vectors = np.concatenate([r.vectors for r in requests])
        answers = iter(self.search(SearchRequest(k=1, vectors=vectors)))
        return [[next(answers) for _ in r.vectors] for r in requests]


def batcher_of(searcher: StandInSearcher) -> QueryBatcher:
    return QueryBatcher(StandInEncoder(), lambda: searcher, SearchTimings())


def find(batcher: QueryBatcher, n: int) -> int:
    return batcher.find(SearchRequest(np.array([n, 1.0]), k=1), np.array([n, 1.0]), None)[0].index


def test_a_lone_query_runs_at_once_in_its_callers_thread():
    searcher = StandInSearcher()
    assert find(batcher_of(searcher), 7) == 7
    assert searcher.passes == [(1, threading.current_thread().name)]


def test_queries_arriving_during_a_pass_share_the_next_one():
    searcher, answers = StandInSearcher(), {}
    batcher = batcher_of(searcher)
    searcher.release.clear()
    first = threading.Thread(target=lambda: answers.setdefault(0, find(batcher, 0)))
    first.start()
    assert searcher.entered.wait(STALLED_S)
    others = [threading.Thread(target=lambda n=n: answers.setdefault(n, find(batcher, n))) for n in range(1, 6)]
    for t in others:
        t.start()
    while len(batcher.waiting) < 5:
        assert first.is_alive()
        time.sleep(0.001)
    searcher.release.set()
    for t in [first, *others]:
        t.join(STALLED_S)
    assert answers == {n: n for n in range(6)}
    assert [size for size, _ in searcher.passes] == [1, 5]


def test_a_query_given_up_while_it_was_to_run_the_next_pass_hands_it_on():
    searcher = StandInSearcher()
    batcher = batcher_of(searcher)
    gone = Pending(SearchRequest(k=1), None, None, leads=True)
    batcher.waiting, batcher.running = [gone], True  # handed the next pass, then its caller was interrupted
    batcher.withdraw(gone)
    assert not batcher.running and batcher.waiting == []
    assert find(batcher, 3) == 3  # the next query runs at once instead of waiting for the withdrawn one

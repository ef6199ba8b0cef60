"""Queries that arrive together answered together: one pass of the index for all their vectors, whatever
each asks (its own k, filters, minimum similarity, collapse: Searcher.search_each), each text's vector the
one it gets alone, bit for bit, on every CPU (`QueryEncoder.encode_texts`; a text asked by several queries
encoded once).

A query on 1M rows costs about as much alone as in a batch of dozens (the kernel reads the rows once for
all the queries of a pass), so concurrent users (a server's clients, a program's threads) share passes.
`QueryBatcher` needs no thread of its own and never waits on a timer: a query that finds no pass running
runs at once in its caller's thread, as it would alone; queries arriving while a pass runs wait, and the
first of them runs them all as the next pass when it ends. Each query's results are exactly those it gets
alone (the same vectors, the same exact top k). The queries waiting are bounded: beyond `max_waiting`,
`find` raises SearchBusy (the server answers 503 with Retry-After) instead of queueing without end.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from nanodb.search.encoder import QueryEncoder, SearchTimings, unit
from nanodb.search.query import QueryError, TypedQuery, is_combined
from nanodb.search.request import Searcher, SearchRequest, SearchResults

MAX_WAITING = 256  # queries waiting for the next pass; beyond it, SearchBusy
RETRY_AFTER_S = 1  # what SearchBusy tells a client to wait: a pass of a full batch takes well under this


class SearchBusy(QueryError):
    """Too many searches are waiting: try again shortly (over HTTP: 503 with Retry-After)."""

    def __init__(self, waiting: int, retry_after: int = RETRY_AFTER_S):
        super().__init__(f"the server is busy: {waiting} searches are waiting; try again in {retry_after} s")
        self.retry_after = retry_after


@dataclass(eq=False)
class Pending:
    """One query in the batcher, until its results (or its error) are set."""

    request: SearchRequest  # checked
    query: Any  # as QueryEncoder.classify returned it
    kind: str | None
    leads: bool = False  # this query's thread runs the next pass
    finished: bool = False
    results: SearchResults | None = None
    error: BaseException | None = None
    vector: np.ndarray | None = None
    encode_ms: float = 0.0
    woken: threading.Event = field(default_factory=threading.Event)


def plain_words(request: SearchRequest, query: Any) -> tuple[str, Callable[[np.ndarray], np.ndarray]] | None:
    """(the words, what makes their encoded row the query's vector) when the query is words alone, as
    QueryEncoder encodes them (`text=` as is, a typed query's one text term made unit); else None."""
    if request.text is not None:
        return None if is_combined(query) else (query, lambda v: v)
    single = query.single if isinstance(query, TypedQuery) else None
    if single is not None and single.kind == "text":
        return single.value, unit
    return None


class QueryBatcher:
    """Answers single queries (NanoDB.find) in shared passes; see the module's docstring."""

    def __init__(self, encoder: QueryEncoder, searcher: Callable[[], Searcher], timings: SearchTimings,
                 max_waiting: int = MAX_WAITING):
        self.encoder = encoder
        self.searcher = searcher
        self.timings = timings
        self.max_waiting = max_waiting
        self.lock = threading.Lock()
        self.waiting: list[Pending] = []
        self.running = False

    def find(self, request: SearchRequest, query: Any, kind: str | None) -> SearchResults:
        """The results of one checked request, its query classified; SearchBusy when too many wait."""
        job = Pending(request, query, kind)
        with self.lock:
            if len(self.waiting) >= self.max_waiting:
                raise SearchBusy(len(self.waiting))
            self.waiting.append(job)
            if not self.running:
                self.running = job.leads = True
        try:
            while not job.finished:
                if job.leads:
                    self.run_pass()
                else:
                    job.woken.wait()
        except BaseException:  # e.g. Ctrl-C while waiting: the others must not wait for this thread
            self.withdraw(job)
            raise
        if job.error is not None:
            raise job.error
        return job.results

    def withdraw(self, job: Pending) -> None:
        """Take a query its caller gave up on out of the queue; if it was to run the next pass, hand that on."""
        with self.lock:
            if job in self.waiting:
                self.waiting.remove(job)
                if job.leads:
                    self.hand_on()

    def hand_on(self) -> None:
        """The next pass to the first query waiting (the lock held), or no pass running."""
        if self.waiting:
            self.waiting[0].leads = True
            self.waiting[0].woken.set()
        else:
            self.running = False

    def run_pass(self) -> None:
        """Answer every query waiting now, then hand the next pass to the first query that came meanwhile."""
        with self.lock:
            batch, self.waiting = self.waiting, []
        try:
            self.answer(batch)
        finally:
            with self.lock:
                for job in batch:
                    if job.results is None and job.error is None:
                        job.error = RuntimeError("the search pass failed")
                    job.finished = True
                    job.woken.set()
                self.hand_on()

    def answer(self, batch: list[Pending]) -> None:
        """Embed the batch (all plain words in one text-tower pass), then search all its queries in one
        pass, each with its own k, filters and options; an error belongs to the queries it concerns."""
        self.embed(batch)
        jobs = [job for job in batch if job.error is None]
        if not jobs:
            return
        t0 = time.perf_counter()
        try:
            answers = self.searcher().search_each([dataclasses.replace(job.request, vectors=job.vector[None])
                                                   for job in jobs])
        except Exception as e:
            for job in jobs:
                job.error = e
            return
        search_ms = (time.perf_counter() - t0) * 1000
        for job, answer in zip(jobs, answers):
            if isinstance(answer, Exception):
                job.error = answer
                continue
            results = SearchResults(answer[0])
            results.encode_ms, results.search_ms = job.encode_ms, search_ms
            self.timings.record(job.kind, job.encode_ms, search_ms)
            job.results = results

    def embed(self, batch: list[Pending]) -> None:
        """Each query's vector, computed exactly as for the query alone; the same text asked by several
        queries is encoded once."""
        words = {id(job): plain_words(job.request, job.query) for job in batch}
        texted = [job for job in batch if words[id(job)] is not None]
        for job in batch:
            if words[id(job)] is None:
                t0 = time.perf_counter()
                try:
                    job.vector = (self.encoder.embed_text(job.query) if job.request.text is not None
                                  else self.encoder.embed(job.query))
                except Exception as e:
                    job.error = e
                job.encode_ms = (time.perf_counter() - t0) * 1000
        if not texted:
            return
        t0 = time.perf_counter()
        try:
            # each distinct text's vector, the bits it gets as a lone query (encode_texts: the text tower
            # runs in shapes that give each text its own bits; texts asked before come from the cache)
            distinct = list(dict.fromkeys(words[id(job)][0] for job in texted))
            rows = dict(zip(distinct, self.encoder.encode_texts(distinct)))
        except Exception as e:
            for job in texted:
                job.error = e
            return
        encode_ms = (time.perf_counter() - t0) * 1000
        for job in texted:
            text, finish = words[id(job)]
            job.vector, job.encode_ms = finish(rows[text]), encode_ms


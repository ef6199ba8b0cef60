"""Queries that arrive together share one encode and one search pass (search.batcher), and each gets
exactly the results it gets alone; too many waiting get a 503 with Retry-After."""

from __future__ import annotations

import threading
import time

import httpx
import numpy as np
import pytest

from nanodb.database import NanoDB
from nanodb.interfaces.server import start_server
from nanodb.search.query import QueryError
from nanodb.search.request import Filters, SearchRequest

ROWS = 2000
STALLED_S = 120  # a liveness bound: far beyond a pass on a loaded 2-core machine


class GatedTextModel:
    """The text model, holding every encode until `release` is set: the pass it runs stays running."""

    def __init__(self, model):
        self.model = model
        self.entered = threading.Event()
        self.release = threading.Event()

    def hold(self) -> None:
        self.entered.set()
        assert self.release.wait(STALLED_S), "the test never released the pass"

    def encode_text(self, texts):
        self.hold()
        return self.model.encode_text(texts)

    def encode_each(self, texts):
        self.hold()
        return self.model.encode_each(texts)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(db, server url): ROWS random vectors under two folders, served on a free port."""
    db = NanoDB(tmp_path_factory.mktemp("batching") / "db", config="test")
    vectors = np.random.default_rng(7).standard_normal((ROWS, db.dim)).astype(np.float32)
    db.add(vectors, paths=[f"/photos/{'ab'[i % 2]}/{i}.jpg" for i in range(ROWS)])
    db.search(text="warm up the text model", k=1)
    server = start_server(db, "127.0.0.1", 0)
    yield db, server.url.rstrip("/")
    server.stop()
    db.close()


@pytest.fixture
def gated(served):
    """The served db with its text encodes held by a GatedTextModel until released."""
    db, url = served
    real = db.queries.text_model
    gate = GatedTextModel(real())
    db.queries.text_model = lambda: gate
    try:
        yield db, url, gate
    finally:
        gate.release.set()
        db.queries.text_model = real


def hold_a_pass(url: str, gate: GatedTextModel) -> threading.Thread:
    """A text query whose pass runs (held by the gate) while the test sends others."""
    leader = threading.Thread(target=lambda: httpx.get(f"{url}/api/search/text", params={"q": "first"},
                                                       timeout=STALLED_S))
    leader.start()
    assert gate.entered.wait(STALLED_S)
    return leader


def wait_for_waiting(db: NanoDB, count: int) -> None:
    deadline = time.monotonic() + STALLED_S
    while len(db.batcher.waiting) < count:
        assert time.monotonic() < deadline, f"{len(db.batcher.waiting)} of {count} queries ever queued"
        time.sleep(0.01)


def http_text(url: str, i: int) -> dict:
    params = {"q": f"photo number {i}", "k": 5 + i % 3} | ({"folder": "a"} if i % 4 == 0 else {})
    r = httpx.get(f"{url}/api/search/text", params=params, timeout=STALLED_S)
    assert r.status_code == 200, r.text
    return [(x["index"], x["similarity"]) for x in r.json()["results"]]


def api_query(db: NanoDB, i: int):
    """Query i through the Python API: text or a vector, various k and filters; a few are bad input."""
    if i % 8 == 7:
        return db.find(SearchRequest(10**9))  # no such item: an error of its own
    filters = Filters(folder="b") if i % 3 == 0 else Filters()
    query = (SearchRequest(text=f"a text query {i}", k=4, filters=filters) if i % 2
             else SearchRequest(np.random.default_rng(i).standard_normal(db.dim), k=3 + i % 5, filters=filters))
    return [(r.index, r.similarity) for r in db.find(query)]


def outcome(call, *args):
    try:
        return call(*args)
    except QueryError as e:
        return f"QueryError: {e}"


def test_queries_sent_together_get_their_one_by_one_results(gated):
    """16 HTTP clients and 16 threads at once, in one pass: each gets exactly what it gets alone (items, order,
    similarities), and a query's bad input fails that query only."""
    db, url, gate = gated
    calls = [(http_text, url, i) for i in range(16)] + [(api_query, db, i) for i in range(16)]
    gate.release.set()
    alone = [outcome(*call) for call in calls]
    assert sum(isinstance(a, str) for a in alone) == 2 and all(a for a in alone)
    gate.release.clear()
    gate.entered.clear()
    leader = hold_a_pass(url, gate)
    together: list = [None] * len(calls)

    def send(n: int) -> None:
        together[n] = outcome(*calls[n])

    threads = [threading.Thread(target=send, args=(n,)) for n in range(len(calls))]
    for t in threads:
        t.start()
    wait_for_waiting(db, len(calls))  # all of them in the next pass
    gate.release.set()
    for t in [leader, *threads]:
        t.join(STALLED_S)
    assert together == alone


def test_too_many_waiting_get_503_with_retry_after(gated):
    db, url, gate = gated
    db.batcher.max_waiting = 2
    try:
        leader = hold_a_pass(url, gate)
        queued = [threading.Thread(target=http_text, args=(url, i)) for i in range(2)]
        for t in queued:
            t.start()
        wait_for_waiting(db, 2)
        r = httpx.get(f"{url}/api/search/text", params={"q": "one too many"}, timeout=STALLED_S)
        assert r.status_code == 503
        assert int(r.headers["Retry-After"]) >= 1 and "busy" in r.json()["error"]
        gate.release.set()
        for t in [leader, *queued]:
            t.join(STALLED_S)
    finally:
        db.batcher.max_waiting = 256
    assert httpx.get(f"{url}/api/search/text", params={"q": "after the rush"}, timeout=STALLED_S).status_code == 200

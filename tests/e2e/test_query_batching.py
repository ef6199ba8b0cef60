"""Queries that arrive together share one encode and one search pass (search.batcher), whatever each asks
(k, filters, minimum similarity, collapse), and each gets exactly the results it gets alone; too many
waiting get a 503 with Retry-After."""

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
COPIES = 100  # rows of one vector, in both folders: collapse asks for more rows, round after round
FEW_COPIES = 3  # rows of another: collapse finds them all in its first pass
FRAMES = 6  # frames of one video, each its own vector near the video's
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


def near(db: NanoDB, seed: int) -> np.ndarray:
    """A vector of its own for each seed: seeds 1, 2 and 3 are the copies', the video's and the few copies'."""
    return np.random.default_rng(1000 + seed).standard_normal(db.dim).astype(np.float32)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(db, server url): ROWS random vectors under two folders, COPIES copies of one vector (the same content),
    FEW_COPIES of another and a video's FRAMES frames among them, served on a free port."""
    db = NanoDB(tmp_path_factory.mktemp("batching") / "db", config="test")
    vectors = np.random.default_rng(7).standard_normal((ROWS, db.dim)).astype(np.float32)
    db.add(vectors, paths=[f"/photos/{'ab'[i % 2]}/{i}.jpg" for i in range(ROWS)])
    for seed, copies in ((1, COPIES), (3, FEW_COPIES)):
        db.add(np.tile(near(db, seed), (copies, 1)), paths=[f"/photos/{'ab'[i % 2]}/copy{seed}-{i}.jpg"
                                                            for i in range(copies)])
    frames = near(db, 2) + 0.3 * np.random.default_rng(8).standard_normal((FRAMES, db.dim)).astype(np.float32)
    db.add(frames, paths=["/photos/a/clip.mp4"] * FRAMES, metadata=[{"time": t} for t in range(FRAMES)])
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


def mixed_request(db: NanoDB, i: int) -> SearchRequest:
    """Query i of a mixed batch: its own vector, k, filters, minimum similarity and collapse."""
    vector = near(db, 10 + i)
    if i % 5 == 1:
        vector = near(db, 3) + 0.5 * vector  # the few copies first
    filters = [Filters(), Filters(folder="a"), Filters(folder="b", types=["jpg"]), Filters(folder="/photos")][i % 4]
    return SearchRequest(vector, k=1 + (i * 7) % 23, filters=filters, collapse=i % 3 == 0,
                         min_similarity=0.12 if i % 7 == 2 else None)


def rounds_request(db: NanoDB, i: int) -> SearchRequest:
    """Queries that need more rows than their first pass: many copies with collapse, a video's frames."""
    if i % 2:
        return SearchRequest(near(db, 1) + 0.3 * near(db, 50 + i), k=5 + i, collapse=True)
    filters = Filters(folder="a") if i % 4 else Filters()
    return SearchRequest(near(db, 2) + 0.3 * near(db, 50 + i), k=3 + i, filters=filters)


def shown(db: NanoDB, request: SearchRequest):
    """What a user sees of a request's results (or its error)."""
    try:
        return [(r.index, r.path, r.similarity, r.duplicates) for r in db.find(request)]
    except QueryError as e:
        return f"QueryError: {e}"


def sent_together(db: NanoDB, gate: GatedTextModel, url: str, requests: list) -> list:
    """The requests' results when all are sent while a pass runs: they wait for the next pass."""
    gate.release.clear()
    gate.entered.clear()
    leader = hold_a_pass(url, gate)
    together: list = [None] * len(requests)
    threads = [threading.Thread(target=lambda n=n: together.__setitem__(n, shown(db, requests[n])))
               for n in range(len(requests))]
    for t in threads:
        t.start()
    wait_for_waiting(db, len(requests))
    gate.release.set()
    for t in [leader, *threads]:
        t.join(STALLED_S)
    return together


@pytest.fixture
def passes(gated, monkeypatch):
    """The number of queries of each pass over the index's rows (VectorIndex.search_each), from now on."""
    db = gated[0]
    index, sizes = db.store.index, []
    search_each = index.search_each

    def counted(queries, ks, allowed, stats=None):
        sizes.append(len(queries))
        return search_each(queries, ks, allowed, stats)

    monkeypatch.setattr(index, "search_each", counted)
    return sizes


def test_a_mixed_batch_is_one_pass_giving_each_query_its_lone_results(gated, passes):
    """24 queries with different k, filters (one bad), minimum similarity and collapse, sent together: one
    pass over the rows answers them all (the held query's pass before), each exactly as alone."""
    db, url, gate = gated
    requests = [mixed_request(db, i) for i in range(23)] + [SearchRequest(near(db, 4), k=4, filters=Filters(
        since="not a date"))]
    gate.release.set()
    alone = [shown(db, r) for r in requests]
    assert sent_together(db, gate, url, requests) == alone
    assert sum(isinstance(a, str) for a in alone) == 1 and "not a date" in alone[-1]
    assert any(a and a[0][3] for a in alone[:-1]), "no query collapsed copies"
    assert any(len(a) < r.k for a, r in zip(alone, requests) if r.min_similarity), "no result below a minimum"
    assert passes[-2:] == [1, 23]  # the held text query's pass, then one for all the rest


def test_queries_needing_more_rows_share_their_later_passes_too(gated, passes):
    """Collapsed copies and a video's frames make a query ask for more rows: each still gets its lone
    results, and the rounds of all the queries share passes."""
    db, url, gate = gated
    requests = [rounds_request(db, i) for i in range(8)] + [mixed_request(db, i) for i in range(8)]
    gate.release.set()
    alone, lone_rounds = [], []
    for r in requests:
        before = len(passes)
        alone.append(shown(db, r))
        lone_rounds.append(len(passes) - before)
    before = len(passes)
    assert sent_together(db, gate, url, requests) == alone
    assert all(sum(r[1] == "/photos/a/clip.mp4" for r in a) == 1 for a in alone[:8:2]), "one result per video"
    assert all(len(a[0][3]) == COPIES - 1 for a in alone[1:8:2]), "every copy listed"
    rounds = passes[before + 1 :]  # after the held query's pass
    assert max(lone_rounds) >= 3 and len(rounds) == max(lone_rounds)  # round n of every query in one pass
    assert rounds[0] == len(requests) and sum(rounds) == sum(lone_rounds)  # each query as many rounds as alone

"""GET /api/duplicates on a real server: the groups of NanoDB.near_duplicates, bounded answers, one-line
errors, one computation at a time (a second request meanwhile: 503 with Retry-After), the last result kept."""

from __future__ import annotations

import threading

import httpx
import pytest
from helpers.browser import served_photos
from PIL import Image

from nanodb.interfaces.search_service import MAX_DUPLICATE_GROUPS, DuplicateFinder, DuplicatesBusy


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """(db, client, photos): 6 real photos and a half-size copy of the first, served on 127.0.0.1."""
    root = tmp_path_factory.mktemp("dups")
    with served_photos(root, ("p",), per_folder=6) as (db, url, photos):
        copy = root / "p" / "copy_half.png"
        with Image.open(photos[0]) as im:
            im.resize((im.width // 2, im.height // 2), Image.LANCZOS).save(copy)
        db.add([str(copy)])
        with httpx.Client(base_url=url, timeout=120) as client:
            yield db, client, [*photos, copy]


def as_sets(groups) -> list[frozenset[int]]:
    return [frozenset(m["index"] for m in g["items"]) for g in groups]


@pytest.mark.parametrize("threshold", [0.9, 0.95, 0.99, 1.0])
def test_groups_equal_near_duplicates(site, threshold):
    db, client, photos = site
    r = client.get("/api/duplicates", params={"threshold": threshold})
    assert r.status_code == 200, r.text
    body = r.json()
    want = db.near_duplicates(threshold)
    assert as_sets(body["groups"]) == [frozenset(g.indices) for g in want]
    assert body["total_groups"] == len(want) and body["total_items"] == sum(len(g) for g in want)
    assert not body["truncated"] and body["threshold"] == threshold
    for g, w in zip(body["groups"], want):
        assert g["size"] == len(w)
        assert [m["index"] for m in g["items"]] == w.indices
        assert [m["similarity"] for m in g["items"]] == [round(m.similarity, 5) for m in w]
        assert all(m["thumbnail"] == f"/api/items/{m['index']}/thumbnail" for m in g["items"])
    if threshold <= 0.95:  # the half-size copy is its original's near-duplicate
        original, copy = db.index_of(photos[0]), db.index_of(photos[-1])
        assert any({original, copy} <= s for s in as_sets(body["groups"]))


def test_the_last_result_is_kept_until_the_database_changes(site):
    db, client, photos = site
    first = client.get("/api/duplicates", params={"threshold": 0.93}).json()
    again = client.get("/api/duplicates", params={"threshold": 0.93}).json()
    assert again["cached"] and again["groups"] == first["groups"]
    index = db.add(db[db.index_of(photos[1])].vector, paths=["/nowhere/same-vector.jpg"])[0]
    try:
        changed = client.get("/api/duplicates", params={"threshold": 0.93}).json()
        assert not changed["cached"] and any(index in s for s in as_sets(changed["groups"]))
    finally:
        db.delete([index])
    assert not client.get("/api/duplicates", params={"threshold": 0.93}).json()["cached"]


def test_limits_and_min_size(site):
    db, client, _ = site
    want = db.near_duplicates(0.8)
    r = client.get("/api/duplicates", params={"threshold": 0.8, "limit": 1})
    body = r.json()
    assert len(body["groups"]) == min(1, len(want)) and body["total_groups"] == len(want)
    assert body["truncated"] == (len(want) > 1)
    big = client.get("/api/duplicates", params={"threshold": 0.8, "min_size": 3}).json()
    assert as_sets(big["groups"]) == [frozenset(g.indices) for g in want if len(g) >= 3]


@pytest.mark.parametrize("params", [{"threshold": 0}, {"threshold": 1.5}, {"threshold": -1}, {"threshold": "nan"},
                                    {"threshold": "x"}, {"threshold": "inf"}, {"min_size": 1},
                                    {"limit": 0}, {"limit": MAX_DUPLICATE_GROUPS + 1}])
def test_bad_parameters_get_a_one_line_error(site, params):
    _, client, _ = site
    r = client.get("/api/duplicates", params=params)
    assert r.status_code in (400, 422), r.text
    error = r.json()["error"]
    assert error and "\n" not in error and len(error) < 300


class Blocking:
    """A stand-in database whose near_duplicates waits until released."""

    def __init__(self, db):
        self.db, self.entered, self.release = db, threading.Event(), threading.Event()
        self.compute = db.near_duplicates  # the real one, before a test replaces it on `db`

    @property
    def state(self):
        return self.db.state

    def near_duplicates(self, threshold, **kwargs):
        self.entered.set()
        assert self.release.wait(60)
        return self.compute(threshold, **kwargs)


def test_one_computation_at_a_time(site):
    db, _, _ = site
    finder = DuplicateFinder(Blocking(db))
    done = []
    first = threading.Thread(target=lambda: done.append(finder.find(0.97)))
    first.start()
    assert finder.db.entered.wait(60)
    with pytest.raises(DuplicatesBusy) as busy:
        finder.find(0.97)
    with pytest.raises(DuplicatesBusy):
        finder.find(0.9)
    assert busy.value.retry_after > 0 and "\n" not in str(busy.value)
    finder.db.release.set()
    first.join(60)
    assert done and not done[0].cached
    assert finder.find(0.97).cached


def test_a_request_while_one_computes_gets_503_with_retry_after(site, monkeypatch):
    db, client, _ = site
    blocking = Blocking(db)
    monkeypatch.setattr(db, "near_duplicates", blocking.near_duplicates)
    answers = []
    first = threading.Thread(target=lambda: answers.append(client.get("/api/duplicates",
                                                                      params={"threshold": 0.912})))
    first.start()
    try:
        assert blocking.entered.wait(60)
        with httpx.Client(base_url=client.base_url, timeout=60) as other:
            r = other.get("/api/duplicates", params={"threshold": 0.912})
            assert r.status_code == 503 and int(r.headers["Retry-After"]) > 0
            assert "computed for another request" in r.json()["error"]
            assert other.get("/api/stats").status_code == 200  # other requests go on meanwhile
    finally:
        blocking.release.set()
        first.join(60)
    assert answers and answers[0].status_code == 200

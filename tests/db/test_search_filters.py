"""Search filters (folder, date range, file type) and collapsed duplicates stay exact."""

from __future__ import annotations

import json
import os
from datetime import date, datetime

import numpy as np
import pytest

from nanodb.database import NanoDB
from nanodb.media.record import FileRecord
from nanodb.search.local import RowFilter
from nanodb.search.query import QueryError
from nanodb.search.request import Filters

N = 300


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    rng = np.random.default_rng(7)
    vectors = rng.standard_normal((N, 512)).astype(np.float32)
    vectors[200:205] = vectors[3]  # five copies of item 3's content
    db = NanoDB(tmp_path_factory.mktemp("filters") / "db", config="test")
    paths = [f"/photos/{'2023' if i % 2 else '2024'}/trip/img{i}.{('jpg', 'png', 'jpeg')[i % 3]}" for i in range(N)]
    db.add(vectors[:, : db.dim], paths=paths)
    yield db
    db.close()


def brute_force(db, query, allowed, k):
    scores = db.vectors.astype(np.float64) @ query
    rows = np.flatnonzero(allowed)
    return list(rows[np.lexsort((rows, -scores[rows]))][:k])


@pytest.mark.parametrize("folder,types,want", [
    ("2023", None, lambda p: "/2023/" in p),
    ("/photos/2024", ["png"], lambda p: p.startswith("/photos/2024/") and p.endswith(".png")),
    (None, "jpg", lambda p: p.endswith((".jpg", ".jpeg"))),
    ("trip", ["PNG"], lambda p: p.endswith(".png")),
])
def test_filtered_search_is_the_exact_top_k_of_the_allowed_items(db, folder, types, want):
    rng = np.random.default_rng(1)
    allowed = np.array([want(db.path_of(i)) for i in range(N)])
    for _ in range(5):
        q = rng.standard_normal(db.dim)
        q /= np.linalg.norm(q)
        got = [r.index for r in db.search(q.astype(np.float32), 10, folder=folder, types=types)]
        assert got == brute_force(db, q, allowed, 10)


def test_a_folder_matches_whole_names_only(db):
    assert db.search(0, 5, folder="/photos/202") == []
    assert db.search(0, 5, folder="rip") == []


def test_date_range_filters_by_file_time(tmp_path):
    db = NanoDB(tmp_path / "db", config="test")
    rng = np.random.default_rng(2)
    times = [datetime(2024, 1, d, 12).timestamp() for d in (1, 2, 3)]
    for t in times:
        db.store.append(rng.standard_normal((1, db.dim)), [FileRecord(path=f"/x/{t}.jpg", mtime=t, hash=rng.bytes(16))])
    day2 = db.search(0, 5, since="2024-01-02", until="2024-01-02")
    assert [r.index for r in day2] == [1]
    assert {r.index for r in db.search(0, 5, since=date(2024, 1, 2))} == {1, 2}
    assert {r.index for r in db.search(0, 5, until=times[1])} == {0}
    with pytest.raises(QueryError, match="since: 'last week' is not a date"):
        db.search(0, 5, since="last week")
    db.close()


def test_identical_files_collapse_into_one_result_listing_the_copies(db):
    results = db.search(3, 5, collapse_duplicates=True)
    assert results[0].index == 3 and sorted(results[0].duplicates) == [200, 201, 202, 203, 204]
    assert len(results) == 5 and len({r.index for r in results}) == 5
    plain = db.search(3, 6)
    assert {r.index for r in plain} == {3, 200, 201, 202, 203, 204}
    # the rest are the exact next-best distinct items
    others = [r.index for r in db.search(3, 12) if r.index not in (3, 200, 201, 202, 203, 204)]
    assert [r.index for r in results[1:]] == others[:4]



def test_filters_and_collapse_together_keep_the_allowed_copies_only(db):
    results = db.search(3, 4, folder="2024", collapse_duplicates=True)  # item 3 is in 2023, copies 200-204 both
    assert results[0].index == 200 and results[0].duplicates == [202, 204]
    assert all("/2024/" in r.path for r in results) and len({r.index for r in results}) == 4


def test_every_interface_takes_every_filter_declared_once(db):
    """The command line's flags, the HTTP API's parameters and body fields and the web UI's controls are
    made from search.request.Filters: a filter added there reaches all of them."""
    from fastapi.testclient import TestClient

    from nanodb.interfaces.cli import build_parser
    from nanodb.interfaces.server import build_app
    from nanodb.search.request import Filters

    declared = Filters.described()
    assert [f.name for f in declared] == ["folder", "since", "until", "types"]
    for command in (["search", "words"], ["similar", "12"]):
        flags = [arg for f in declared for arg in (f"--{f.flag}", f.examples[0] if not f.choices else "jpg")]
        args = build_parser().parse_args([*command, "--path", "db", *flags])
        assert all(getattr(args, f.name) == (["jpg"] if f.choices else f.examples[0]) for f in declared)
    schema = TestClient(build_app(db)).get("/openapi.json").json()
    for route in ("/api/search/text", "/api/search/item/{index}"):
        parameters = {p["name"]: p for p in schema["paths"][route]["get"]["parameters"]}
        assert all(parameters[f.flag]["description"] == f.help for f in declared), route
    body = schema["components"]["schemas"]["TextQuery"]["properties"]
    assert all(body[f.name]["description"] == f.help for f in declared)


# ----------------------------------------------------------------- filters over a changing database
FILTERS = [  # selective and broad, alone and combined
    dict(folder="holiday"), dict(folder="/photos/2019"), dict(folder="/photos/2019/"), dict(folder="/"),
    dict(folder="2019/holiday"), dict(folder="x"), dict(types=["png"]), dict(types="jpg,tif"), dict(types=["GIF"]),
    dict(since="2020-01-01"), dict(until="2019-06-30"), dict(since="2019-03-01", until="2021-12-31"),
    dict(folder="holiday", types=["jpg"], since="2019-06-01"), dict(folder="/photos", types=["png", "webp"]),
]
AWKWARD_PATHS = [  # each a path, whose folder and extension os.path would find for the filters' tests
    "/photos/2019/holiday/.hidden.jpg", "/photos/2019/holiday/..jpg", "/photos/2019/holiday/.png",
    "/photos//2019/holiday/double.PNG", "/photos/2019/holiday/", "bare-name.jpg", "/top.gif", "//x/y.jpeg",
    "/photos/2019/holiday/dots.in.name.TIF", "/photos/2019/holiday.d/img.jpg", "/photos/2019/\udcff/img.png",
    "/photos/x/no-extension", "/photos/2019/holiday/img.j\u00e9pg",
]


def reference_allows(path, where, mtime):
    """The filters' meaning, tested path by path with os.path (what the row masks must equal)."""
    if path is None:
        return where.folder is None and where.types is None and reference_time(where, mtime)
    if where.types is not None and os.path.splitext(path)[1][1:].lower() not in where.types:
        return False
    if where.folder is not None:
        if os.path.isabs(where.folder):
            prefix = where.folder if where.folder.endswith(os.sep) else where.folder + os.sep
            if not path.startswith(prefix):
                return False
        elif f"{os.sep}{where.folder.strip(os.sep)}{os.sep}" not in os.path.dirname(path) + os.sep:
            return False
    return reference_time(where, mtime)


def reference_time(where, mtime):
    return (where.since is None or mtime >= where.since) and (where.until is None or mtime < where.until)


def assert_filters_exact(db, rng):
    vectors = db.vectors.astype(np.float64)
    live = np.array([db.store.is_live(i) for i in range(db.store.rows)])
    queries = rng.standard_normal((2, db.dim))
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    for given in FILTERS:
        where = RowFilter.of(Filters(**given))
        allowed = live & np.array([reference_allows(db.store.path_of(i), where, db.store.item(i).mtime)
                                   for i in range(db.store.rows)], bool)
        for q in queries:
            scores = vectors @ q
            rows = np.flatnonzero(allowed)
            for k in (5, 40):
                got = [r.index for r in db.search(q.astype(np.float32), k, **given)]
                assert got == list(rows[np.lexsort((rows, -scores[rows]))][:k]), (given, k)


def records(rng, n, first):
    years = rng.integers(2018, 2023, n)
    folders = rng.choice(["holiday", "work", "holiday/beach", "family"], n)
    types = rng.choice(["jpg", "png", "JPEG", "webp", "gif", "tif"], n)
    return [FileRecord(path=f"/photos/{y}/{f}/img_{first + i}.{t}", hash=rng.bytes(16),
                       mtime=datetime(int(y), int(rng.integers(1, 13)), 15).timestamp())
            for i, (y, f, t) in enumerate(zip(years, folders, types))]


def test_filters_stay_exact_through_appends_deletes_moves_compaction_and_reopening(tmp_path):
    rng = np.random.default_rng(24)
    db = NanoDB(tmp_path / "db", config="test", compact_dead_fraction=0.1)
    first = records(rng, 300, 0) + [FileRecord(path=p, hash=rng.bytes(16), mtime=1.6e9) for p in AWKWARD_PATHS]
    db.store.append(rng.standard_normal((len(first), db.dim)), first)
    db.add(rng.standard_normal((3, db.dim)))  # items without a path: no folder or type filter allows them
    assert_filters_exact(db, rng)  # the columns are derived here
    db.store.append(rng.standard_normal((50, db.dim)), records(rng, 50, 1000))  # and kept in step from here
    db.store.append(rng.standard_normal((1, db.dim)), [FileRecord(path="/new/folder/a.png", hash=rng.bytes(16))])
    db.delete(rng.choice(db.store.rows, 60, replace=False))
    db.store.move_paths([("/new/folder/a.png", "/photos/2019/holiday/moved.jpg")])
    db.store.move_folder("/photos/2020/work", "/photos/2019/holiday/work")
    assert_filters_exact(db, rng)
    db.save()  # more than 10% of the rows are dead: compacted, the rows renumbered
    assert db.store.rows == len(db.store)
    assert_filters_exact(db, rng)
    db.store.append(rng.standard_normal((10, db.dim)), records(rng, 10, 2000))
    db.save()
    db.close()
    db = NanoDB(tmp_path / "db", config="test")
    assert_filters_exact(db, rng)
    db.close()


def test_a_format_1_database_filters_exactly(tmp_path):
    """Filter columns come from the item records and paths, which format 1 (before the compact copy)
    stored alike: such a folder filters exactly as it opens, and after its migration by a save."""
    rng = np.random.default_rng(1)
    with NanoDB(tmp_path / "db", config="test") as db:
        db.store.append(rng.standard_normal((120, db.dim)), records(rng, 120, 0))
        db.save()
    manifest = json.loads((tmp_path / "db" / "nanodb.json").read_text())
    manifest["version"] = 1  # what nanodb wrote before the compact copy: no compact files or field
    del manifest["compact"]
    for kind, extension in (("codes", "u8"), ("scales", "f32")):
        del manifest["checksums"][kind]
        (tmp_path / "db" / f"{kind}.0.{extension}").unlink()
    (tmp_path / "db" / "nanodb.json").write_text(json.dumps(manifest))
    with NanoDB(tmp_path / "db", config="test") as db:
        assert_filters_exact(db, rng)
        db.store.append(rng.standard_normal((5, db.dim)), records(rng, 5, 500))
        db.save()
    with NanoDB(tmp_path / "db", config="test") as db:
        assert db.store.manifest.version == 2
        assert_filters_exact(db, rng)


def test_vectors_added_bare_answer_filtered_searches_and_near_duplicates(tmp_path):
    """Items added as bare vectors have no path: a filter allows none of them (it raised IndexError, a 500
    over HTTP), and the near-duplicates still pair them."""
    rng = np.random.default_rng(3)
    with NanoDB(tmp_path / "db", config="test") as db:
        vectors = rng.standard_normal((6, db.dim)).astype(np.float32)
        vectors[5] = vectors[0]
        db.add(vectors)
        assert db.search(vectors[0], 3, types=["jpg"]) == []
        assert db.search(vectors[0], 3, folder="photos") == []
        assert [r.index for r in db.search(vectors[0], 2)] in ([0, 5], [5, 0])
        groups = db.near_duplicates(0.99)
        assert [sorted(g.indices) for g in groups] == [[0, 5]]

"""Images, items and URLs as terms of combined queries (`./cat.jpg - 3:cat + 2:bee`, `#3 + night`), and the
one path-or-text rule, in the Python API, the console, the one-shot commands and the HTTP API."""

from __future__ import annotations

import asyncio
import functools
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from helpers import coco_photos

from nanodb.database import NanoDB
from nanodb.interfaces.console import Console
from nanodb.interfaces.http_api import api_router, install_error_handlers
from nanodb.interfaces.search_service import SearchService
from nanodb.interfaces.thumbnails import ThumbnailCache
from nanodb.search.query import QueryError, QueryTerm, TypedQuery
from nanodb.search.request import SearchRequest

K = 4


@pytest.fixture(scope="module")
def photos_db(tmp_path_factory):
    """(db, folder): 8 real photos p0.jpg..p7.jpg added (ViT-S-32, random weights), and a copy of p0
    named `Holiday - Beach.jpg` that is not added."""
    root = tmp_path_factory.mktemp("combined")
    folder = root / "photos"
    folder.mkdir()
    photos = [shutil.copy(src, folder / f"p{i}.jpg") for i, src in enumerate(coco_photos(8))]
    shutil.copy(photos[0], folder / "Holiday - Beach.jpg")
    db = NanoDB(root / "db", config="test")
    db.add([str(p) for p in photos])
    db.save()
    yield db, folder
    db.close()


def expected(db: NanoDB, *terms: tuple[float, object]) -> list[int]:
    """The exact top K for the normalised weighted sum of the terms' unit vectors, each embedded alone: a
    string as words, a Path as that image, an int as that item."""
    vectors = [db.queries.embed_text(term) if isinstance(term, str) else db.embed_query(term) for _, term in terms]
    total = sum(weight * v / np.linalg.norm(v) for (weight, _), v in zip(terms, vectors, strict=True))
    return [r.index for r in db.search(total / np.linalg.norm(total), K)]


def indices(results) -> list[int]:
    return [r.index for r in results]


def test_image_paths_items_and_words_combine_in_the_python_api(photos_db, monkeypatch):
    db, folder = photos_db
    monkeypatch.chdir(folder)
    p0, p5 = Path(folder / "p0.jpg"), Path(folder / "p5.jpg")
    assert indices(db.search("./p0.jpg - 3:cat + 2:bee", K)) == expected(db, (1, p0), (-3, "cat"), (2, "bee"))
    assert indices(db.search("2:./p0.jpg + night", K)) == expected(db, (2, p0), (1, "night"))
    assert indices(db.search("#3 + night - 0.5:p5.jpg", K)) == expected(db, (1, 3), (1, "night"), (-0.5, p5))
    request = SearchRequest("p5.jpg + #1", K)
    assert indices(db.find(request)) == expected(db, (1, p5), (1, 1))
    # quoted terms are words, and a file whose name holds an operator is that file
    assert indices(db.search('"./p0.jpg" + night', K)) == expected(db, (1, "./p0.jpg"), (1, "night"))
    first = db.search("./Holiday - Beach.jpg", 1)[0]
    assert first.path == str(p0) and first.similarity > 0.999


def test_a_missing_image_or_item_term_is_an_error_naming_it(photos_db, monkeypatch):
    db, folder = photos_db
    monkeypatch.chdir(folder)
    with pytest.raises(QueryError, match=r"^no such image file: \./nope\.jpg$"):
        db.search("./nope.jpg - 3:cat")
    with pytest.raises(QueryError, match="^no item with index 99$"):
        db.search("night + #99")
    with pytest.raises(QueryError, match="cancel out"):
        db.search("p1.jpg - ./p1.jpg")


@pytest.fixture
def image_site(photos_db):
    """The photos folder on a local http server: (base URL, the paths it was asked for)."""
    _, folder = photos_db
    asked: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            asked.append(self.path)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", asked
    server.shutdown()
    server.server_close()


def test_an_image_url_is_a_term_where_fetching_is_allowed(photos_db, image_site):
    db, folder = photos_db
    base, asked = image_site
    got = indices(db.search(f"{base}/p2.jpg - 2:cat", K))
    assert asked == ["/p2.jpg"] and got == expected(db, (1, folder / "p2.jpg"), (-2, "cat"))


def console_lines(db: NanoDB, line: str) -> list[str]:
    lines: list[str] = []
    asyncio.run(Console(db, K, lines.append).execute(line))
    return lines


def test_the_console_searches_combined_queries_that_start_with_an_image(photos_db, monkeypatch):
    db, folder = photos_db
    monkeypatch.chdir(folder)
    for line in ("./p0.jpg - 3:cat + 2:bee", "2:./p0.jpg + night", "#3 + night"):
        assert console_lines(db, line) == [str(r) for r in db.search(line, K)], line
    assert console_lines(db, "./nope.jpg - 3:cat") == ["error: no such image file: ./nope.jpg"]
    # `similar` takes the same combined queries, and #N as an item
    assert console_lines(db, "similar p0.jpg - 3:cat") == console_lines(db, "./p0.jpg - 3:cat")
    assert console_lines(db, "similar #3") == console_lines(db, "similar 3")
    assert console_lines(db, "similar ./nope.jpg - 3:cat") == ["error: no such image file: ./nope.jpg"]
    assert console_lines(db, '"./p0.jpg - cat"') == [str(r) for r in db.search(text="./p0.jpg - cat", k=K)]


def nanodb(*args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nanodb", *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=cwd, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])})


def test_the_one_shot_search_reads_paths_as_images_and_text_as_words(photos_db):
    db, folder = photos_db
    run = nanodb("search", "--path", db.path, "./p0.jpg", "-", "3:cat", "+", "2:bee", "--json", "-k", K, cwd=folder)
    assert run.returncode == 0, run.stderr
    got = [json.loads(line)["index"] for line in run.stdout.splitlines()]
    assert got == expected(db, (1, folder / "p0.jpg"), (-3, "cat"), (2, "bee"))
    words = nanodb("search", "--path", db.path, "--text", "./p0.jpg", "--json", "-k", K, cwd=folder)
    assert words.returncode == 0, words.stderr
    assert [json.loads(line)["index"] for line in words.stdout.splitlines()] == expected(db, (1, "./p0.jpg"))
    missing = nanodb("search", "--path", db.path, "./nope.jpg - 3:cat", cwd=folder)
    assert missing.returncode == 2 and missing.stdout == "", missing.stderr
    assert missing.stderr == "nanodb: error: no such image file: ./nope.jpg\n", missing.stderr


@pytest.fixture
def api(photos_db):
    db, _ = photos_db
    app = FastAPI()
    install_error_handlers(app)
    service = SearchService(db)
    app.include_router(api_router(service, ThumbnailCache(db)))
    with TestClient(app) as client:
        yield client, service
    service.close()


def api_indices(response) -> list[int]:
    assert response.status_code == 200, response.text
    return [r["index"] for r in response.json()["results"]]


def test_the_http_text_route_combines_items_and_words_and_opens_no_path(photos_db, api, image_site):
    db, folder = photos_db
    client, _ = api
    assert api_indices(client.get("/api/search/text", params={"q": "#3 + night", "k": K})) == expected(
        db, (1, 3), (1, "night"))
    assert api_indices(client.post("/api/search/text", json={"q": "2:#1 - cat", "k": K})) == expected(
        db, (2, 1), (-1, "cat"))
    base, asked = image_site
    for q in (f"{folder / 'p0.jpg'} + night", f"{base}/p0.jpg - cat"):  # words on a server, never opened
        got = api_indices(client.get("/api/search/text", params={"q": q, "k": K}))
        assert got == indices(db.search(text=q, k=K)), q
    assert asked == []
    r = client.get("/api/search/text", params={"q": "night + #99"})
    assert r.status_code == 400 and r.json() == {"error": "no item with index 99"}


def test_the_http_image_route_combines_the_upload_with_terms(photos_db, api):
    db, folder = photos_db
    client, service = api
    data = (folder / "p0.jpg").read_bytes()
    r = client.post("/api/search/image", params={"q": "- 3:cat + 2:bee", "k": K}, files={"file": ("p0.jpg", data)})
    upload = QueryTerm(1.0, "image", service.open_upload(data))
    combined = TypedQuery.parse("- 3:cat + 2:bee", on_server=True, first=upload)
    assert api_indices(r) == indices(db.search(combined, K))
    plain = client.post("/api/search/image", params={"k": K}, files={"file": ("p0.jpg", data)}).json()["results"]
    assert [x["similarity"] for x in plain] != [x["similarity"] for x in r.json()["results"]]

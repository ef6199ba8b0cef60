"""The OpenAPI schema says what clients need, /docs works offline, and the API takes the search filters."""

from __future__ import annotations

import numpy as np
import pytest
from fastapi.testclient import TestClient

from nanodb.database import NanoDB
from nanodb.interfaces.server import build_app


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    db = NanoDB(tmp_path_factory.mktemp("schema") / "db", config="test")
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((6, db.dim))
    vectors[5] = vectors[0]
    db.add(vectors, paths=[f"/photos/{'a' if i % 2 else 'b'}/p{i}.{'png' if i == 3 else 'jpg'}" for i in range(6)])
    yield db
    db.close()


def test_docs_are_served_without_a_cdn(db):
    client = TestClient(build_app(db))
    page = client.get("/docs").text
    assert "cdn.jsdelivr" not in page and "unpkg" not in page
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css"):
        url = next(part.split('"')[0] for part in page.split("'") + page.split('"') if part.endswith(asset))
        assert client.get(url).status_code == 200, url


def test_schema_declares_bounds_models_images_and_404(db):
    schema = TestClient(build_app(db)).get("/openapi.json").json()
    paths = schema["paths"]
    k = next(p for p in paths["/api/search/text"]["get"]["parameters"] if p["name"] == "k")
    assert k["schema"]["minimum"] == 1 and k["schema"]["maximum"] >= 256 and k["schema"]["examples"]
    stats = paths["/api/stats"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert stats["$ref"].endswith("/Stats")
    assert "image/jpeg" in paths["/api/items/{index}/thumbnail"]["get"]["responses"]["200"]["content"]
    assert "404" in paths["/api/items/{index}"]["get"]["responses"]
    names = {p["name"] for p in paths["/api/search/item/{index}"]["get"]["parameters"]}
    assert {"folder", "since", "until", "type", "collapse"} <= names


def test_a_missing_item_is_404(db):
    client = TestClient(build_app(db))
    for url in ("/api/items/9999", "/api/items/9999/thumbnail", "/api/search/item/9999"):
        r = client.get(url)
        assert r.status_code == 404 and "no item with index 9999" in r.json()["error"], url


def test_basic_auth_is_a_declared_security_scheme(db):
    client = TestClient(build_app(db, ("ann", "secret")))
    assert client.get("/api/stats").status_code == 401
    assert client.get("/api/stats", auth=("ann", "secret")).json()["items"] == 6
    schema = client.get("/openapi.json", auth=("ann", "secret")).json()
    assert schema["components"]["securitySchemes"]["HTTPBasic"]["scheme"] == "basic"


def test_search_takes_the_filters(db):
    client = TestClient(build_app(db))
    found = client.get("/api/search/item/0", params={"folder": "a", "k": 10}).json()["results"]
    assert {r["path"] for r in found} == {"/photos/a/p1.jpg", "/photos/a/p3.png", "/photos/a/p5.jpg"}
    found = client.get("/api/search/item/0", params=[("type", "png"), ("k", "10")]).json()["results"]
    assert [r["index"] for r in found] == [3]
    found = client.get("/api/search/item/0", params={"collapse": "true", "k": 2}).json()["results"]
    assert found[0]["index"] == 0 and found[0]["duplicates"] == [5] and found[1]["index"] not in (0, 5)
    r = client.post("/api/search/text", json={"q": "dog", "since": "yesterday"})
    assert r.status_code == 400 and "not a date" in r.json()["error"]

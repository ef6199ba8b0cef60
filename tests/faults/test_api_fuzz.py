"""Fuzz the HTTP API from its own OpenAPI schema (schemathesis): whatever a client sends, the answer is
never a 5xx and never carries a stack trace. A real server on 127.0.0.1 serves ~20 real photos."""

from __future__ import annotations

import os
import shutil

import httpx
import numpy as np
import pytest

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is in the `test` extra")
from helpers import PHOTOS  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402  (hypothesis comes with schemathesis)
from hypothesis import strategies as st  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402

from nanodb.database import NanoDB  # noqa: E402
from nanodb.interfaces.server import start_server  # noqa: E402

COCO = PHOTOS
DEFAULT_EXAMPLES = 40  # per operation: well under a minute in all on 2 cores
UI_EXAMPLES = 40  # per Gradio route (about 15): ~15 s on 2 cores
SLOW_EXAMPLES = int(os.environ.get("NANODB_FUZZ_EXAMPLES", "400"))
TRACE_MARKERS = ("Traceback (most recent call last)", 'File "/', "site-packages")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A 127.0.0.1 server over 20 photos, a deleted item and an item whose file is gone."""
    root = tmp_path_factory.mktemp("fuzz")
    (root / "photos").mkdir()
    photos = [shutil.copy2(p, root / "photos" / p.name) for p in sorted(COCO.glob("*.jpg"))[:20]]
    db = NanoDB(root / "db", config="test")
    db.add([str(p) for p in photos])
    db.delete([3])
    os.remove(photos[5])
    db.add(np.ones(db.dim, np.float32), paths=["/etc/passwd"])  # a label, never a served file
    server = start_server(db, "127.0.0.1", 0)
    try:
        yield server
    finally:
        server.stop()
        db.close()


@pytest.fixture(scope="module")
def api_schema(server):
    """The server's own /openapi.json."""
    return schemathesis.openapi.from_url(f"{server.url}openapi.json")


@pytest.fixture(scope="module")
def ui_schema(server):
    """The OpenAPI that Gradio publishes for the web UI's routes (uploads, and each event's call API).
    Gradio describes a JSON component's value as `"type": {}` (any JSON), which OpenAPI spells as no
    type at all: read so, its values are any JSON."""
    url = f"{server.url}gradio_api/openapi.json"
    schema = any_type_unspelled(httpx.get(url, timeout=30).json())
    loaded = schemathesis.openapi.from_dict(schema)
    loaded.location = url
    return loaded


def any_type_unspelled(node):
    """`node` without its `"type": {}` entries."""
    if isinstance(node, dict):
        return {key: any_type_unspelled(value) for key, value in node.items() if not (key == "type" and value == {})}
    if isinstance(node, list):
        return [any_type_unspelled(value) for value in node]
    return node


def assert_no_trace(where: str, text: str) -> None:
    assert not any(marker in text for marker in TRACE_MARKERS), f"{where}: a stack trace in {text[:300]}"


def check_answer(case) -> None:
    response = case.call(timeout=60)
    where = f"{case.method} {case.formatted_path} {case.query or ''}"
    assert response.status_code < 500, f"{where} -> {response.status_code}: {response.text[:300]}"
    body = response.text if "json" in " ".join(response.headers.get("content-type", [])) else ""
    assert_no_trace(where, body)
    if response.status_code >= 400:
        assert set(response.json()) == {"error"} and "\n" not in response.json()["error"], body[:300]


def requests_for(operation):
    """Requests that fit the schema, requests that break it, and (for item routes) indices near the
    real ones: live, deleted, file gone, label-only, just past the end, negative; for image search,
    a real photo whole or cut short."""
    strategies = [operation.as_strategy(mode) for mode in GenerationMode]
    if operation.path.endswith("/search/image"):  # real photos, whole and cut short
        photo = sorted(COCO.glob("*.jpg"))[30].read_bytes()
        strategies.append(st.integers(0, len(photo)).flatmap(
            lambda n: operation.as_strategy(body={"file": photo[-n:] if n % 2 else photo[:n] if n else photo})))
    if "{index}" in operation.path:
        strategies.append(st.integers(-2, 24).flatmap(
            lambda i: operation.as_strategy(path_parameters={"index": i})))
    return st.one_of(strategies)


def fuzz(api_schema, examples: int) -> None:
    """`examples` generated requests per operation of the schema."""
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 8, "the schema lost its operations"
    for operation in operations:

        @given(case=requests_for(operation))
        @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        def answer_is_clean(case):
            check_answer(case)

        answer_is_clean()


def check_ui_answer(case, server) -> None:
    """A web UI route answers below 500 without a stack trace; an accepted event's result stream too."""
    response = case.call(timeout=60)
    where = f"{case.method} {case.formatted_path} {str(case.body)[:200]}"
    assert response.status_code < 500, f"{where} -> {response.status_code}: {response.text[:300]}"
    assert_no_trace(where, response.text)
    if "/call/v2/" in case.path and response.status_code == 200:
        stream = case.path.replace("/call/v2/", "/call/") + "/" + response.json()["event_id"]
        result = httpx.get(f"{server.url}{stream.lstrip('/')}", timeout=60)
        assert result.status_code < 500, f"{where} then {stream} -> {result.status_code}: {result.text[:300]}"
        assert_no_trace(f"{where} then {stream}", result.text)


def fuzz_ui(ui_schema, server, examples: int) -> None:
    operations = [result.ok() for result in ui_schema.get_all_operations()]
    paths = {op.path for op in operations}
    assert "/gradio_api/upload" in paths and any("/call/v2/" in p for p in paths), "Gradio's schema changed"
    for operation in operations:

        @given(case=st.one_of([operation.as_strategy(mode) for mode in GenerationMode]))
        @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        def answer_is_clean(case):
            check_ui_answer(case, server)

        answer_is_clean()
    assert httpx.get(f"{server.url}api/stats", timeout=30).status_code == 200  # still serving
    assert httpx.get(f"{server.url}config", timeout=30).status_code == 200


def test_no_input_gets_a_server_error_or_a_stack_trace(api_schema):
    fuzz(api_schema, DEFAULT_EXAMPLES)


@pytest.mark.slow
def test_no_input_gets_a_server_error_or_a_stack_trace_long(api_schema):
    fuzz(api_schema, SLOW_EXAMPLES)


def test_no_web_ui_input_gets_a_server_error_or_a_stack_trace(ui_schema, server):
    fuzz_ui(ui_schema, server, UI_EXAMPLES)


@pytest.mark.slow
def test_no_web_ui_input_gets_a_server_error_or_a_stack_trace_long(ui_schema, server):
    fuzz_ui(ui_schema, server, SLOW_EXAMPLES)

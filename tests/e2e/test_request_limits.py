"""The server's request layer (issue 20, items 1, 2 and 6): one guard in front of every route bounds
bodies by the bytes read and refuses ambiguous headers, file descriptors naming anything but an upload
anywhere in a web UI event, and turns bad input into one-line 4xx answers, never 500s.

A real server on 127.0.0.1 (a free port) over 12 fixed vectors (no photos needed), and the guard alone
in front of a recording app."""

from __future__ import annotations

import asyncio
import io
import shutil
import time
from datetime import date

import httpx
import pytest
from gradio.utils import get_upload_folder
from PIL import Image

from nanodb.database import NanoDB
from nanodb.interfaces.request_guard import MAX_JSON_BODY, RequestGuard
from nanodb.interfaces.server import start_server
from nanodb.search.local import RowFilter
from nanodb.search.query import QueryError
from nanodb.search.request import DATE_RANGE, MAX_TYPES, Filters

# The web UI's options, by name, as its search events take them (see web.option_inputs)
OPTIONS = {"k": 3, "min_similarity": -1, "folder": "", "since": "", "until": "", "types": [], "collapse": True}
META = {"_type": "gradio.FileData"}


@pytest.fixture(scope="module")
def served(vector_db, tmp_path_factory):
    """(client, url): the 12-item database served on a free port; a new connection per request."""
    path = tmp_path_factory.mktemp("limits") / "db"
    shutil.copytree(vector_db, path)
    with NanoDB(path, config="test") as db:
        server = start_server(db, "127.0.0.1", 0)
        try:
            with httpx.Client(base_url=server.url, timeout=60, limits=httpx.Limits(max_keepalive_connections=0)) as c:
                yield c
        finally:
            server.stop()


def one_line_error(r: httpx.Response) -> str:
    assert set(r.json()) == {"error"} and "\n" not in r.json()["error"] and len(r.content) < 1024, r.text[:300]
    return r.json()["error"]


# ------------------------------------------------------------------ 1: headers and bodies
def test_two_content_types_with_a_big_body_are_refused_before_the_body_is_read(served):
    body = b'{"data": [' + b",".join([b"0"] * 14_000_000) + b"]}"  # 28 MB: under the upload limit
    for route, types in (("/gradio_api/call/on_text", ["application/json", "multipart/form-data; boundary=x"]),
                         ("/api/search/image", ["multipart/form-data; boundary=x", "application/json"])):
        start = time.monotonic()
        r = served.post(route, content=body, headers=[("content-type", t) for t in types])
        assert r.status_code == 400 and "more than one Content-Type" in one_line_error(r), (route, r.text[:300])
        assert time.monotonic() - start < 5
    assert served.get("/api/stats").status_code == 200


class Recording:
    """An ASGI app that records the body bytes it was given, and answers 200."""

    def __init__(self):
        self.received = 0
        self.called = False

    async def __call__(self, scope, receive, send):
        self.called = True
        while True:
            message = await receive()
            self.received += len(message.get("body", b""))
            if message["type"] == "http.disconnect" or not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})


def through_guard(path: str, headers: list[tuple[bytes, bytes]], chunks: int, chunk: bytes = b"0" * (1 << 20)):
    """(status, app, bytes the guard took from the client): `chunks` MB sent to `path` through the guard."""
    app, sent, taken = Recording(), [], [0]

    async def receive():
        taken[0] += 1
        more = taken[0] < chunks
        return {"type": "http.request", "body": chunk if taken[0] <= chunks else b"", "more_body": more}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path, "headers": headers, "query_string": b""}
    asyncio.run(RequestGuard(app, max_upload_bytes=32 << 20)(scope, receive, send))
    return sent[0]["status"], app, taken[0] * len(chunk)


def test_the_guard_bounds_every_body_by_the_bytes_read_whatever_the_headers_say():
    json_type, form_type = (b"content-type", b"application/json"), (b"content-type", b"multipart/form-data; b=x")
    status, app, taken = through_guard("/gradio_api/upload", [json_type, form_type], 28)
    assert status == 400 and not app.called and taken == 0  # refused from the headers alone
    status, app, _ = through_guard("/api/search/text", [(b"content-length", b"10"), (b"content-length", b"10")], 1)
    assert status == 400 and not app.called
    for path, headers in (("/api/search/text", [json_type]), ("/gradio_api/call/on_text", [json_type]),
                          ("/api/search/text", [form_type]), ("/gradio_api/queue/join", [form_type]),
                          ("/gradio_api/upload", [json_type]), ("/api/stats", [])):
        status, app, taken = through_guard(path, headers, 28)  # no Content-Length: counted as it comes
        assert status == 413 and app.received <= MAX_JSON_BODY and taken <= MAX_JSON_BODY + (1 << 20), path
    status, app, _ = through_guard("/gradio_api/upload", [form_type, (b"content-length", b"%d" % (40 << 20))], 1)
    assert status == 413 and not app.called  # declared over the limit: refused at once
    status, app, _ = through_guard("/gradio_api/upload", [form_type], 28)  # an upload: up to the upload limit
    assert status == 200 and app.received == 28 << 20


# ------------------------------------------------------------------ 1: file descriptors, every API version
def test_named_arguments_naming_a_server_file_or_a_url_are_refused_before_gradio(served):
    endpoints = served.get("/gradio_api/info").json()["named_endpoints"]
    assert [p["parameter_name"] for p in endpoints["/on_image"]["parameters"]] == ["path", *OPTIONS]
    for target in ("/etc/passwd", "https://example.com/photo.jpg", f"{get_upload_folder()}/../../etc/passwd"):
        for descriptor in ({"path": target, "meta": META}, {"path": None, "url": target, "meta": META}):
            r = served.post("/gradio_api/call/v2/on_image", json={"path": descriptor, **OPTIONS})
            assert r.status_code == 403 and "uploaded" in one_line_error(r), (target, r.text)


def test_descriptors_are_found_at_any_depth_under_any_key_on_every_route(served):
    hidden = {"nested": [{"deeper": {"path": "/etc/passwd", "meta": META}}]}
    for route, body in (("/gradio_api/call/on_image", {"data": [hidden, *OPTIONS.values()]}),
                        ("/gradio_api/run/on_image", {"data": [None, *OPTIONS.values()], "extra": hidden}),
                        ("/gradio_api/queue/join", {"data": [], "fn_index": 0, "session_hash": "x",
                                                    "event_data": hidden}),
                        ("/gradio_api/call/v2/on_image", {"path": None, **OPTIONS, "types": [hidden]})):
        r = served.post(route, json=body)
        assert r.status_code == 403 and "uploaded" in one_line_error(r), (route, r.text)
    many = [{"path": f"{get_upload_folder()}/{i}/x.png", "meta": META} for i in range(10_000)]
    many.append({"path": "/etc/passwd", "meta": META})  # refused for the count before any one of them is checked
    r = served.post("/gradio_api/queue/join", json={"data": many, "fn_index": 0, "session_hash": "x"})
    assert r.status_code == 400 and "at most" in one_line_error(r), r.text


def test_an_upload_is_searchable_by_its_path_and_this_servers_url_and_no_other_url(served):
    png = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(png, "PNG")
    uploaded = served.post("/gradio_api/upload", files={"files": ("x.png", png.getvalue())}).json()[0]
    host = served.base_url.netloc.decode()
    for url in ("http://169.254.169.254/latest/meta-data", f"http://elsewhere.example/gradio_api/file={uploaded}",
                "file:///etc/passwd"):
        r = served.post("/gradio_api/call/v2/on_image", json={"path": {"path": uploaded, "url": url, "meta": META},
                                                              **OPTIONS})
        assert r.status_code == 403 and "uploaded" in one_line_error(r), (url, r.text)
    own = {"path": uploaded, "url": f"http://{host}/gradio_api/file={uploaded}", "meta": META}  # as the browser sends
    r = served.post("/gradio_api/call/v2/on_image", json={"path": own, **OPTIONS})
    assert r.status_code == 200, r.text
    outcome = served.get(f"/gradio_api/call/on_image/{r.json()['event_id']}").text
    assert "event: complete" in outcome and "/api/items/" in outcome, outcome[:300]


def test_a_clicked_gallery_tile_may_carry_this_servers_thumbnail_url_only(served):
    """The browser sends the clicked tile back in `event_data` (Gradio opens nothing from it)."""
    on_select = served.get("/config").json()
    fn_index = next(d["id"] for d in on_select["dependencies"] if d.get("api_name") == "on_select")
    host = served.base_url.netloc.decode()
    for where, status in ((host, 200), ("elsewhere.example", 403)):
        tile = {"path": f"http://{where}/api/items/0/thumbnail", "url": f"http://{where}/api/items/0/thumbnail",
                "meta": META}
        r = served.post("/gradio_api/queue/join", json={"data": [[[0, 1.0, 1]]], "fn_index": fn_index,
                        "session_hash": "tile", "event_data": {"index": 0, "value": {"image": tile}}})
        assert r.status_code == status, (where, r.text)


# ------------------------------------------------------------------ 2: validation errors cost little
def test_a_megabyte_of_invalid_list_items_answers_at_once_in_one_short_line(served):
    body = b'{"q": "dog", "types": [' + b",".join([b"0"] * 500_000) + b"]}"
    assert len(body) < MAX_JSON_BODY
    start = time.monotonic()
    r = served.post("/api/search/text", content=body, headers={"content-type": "application/json"})
    assert time.monotonic() - start < 1.5 and r.status_code == 422  # it took 2.6 s
    assert f"at most {MAX_TYPES}" in one_line_error(r)
    r = served.get("/api/search/text", params=[("q", "dog"), *[("type", "jpg")] * (MAX_TYPES + 1)])
    assert r.status_code == 422 and f"at most {MAX_TYPES}" in one_line_error(r)


# ------------------------------------------------------------------ 6: out-of-range dates, bad web UI calls
@pytest.mark.parametrize("name, value", [("since", "0001-01-01"), ("until", "9999-12-31"),
                                         ("since", "0001-01-01T00:00:00+14:00"), ("until", "1899-12-31")])
def test_dates_out_of_range_are_a_400_in_one_line(served, name, value):
    for r in (served.get("/api/search/item/0", params={name: value}),
              served.post("/api/search/text", json={"q": "dog", name: value})):
        assert r.status_code == 400 and "out of range" in one_line_error(r), r.text
    first, last = DATE_RANGE
    r = served.get("/api/search/item/0", params={"since": first.isoformat(), "until": last.isoformat()})
    assert r.status_code == 200, r.text


def test_the_search_layer_bounds_the_filters_for_every_interface():
    for filters in (Filters(since="0001-01-01"), Filters(until=date(9999, 12, 31)), Filters(since=float("nan")),
                    Filters(until=10**400), Filters(types=["jpg"] * (MAX_TYPES + 1)), Filters(folder="x" * 5000)):
        with pytest.raises(QueryError):
            RowFilter.of(filters)
    assert RowFilter.of(Filters(since=DATE_RANGE[0], until=DATE_RANGE[1], types=["jpg"] * MAX_TYPES))


def test_web_ui_events_called_with_bad_input_answer_4xx_in_one_line(served):
    text = ["dog", *OPTIONS.values()]
    for route, body in (("/gradio_api/run/on_text", {"data": ["dog", "many", *list(OPTIONS.values())[1:]]}),
                        ("/gradio_api/run/on_text", {"data": ["dog", 10**30, *list(OPTIONS.values())[1:]]}),
                        ("/gradio_api/run/on_text", {"data": []}),
                        ("/gradio_api/run/on_text", {"data": "dog"}),
                        ("/gradio_api/run/no_such_event", {"data": text}),
                        ("/gradio_api/queue/join", {"data": text, "fn_index": 10**6, "session_hash": "x"})):
        r = served.post(route, json=body)
        assert 400 <= r.status_code < 500, (route, body, r.status_code, r.text[:300])
        one_line_error(r)
    r = served.post("/gradio_api/run/on_text", json={"data": ["dog", 3, -1, "", "0001-01-01", "", [], True]})
    assert r.status_code == 200 and "out of range" in r.text  # the page shows the message
    assert served.post("/gradio_api/run/on_text", json={"data": text}).status_code == 200

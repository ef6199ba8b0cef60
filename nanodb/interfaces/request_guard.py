"""The one boundary every request to the server crosses before any route, parser or Gradio sees it.

A defense in one handler is walked around by a route, a header or a content type that the handler did
not foresee, so these checks sit in one ASGI middleware in front of the whole app (issue 20):

- Headers: a request with two Content-Type or two Content-Length headers is refused (400): the guard and
  the app could read different ones. A Content-Length over the route's limit is refused at once (413).
- Bodies are bounded by the bytes actually read, for every route, method and content type: 1 MB, and the
  upload limit (plus room for the form around the file) for a multipart upload to the two upload routes.
  Past the limit the app sees the client leave and the client gets 413.
- File descriptors: a body for the web UI (any route outside nanodb's /api/) is read whole (it is small)
  and every Gradio file descriptor in it, at any depth under any key, whatever the Gradio API version
  (positional `data` or named arguments), must name a file uploaded to this server: a `path` inside
  Gradio's upload folder, never a URL for Gradio to download; a `url` only a path on this server.
  (`event_data`, which says what the browser clicked and which Gradio opens nothing from, may also hold
  this server's own URLs: the gallery's thumbnails.) Anything else is refused with 403 before Gradio.
- Gradio's file routes send only those uploads; its proxy route fetches nothing.
- A web UI event called directly (`/gradio_api/run/...`, `/gradio_api/queue/join`) that Gradio cannot
  run on its input answers a 4xx with one line, not Gradio's 500 with its message or a traceback.
"""

from __future__ import annotations

import json
import logging
import re
from urllib.parse import unquote, urlsplit

from fastapi.responses import JSONResponse
from gradio.utils import get_upload_folder, is_in_or_equal
from starlette.datastructures import Headers

from nanodb.interfaces.refusals import refusal

MAX_JSON_BODY = 1 << 20  # a text query is at most 1,000 characters; the web UI's events are small too
MULTIPART_SLACK = 1 << 20  # form fields and headers around an uploaded file
UPLOAD_ROUTES = ("/api/search/image", "/gradio_api/upload")  # the only routes a large (multipart) body may go to
FILE_ROUTES = ("/gradio_api/file=", "/gradio_api/file/")  # Gradio's routes that send a file by its path
EVENT_ROUTES = ("/gradio_api/run/", "/gradio_api/api/", "/gradio_api/queue/join")  # a 500 there: bad input
MAX_DESCRIPTORS = 8  # files one web UI event may name (its image input, the tile clicked)
SINGLE_HEADERS = ("content-type", "content-length")  # the body's framing: one of each at most
OWN_URL_PATH = re.compile(r"(?:/[\w.-]+)*/api/items/\d+/(?:thumbnail|original)")  # nanodb's file routes

log = logging.getLogger(__name__)


class RequestGuard:
    """ASGI middleware: every check above, in front of every route (see the module's docstring)."""

    def __init__(self, app, max_upload_bytes: int):
        self.app = app
        self.max_upload_bytes = max_upload_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, headers = scope["path"], Headers(scope=scope)
        upload = path in UPLOAD_ROUTES and headers.get("content-type", "").lower().startswith("multipart/")
        limit = self.max_upload_bytes + MULTIPART_SLACK if upload else MAX_JSON_BODY
        too_large = refusal(413, f"the upload is too large: at most {self.max_upload_bytes >> 20} MB" if upload
                            else f"the request body is too large: at most {MAX_JSON_BODY >> 20} MB")
        refused = refused_route(path) or refused_headers(headers, limit, too_large)
        if refused is not None:
            return await refused(scope, receive, send)
        body = CountedBody(receive, limit)
        if upload or path.startswith("/api/"):  # nanodb's own routes open no file a body names
            return await self._counted(scope, body, send, too_large)
        data = await body.read()  # a body for the web UI: small, read whole and checked before Gradio
        if body.over:
            return await too_large(scope, receive, send)
        if data is None:
            return None  # the client left
        if (refused := descriptor_refusal(data, own_hosts(headers))) is not None:
            return await refused(scope, receive, send)
        answering = EventErrors(scope, send) if path.startswith(EVENT_ROUTES) else send
        return await self._run(scope, body.replay(data), answering)

    async def _counted(self, scope, body: CountedBody, send, too_large: JSONResponse):
        """Pass the body through, counting: past the limit the app sees a disconnect and the client a 413."""
        started = False

        async def sending(message):
            nonlocal started
            if not body.over:
                started = True
                await send(message)

        try:
            await self._run(scope, body, sending)
        except Exception:
            if not body.over:
                raise
        if body.over and not started:
            await too_large(scope, body.receive, send)

    async def _run(self, scope, receive, send):
        try:
            await self.app(scope, receive, send)
        except Exception as e:
            if not isinstance(send, EventErrors) or send.started:
                raise
            return await send.answer(e)
        if isinstance(send, EventErrors) and send.held is not None:
            await send.answer(None)


class CountedBody:
    """The request body as the app reads it: past `limit` bytes the app sees the client leave."""

    def __init__(self, receive, limit: int):
        self.receive = receive
        self.limit = limit
        self.seen = 0
        self.over = False

    async def __call__(self):
        if self.over:
            return {"type": "http.disconnect"}
        message = await self.receive()
        self.seen += len(message.get("body", b""))
        if self.seen > self.limit:
            self.over = True
            return {"type": "http.disconnect"}
        return message

    async def read(self) -> bytes | None:
        """The whole body; None when it is over the limit or the client left."""
        data = bytearray()
        while True:
            message = await self()
            if message["type"] == "http.disconnect":
                return None
            data += message.get("body", b"")
            if not message.get("more_body"):
                return bytes(data)

    def replay(self, data: bytes):
        """A receive() that gives the body already read, then waits for the client to leave."""
        replayed = False

        async def receive():
            nonlocal replayed
            if replayed:
                return await self.receive()
            replayed = True
            return {"type": "http.request", "body": data, "more_body": False}

        return receive


class EventErrors:
    """send() for a web UI event called directly: Gradio answers an event it cannot run on the caller's
    input (wrong types, missing inputs, an unknown event, a value past a slider's range) with a 500 that
    carries its message or a traceback, or with a validation report; the caller gets a 4xx with one
    line instead (`answer`)."""

    def __init__(self, scope, send):
        self.scope = scope
        self.send = send
        self.started = False  # a response went out as the app gave it
        self.status = 400  # of the answer replacing the app's
        self.held: bytearray | None = None  # the body of the error answer to replace

    async def __call__(self, message):
        status = message.get("status", 0)
        if message["type"] == "http.response.start" and (400 <= status < 500 or status == 500) and not self.started:
            self.status = 400 if status == 500 else status  # an overload (503: queue full) is answered as it is
            self.held = bytearray()
        elif self.held is None:
            self.started = True
            await self.send(message)
        elif len(self.held) < 1 << 12:
            self.held += message.get("body", b"")

    async def answer(self, error: Exception | None) -> None:
        """The 4xx for the app's error answer (held) or for the exception it raised before answering."""
        reason = f"{type(error).__name__}: {error}" if error else gradio_error(bytes(self.held or b""))
        path = self.scope["path"]
        log.info("web UI event %s failed on its input: %s", path, reason[:200])
        reason = " ".join(reason.split())[:200]
        response = refusal(self.status, f"the web UI event {path[:80]} cannot run on this input ({reason})")
        await response(self.scope, None, self.send)


def gradio_error(body: bytes) -> str:
    """The message of Gradio's error answer ({"error": "..."} or a validation report), else its text."""
    try:
        answer = json.loads(body)
        message = answer.get("error") or answer.get("detail")
    except (ValueError, AttributeError):
        message = None
    if isinstance(message, list) and message and isinstance(message[0], dict):  # FastAPI's validation errors
        first = message[0]
        message = f"{'.'.join(str(p) for p in first.get('loc', ()))}: {first.get('msg')}"
    return str(message) if message else body.decode("utf-8", "replace") or "error"


def refused_route(path: str) -> JSONResponse | None:
    """Gradio's file routes send only uploads; its proxy route fetches nothing for a client."""
    named = next((path[len(route):] for route in FILE_ROUTES if path.startswith(route)), None)
    if path.startswith("/gradio_api/proxy=") or (named is not None and not is_upload(named)):
        return refusal(403, "this server sends only files uploaded to it")
    return None


def refused_headers(headers: Headers, limit: int, too_large: JSONResponse) -> JSONResponse | None:
    """A request whose framing headers are ambiguous, malformed or over the limit."""
    for name in SINGLE_HEADERS:
        if len(headers.getlist(name)) > 1:
            return refusal(400, f"the request has more than one {name.title()} header")
    declared = headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            return refusal(400, "the Content-Length header is not a number")
        if int(declared) > limit:
            return too_large
    return None


def own_hosts(headers: Headers) -> set[str]:
    """The host names this request reached the server by (as the browser's URLs for it name it)."""
    named = [headers.get("host", "")] + headers.get("x-forwarded-host", "").split(",")
    return {host.strip().lower() for host in named if host.strip()}


def is_upload(path: str) -> bool:
    """True for a file inside Gradio's upload folder (symlinks and `..` resolved); never for a URL."""
    return "://" not in path and is_in_or_equal(path, get_upload_folder())


def is_own_url(url: str, hosts: set[str]) -> bool:
    """A URL of this server's own files: an upload sent by Gradio's file route, or an item's
    thumbnail or original (the web UI's gallery tiles), with no host or the host this request came to."""
    parts = urlsplit(url)
    absolute = bool(parts.netloc or parts.scheme)
    if parts.scheme not in ("", "http", "https") or (absolute and parts.netloc.lower() not in hosts):
        return False
    path = unquote(parts.path)
    _, route, rest = path.partition("/gradio_api/file=")
    return bool(route and path.startswith("/") and is_upload(rest)) or bool(OWN_URL_PATH.fullmatch(path))


def refused_descriptor(value: dict, hosts: set[str], clicked: bool) -> str | None:
    """What a file descriptor names that it may not (None when it names only uploads); `clicked`: inside
    `event_data`, where the gallery's own thumbnail URLs come back."""
    path, url = value.get("path"), value.get("url")
    if path is not None and not (isinstance(path, str) and (is_upload(path) or clicked and is_own_url(path, hosts))):
        return str(path)
    if url is not None and not (isinstance(url, str) and is_own_url(url, hosts)):
        return str(url)
    return None


def descriptor_refusal(body: bytes, hosts: set[str]) -> JSONResponse | None:
    """The answer to a body whose file descriptors name anything but this server's uploads (403), that
    names more files than an event takes, or that nests too deep to check (400); None when it may pass."""
    try:
        found = file_descriptors(json.loads(body))
    except RecursionError:
        return refusal(400, "the request body is nested too deep")
    except ValueError:
        return None  # not JSON: nothing for Gradio to open either
    if len(found) > MAX_DESCRIPTORS:
        return refusal(400, f"a web UI event names at most {MAX_DESCRIPTORS} files")
    for descriptor, clicked in found:
        if (bad := refused_descriptor(descriptor, hosts, clicked)) is not None:
            return refusal(403, f"a file descriptor may name only a file uploaded to this server, not {bad[:80]!r}")
    return None


def file_descriptors(document) -> list[tuple[dict, bool]]:
    """The file descriptors anywhere in a JSON document (any object with a `path` or a `url`), each with
    whether it is inside `event_data`; at most MAX_DESCRIPTORS + 1 of them."""
    top = document.items() if isinstance(document, dict) else [("", document)]
    stack, found = [(value, key == "event_data") for key, value in top], []
    while stack and len(found) <= MAX_DESCRIPTORS:
        value, clicked = stack.pop()
        if isinstance(value, dict):
            if "path" in value or "url" in value:
                found.append((value, clicked))
            stack.extend((v, clicked) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, clicked) for v in value)
    return found

"""One server for the web UI and the HTTP API, run by uvicorn in a background thread so that the
console, scans and watches go on in the caller's thread and event loop."""

from __future__ import annotations

import base64
import binascii
import logging
import secrets
import threading
import time
from dataclasses import dataclass

import gradio as gr
import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from gradio.routes import App as GradioApp
from starlette.exceptions import HTTPException
from starlette.requests import HTTPConnection
from starlette.routing import Mount

from nanodb import __version__
from nanodb.interfaces.http_api import api_router, install_error_handlers, unknown_api_route
from nanodb.interfaces.request_guard import RequestGuard
from nanodb.interfaces.search_service import SearchService
from nanodb.interfaces.thumbnails import ThumbnailCache
from nanodb.interfaces.web import CSS, JS, build_ui

UPLOAD_MAX_AGE_S = 600  # the web UI's uploads are deleted this long after they came, and at shutdown
LOGIN_BURST = 10  # failed logins a client may make at once; then one more per LOGIN_REFILL_S
LOGIN_REFILL_S = 1.0

log = logging.getLogger(__name__)


def parse_auth(text: str) -> tuple[str, str]:
    """`USER:PASS` -> (user, password)."""
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise ValueError("--auth must be USER:PASS, both non-empty")
    return user, password


def build_app(db, auth: tuple[str, str] | None = None) -> FastAPI:
    """The FastAPI app: /api/... JSON endpoints, /docs and /openapi.json, and the web UI at /."""
    service = SearchService(db)
    app = FastAPIOffline(title="nanodb", version=__version__,
                  description="Search a nanodb image database by text, by image or by item.")
    install_error_handlers(app)
    app.include_router(api_router(service, ThumbnailCache(db), auth))
    unknown_api_route(app)
    ui = build_ui(service).queue(default_concurrency_limit=8)
    ui.delete_cache = (UPLOAD_MAX_AGE_S, UPLOAD_MAX_AGE_S)
    gr.mount_gradio_app(app, ui, path="", max_file_size=service.max_upload_bytes, footer_links=["api"],
                        run_history=False, blocked_paths=[str(db.path)], css=CSS, js=JS)
    next(r.app for r in app.routes if isinstance(r, Mount) and isinstance(r.app, GradioApp)).add_middleware(
        MalformedCalls)
    # A mounted app is never marked launched, and Gradio checks the files an event names only for a
    # launched one: without this, any server path named in an event was copied into its cache.
    ui.has_launched = True
    app.add_middleware(RequestGuard, max_upload_bytes=service.max_upload_bytes)
    if auth is not None:
        app.add_middleware(BasicAuth, user=auth[0], password=auth[1])  # outermost: checked first
    return app


def _refuse(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class MalformedCalls:
    """Inside the web UI's Gradio app: a call or an upload that Gradio fails to parse is the client's
    error, answered 400 in one line, not a 500 that also drops the connection. (Gradio raises on a
    call that lacks an argument or names no event, and on an upload form without a file.) A result
    stream asked for an unknown event ends whole after Gradio's error event, instead of cut short."""

    ROUTES = ("/gradio_api/call/", "/gradio_api/upload")

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith(self.ROUTES):
            return await self.app(scope, receive, send)
        started = ended = False

        async def sending(message):
            nonlocal started, ended
            started = True
            ended = message["type"] == "http.response.body" and not message.get("more_body")
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except Exception as e:
            refused = e.__cause__ if isinstance(e.__cause__, HTTPException) else e  # Starlette wraps it once started
            if started and not ended and isinstance(refused, HTTPException) and refused.status_code < 500:
                return await send({"type": "http.response.body", "body": b"", "more_body": False})
            if started:
                raise
            log.info("malformed web UI request to %s: %r", scope["path"], e)
            reason = " ".join(f"{type(e).__name__}: {e}".split())[:200]
            await _refuse(400, f"malformed request for {scope['path'][:80]} ({reason})")(scope, receive, send)


class BasicAuth:
    """HTTP Basic auth on every route: browsers ask once, programs pass `curl -u USER:PASS`.

    Failed logins are rate-limited per client address: after LOGIN_BURST failures, one attempt per
    LOGIN_REFILL_S; attempts beyond that get 429 without their password being checked."""

    def __init__(self, app, user: str, password: str):
        self.app = app
        self.expected = f"{user}:{password}".encode()
        self.budgets: dict[str, tuple[float, float]] = {}  # client -> (attempts left, when counted)
        self.lock = threading.Lock()

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        connection = HTTPConnection(scope)
        client = connection.client.host if connection.client else "?"
        scheme, _, encoded = connection.headers.get("authorization", "").partition(" ")
        try:
            given = base64.b64decode(encoded, validate=True) if scheme.lower() == "basic" else None
        except (binascii.Error, ValueError):
            given = b""
        if given is not None and self._budget(client) < 1:
            refusal = _refuse(429, f"too many failed logins; try again in {LOGIN_REFILL_S:g} s",
                              {"Retry-After": str(max(1, round(LOGIN_REFILL_S)))})
        elif given is None or not secrets.compare_digest(given, self.expected):
            if given is not None:
                self._spend(client)
            refusal = _refuse(401, "log in with the user and password given to --auth",
                              {"WWW-Authenticate": 'Basic realm="nanodb"'})
        else:
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008})
        return await refusal(scope, receive, send)

    def _budget(self, client: str) -> float:
        with self.lock:
            left, when = self.budgets.get(client, (LOGIN_BURST, time.monotonic()))
            return min(LOGIN_BURST, left + (time.monotonic() - when) / LOGIN_REFILL_S)

    def _spend(self, client: str) -> None:
        left = self._budget(client) - 1
        with self.lock:
            if len(self.budgets) > 10_000:  # forget clients that have their whole budget back
                now = time.monotonic()
                self.budgets = {c: (n, t) for c, (n, t) in self.budgets.items()
                                if n + (now - t) / LOGIN_REFILL_S < LOGIN_BURST}
            self.budgets[client] = (left, time.monotonic())


@dataclass
class ServerHandle:
    url: str
    server: uvicorn.Server
    thread: threading.Thread

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)


def start_server(db, host: str = "0.0.0.0", port: int = 7860, auth: tuple[str, str] | None = None) -> ServerHandle:
    """Serve `db` in a background thread; returns once it accepts connections (port 0: any free port)."""
    _ = db.model  # load the model now, not during the first visitor's search
    config = uvicorn.Config(build_app(db, auth), host=host, port=port, log_level="warning",
                            timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="nanodb-server", daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise OSError(f"cannot serve on {host}:{port} (is the port in use?)")
        thread.join(0.05)
    bound = server.servers[0].sockets[0].getsockname()[1]
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    return ServerHandle(f"http://{shown}:{bound}/", server, thread)

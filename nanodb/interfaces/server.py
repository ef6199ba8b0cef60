"""One server for the web UI and the HTTP API, run by uvicorn in a background thread so that the
console, scans and watches go on in the caller's thread and event loop."""

from __future__ import annotations

import base64
import binascii
import secrets
import threading
from dataclasses import dataclass

import gradio as gr
import uvicorn
from fastapi import FastAPI, Request
from fastapi_offline import FastAPIOffline
from fastapi.responses import JSONResponse

from nanodb import __version__
from nanodb.interfaces.http_api import api_router, install_error_handlers
from nanodb.interfaces.search_service import SearchService
from nanodb.interfaces.thumbnails import ThumbnailCache
from nanodb.interfaces.web import CSS, JS, build_ui


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
    if auth is not None:
        _require_basic_auth(app, *auth)
    ui = build_ui(service).queue(default_concurrency_limit=8)
    return gr.mount_gradio_app(app, ui, path="", max_file_size=service.max_upload_bytes,
                               footer_links=["api"], run_history=False, css=CSS, js=JS)


def _require_basic_auth(app: FastAPI, user: str, password: str) -> None:
    """HTTP Basic auth on every route: browsers ask once, programs pass `curl -u USER:PASS`."""
    expected = f"{user}:{password}".encode()

    @app.middleware("http")
    async def check(request: Request, call_next):
        scheme, _, encoded = request.headers.get("authorization", "").partition(" ")
        try:
            given = base64.b64decode(encoded, validate=True) if scheme.lower() == "basic" else b""
        except (binascii.Error, ValueError):
            given = b""
        if not secrets.compare_digest(given, expected):
            return JSONResponse({"error": "log in with the user and password given to --auth"}, status_code=401,
                                headers={"WWW-Authenticate": 'Basic realm="nanodb"'})
        return await call_next(request)


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
    db.model  # load the model now, not during the first visitor's search
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

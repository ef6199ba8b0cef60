"""One server for the web UI and the HTTP API, run by uvicorn in a background thread so that the
console, scans and watches go on in the caller's thread and event loop."""

from __future__ import annotations

import functools
import logging
import threading
from dataclasses import dataclass

import gradio as gr
import uvicorn
from fastapi import FastAPI
from fastapi_offline import FastAPIOffline
from gradio.routes import App as GradioApp
from starlette.exceptions import HTTPException
from starlette.routing import Mount

from nanodb import __version__
from nanodb.interfaces.connections import ConnectionLimits, GuardedH11Protocol, connection_cap, quiet_accept_errors
from nanodb.interfaces.http_api import api_router, install_error_handlers, unknown_api_route
from nanodb.interfaces.login import BasicAuth, parse_auth
from nanodb.interfaces.refusals import refusal
from nanodb.interfaces.request_guard import RequestGuard
from nanodb.interfaces.search_service import SearchService
from nanodb.interfaces.thumbnails import ThumbnailCache
from nanodb.interfaces.web import CSS, JS, build_ui
from nanodb.interfaces.web_limits import OverloadAnswers, UploadQuota, WebRoutes, bound_queue

__all__ = ["ServerHandle", "build_app", "parse_auth", "start_server"]

log = logging.getLogger(__name__)


def build_app(db, auth: tuple[str, str] | None = None) -> FastAPI:
    """The FastAPI app: /api/... JSON endpoints, /docs and /openapi.json, and the web UI at /. Its
    `state.close()` stops the worker processes its requests started (upload and thumbnail decoders)."""
    service, thumbnails = SearchService(db), ThumbnailCache(db)
    app = FastAPIOffline(title="nanodb", version=__version__,
                  description="Search a nanodb image database by text, by image or by item.")
    app.state.close = lambda: (service.close(), thumbnails.close())
    install_error_handlers(app)
    app.include_router(api_router(service, thumbnails, auth))
    unknown_api_route(app)
    ui = bound_queue(build_ui(service))
    gr.mount_gradio_app(app, ui, path="", max_file_size=service.max_upload_bytes, footer_links=["api"],
                        run_history=False, blocked_paths=[str(db.path)], css=CSS, js=JS)
    web_app = next(r.app for r in app.routes if isinstance(r, Mount) and isinstance(r.app, GradioApp))
    web_app.add_middleware(OverloadAnswers)  # innermost: Gradio's own 503s only
    web_app.add_middleware(MalformedCalls)
    web_app.add_middleware(UploadQuota, blocks=ui)
    web_app.add_middleware(WebRoutes)  # outermost in the web UI's app
    # A mounted app is never marked launched, and Gradio checks the files an event names only for a
    # launched one: without this, any server path named in an event was copied into its cache.
    ui.has_launched = True
    app.add_middleware(RequestGuard, max_upload_bytes=service.max_upload_bytes)
    if auth is not None:
        app.add_middleware(BasicAuth, user=auth[0], password=auth[1])  # outermost: checked first
    return app


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
            await refusal(400, f"malformed request for {scope['path'][:80]} ({reason})")(scope, receive, send)


@dataclass
class ServerHandle:
    url: str
    server: uvicorn.Server
    thread: threading.Thread
    app: FastAPI

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving, then the decoders' worker processes (left running, their semaphores would be
        reported leaked by loky's resource tracker at exit)."""
        self.server.should_exit = True
        self.thread.join(timeout)
        self.app.state.close()


def start_server(db, host: str = "0.0.0.0", port: int = 7860, auth: tuple[str, str] | None = None,
                 trusted_proxies: tuple[str, ...] = ()) -> ServerHandle:
    """Serve `db` in a background thread; returns once it accepts connections (port 0: any free port).

    A client's address is its socket's peer; only a peer in `trusted_proxies` may name another in
    X-Forwarded-For (whom the login backoff then counts), and its connections count only in the total cap."""
    _ = db.text_model  # load the text tower now, not during the first visitor's search (the image tower
    # is loaded on the first image query: NanoDB.image_model)
    limits = ConnectionLimits(connection_cap(), trusted_proxies=frozenset(trusted_proxies))
    quiet_accept_errors()
    app = build_app(db, auth)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning",
                            timeout_graceful_shutdown=2, http=functools.partial(GuardedH11Protocol, limits=limits),
                            proxy_headers=bool(trusted_proxies), forwarded_allow_ips=list(trusted_proxies) or None,
                            timeout_keep_alive=5, backlog=256)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="nanodb-server", daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise OSError(f"cannot serve on {host}:{port} (is the port in use?)")
        thread.join(0.05)
    bound = server.servers[0].sockets[0].getsockname()[1]
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    return ServerHandle(f"http://{shown}:{bound}/", server, thread, app)

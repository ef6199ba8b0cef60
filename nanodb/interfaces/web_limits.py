"""Limits on the web UI's Gradio app: only the routes the page uses, a bounded queue that refuses an
overload instead of dying of it, and a quota on the uploads kept on disk."""

from __future__ import annotations

import os
import re

import gradio as gr
from fastapi.responses import JSONResponse

QUEUE_MAX_EVENTS = 64  # events waiting at once; more are refused (503) until some have run
QUEUE_CONCURRENCY = 8  # events running at once
UPLOAD_QUOTA_BYTES = 256 << 20  # the uploads kept at once, in all; past it an upload is refused (503)
UPLOAD_QUOTA_FILES = 1000
UPLOAD_MAX_AGE_S = 300  # an upload is deleted this long after it came (checked every UPLOAD_SWEEP_S), and at shutdown
UPLOAD_SWEEP_S = 60

# What the page and Gradio's API clients use; any other route of the Gradio app answers 404 (Gradio also
# serves a screen recorder that keeps every upload, media streams, component files, monitoring, ...).
WEB_UI_ROUTES = re.compile(r"""/(?:
    |config/?|theme\.css|favicon\.ico|robots\.txt|manifest\.json|pwa_icon(?:/\d+)?
    |(?:assets|static|svelte)/.+
    |gradio_api/(?:
        info/?|openapi\.json|heartbeat/[^/]+|queue/(?:join|data|status)|upload|upload_progress|startup-events
        |app_id/?|cancel|reset/?|login_check/?|theme\.css|(?:call|run|api)/.+|file=.+|file/.+))""", re.X)


def bound_queue(ui: gr.Blocks) -> gr.Blocks:
    """Queue every event of `ui` in one first-in first-out line of at most QUEUE_MAX_EVENTS.

    Gradio keeps the messages of its last 2,000 sessions (each API call is a session) and its queue loop
    dies for good if a waiting event's session was dropped. With one line, an event waits behind at most
    QUEUE_MAX_EVENTS others, so fewer than that many sessions can start while it waits: none is dropped."""
    for fn in ui.fns.values():
        fn.concurrency_id = "nanodb"
        fn.concurrency_limit = "default"
    ui.delete_cache = (UPLOAD_SWEEP_S, UPLOAD_MAX_AGE_S)
    return ui.queue(max_size=QUEUE_MAX_EVENTS, default_concurrency_limit=QUEUE_CONCURRENCY)


def _refuse(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class WebRoutes:
    """Inside the web UI's Gradio app (ASGI middleware): a route outside WEB_UI_ROUTES answers 404."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket") and not WEB_UI_ROUTES.fullmatch(scope["path"]):
            if scope["type"] == "websocket":
                return await send({"type": "websocket.close", "code": 1008})
            return await _refuse(404, f"no such route: {scope['path'][:80]}")(scope, receive, send)
        return await self.app(scope, receive, send)


class UploadQuota:
    """Inside the web UI's Gradio app: an upload that could take the uploads kept past
    UPLOAD_QUOTA_BYTES or UPLOAD_QUOTA_FILES is refused (503) before its body is read. Uploads in progress
    count at their declared length (at most `max_request_bytes` when not declared)."""

    def __init__(self, app, blocks: gr.Blocks, max_request_bytes: int):
        self.app = app
        self.blocks = blocks
        self.max_request_bytes = max_request_bytes
        self.receiving = 0  # bytes of the uploads in progress

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != "/gradio_api/upload" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        size = int(declared) if declared.isdigit() else self.max_request_bytes
        kept = self.blocks.upload_file_set
        if self.receiving + size + sum(map(file_size, list(kept))) > UPLOAD_QUOTA_BYTES or \
                len(kept) >= UPLOAD_QUOTA_FILES:
            message = (f"the server keeps at most {UPLOAD_QUOTA_BYTES >> 20} MB of uploads at once and deletes each "
                       f"{UPLOAD_MAX_AGE_S // 60} minutes after it came; try again later")
            return await _refuse(503, message, {"Retry-After": str(UPLOAD_SWEEP_S)})(scope, receive, send)
        self.receiving += size
        try:
            await self.app(scope, receive, send)
        finally:
            self.receiving -= size


def file_size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0

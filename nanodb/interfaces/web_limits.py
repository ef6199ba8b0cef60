"""Limits on the web UI's Gradio app: only the routes the page uses, a bounded queue that refuses an
overload instead of dying of it, and a quota on the uploads kept on disk."""

from __future__ import annotations

import asyncio
import os
import re
import time
from dataclasses import dataclass, field

import gradio as gr

from nanodb.interfaces.connections import FloodLog
from nanodb.interfaces.refusals import refusal
from nanodb.interfaces.request_guard import gradio_error

QUEUE_MAX_EVENTS = 64  # events waiting at once; more are refused (503) until some have run
QUEUE_CONCURRENCY = 8  # events running at once
QUEUE_RETRY_AFTER_S = 1  # told to a client refused for a full queue
OVERLOAD_MESSAGE_BYTES = 1 << 12  # of Gradio's answer, read for its message
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



class OverloadAnswers:
    """Inside the web UI's Gradio app, around its routes alone: an event past the queue's bound (or on a
    stopped queue) is answered by Gradio with 503 and {"detail": ...}; the client gets the shape of every
    other error, {"error": ...}, and a Retry-After."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        held: bytearray | None = None

        async def sending(message):
            nonlocal held
            if message["type"] == "http.response.start" and message["status"] == 503 and held is None:
                held = bytearray()
            elif held is None:
                await send(message)
            else:
                held += message.get("body", b"")[: OVERLOAD_MESSAGE_BYTES - len(held)]
                if not message.get("more_body"):
                    message = f"the web UI is busy ({gradio_error(bytes(held))}); try again shortly"
                    await refusal(503, message, {"Retry-After": str(QUEUE_RETRY_AFTER_S)})(scope, receive, send)

        await self.app(scope, receive, sending)


class WebRoutes:
    """Inside the web UI's Gradio app (ASGI middleware): a route outside WEB_UI_ROUTES answers 404."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket") and not WEB_UI_ROUTES.fullmatch(scope["path"]):
            if scope["type"] == "websocket":
                return await send({"type": "websocket.close", "code": 1008})
            return await refusal(404, f"no such route: {scope['path'][:80]}")(scope, receive, send)
        return await self.app(scope, receive, send)


@dataclass(eq=False)
class UploadInProgress:
    """An upload to /gradio_api/upload being received: the bytes it has sent, not what it declares."""

    started: float
    received: int = 0
    whole: bool = False  # its body has arrived: its bytes are about to be kept, it is not dropped
    dropped: asyncio.Event = field(default_factory=asyncio.Event)

    def rate(self, now: float) -> float:
        return self.received / max(now - self.started, 1e-3)


class UploadQuota:
    """Inside the web UI's Gradio app: the uploads kept and in progress stay within UPLOAD_QUOTA_BYTES and
    UPLOAD_QUOTA_FILES. An upload is refused (503) before its body is read when the files kept leave no
    room for its declared length, or are UPLOAD_QUOTA_FILES already. Uploads in progress count the bytes
    they have sent, not what they declare: when those and the files kept would pass the quota, the
    slowest upload in progress (bytes a second since it began) is dropped with a 503, so a few clients
    that declare large uploads and send them slowly cannot hold the quota against everyone else."""

    def __init__(self, app, blocks: gr.Blocks):
        self.app = app
        self.blocks = blocks
        self.uploads: set[UploadInProgress] = set()
        self.receiving = 0  # bytes received of the uploads in progress
        self.kept = 0  # bytes of the uploads kept, as of the last upload's start or end
        self.drops = FloodLog()

    def _kept_now(self) -> int:
        self.kept = sum(map(file_size, list(self.blocks.upload_file_set)))
        return self.kept

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != "/gradio_api/upload" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        size = int(declared) if declared.isdigit() else 0
        if self._kept_now() + size > UPLOAD_QUOTA_BYTES or len(self.blocks.upload_file_set) >= UPLOAD_QUOTA_FILES:
            return await refusal(503, self._full(), {"Retry-After": str(UPLOAD_SWEEP_S)})(scope, receive, send)
        upload = UploadInProgress(time.monotonic())
        self.uploads.add(upload)
        answered = False

        async def sending(message):
            nonlocal answered
            if not upload.dropped.is_set():
                answered = True
                await send(message)

        try:
            await self.app(scope, self._counted(upload, receive), sending)
        except Exception:
            if not upload.dropped.is_set():
                raise
        finally:
            self.uploads.discard(upload)
            self.receiving -= upload.received
            self._kept_now()
        if upload.dropped.is_set() and not answered:
            message = f"{self._full()} (this upload was the slowest in progress when the room was needed)"
            headers = {"Retry-After": str(UPLOAD_SWEEP_S), "Connection": "close"}
            await refusal(503, message, headers)(scope, receive, send)

    def _counted(self, upload: UploadInProgress, receive):
        """receive() for an upload: counts what arrives, makes room past the quota, and answers a
        disconnect at once once the upload is dropped (however slowly its client sends)."""

        async def counted():
            if upload.dropped.is_set():
                return {"type": "http.disconnect"}
            getting = asyncio.ensure_future(receive())
            dropping = asyncio.ensure_future(upload.dropped.wait())
            try:
                await asyncio.wait({getting, dropping}, return_when=asyncio.FIRST_COMPLETED)
            finally:  # neither outlives this call (nor a cancelled request)
                dropping.cancel()
                if not getting.done():
                    getting.cancel()
            if getting.cancelled():
                return {"type": "http.disconnect"}
            message = getting.result()
            if message["type"] == "http.request" and upload in self.uploads:
                upload.received += len(message.get("body", b""))
                self.receiving += len(message.get("body", b""))
                upload.whole = not message.get("more_body", False)
                self._make_room()
            return {"type": "http.disconnect"} if upload.dropped.is_set() else message

        return counted

    def _make_room(self) -> None:
        """Drop the slowest uploads in progress while they and the kept files pass the quota."""
        now = time.monotonic()
        while self.kept + self.receiving > UPLOAD_QUOTA_BYTES:
            droppable = [u for u in self.uploads if not u.whole]
            if not droppable:
                return
            slowest = min(droppable, key=lambda u: u.rate(now))
            slowest.dropped.set()
            self.uploads.discard(slowest)
            self.receiving -= slowest.received
            slowest.received = 0
            self.drops.note(f"dropped the slowest uploads in progress: the upload quota "
                            f"({UPLOAD_QUOTA_BYTES >> 20} MB) was needed")

    @staticmethod
    def _full() -> str:
        return (f"the server keeps at most {UPLOAD_QUOTA_BYTES >> 20} MB of uploads at once and deletes each "
                f"{UPLOAD_MAX_AGE_S // 60} minutes after it came; try again later")


def file_size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0

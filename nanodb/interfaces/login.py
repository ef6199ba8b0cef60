"""`--auth`: HTTP Basic auth on every route, with a backoff that slows password guessing but never locks
out a browser that has logged in before."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import threading
import time

from starlette.requests import HTTPConnection

from nanodb.interfaces.refusals import refusal

LOGIN_BURST = 10  # failed logins a client may make at once; then one more per LOGIN_REFILL_S
LOGIN_REFILL_S = 1.0
DEVICE_COOKIE = "nanodb_device"
DEVICE_COOKIE_MAX_AGE_S = 365 * 86400  # valid while this server process runs


def parse_auth(text: str) -> tuple[str, str]:
    """`USER:PASS` -> (user, password)."""
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise ValueError("--auth must be USER:PASS, both non-empty")
    return user, password


class BasicAuth:
    """HTTP Basic auth on every route: browsers ask once, programs pass `curl -u USER:PASS`.

    Failed logins are rate-limited: after LOGIN_BURST failures, one attempt per LOGIN_REFILL_S; attempts
    beyond that get 429 without their password being checked (else a 429 for a wrong password and a 200
    for the right one would let guessing go on at full speed). So that guessing from an address never
    locks out the real user, a successful login gets a device cookie (signed with a key of this process):
    a client that shows one has a backoff of its own, not its address's. The address is the socket's
    peer, or what a proxy named with --trusted-proxy forwards (uvicorn's proxy headers)."""

    def __init__(self, app, user: str, password: str):
        self.app = app
        self.expected = f"{user}:{password}".encode()
        self.device_key = secrets.token_bytes(32)
        self.budgets: dict[str, tuple[float, float]] = {}  # client -> (attempts left, when counted)
        self.lock = threading.Lock()

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        connection = HTTPConnection(scope)
        device = self.device(connection.cookies.get(DEVICE_COOKIE, ""))
        client = f"device {device}" if device else f"address {connection.client.host if connection.client else '?'}"
        scheme, _, encoded = connection.headers.get("authorization", "").partition(" ")
        try:
            given = base64.b64decode(encoded, validate=True) if scheme.lower() == "basic" else None
        except (binascii.Error, ValueError):
            given = b""
        if given is not None and self._budget(client) < 1:
            refused = refusal(429, f"too many failed logins; try again in {LOGIN_REFILL_S:g} s",
                              {"Retry-After": str(max(1, round(LOGIN_REFILL_S)))})
        elif given is None or not secrets.compare_digest(given, self.expected):
            if given is not None:
                self._spend(client)
            refused = refusal(401, "log in with the user and password given to --auth",
                              {"WWW-Authenticate": 'Basic realm="nanodb"'})
        elif device or scope["type"] != "http":
            return await self.app(scope, receive, send)
        else:
            return await self.app(scope, receive, self.with_device_cookie(send))
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008})
        return await refused(scope, receive, send)

    def device(self, cookie: str) -> str | None:
        """The device id in a cookie this process signed, else None."""
        device, _, signature = cookie.partition(".")
        return device if device and secrets.compare_digest(signature, self._sign(device)) else None

    def _sign(self, device: str) -> str:
        return hmac.new(self.device_key, device.encode(), hashlib.sha256).hexdigest()

    def with_device_cookie(self, send):
        """`send`, adding a new device cookie to the response."""
        device = secrets.token_hex(16)
        cookie = (f"{DEVICE_COOKIE}={device}.{self._sign(device)}; Path=/; Max-Age={DEVICE_COOKIE_MAX_AGE_S}; "
                  "HttpOnly; SameSite=Strict").encode()

        async def sending(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"set-cookie", cookie)]}
            await send(message)
        return sending

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

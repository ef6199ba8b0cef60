"""The one shape of every error the server answers, whichever layer answers it: a JSON object
`{"error": "one line"}` with Content-Type application/json, from a route, the request guard, the web UI's
limits, the login check, or the connection layer that answers before any HTTP parsing or app runs."""

from __future__ import annotations

import json
from http import HTTPStatus

from fastapi.responses import JSONResponse

JSON_TYPE = b"application/json"


def refusal(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    """The ASGI answer: `message` as {"error": message}."""
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def refusal_body(message: str) -> bytes:
    return json.dumps({"error": message}).encode()


def raw_refusal(status: int, message: str, headers: dict[str, str] | None = None) -> bytes:
    """A whole HTTP/1.1 answer that closes the connection, for a layer below the app (no ASGI to send it)."""
    body = refusal_body(message)
    head = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}", f"content-type: {JSON_TYPE.decode()}",
            "connection: close", f"content-length: {len(body)}", *(f"{k}: {v}" for k, v in (headers or {}).items())]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body

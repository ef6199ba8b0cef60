"""Fetching a query image from an http(s) URL, for the console and the Python API (never for the
HTTP API: a server must not fetch what a remote client names)."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from urllib.parse import urlsplit

from nanodb.search.query import QueryError, is_url

MAX_FETCH_BYTES = 32 << 20  # the HTTP API's upload limit
FETCH_TIMEOUT_S = 15.0  # for the whole download


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if urlsplit(newurl).scheme.lower() not in ("http", "https"):
            raise urllib.error.URLError(f"redirected to a non-http URL ({newurl})")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def fetch_url(url: str, max_bytes: int = MAX_FETCH_BYTES, timeout: float = FETCH_TIMEOUT_S) -> bytes:
    """The bytes at an http(s) URL, at most `max_bytes`, within `timeout` seconds in all; any failure
    raises QueryError with one line saying why."""
    url = url.strip()
    if not is_url(url):
        raise QueryError(f"not an http(s) URL: {url[:200]}")
    opener = urllib.request.build_opener(_HttpOnlyRedirects)
    request = urllib.request.Request(url, headers={"User-Agent": "nanodb", "Accept": "image/*"})
    deadline = time.monotonic() + timeout
    try:
        with opener.open(request, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > max_bytes:
                raise QueryError(f"cannot fetch {url}: larger than {max_bytes >> 20} MB")
            chunks, size = [], 0
            while chunk := response.read(1 << 16):
                size += len(chunk)
                if size > max_bytes:
                    raise QueryError(f"cannot fetch {url}: larger than {max_bytes >> 20} MB")
                if time.monotonic() > deadline:
                    raise QueryError(f"cannot fetch {url}: took longer than {timeout:g} s")
                chunks.append(chunk)
    except QueryError:
        raise
    except urllib.error.HTTPError as e:
        raise QueryError(f"cannot fetch {url}: HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        raise QueryError(f"cannot fetch {url}: {e.reason}") from None
    except (TimeoutError, OSError, ValueError) as e:  # socket timeouts, resets, malformed URLs
        raise QueryError(f"cannot fetch {url}: {e or type(e).__name__}") from None
    if not size:
        raise QueryError(f"cannot fetch {url}: the answer was empty")
    return b"".join(chunks)

"""The server's connection layer, below HTTP parsing: caps on open connections, in all and per client
address, and deadlines for clients that send a request too slowly. Uvicorn has no header-read timeout of
its own: a connection that sends its headers a byte a second would stay open for good, and enough of them
exhaust the process's file descriptors, which locks every other client out."""

from __future__ import annotations

import logging
import resource
import time
from collections import Counter

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from nanodb.interfaces.refusals import JSON_TYPE, raw_refusal, refusal_body

MAX_CONNECTIONS = 1000  # open connections in all, fewer when the open-file limit is low (see connection_cap)
MAX_CONNECTIONS_PER_CLIENT = 256  # from one address (a trusted proxy counts only in the total)
FILES_RESERVED = 256  # file descriptors kept for the database, the decode workers and the thumbnails
HEADER_TIMEOUT_S = 5.0  # a request's head must arrive whole within this, from the connection or the last response
BODY_STALL_S = 10.0  # a request body slower than BODY_MIN_RATE for this long is dropped
BODY_MIN_RATE = 1024  # bytes a second
CHECK_EVERY_S = 1.0
REPORT_EVERY_S = 60.0

RETRY_AFTER_S = 5  # told to a client refused for too many connections
REFUSED = raw_refusal(503, "too many connections; try again later", {"retry-after": str(RETRY_AFTER_S)})

log = logging.getLogger(__name__)


class FloodLog:
    """Logs a kind of refusal once when it starts, then at most once per REPORT_EVERY_S with a count, so a
    flood writes a few lines, not one per connection."""

    def __init__(self):
        self.counts: Counter[str] = Counter()
        self.reported_at: dict[str, float] = {}

    def note(self, what: str) -> None:
        self.counts[what] += 1
        now = time.monotonic()
        if now - self.reported_at.get(what, -REPORT_EVERY_S) >= REPORT_EVERY_S:
            self.reported_at[what] = now
            log.warning("%s (%d times since the last report; reported at most once a minute)",
                        what, self.counts.pop(what))


class ConnectionLimits:
    """The open connections, in all and per client address. Used on the event loop's thread only."""

    def __init__(self, total: int, per_client: int = MAX_CONNECTIONS_PER_CLIENT,
                 trusted_proxies: frozenset[str] = frozenset()):
        self.total, self.per_client, self.trusted_proxies = total, per_client, trusted_proxies
        self.open: Counter[str] = Counter()
        self.open_total = 0
        self.flood = FloodLog()

    def admit(self, host: str) -> bool:
        if self.open_total >= self.total:
            self.flood.note(f"refusing connections: {self.total} are open, the most this server keeps")
            return False
        if host not in self.trusted_proxies and self.open[host] >= self.per_client:
            self.flood.note(f"refusing connections from {host}: it has {self.per_client} open, the most per address")
            return False
        self.open[host] += 1
        self.open_total += 1
        return True

    def release(self, host: str) -> None:
        self.open[host] -= 1
        self.open_total -= 1
        if self.open[host] <= 0:
            del self.open[host]


class GuardedH11Protocol(H11Protocol):
    """Uvicorn's h11 protocol, plus: a connection over the caps gets a 503 and is closed before anything is
    read; a request head not whole within HEADER_TIMEOUT_S, or a body that stalls, closes the connection."""

    def __init__(self, *args, limits: ConnectionLimits, **kwargs):
        super().__init__(*args, **kwargs)
        self.limits = limits
        self.host: str | None = None  # set once admitted
        self.waiting_since = 0.0  # when the connection began to wait for a request head
        self.received = 0  # bytes since the last check
        self.stalled_since: float | None = None
        self.check_timer = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        host = self.client[0] if self.client else "?"
        if not self.limits.admit(host):
            transport.write(REFUSED)
            transport.close()
            return
        self.host = host
        self.waiting_since = self.loop.time()
        self.check_timer = self.loop.call_later(CHECK_EVERY_S, self.check_progress)

    def send_400_response(self, msg: str) -> None:
        """A request h11 cannot parse (uvicorn's answer is plain text, on a connection left open): 400 with
        the JSON error body, and the connection closed as its header says."""
        headers = [(b"content-type", JSON_TYPE), (b"connection", b"close")]
        for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"),
                      h11.Data(data=refusal_body(msg)), h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self.transport.close()

    def connection_lost(self, exc) -> None:
        self.release()
        super().connection_lost(exc)

    def release(self) -> None:
        if self.host is not None:
            self.limits.release(self.host)
            self.host = None
        if self.check_timer is not None:
            self.check_timer.cancel()
            self.check_timer = None

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        super().data_received(data)

    def on_response_complete(self) -> None:
        self.waiting_since = self.loop.time()
        super().on_response_complete()

    def check_progress(self) -> None:
        """Every CHECK_EVERY_S: close the connection if the client is too slow to send its request."""
        if self.transport.is_closing() or self.transport.get_protocol() is not self:  # closing, or a WebSocket now
            return self.release()
        now, state = self.loop.time(), self.conn.their_state
        if state is h11.IDLE and now - self.waiting_since > HEADER_TIMEOUT_S:
            if self.conn.trailing_data[0]:  # a request begun (an idle keep-alive connection closes quietly)
                self.limits.flood.note(f"closed connections that sent no whole request head in {HEADER_TIMEOUT_S:g} s")
            return self.transport.close()
        if state is h11.SEND_BODY and not self.flow.read_paused and self.received < BODY_MIN_RATE * CHECK_EVERY_S:
            self.stalled_since = self.stalled_since or now
            if now - self.stalled_since >= BODY_STALL_S:
                self.limits.flood.note(f"closed connections whose request body stalled for {BODY_STALL_S:g} s")
                return self.transport.close()
        else:
            self.stalled_since = None
        self.received = 0
        self.check_timer = self.loop.call_later(CHECK_EVERY_S, self.check_progress)


def connection_cap() -> int:
    """MAX_CONNECTIONS, or fewer so that open connections can never use up the open-file limit (which is
    first raised to its hard limit): past that limit, accepting fails and every client is locked out."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY:
        return MAX_CONNECTIONS
    return max(16, min(MAX_CONNECTIONS, soft - FILES_RESERVED))


class AcceptErrorsOncePerMinute(logging.Filter):
    """asyncio logs a failed accept (out of file descriptors) for every connection it retries, with a
    traceback: this lets one through per REPORT_EVERY_S."""

    MESSAGE = "socket.accept() out of system resource"

    def __init__(self):
        super().__init__()
        self.passed_at = -REPORT_EVERY_S

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.MESSAGE):
            return True
        now = time.monotonic()
        if now - self.passed_at < REPORT_EVERY_S:
            return False
        self.passed_at = now
        return True


def quiet_accept_errors() -> None:
    """Install AcceptErrorsOncePerMinute on asyncio's logger, once per process."""
    asyncio_log = logging.getLogger("asyncio")
    if not any(isinstance(f, AcceptErrorsOncePerMinute) for f in asyncio_log.filters):
        asyncio_log.addFilter(AcceptErrorsOncePerMinute())

"""Bounds on HTTP connections, for clients that open connections and never finish a request
(slowloris) or open more than the server can hold.

uvicorn's h11 protocol, with:

- a header timeout: a connection must send a complete request head within `header_timeout`
  seconds of opening, or of the end of its previous response; otherwise it is closed;
- a connection limit: at most `max_connections` open connections. When they are all open, a
  new connection takes the place of the one that has waited longest for a request head (a
  half-sent request or an idle keep-alive connection), so that connections which send nothing
  cannot hold the limit. A connection serving a request is never closed for another;
- a reserve for monitoring: when every connection is serving a request, `reserved` more are
  accepted, for /health and /metrics only (anything else gets a fast 503 with Retry-After).
  Past those, a new connection is closed at once; it never waits in the server.

The request body is timed by BodySizeLimitMiddleware (server/middleware.py), which reads it.
Per-connection log lines are collapsed by `quiet_repeated_logs`, and `connection_limits` fits
the limit to the file descriptors the process may open.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import OrderedDict

from uvicorn.protocols.http.h11_impl import H11Protocol

from server.errors import error_body

logger = logging.getLogger("sinkserve.connections")

# Defaults of the command-line flags (why these: server/defaults.py).
from server.defaults import DEFAULT_HEADER_TIMEOUT, DEFAULT_MAX_CONNECTIONS  # noqa: E402
# Connections past the limit that may still ask for /health and /metrics.
RESERVED_CONNECTIONS = 16
RESERVED_PATHS = ("/health", "/metrics")
# uvicorn's settings, chosen rather than inherited: an idle keep-alive connection is closed after
# 5 s (uvicorn's and vLLM's default), and a request head (request line and headers) may have at
# most 16 KiB (h11's default, as Node's), which bounds what a half-sent request holds.
KEEP_ALIVE_TIMEOUT = 5
MAX_REQUEST_HEAD_BYTES = 16 * 1024
# Connections the kernel queues before the server accepts them (uvicorn's default), unless the
# open-file limit calls for fewer (connection_limits).
DEFAULT_BACKLOG = 2048


class ConnectionGuard:
    """The limits of one server, and its connections: those open, and those waiting for a
    request head (new, half-sent, or idle between requests), the longest-waiting first."""

    def __init__(self, max_connections: int = DEFAULT_MAX_CONNECTIONS,
                 header_timeout: float = DEFAULT_HEADER_TIMEOUT, reserved: int = RESERVED_CONNECTIONS):
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        self.reserved = reserved
        self.open: set[LimitedH11Protocol] = set()
        self.waiting: OrderedDict[LimitedH11Protocol, None] = OrderedDict()  # longest-waiting first


def http_protocol(guard: ConnectionGuard) -> type[H11Protocol]:
    """The protocol class for `uvicorn.Config(http=...)`, for one server with these limits."""
    return type("LimitedH11Protocol", (LimitedH11Protocol,), {"guard": guard})


class LimitedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a header timeout, a connection limit and a reserve (see the
    module's docstring). Use `http_protocol()` to get one bound to a ConnectionGuard."""

    guard: ConnectionGuard

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        guard = self.guard
        if len(guard.open) >= guard.max_connections and guard.waiting:
            next(iter(guard.waiting)).close()  # the one that has waited longest for a request head
            logger.warning("%d connections open: closed the one that had waited longest for a request",
                           guard.max_connections)
        if len(guard.open) >= guard.max_connections + guard.reserved:
            logger.warning("%d connections open, all serving requests, and %d reserved for /health: "
                           "refused a new connection", guard.max_connections, guard.reserved)
            transport.close()
            return
        if len(guard.open) >= guard.max_connections:
            self.app = reserved_only(self.app)
        guard.open.add(self)
        self._wait_for_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_waiting()
        self.guard.open.discard(self)
        super().connection_lost(exc)

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle:  # uvicorn starts a new cycle when a request head is complete
            self._stop_waiting()

    def on_response_complete(self) -> None:
        if not self.transport.is_closing():
            self._wait_for_head()  # for the next request (a pipelined one stops the timer again)
        super().on_response_complete()

    def close(self) -> None:
        self._stop_waiting()
        self.guard.open.discard(self)
        self.transport.close()

    def _wait_for_head(self) -> None:
        self._stop_waiting()
        self.head_timer = self.loop.call_later(self.guard.header_timeout, self._head_timed_out)
        self.guard.waiting[self] = None

    def _stop_waiting(self) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None
        self.guard.waiting.pop(self, None)

    def _head_timed_out(self) -> None:
        self.head_timer = None
        if self.conn.trailing_data[0]:  # part of a request came (an idle connection just ends)
            logger.warning("closed a connection whose request head was incomplete after %g s",
                           self.guard.header_timeout)
        self.close()


def reserved_only(app):
    """`app` for /health and /metrics; a fast 503 (and the connection closed) for anything else."""

    async def reserved(scope, receive, send):
        if scope["type"] != "http" or scope["path"] in RESERVED_PATHS:
            return await app(scope, receive, send)
        body = json.dumps(error_body("The server has too many open connections. Retry later.",
                                     "service_unavailable", code="too_many_connections")).encode()
        await send({"type": "http.response.start", "status": 503,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"retry-after", b"1"), (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

    return reserved


class RepeatedLogFilter(logging.Filter):
    """Lets a kind of log record (same logger, message and exception type) through at most once
    per `interval` seconds; the next one through says how many were held back meanwhile."""

    MAX_KINDS = 1024

    def __init__(self, interval: float = 10.0, clock=time.monotonic):
        super().__init__()
        self.interval = interval
        self.clock = clock
        self.kinds: dict[tuple, list] = {}  # kind -> [when one was last let through, held back since]

    def filter(self, record: logging.LogRecord) -> bool:
        now = self.clock()
        exc_type = record.exc_info[0].__name__ if record.exc_info and record.exc_info[0] else None
        kind = (record.name, record.levelno, str(record.msg), exc_type)
        seen = self.kinds.get(kind)
        if seen is not None and now - seen[0] < self.interval:
            seen[1] += 1
            return False
        if seen is not None and seen[1]:
            record.msg = f"{record.msg} ({seen[1]} more like this in the last {now - seen[0]:.0f} s)"
        if len(self.kinds) >= self.MAX_KINDS:  # bounded: at worst a few repeats more get through
            self.kinds.clear()
        self.kinds[kind] = [now, 0]
        return True


# The loggers that write a line per connection: asyncio's accept errors, uvicorn's invalid requests,
# and this module's.
FLOODING_LOGGERS = ("asyncio", "uvicorn.error", logger.name)


def quiet_repeated_logs(interval: float = 10.0) -> None:
    """Collapse repeated lines from the loggers that can write one per connection."""
    log_filter = RepeatedLogFilter(interval)
    for name in FLOODING_LOGGERS:
        logging.getLogger(name).addFilter(log_filter)


def raise_open_file_limit() -> int | None:
    """Raise the soft limit on open files to the hard limit (each connection holds one); return
    the soft limit, or None where there is none to read (Windows) or it is unlimited."""
    try:
        import resource
    except ImportError:
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 65536
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):  # e.g. macOS caps the soft limit lower than the hard one
            pass
    return None if soft == resource.RLIM_INFINITY else soft


def connection_limits(max_connections: int) -> tuple[int, int]:
    """The connection limit and the listen backlog, within the open-file limit (raised first).

    asyncio accepts up to `backlog` connections in one go, and a connection past the limit holds
    its descriptor until the next turns of the event loop close it, so a flood needs about
    max_connections + reserved + a few backlogs: connections get half of the open-file limit at
    most, the backlog an eighth. Running out makes accepts fail, and asyncio then stops accepting
    for a second (and logs each failed accept).
    """
    open_files = raise_open_file_limit()
    if open_files is None:
        return max_connections, DEFAULT_BACKLOG
    if max_connections > open_files // 2:
        logger.warning("--max-connections %d lowered to %d, half of the open-file limit (ulimit -n %d)",
                       max_connections, open_files // 2, open_files)
        max_connections = open_files // 2
    return max_connections, min(DEFAULT_BACKLOG, open_files // 8)

"""ASGI middleware: request ids and access logs, API-key auth, a request body size limit."""

from __future__ import annotations

import hmac
import json
import logging
import re
import time
import uuid

from server.errors import error_body
from server.logs import REQUEST_ID

access_logger = logging.getLogger("sinkserve.access")
# A client's X-Request-Id is kept when it is this tame; anything else gets a fresh id.
_CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")

PROTECTED_PREFIXES = ("/v1/", "/tokenize", "/detokenize")


async def _send_error(send, status: int, message: str, type: str, headers: list | None = None) -> None:
    body = json.dumps(error_body(message, type)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


class RequestIdMiddleware:
    """Gives every HTTP request an id (the client's `X-Request-Id` when well-formed, else a new
    one), returns it in the `X-Request-Id` response header, puts it in the log context of
    everything the request does, and writes one access-log line when the response has ended."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = given if _CLIENT_REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        token = REQUEST_ID.set(request_id)
        status = 0
        start = time.perf_counter()

        async def send_with_id(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", request_id.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            millis = 1000 * (time.perf_counter() - start)
            access_logger.info("%s %s %d %.1f ms", scope["method"], scope["path"], status, millis,
                               extra={"fields": {"method": scope["method"], "path": scope["path"],
                                                 "status": status, "duration_ms": round(millis, 1)}})
            REQUEST_ID.reset(token)


class APIKeyMiddleware:
    """`Authorization: Bearer <key>` on /v1/* and the tokenizer routes; /health, /metrics stay open."""

    def __init__(self, app, api_keys: list[str]):
        self.app = app
        self.api_keys = [key.encode() for key in api_keys]

    def _authorized(self, headers: list[tuple[bytes, bytes]]) -> bool:
        value = dict(headers).get(b"authorization", b"")
        scheme, _, token = value.partition(b" ")
        # Compare against every key, in constant time each, whatever matches.
        matches = [hmac.compare_digest(token.strip(), key) for key in self.api_keys]
        return scheme.lower() == b"bearer" and any(matches)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] != "OPTIONS" and scope["path"].startswith(PROTECTED_PREFIXES):
            if not self._authorized(scope["headers"]):
                await _send_error(send, 401, "Incorrect API key provided.", "authentication_error",
                                  [(b"www-authenticate", b"Bearer")])
                return
        await self.app(scope, receive, send)


class RateLimitMiddleware:
    """At most `per_minute` requests a minute on /v1/* and the tokenizer routes for each API key
    (or, without keys, each client address): a token bucket that refills continuously; past it,
    429 with Retry-After."""

    def __init__(self, app, per_minute: float, clock=time.monotonic):
        self.app = app
        self.capacity = per_minute
        self.rate = per_minute / 60.0  # tokens per second
        self.clock = clock
        self.buckets: dict[bytes, tuple[float, float]] = {}  # caller -> (tokens, last refill)

    def _caller(self, scope) -> bytes:
        value = dict(scope["headers"]).get(b"authorization")
        if value:  # the key itself is only a dict key, never logged
            return b"key:" + value.partition(b" ")[2].strip()
        client = scope.get("client") or ("?", 0)
        return b"addr:" + str(client[0]).encode()

    def _take(self, caller: bytes) -> float:
        """0 if the request may go, else the seconds until it could."""
        now = self.clock()
        tokens, last = self.buckets.get(caller, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - last) * self.rate)
        if tokens >= 1.0:
            self.buckets[caller] = (tokens - 1.0, now)
            return 0.0
        self.buckets[caller] = (tokens, now)
        return (1.0 - tokens) / self.rate

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] != "OPTIONS" and scope["path"].startswith(PROTECTED_PREFIXES):
            wait = self._take(self._caller(scope))
            if wait:
                await _send_error(send, 429, f"Rate limit of {self.capacity:g} requests per minute reached.",
                                  "rate_limit_error", [(b"retry-after", str(max(1, int(wait + 0.999))).encode())])
                return
        await self.app(scope, receive, send)


class BodySizeLimitMiddleware:
    """Refuses bodies over max_bytes with 413, by Content-Length or while they stream in."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        too_large = f"The request body is larger than the limit of {self.max_bytes} bytes."
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await _send_error(send, 413, too_large, "invalid_request_error")
            return
        # Read the whole body first (the app would anyway), so a chunked body is limited too.
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before sending its body
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await _send_error(send, 413, too_large, "invalid_request_error")
                return
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # later calls wait for the disconnect

        await self.app(scope, replay, send)

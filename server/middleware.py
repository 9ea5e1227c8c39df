"""ASGI middleware: request ids and access logs, API-key auth, a rate limit, a request body size
limit and timeout."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import re
import time
import uuid
from collections import OrderedDict

from server.errors import error_body
from server.logs import REQUEST_ID

access_logger = logging.getLogger("sinkserve.access")
# A client's X-Request-Id is kept when it is this tame; anything else gets a fresh id.
_CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")

PROTECTED_PREFIXES = ("/v1/", "/tokenize", "/detokenize")
# Seconds a request body may take to arrive in full: the CLI's default (server/defaults.py).
from server.defaults import DEFAULT_BODY_TIMEOUT  # noqa: E402
# Rate-limit buckets kept at most (about 300 bytes each).
DEFAULT_MAX_BUCKETS = 10_000


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


def tenant_id(api_key: bytes) -> str:
    """The name a key's data (sessions, prefix-cache entries) is kept under: a digest of the key,
    so that the key itself is never stored beside that data or logged."""
    return hashlib.sha256(b"sinkserve-tenant\0" + api_key).hexdigest()[:32]


def request_tenant(scope) -> str | None:
    """The tenant APIKeyMiddleware found for this request; None on a server without keys."""
    return scope.get("state", {}).get("tenant")


class APIKeyMiddleware:
    """`Authorization: Bearer <key>` on /v1/* and the tokenizer routes; /health, /metrics stay open.

    An authorized request carries its key's tenant id (`request_tenant`), under which the
    server keeps its sessions and prefix-cache entries apart from every other key's.
    """

    def __init__(self, app, api_keys: list[str]):
        self.app = app
        self.api_keys = [key.encode() for key in api_keys]
        self.tenants = [tenant_id(key) for key in self.api_keys]

    def _tenant(self, headers: list[tuple[bytes, bytes]]) -> str | None:
        """The tenant of the request's key; None if the key is missing or wrong."""
        value = dict(headers).get(b"authorization", b"")
        scheme, _, token = value.partition(b" ")
        # Compare against every key, in constant time each, whatever matches.
        matches = [hmac.compare_digest(token.strip(), key) for key in self.api_keys]
        if scheme.lower() != b"bearer" or not any(matches):
            return None
        return self.tenants[matches.index(True)]

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] != "OPTIONS" and scope["path"].startswith(PROTECTED_PREFIXES):
            tenant = self._tenant(scope["headers"])
            if tenant is None:
                if dict(scope["headers"]).get(b"authorization") is None:
                    message = ("You didn't provide an API key: send it as 'Authorization: Bearer KEY' (the openai "
                               "client's api_key, or OPENAI_API_KEY).")
                else:
                    message = "Incorrect API key provided."
                await _send_error(send, 401, message, "authentication_error", [(b"www-authenticate", b"Bearer")])
                return
            scope.setdefault("state", {})["tenant"] = tenant
        await self.app(scope, receive, send)


class RateLimitMiddleware:
    """At most `per_minute` requests a minute on /v1/* and the tokenizer routes for each API key
    (or, without keys, each client address): a token bucket that refills continuously; past it,
    429 with Retry-After.

    The caller is the tenant APIKeyMiddleware authenticated (it runs first), or on a server
    without keys the client address: never a header, which a client could vary per request.
    The bucket table stays bounded whatever the callers do: a full bucket is the same as none, so
    a sweep once per refill period drops the buckets that have refilled, and past `max_buckets`
    the least recently used bucket goes.
    """

    def __init__(self, app, per_minute: float, clock=time.monotonic, max_buckets: int = DEFAULT_MAX_BUCKETS):
        self.app = app
        self.capacity = per_minute
        self.rate = per_minute / 60.0  # tokens per second
        self.clock = clock
        self.max_buckets = max_buckets
        # caller -> (tokens, last refill), least recently used first
        self.buckets: OrderedDict[bytes, tuple[float, float]] = OrderedDict()
        self.next_sweep = clock() + 60.0  # an empty bucket is full again after a minute

    def _caller(self, scope) -> bytes:
        tenant = request_tenant(scope)
        if tenant is not None:
            return b"tenant:" + tenant.encode()
        client = scope.get("client") or ("?", 0)
        return b"addr:" + str(client[0]).encode()

    def _take(self, caller: bytes) -> float:
        """0 if the request may go, else the seconds until it could."""
        now = self.clock()
        if now >= self.next_sweep:
            self._sweep(now)
        tokens, last = self.buckets.pop(caller, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - last) * self.rate)
        if tokens >= 1.0:
            tokens, wait = tokens - 1.0, 0.0
        else:
            wait = (1.0 - tokens) / self.rate
        self.buckets[caller] = (tokens, now)  # back in as the most recently used
        if len(self.buckets) > self.max_buckets:
            self.buckets.popitem(last=False)
        return wait

    def _sweep(self, now: float) -> None:
        """Drop the buckets that have refilled completely."""
        self.buckets = OrderedDict((caller, (tokens, last)) for caller, (tokens, last) in self.buckets.items()
                                   if tokens + (now - last) * self.rate < self.capacity)
        self.next_sweep = now + 60.0

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] != "OPTIONS" and scope["path"].startswith(PROTECTED_PREFIXES):
            wait = self._take(self._caller(scope))
            if wait:
                await _send_error(send, 429, f"Rate limit of {self.capacity:g} requests per minute reached.",
                                  "rate_limit_error", [(b"retry-after", str(max(1, int(wait + 0.999))).encode())])
                return
        await self.app(scope, receive, send)


class BodySizeLimitMiddleware:
    """Refuses bodies over max_bytes with 413, by Content-Length or while they stream in, and
    answers 408 (and closes the connection) when a body has not arrived in full within
    `body_timeout` seconds of the request head: a client that stops mid-body would otherwise
    hold its connection and its partial body for as long as it likes."""

    def __init__(self, app, max_bytes: int, body_timeout: float = DEFAULT_BODY_TIMEOUT):
        self.app = app
        self.max_bytes = max_bytes
        self.body_timeout = body_timeout

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
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.body_timeout
        while True:
            try:
                message = await asyncio.wait_for(receive(), deadline - loop.time())
            except asyncio.TimeoutError:
                await _send_error(send, 408, f"The request body did not arrive within {self.body_timeout:g} s.",
                                  "invalid_request_error", [(b"connection", b"close")])
                return
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

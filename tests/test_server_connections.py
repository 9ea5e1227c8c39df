"""Slow and half-sent requests, the connection limit, and the rate limiter's callers (real server,
except the in-process unit tests at the end). `pytest -s` prints the figures."""

from __future__ import annotations

import json
import logging
import os
import socket
import statistics
import time
import uuid

import httpx
import pytest

from server.connections import RESERVED_CONNECTIONS as RESERVED
from tests.server_process import ServerProcess

MAX_CONNECTIONS = 40
HEADER_TIMEOUT = 1.5
BODY_TIMEOUT = 3.0
HALF_SENT = 300  # well past MAX_CONNECTIONS + RESERVED


@pytest.fixture(scope="module")
def server():
    args = ("--max-connections", str(MAX_CONNECTIONS), "--header-timeout", str(HEADER_TIMEOUT),
            "--body-timeout", str(BODY_TIMEOUT))
    with ServerProcess(*args) as proc:
        yield proc


def open_fds(server) -> int:
    return len(os.listdir(f"/proc/{server.process.pid}/fd"))


def wait_for(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def connect(server, data: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.sendall(data)
    return sock


def closed_by_server(sock: socket.socket, timeout: float) -> bool:
    """True once the server has closed the connection (whatever it sent first)."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    except socket.timeout:
        return False
    return True


def read_response(sock: socket.socket, timeout: float) -> tuple[int, dict, bytes]:
    """The status, headers and body of the one response on `sock`, read until the server closes."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


def health_latency(server) -> float:
    start = time.perf_counter()
    response = httpx.get(server.url + "/health", timeout=10)
    assert response.status_code == 200
    return time.perf_counter() - start


def half_sent_attack(server, count: int, max_connections: int, header_timeout: float) -> None:
    """`count` connections that send part of a request head and then nothing, and 100 invalid
    requests, while a monitor keeps asking for /health on fresh connections."""
    if not os.path.isdir(f"/proc/{server.process.pid}/fd"):
        pytest.skip("needs /proc")
    idle_latency = statistics.median(health_latency(server) for _ in range(5))
    fds_before = open_fds(server)
    log_before = len(server.log().splitlines())
    partial = b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: appl"
    attackers, latencies = [], []
    start = time.monotonic()
    for i in range(count):
        attackers.append(connect(server, partial))
        if i % (count // 15) == 0:
            latencies.append(health_latency(server))
    sent = time.monotonic() - start
    # The server never holds more than its limit and reserve, however many connections come.
    bound = fds_before + max_connections + RESERVED + 4
    assert wait_for(lambda: open_fds(server) <= bound, 10), f"{open_fds(server)} fds open, bound {bound}"
    fds_during = open_fds(server)
    latencies.append(health_latency(server))
    # Every half-sent connection is closed: the newest by the header timeout, the rest earlier
    # to make room for new ones.
    start = time.monotonic()
    assert all(closed_by_server(sock, header_timeout + 10) for sock in attackers)
    closed_after = time.monotonic() - start
    for sock in attackers:
        sock.close()
    for _ in range(100):  # uvicorn warns of each invalid request: collapsed too
        with connect(server, b"NOT HTTP\r\n\r\n") as sock:
            assert closed_by_server(sock, 10)
    assert wait_for(lambda: open_fds(server) <= fds_before + 1, 10)
    fds_after = open_fds(server)
    attack_log = server.log().splitlines()[log_before:]
    print(f"\n{count} half-sent requests in {sent:.1f} s against --max-connections {max_connections}, then 100 "
          f"invalid ones: /health ({1000 * idle_latency:.1f} ms idle) {len(latencies)}/{len(latencies)} answered, "
          f"median "
          f"{1000 * statistics.median(latencies):.1f} ms, max {1000 * max(latencies):.1f} ms; fds {fds_before} "
          f"before, {fds_during} during, {fds_after} after; all closed {closed_after:.1f} s after the last was "
          f"sent; {len(attack_log)} log lines:")
    print("\n".join(attack_log))
    assert len(attack_log) <= 5


def test_half_sent_requests_are_closed_and_health_keeps_answering(server):
    half_sent_attack(server, HALF_SENT, MAX_CONNECTIONS, HEADER_TIMEOUT)


@pytest.mark.slow
def test_ten_thousand_half_sent_requests_against_the_default_limit():
    resource = pytest.importorskip("resource")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 10_500 and hard < 10_500:
        pytest.skip("the client needs 10,500 open files")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 10_500)), hard))
    try:
        with ServerProcess("--header-timeout", "3") as server:
            half_sent_attack(server, 10_000, 2048, 3)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_keep_alive_connection_must_send_its_next_head_in_time(server):
    sock = connect(server, b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
    sock.settimeout(10)
    assert sock.recv(65536).startswith(b"HTTP/1.1 200")
    sock.sendall(b"GET /health HTTP/1.1\r\nHo")  # then nothing more
    start = time.monotonic()
    assert closed_by_server(sock, HEADER_TIMEOUT + 10)
    print(f"\nhalf-sent second request closed after {time.monotonic() - start:.1f} s")
    sock.close()


def test_a_stalled_body_gets_408_and_health_answers_while_every_connection_is_busy(server):
    # Complete heads with bodies that stop halfway: these connections are serving a request, so
    # none of them gives way to a new connection.
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n{\"prompt\": ")
    stalled = [connect(server, head) for _ in range(MAX_CONNECTIONS)]
    start = time.monotonic()
    # Past the limit, a fast 503 for the API, while /health and /metrics still answer.
    assert wait_for(lambda: httpx.get(server.url + "/v1/models", timeout=10).status_code == 503, BODY_TIMEOUT / 2)
    refused = httpx.get(server.url + "/v1/models", timeout=10)
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["type"] == "service_unavailable"
    latency = health_latency(server)
    assert httpx.get(server.url + "/metrics", timeout=10).status_code == 200
    for sock in stalled:
        status, headers, body = read_response(sock, BODY_TIMEOUT + 10)
        assert status == 408 and headers["connection"] == "close"
        error = json.loads(body)["error"]
        assert error["type"] == "invalid_request_error" and "did not arrive" in error["message"]
        sock.close()
    print(f"\n{MAX_CONNECTIONS} stalled bodies: /v1/models 503, /health {1000 * latency:.1f} ms through the reserve; "
          f"408 after {time.monotonic() - start:.1f} s (--body-timeout {BODY_TIMEOUT:g})")
    assert httpx.get(server.url + "/v1/models", timeout=10).status_code == 200


def test_random_authorization_headers_do_not_bypass_the_rate_limit():
    with ServerProcess("--rate-limit", "3") as server:
        statuses = [httpx.get(server.url + "/v1/models", timeout=30,
                              headers={"Authorization": f"Bearer {uuid.uuid4().hex}"}).status_code
                    for _ in range(20)]
        print(f"\n20 requests, each with a new Authorization header, --rate-limit 3: {statuses.count(200)} served")
        assert statuses.count(200) == 3 and statuses.count(429) == 17


def _scope(client: str, authorization: bytes = b"", tenant: str | None = None) -> dict:
    scope = {"type": "http", "method": "GET", "path": "/v1/models", "client": (client, 1234),
             "headers": [(b"authorization", authorization)] if authorization else []}
    if tenant is not None:
        scope["state"] = {"tenant": tenant}
    return scope


def test_rate_limit_buckets_are_tenants_or_addresses_never_headers():
    from server.middleware import RateLimitMiddleware

    limiter = RateLimitMiddleware(app=None, per_minute=3, clock=lambda: 0.0)
    callers = {limiter._caller(_scope("10.0.0.1", b"Bearer " + os.urandom(8).hex().encode())) for _ in range(10)}
    assert len(callers) == 1  # no keys: the address, whatever the header
    tenant = {limiter._caller(_scope(f"10.0.0.{i}", b"Bearer k1", tenant="t1")) for i in range(10)}
    assert len(tenant) == 1 and tenant != callers  # keys: the tenant, from any address


def test_rate_limit_bucket_table_stays_bounded():
    from server.middleware import DEFAULT_MAX_BUCKETS, RateLimitMiddleware

    now = [0.0]
    limiter = RateLimitMiddleware(app=None, per_minute=3, clock=lambda: now[0])
    for i in range(20_000):  # 20,000 distinct callers, 8 KB headers each
        assert limiter._take(limiter._caller(_scope(f"10.0.{i >> 8}.{i & 255}", b"Bearer " + b"%08d" % i * 1024))) == 0
    print(f"\n20,000 callers: {len(limiter.buckets)} buckets (cap {DEFAULT_MAX_BUCKETS})")
    assert len(limiter.buckets) <= DEFAULT_MAX_BUCKETS
    # The most recent callers keep their buckets (least recently used ones went).
    assert limiter._take(b"addr:10.0.78.31") == 0 and limiter._take(b"addr:10.0.78.31") == 0
    assert limiter._take(b"addr:10.0.78.31") > 0
    # A minute on, every bucket has refilled: the sweep drops them all but the new caller's.
    now[0] = 61.0
    assert limiter._take(b"addr:10.0.0.1") == 0
    assert len(limiter.buckets) == 1


def test_repeated_log_lines_collapse():
    from server.connections import RepeatedLogFilter

    now = [0.0]
    log_filter = RepeatedLogFilter(interval=10.0, clock=lambda: now[0])

    def record(msg):
        return logging.LogRecord("asyncio", logging.ERROR, __file__, 1, msg, None, None)

    passed = [r for r in (record("socket.accept() out of system resource") for _ in range(100_000))
              if log_filter.filter(r)]
    assert len(passed) == 1 and log_filter.filter(record("another message"))
    now[0] = 10.0
    again = record("socket.accept() out of system resource")
    assert log_filter.filter(again) and "99999 more like this" in again.getMessage()

"""Clients that open a stream and never read it: their requests are aborted once their unread
outputs pass a bound (server/async_engine.py, MAX_UNREAD_TOKENS), so the server's memory stays
bounded, their KV blocks go back, and the other requests go on."""

from __future__ import annotations

import json
import socket
import time

import httpx

from server.async_engine import MAX_UNREAD_TOKENS
from tests.server_process import ServerProcess, rss_mb, wait_for

NUM_STALLED = 8
# Chat chunks with 20 top logprobs (~1.7 KB each), so that the sockets' buffers (megabytes on
# Linux) fill after ~2,500 tokens rather than ~17,000 plain ones; the alternatives also count
# against the bound. Windowed (--attention-window), so that nothing ends them but an abort.
STALLED = {"messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 12_000,
           "ignore_eos": True, "stream": True, "logprobs": True, "top_logprobs": 20}


def _open_unread_stream(port: int, path: str, body: dict) -> socket.socket:
    """A streamed request whose client never reads (its small receive buffer fills at once)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    payload = json.dumps(body).encode()
    sock.sendall(b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (path.encode(), len(payload), payload))
    return sock


def _read_until_done(sock: socket.socket, timeout: float = 60.0) -> bytes:
    sock.settimeout(timeout)
    data = b""
    while b"data: [DONE]" not in data[-4096:]:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def test_streams_nobody_reads_are_aborted_and_memory_stays_bounded():
    with ServerProcess("--attention-window", "64") as server:
        pid = server.process.pid
        warm = httpx.post(f"{server.url}/v1/completions", json={"prompt": "Once", "max_tokens": 64}, timeout=60)
        assert warm.status_code == 200
        idle_blocks = server.metric("sinkserve_kv_blocks_used")
        rss_before = rss_mb(pid)
        start = time.monotonic()
        stalled = [_open_unread_stream(server.port, "/v1/chat/completions", STALLED) for _ in range(NUM_STALLED)]
        try:
            assert wait_for(lambda: server.metric("sinkserve_num_requests_running") == NUM_STALLED, 30)

            # A client that reads runs to completion beside them.
            canary_start = time.monotonic()
            events = []
            body = {"prompt": "Once upon a time", "max_tokens": 300, "ignore_eos": True, "stream": True}
            with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=120) as response:
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
            canary_latency = time.monotonic() - canary_start
            assert events[-1] == "[DONE]"
            assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length"

            # The stalled requests pass the bound and are aborted: their blocks go back.
            assert wait_for(lambda: server.metric("sinkserve_num_requests_running") == 0
                             and server.metric("sinkserve_kv_blocks_used") == idle_blocks, 180), server.log()
            aborted_after = time.monotonic() - start
            generated = server.metric("sinkserve_generation_tokens_total")
            rss_after = rss_mb(pid)
            print(f"\n{NUM_STALLED} unread streams (bound {MAX_UNREAD_TOKENS}): all aborted after "
                  f"{aborted_after:.1f} s "
                  f"and {generated:.0f} tokens generated in all; KV blocks back to {idle_blocks:.0f}; "
                  f"RSS {rss_before:.0f} -> {rss_after:.0f} MB; a reading client's 300 tokens: {canary_latency:.2f} s")
            assert rss_after - rss_before < 100
            assert server.log().count("its client stopped reading") == NUM_STALLED

            # A stalled client that reads again gets what was in flight, then an error event.
            tail = _read_until_done(stalled[0])
            assert b'"code": "stream_stalled"' in tail and b"data: [DONE]" in tail[-64:]
            assert "stream failed" not in server.log()  # no traceback: one warning per request
        finally:
            for sock in stalled:
                sock.close()
        # The server goes on serving.
        after = httpx.post(f"{server.url}/v1/completions", json={"prompt": "Once", "max_tokens": 8}, timeout=60)
        assert after.status_code == 200 and after.json()["usage"]["completion_tokens"] == 8

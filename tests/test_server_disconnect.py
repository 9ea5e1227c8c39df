"""Clients that go away free what they held; shutdown ends streams cleanly."""

from __future__ import annotations

import asyncio
import json
import signal

import httpx
import pytest

from tests.server_process import ServerProcess, stream_events, wait_for

LONG = {"prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True, "stream": True}


@pytest.fixture(scope="module")
def server():
    with ServerProcess("--num-kv-blocks", "1024") as proc:
        yield proc


def test_dropped_streams_free_their_blocks(server):
    idle = server.metric("sinkserve_kv_blocks_used")

    async def drop_after(client: httpx.AsyncClient, chunks: int) -> int:
        seen = 0
        async with client.stream("POST", f"{server.url}/v1/completions", json=LONG) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    seen += 1
                    if seen == chunks:
                        break  # leaving the block closes the connection mid-stream
        return seen

    async def finish(client: httpx.AsyncClient) -> str:
        body = {"prompt": "Lily", "max_tokens": 30, "ignore_eos": True, "stream": True}
        events = []
        async with client.stream("POST", f"{server.url}/v1/completions", json=body) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
        assert events[-1] == "[DONE]"
        return json.loads(events[-2])["choices"][0]["finish_reason"]

    async def run():
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*(drop_after(client, 3 + i % 5) for i in range(20)),
                                        *(finish(client) for _ in range(8)))

    results = asyncio.run(run())
    assert results[20:] == ["length"] * 8
    assert wait_for(lambda: server.metric("sinkserve_kv_blocks_used") == idle
                     and server.metric("sinkserve_num_requests_running") == 0)
    assert server.metric("sinkserve_request_success_total") >= 8
    response = httpx.post(f"{server.url}/v1/completions", json={"prompt": "Once", "max_tokens": 4})
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 4


def test_dropped_non_streaming_request_is_aborted(server):
    body = {"prompt": "Once upon a time", "max_tokens": 450, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json=body, timeout=0.5)
    # The abort comes long before 450 tokens would have been generated.
    assert wait_for(lambda: server.metric("sinkserve_kv_blocks_used") == 0, timeout=30)
    assert server.metric('sinkserve_num_requests_running') == 0


def test_sigterm_ends_streams_cleanly_and_exits_zero():
    server = ServerProcess("--shutdown-timeout", "1")
    try:
        async def run():
            tasks = [asyncio.create_task(stream_events(server.url, LONG)) for _ in range(4)]
            await asyncio.sleep(1.0)
            server.process.send_signal(signal.SIGTERM)
            return await asyncio.gather(*tasks)

        for events in asyncio.run(run()):
            assert events[-1] == "[DONE]"
            last = json.loads(events[-2])["choices"][0]
            assert last["finish_reason"] == "length"
        assert server.process.wait(timeout=30) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{server.url}/health")
    finally:
        server.stop()


def test_sigterm_drains_short_requests_refuses_new_ones_and_aborts_endless_ones():
    """SIGTERM under load: admission stops at once, requests that can finish within
    --shutdown-timeout do (complete answers), endless ones (a StreamingLLM window and a huge
    max_tokens) are aborted at the timeout: finish_reason "length" (incomplete), stop_reason "abort",
    and [DONE]; exit 0."""
    server = ServerProcess("--shutdown-timeout", "6")
    endless = {"prompt": "Once upon a time", "max_tokens": 60_000, "ignore_eos": True, "stream": True,
               "attention_window": 64}
    short = {"prompt": "Once upon a time", "max_tokens": 24, "ignore_eos": True}
    try:
        def stream(body):
            return stream_events(server.url, body)

        async def post(body) -> httpx.Response:
            async with httpx.AsyncClient(timeout=60) as client:
                return await client.post(f"{server.url}/v1/completions", json=body)

        async def run():
            endless_tasks = [asyncio.create_task(stream(endless)) for _ in range(3)]
            await asyncio.sleep(1.0)  # the endless streams are generating
            short_tasks = [asyncio.create_task(stream({**short, "stream": True})), asyncio.create_task(post(short))]
            await asyncio.sleep(0.05)
            server.process.send_signal(signal.SIGTERM)
            await asyncio.sleep(1.0)
            try:  # after the signal: no new request is taken
                late = await post(short)
            except httpx.TransportError as exc:
                late = exc
            return await asyncio.gather(*endless_tasks), await asyncio.gather(*short_tasks), late

        endless_events, (short_events, short_response), late = asyncio.run(run())
        for events in endless_events:
            assert events[-1] == "[DONE]"
            last = json.loads(events[-2])["choices"][0]
            assert (last["finish_reason"], last["stop_reason"]) == ("length", "abort")
        assert short_events[-1] == "[DONE]"
        assert json.loads(short_events[-2])["choices"][0]["finish_reason"] == "length"
        assert short_response.status_code == 200
        assert short_response.json()["usage"]["completion_tokens"] == 24
        assert isinstance(late, httpx.TransportError) or late.status_code == 503
        assert server.process.wait(timeout=30) == 0
    finally:
        server.stop()

"""SIGTERM: requests still waiting for the engine when the drain timeout ends get a 503 with
Retry-After (they can be retried elsewhere); requests that had produced tokens end with
finish_reason "abort"."""

from __future__ import annotations

import asyncio
import json
import signal

import httpx

from tests.server_process import ServerProcess, stream_events


async def _post(url: str, body: dict) -> httpx.Response:
    async with httpx.AsyncClient(timeout=60) as client:
        return await client.post(f"{url}/v1/completions", json=body)


def test_requests_waiting_at_shutdown_get_503_with_retry_after():
    server = ServerProcess("--max-num-seqs", "1", "--shutdown-timeout", "1", "--attention-window", "64",
                           "--max-output-tokens", str(10**7))
    endless = {"prompt": "Once upon a time", "max_tokens": 10**7, "ignore_eos": True, "stream": True}
    waiting = {"prompt": "Lily went", "max_tokens": 16, "ignore_eos": True}
    try:
        async def run():
            running = asyncio.create_task(stream_events(server.url, endless))
            await asyncio.sleep(1.0)  # it holds the one seat
            queued = [asyncio.create_task(_post(server.url, waiting)) for _ in range(2)]
            while server.metric("sinkserve_num_requests_waiting") < 2:
                await asyncio.sleep(0.05)
            server.process.send_signal(signal.SIGTERM)
            return await running, await asyncio.gather(*queued)

        events, responses = asyncio.run(run())
        # The running request had produced tokens: it ends as an aborted stream.
        assert events[-1] == "[DONE]" and len(events) > 3
        last = json.loads(events[-2])["choices"][0]
        assert "abort" in (last["finish_reason"], last["stop_reason"])
        for response in responses:
            assert response.status_code == 503
            assert response.headers["retry-after"] == "1"
            assert response.json()["error"]["code"] == "shutting_down"
        assert server.process.wait(timeout=30) == 0
    finally:
        server.stop()

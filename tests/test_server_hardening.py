"""Request ids, structured logs, API keys from a file, and a bounded waiting queue (real server)."""

from __future__ import annotations

import json
import re
import threading
import time

import httpx
import pytest

from model.sampling_params import SamplingParams
from tests.server_process import ServerProcess

KEY = "sk-from-file"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    key_file = tmp_path_factory.mktemp("keys") / "keys.txt"
    key_file.write_text(f"# sinkserve keys\n\n{KEY}\n")
    args = ("--api-key-file", str(key_file), "--max-num-seqs", "1", "--max-waiting-requests", "2",
            "--log-format", "json", "--log-level", "info")
    with ServerProcess(*args) as proc:
        yield proc


def _post(server, body, request_id=None, key=KEY, path="/v1/completions"):
    headers = {"Authorization": f"Bearer {key}"}
    if request_id is not None:
        headers["X-Request-Id"] = request_id
    return httpx.post(server.url + path, json=body, headers=headers, timeout=120)


def test_request_ids_on_every_response_and_in_the_logs(server):
    ok = _post(server, {"prompt": "Once", "max_tokens": 2}, request_id="client-id-1")
    assert ok.status_code == 200 and ok.headers["x-request-id"] == "client-id-1"
    fresh = _post(server, {"prompt": "Once", "max_tokens": 2}, request_id="bad id\twith spaces")
    assert re.fullmatch(r"[0-9a-f]{32}", fresh.headers["x-request-id"])
    denied = _post(server, {"prompt": "Once"}, key="wrong")
    assert denied.status_code == 401 and re.fullmatch(r"[0-9a-f]{32}", denied.headers["x-request-id"])
    assert KEY not in server.log()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        entries = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
        access = [e for e in entries if e["logger"] == "sinkserve.access" and e["request_id"] == "client-id-1"]
        if access:
            break
        time.sleep(0.2)
    assert access and access[0]["path"] == "/v1/completions" and access[0]["status"] == 200


def test_a_full_waiting_queue_gets_a_fast_503_and_admitted_requests_finish(server):
    results: dict[str, httpx.Response] = {}

    def send(name, max_tokens):
        results[name] = _post(server, {"prompt": "Once upon a time", "max_tokens": max_tokens, "ignore_eos": True})

    # One running request (max_num_seqs 1) keeps the next two waiting.
    threads = [threading.Thread(target=send, args=("running", 400))]
    threads[0].start()
    deadline = time.monotonic() + 60
    while server.metric("sinkserve_num_requests_running") < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    for name in ("waiting-1", "waiting-2"):
        threads.append(threading.Thread(target=send, args=(name, 4)))
        threads[-1].start()
    while server.metric("sinkserve_num_requests_waiting") < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.metric("sinkserve_num_requests_waiting") == 2
    refused = _post(server, {"prompt": "Once", "max_tokens": 4})
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["code"] == "overloaded"
    chat = _post(server, {"messages": [{"role": "user", "content": "hi"}]}, path="/v1/chat/completions")
    assert chat.status_code == 503
    for thread in threads:
        thread.join(120)
    assert {name: r.status_code for name, r in results.items()} == {"running": 200, "waiting-1": 200,
                                                                   "waiting-2": 200}
    assert results["running"].json()["usage"]["completion_tokens"] == 400
    assert server.metric("sinkserve_requests_rejected_total") == 2
    assert server.metric("sinkserve_kv_blocks_used") == 0


def test_request_timeout_ends_running_and_waiting_requests(server):
    long = {"prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True}
    timed = _post(server, {**long, "request_timeout": 0.3}).json()
    # OpenAI's finish_reason for an incomplete reply, sinkserve's reason in stop_reason
    assert (timed["choices"][0]["finish_reason"], timed["choices"][0]["stop_reason"]) == ("length", "timeout")
    assert 0 < timed["usage"]["completion_tokens"] < 400
    with httpx.stream("POST", server.url + "/v1/completions", json={**long, "request_timeout": 0.3, "stream": True},
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as response:
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    last = json.loads(events[-2])["choices"][0]
    assert events[-1] == "[DONE]" and (last["finish_reason"], last["stop_reason"]) == ("length", "timeout")
    # A request still waiting (max_num_seqs 1 is taken) expires in the queue.
    results = {}
    running = threading.Thread(target=lambda: results.setdefault("running", _post(server, long)))
    running.start()
    deadline = time.monotonic() + 60
    while server.metric("sinkserve_num_requests_running") < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    waited = _post(server, {"prompt": "Once", "max_tokens": 4, "request_timeout": 0.2}).json()
    assert waited["choices"][0]["stop_reason"] == "timeout" and waited["usage"]["completion_tokens"] == 0
    running.join(120)
    assert results["running"].json()["usage"]["completion_tokens"] == 400
    assert server.metric("sinkserve_kv_blocks_used") == 0


def _in_process_app(engine):
    """The app around an engine whose faults a test injects, and its server state."""
    from server.app import build_app
    from server.async_engine import AsyncEngine
    from server.chat_template import ChatTemplate
    from server.metrics import Metrics
    from server.serving import ServerState

    state = ServerState(engine=AsyncEngine(engine), tokenizer=engine.tokenizer,
                        chat_template=ChatTemplate(engine.tokenizer), metrics=Metrics(engine.stats, "stories260K"),
                        model_name="stories260K", max_model_len=engine.max_model_len)
    return build_app(state), state


async def _with_client(app, state, scenario):
    state.engine.start()
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://sinkserve") as client:
            return await scenario(client)
    finally:
        state.engine.stop()


def test_a_dead_engine_loop_fails_requests_fast_and_turns_health_to_503():
    import asyncio

    from scheduler.engine import Engine

    engine = Engine(device="cpu", num_kv_blocks=64)

    def failing_step():
        raise RuntimeError("injected fault at /internal/path")

    engine.step = failing_step
    app, state = _in_process_app(engine)

    async def scenario(client):
        body = {"prompt": "Once", "max_tokens": 4}
        first, stream = await asyncio.gather(
            client.post("/v1/completions", json=body),
            client.post("/v1/completions", json={**body, "stream": True}))
        return first, stream, await client.get("/health"), await client.post("/v1/completions", json=body)

    first, stream, health, after = asyncio.run(asyncio.wait_for(_with_client(app, state, scenario), 60))
    assert first.status_code == 503 and first.json()["error"]["code"] == "engine_dead"
    assert "injected" not in first.text and "/internal" not in first.text
    assert stream.status_code in (200, 503) and "injected" not in stream.text
    if stream.status_code == 200:  # the stream had started: the error travels inside it
        assert '"error"' in stream.text and stream.text.rstrip().endswith("data: [DONE]")
    assert health.status_code == 503
    assert after.status_code == 503


def test_a_request_that_makes_the_engine_raise_fails_alone():
    """A poisoned prompt breaks the model's step (injected); the step's other requests are
    retried and finish exactly as without the fault, the culprit gets a clear 500 (or an error
    event in its stream), nothing leaks, and the server stays healthy."""
    import asyncio

    from scheduler.engine import Engine

    poison = 509
    engine = Engine(device="cpu", num_kv_blocks=128, max_num_batched_tokens=64)
    execute = engine.runner.execute

    def faulty(model_input):
        if poison in model_input.token_ids:
            raise RuntimeError("injected fault at /internal/path")
        return execute(model_input)

    engine.runner.execute = faulty
    app, state = _in_process_app(engine)
    clean = {"prompt": "Once upon a time", "max_tokens": 24, "temperature": 0, "ignore_eos": True}
    expected = engine.generate("Once upon a time", SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
                               use_tqdm=False)[0].text

    async def scenario(client):
        poisoned = {"prompt": [1, 400, poison, 37], "max_tokens": 8}

        async def stream(body):
            return await client.post("/v1/completions", json={**body, "stream": True})

        responses = await asyncio.gather(
            client.post("/v1/completions", json=clean), stream(clean),
            client.post("/v1/completions", json=poisoned), stream(poisoned),
            client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                      "max_tokens": 8}),
            client.post("/v1/completions", json=clean))
        metrics = (await client.get("/metrics")).text
        return responses, await client.get("/health"), metrics

    responses, health, metrics = asyncio.run(asyncio.wait_for(_with_client(app, state, scenario), 120))
    plain, streamed, bad, bad_stream, chat, plain_again = responses
    for response in (plain, plain_again):
        assert response.status_code == 200 and response.json()["choices"][0]["text"] == expected
    assert streamed.status_code == 200 and _stream_text(streamed.text) == expected
    assert chat.status_code == 200 and chat.json()["choices"][0]["finish_reason"] in ("stop", "length")
    assert bad.status_code == 500
    error = bad.json()["error"]
    assert error["code"] == "generation_failed" and error["type"] == "internal_error"
    assert "injected" not in bad.text and "/internal" not in bad.text
    assert bad_stream.status_code == 200 and '"generation_failed"' in bad_stream.text
    assert "injected" not in bad_stream.text
    assert bad_stream.text.rstrip().endswith("data: [DONE]")
    assert health.status_code == 200
    assert engine.block_manager.num_used_blocks == 0
    assert re.search(r'sinkserve_request_success_total\{finished_reason="error",model_name="stories260K"\} 2\.0',
                     metrics), metrics


def _stream_text(body: str) -> str:
    text = ""
    for line in body.splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            text += "".join(choice["text"] for choice in json.loads(line[6:])["choices"])
    return text


def test_rate_limit_per_key():
    with ServerProcess("--api-key", "k1", "--api-key", "k2", "--rate-limit", "3") as server:
        def post(key):
            return httpx.post(server.url + "/v1/completions", json={"prompt": "Once", "max_tokens": 1},
                              headers={"Authorization": f"Bearer {key}"}, timeout=60)

        assert [post("k1").status_code for _ in range(3)] == [200, 200, 200]
        limited = post("k1")
        assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
        assert limited.json()["error"]["type"] == "rate_limit_error"
        assert post("k2").status_code == 200  # another key has its own quota
        assert post("wrong").status_code == 401  # a wrong key is refused before any quota
        assert httpx.get(server.url + "/health").status_code == 200


def test_rate_limit_bucket_refills_over_time():
    from server.middleware import RateLimitMiddleware

    now = [0.0]
    limiter = RateLimitMiddleware(app=None, per_minute=2, clock=lambda: now[0])
    assert limiter._take(b"a") == 0 and limiter._take(b"a") == 0
    assert limiter._take(b"a") == pytest.approx(30.0)  # one token comes back every 30 s
    now[0] = 29.0
    assert limiter._take(b"a") == pytest.approx(1.0)
    now[0] = 30.0
    assert limiter._take(b"a") == 0 and limiter._take(b"b") == 0

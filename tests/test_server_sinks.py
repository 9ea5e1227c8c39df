"""StreamingLLM and long sessions through the real server."""

from __future__ import annotations

import random
import time

import httpx
import pytest

from model.sampling_params import SamplingParams
from scheduler.engine import Engine
from tests.server_process import ServerProcess

openai = pytest.importorskip("openai")

WINDOWED = ("--attention-sinks", "4", "--attention-window", "64", "--max-model-len", "128",
            "--num-kv-blocks", "64")


@pytest.fixture(scope="module")
def server():
    with ServerProcess(*WINDOWED) as proc:
        yield proc


def _post(server, path, body, **kwargs):
    return httpx.post(server.url + path, json=body, timeout=120, **kwargs)


def test_generation_runs_past_the_context(server):
    out = _post(server, "/v1/completions", {"prompt": "Once upon a time", "max_tokens": 300, "ignore_eos": True,
                                           "temperature": 0}).json()
    assert out["usage"]["completion_tokens"] == 300 and out["choices"][0]["finish_reason"] == "length"
    assert server.metric("sinkserve_sink_evictions_total") > 0
    assert server.metric("sinkserve_kv_blocks_used") == 0


def test_prompts_longer_than_the_window_are_accepted_and_scored(server):
    rng = random.Random(0)
    prompt = [1] + [rng.randrange(3, 512) for _ in range(299)]
    scored = _post(server, "/v1/completions", {"prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 1}).json()
    logprobs = scored["choices"][0]["logprobs"]["token_logprobs"]
    assert len(logprobs) == 300 and logprobs[0] is None and all(lp < 0 for lp in logprobs[1:])
    assert scored["usage"]["completion_tokens"] == 0
    # The same streaming computation offline, through the engine.
    engine = Engine(device="cpu", num_kv_blocks=64, max_model_len=128, attention_sinks=4, attention_window=64)
    engine.add_request("p", prompt, SamplingParams(max_tokens=0, prompt_logprobs=1))
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    expected = [entry.logprob for entry in outputs[-1].prompt_logprobs[1:]]
    assert logprobs[1:] == pytest.approx(expected, abs=1e-4)
    continued = _post(server, "/v1/completions", {"prompt": prompt, "max_tokens": 5, "ignore_eos": True}).json()
    assert continued["usage"] == {"prompt_tokens": 300, "completion_tokens": 5, "total_tokens": 305,
                                  "prompt_tokens_details": {"cached_tokens": continued["usage"][
                                      "prompt_tokens_details"]["cached_tokens"]}}


def test_per_request_cache_policy(server):
    long_prompt = [1] + [5] * 200
    dense = _post(server, "/v1/completions", {"prompt": long_prompt, "max_tokens": 4, "attention_window": 0})
    assert dense.status_code == 400 and dense.json()["error"]["code"] == "context_length_exceeded"
    bad = _post(server, "/v1/completions", {"prompt": "x", "attention_window": 8})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "attention_window"
    too_big = _post(server, "/v1/completions", {"prompt": "x", "attention_window": 200})
    assert too_big.status_code == 400
    sliding = _post(server, "/v1/completions", {"prompt": long_prompt, "max_tokens": 4, "attention_sinks": 0})
    assert sliding.status_code == 200


def test_fifty_turn_session_prefills_only_new_tokens(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "Tell me a story about a cat."}]
    previous_prompt = 0
    blocks = []
    for turn in range(50):
        reply = client.chat.completions.create(model="stories260K", messages=messages, max_tokens=12,
                                               temperature=0, extra_body={"session_id": "story"})
        usage = reply.usage
        if turn:
            # Everything the previous turn sent was reused; only the reply and the new user
            # message (and at most the reply's retokenised tail) were prefilled.
            assert usage.prompt_tokens_details.cached_tokens >= previous_prompt, turn
        previous_prompt = usage.prompt_tokens
        blocks.append(server.metric("sinkserve_kv_blocks_used"))
        messages += [{"role": "assistant", "content": reply.choices[0].message.content},
                     {"role": "user", "content": random.Random(turn).choice(["And then?", "What next?", "Go on."])}]
    assert previous_prompt > 128 * 3  # the history is far past the context
    assert server.metric("sinkserve_sessions_active") == 1
    assert max(blocks) <= 64 // 16 + 1  # sinks + window, in 16-token blocks (+1 for the sink gap)
    assert httpx.delete(f"{server.url}/v1/sessions/story").status_code == 200
    assert httpx.delete(f"{server.url}/v1/sessions/story").status_code == 404
    assert server.metric("sinkserve_sessions_active") == 0
    assert server.metric("sinkserve_kv_blocks_used") == 0


def test_session_by_header_and_restart_on_mismatch(server):
    headers = {"X-Session-ID": "header-session"}
    first = [{"role": "user", "content": "Lily had a red ball."}]
    reply = _post(server, "/v1/chat/completions", {"messages": first, "max_tokens": 8, "temperature": 0},
                  headers=headers).json()
    follow = first + [{"role": "assistant", "content": reply["choices"][0]["message"]["content"]},
                      {"role": "user", "content": "Then?"}]
    again = _post(server, "/v1/chat/completions", {"messages": follow, "max_tokens": 8}, headers=headers).json()
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] >= reply["usage"]["prompt_tokens"]
    other = [{"role": "user", "content": "Zebras are striped and fast, everyone knows that."}]
    restarted = _post(server, "/v1/chat/completions", {"messages": other, "max_tokens": 4}, headers=headers).json()
    assert restarted["usage"]["prompt_tokens_details"]["cached_tokens"] < 8  # at most the shared "<s>user:"
    assert httpx.delete(f"{server.url}/v1/sessions/header-session").status_code == 200


@pytest.mark.parametrize("session_memory", ["0", "1"])
def test_idle_sessions_expire_and_give_way_under_pressure(session_memory):
    with ServerProcess(*WINDOWED[:-2], "--num-kv-blocks", "16", "--session-ttl", "2",
                       "--session-memory", session_memory) as server:
        for i in range(3):
            body = {"prompt": f"Session {i} story", "max_tokens": 40, "ignore_eos": True, "session_id": f"s{i}"}
            assert _post(server, "/v1/completions", body).status_code == 200
        assert server.metric("sinkserve_sessions_active") == 3
        held = server.metric("sinkserve_kv_blocks_used")
        assert held > 0
        # A request that needs most of the pool: idle sessions give way, nothing is preempted.
        big = _post(server, "/v1/completions", {"prompt": [1] + [7] * 60, "max_tokens": 60, "ignore_eos": True,
                                                "attention_window": 0})
        assert big.status_code == 200
        if session_memory == "0":  # dropped
            assert server.metric("sinkserve_sessions_active") < 3
        else:  # moved to host memory
            assert server.metric("sinkserve_sessions_active") == 3
            assert server.metric("sinkserve_sessions_in_host_memory") >= 1
            assert server.metric("sinkserve_sessions_swapped_out_total") >= 1
        assert server.metric("sinkserve_preemptions_total") == 0
        deadline = time.monotonic() + 10
        while server.metric("sinkserve_sessions_active") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert server.metric("sinkserve_sessions_active") == 0
        assert server.metric("sinkserve_kv_blocks_used") == 0
        assert server.metric("sinkserve_session_host_blocks_used") == 0

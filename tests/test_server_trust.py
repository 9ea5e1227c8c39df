"""Bounded requests, tenants kept apart, and an API that never pretends: each case against a real
server process, with `/health` probed during the heavy ones (figures printed with `pytest -s`)."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from tests.server_process import ServerProcess, health_probe, rss_mb

openai = pytest.importorskip("openai")

KEY_A, KEY_B = "sk-tenant-a", "sk-tenant-b"
# A prompt of several KV blocks (block size 16) that stories260K tokenizes the same way each time.
LONG_PROMPT = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park " * 2


@pytest.fixture(scope="module")
def keyed():
    with ServerProcess("--api-key", KEY_A, "--api-key", KEY_B, "--num-kv-blocks", "256",
                       "--max-waiting-requests", "64") as proc:
        yield proc


@pytest.fixture(scope="module")
def windowed():
    with ServerProcess("--attention-window", "48", "--attention-sinks", "4", "--max-output-tokens", "40",
                       "--shared-prefix-cache", "--api-key", KEY_A, "--api-key", KEY_B) as proc:
        yield proc


def post(server, path: str, body: dict, key: str = KEY_A, headers: dict | None = None, timeout: float = 120):
    return httpx.post(f"{server.url}{path}", json=body, timeout=timeout,
                      headers={"Authorization": f"Bearer {key}", **(headers or {})})


def error_of(response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


# -- resource bounds ---------------------------------------------------------------------------

def test_a_prompt_list_is_capped_and_refused_without_stalling_the_server(keyed):
    before = rss_mb(keyed.process.pid)
    with health_probe(keyed) as probe:
        response = post(keyed, "/v1/completions", {"prompt": [[5]] * 400_000, "max_tokens": 1})
    print(f"\n400,000 prompts (1.6 MB): {response.status_code}; {probe.summary()}; "
          f"RSS {before:.0f} -> {rss_mb(keyed.process.pid):.0f} MB")
    assert response.status_code == 400 and error_of(response)["param"] == "prompt"
    assert "2048" in error_of(response)["message"]
    assert probe.failures == 0 and probe.latencies
    # a long list that is not one prompt of token ids is refused at once too, with one error
    mixed = post(keyed, "/v1/completions", {"prompt": [5] + [[5]] * 200_000, "max_tokens": 1})
    assert mixed.status_code == 400 and error_of(mixed)["param"] == "prompt"
    bad_ids = post(keyed, "/v1/completions", {"prompt": "hi", "stop_token_ids": ["x"] * 200_000})
    assert bad_ids.status_code == 400 and len(bad_ids.content) < 1000
    for ids in ([5] * 257, [10**6], [-3]):
        response = post(keyed, "/v1/completions", {"prompt": "hi", "max_tokens": 1, "stop_token_ids": ids})
        assert response.status_code == 400 and error_of(response)["param"] == "stop_token_ids"
    # prompts x n count against the waiting queue (64 here), before any prompt is tokenized
    response = post(keyed, "/v1/completions", {"prompt": ["a b"] * 20, "n": 4, "max_tokens": 1})
    assert response.status_code == 400 and error_of(response)["param"] == "n"
    assert post(keyed, "/v1/completions", {"prompt": ["a b"] * 8, "n": 4, "max_tokens": 1}).status_code == 200


def test_tokenizing_and_large_responses_run_off_the_event_loop(keyed):
    text = "Lily and Ben went to the park to play with a big red ball. " * 70_000  # 4.2 MB
    results = []

    def tokenize():
        results.append(post(keyed, "/tokenize", {"prompt": text}, timeout=300))

    def many_logprobs():
        results.append(post(keyed, "/v1/chat/completions", {
            "messages": [{"role": "user", "content": "Tell me a story"}], "n": 32, "logprobs": True,
            "top_logprobs": 20, "max_tokens": 150, "ignore_eos": True}, timeout=300))

    # the two chats together fill the waiting queue (64) exactly, however they arrive
    threads = [threading.Thread(target=fn) for fn in (tokenize, tokenize, many_logprobs, many_logprobs)]
    with health_probe(keyed) as probe:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    sizes = [len(r.content) for r in results]
    print(f"\n2 x 4.2 MB /tokenize and 2 x n=32 top_logprobs=20 chats ({max(sizes) / 1e6:.1f} MB of JSON): "
          f"{probe.summary()}")
    assert all(r.status_code == 200 for r in results), [r.text[:200] for r in results]
    assert probe.failures == 0
    chat = next(r.json() for r in results if "choices" in r.json())
    assert len(chat["choices"]) == 32 and len(chat["choices"][0]["logprobs"]["content"]) == 150


def test_logprobs_a_request_may_hold_are_bounded(keyed):
    response = post(keyed, "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "hi"}], "n": 64, "logprobs": True, "top_logprobs": 20,
        "max_tokens": 400})
    assert response.status_code == 400 and error_of(response)["param"] == "logprobs"
    long_prompt = list(range(3, 400)) * 40  # 15,880 tokens scored with 20 alternatives each
    response = post(keyed, "/v1/completions", {
        "prompt": long_prompt, "echo": True, "logprobs": 20, "max_tokens": 0, "attention_window": 48})
    assert response.status_code == 400 and error_of(response)["param"] == "logprobs"


def test_windowed_requests_without_max_tokens_end_at_the_server_cap(windowed):
    body = {"prompt": "Once upon a time", "max_tokens": None, "ignore_eos": True}
    out = post(windowed, "/v1/completions", body).json()
    assert out["choices"][0]["finish_reason"] == "length" and out["usage"]["completion_tokens"] == 40
    chat = post(windowed, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                   "ignore_eos": True}).json()
    assert chat["usage"]["completion_tokens"] == 40
    response = post(windowed, "/v1/completions", {**body, "max_tokens": 41})
    assert response.status_code == 400 and error_of(response)["param"] == "max_tokens"


# -- tenants -----------------------------------------------------------------------------------

def chat_turn(server, key: str, session: str, history: list[dict], via_header: bool = False) -> dict:
    body = {"messages": history, "max_tokens": 8, "temperature": 0}
    headers = {"X-Session-ID": session} if via_header else {}
    if not via_header:
        body["session_id"] = session
    response = post(server, "/v1/chat/completions", body, key=key, headers=headers)
    assert response.status_code == 200, response.text
    return response.json()


def test_sessions_are_kept_apart_per_api_key(keyed):
    history = [{"role": "user", "content": LONG_PROMPT}]
    first = chat_turn(keyed, KEY_A, "shared-name", history)
    history += [first["choices"][0]["message"], {"role": "user", "content": "And then?"}]
    # B uses A's session id: B gets a session of its own, with nothing of A's.
    stranger = chat_turn(keyed, KEY_B, "shared-name", history)
    assert stranger["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    deleted = httpx.delete(f"{keyed.url}/v1/sessions/shared-name", headers={"Authorization": f"Bearer {KEY_B}"})
    assert deleted.status_code == 200  # B's own session
    assert httpx.delete(f"{keyed.url}/v1/sessions/shared-name",
                        headers={"Authorization": f"Bearer {KEY_B}"}).status_code == 404
    # A's session is intact, and its next turn reuses its history.
    second = chat_turn(keyed, KEY_A, "shared-name", history)
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] > 0


def test_the_prefix_cache_is_not_shared_between_keys_or_salts(keyed, windowed):
    prompt = "Tenant probe. " + LONG_PROMPT  # a first block no earlier request can have made

    def cached(server, key, **extra):
        out = post(server, "/v1/completions", {"prompt": prompt, "max_tokens": 1, **extra}, key=key).json()
        return out["usage"]["prompt_tokens_details"]["cached_tokens"]

    assert cached(keyed, KEY_A) == 0
    assert cached(keyed, KEY_A) > 0  # A's own blocks
    assert cached(keyed, KEY_B) == 0  # never A's
    assert cached(keyed, KEY_A, cache_salt="one") == 0
    assert cached(keyed, KEY_A, cache_salt="one") > 0
    assert cached(keyed, KEY_A, cache_salt="two") == 0
    # --shared-prefix-cache: the operator shares the cache between keys.
    assert cached(windowed, KEY_A) == 0
    assert cached(windowed, KEY_B) > 0


def test_ending_a_session_forgets_its_cached_blocks(keyed):
    history = [{"role": "user", "content": "Secret 4711. " + LONG_PROMPT}]
    chat_turn(keyed, KEY_A, "forget-me", history)
    assert httpx.delete(f"{keyed.url}/v1/sessions/forget-me",
                        headers={"Authorization": f"Bearer {KEY_A}"}).status_code == 200
    again = post(keyed, "/v1/chat/completions", {"messages": history, "max_tokens": 1}).json()
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


def test_a_session_is_kept_apart_per_cache_salt_and_ids_with_a_slash_can_be_ended(keyed):
    history = [{"role": "user", "content": "Salted. " + LONG_PROMPT}]

    def turn(salt: str) -> int:
        body = {"messages": history, "max_tokens": 4, "temperature": 0, "session_id": "team/alice",
                "cache_salt": salt}
        return post(keyed, "/v1/chat/completions", body).json()["usage"]["prompt_tokens_details"]["cached_tokens"]

    assert turn("one") == 0
    assert turn("one") > 0
    assert turn("two") == 0  # same key and session id, another salt: nothing of the first
    deleted = httpx.delete(f"{keyed.url}/v1/sessions/team/alice", headers={"Authorization": f"Bearer {KEY_A}"})
    assert deleted.status_code == 200 and deleted.json()["id"] == "team/alice"


def test_forwarded_headers_are_not_trusted_by_default():
    with ServerProcess("--rate-limit", "3") as server:
        statuses = [httpx.post(f"{server.url}/v1/completions", json={"prompt": "hi", "max_tokens": 1},
                               headers={"X-Forwarded-For": f"10.0.0.{i}"}).status_code for i in range(8)]
    assert statuses.count(200) == 3 and statuses.count(429) == 5


def test_the_session_header_is_checked_like_the_field(keyed):
    for bad in ("", "x" * 8000, "a b", "ü"):
        response = post(keyed, "/v1/completions", {"prompt": "hi", "max_tokens": 1},
                        headers={"X-Session-ID": bad.encode()})
        assert response.status_code == 400 and error_of(response)["param"] == "X-Session-ID", bad[:20]
    history = [{"role": "user", "content": LONG_PROMPT}]
    chat_turn(keyed, KEY_A, "by-header", history, via_header=True)
    reused = chat_turn(keyed, KEY_A, "by-header", history, via_header=True)
    assert reused["usage"]["prompt_tokens_details"]["cached_tokens"] > 0


# -- never pretend -----------------------------------------------------------------------------

@pytest.mark.parametrize("field, value", [
    ("function_call", "auto"), ("web_search_options", {}), ("audio", {"format": "wav"}),
    ("tool_choice", "auto"), ("best_of", 2), ("use_beam_search", True), ("priority", 1), ("store", True),
    ("functions", [{"name": "f"}]), ("reasoning_effort", "high"), ("no_such_field", 1),
])
def test_a_field_the_server_does_not_implement_is_a_400_naming_it(keyed, field, value):
    response = post(keyed, "/v1/chat/completions",
                    {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, field: value})
    assert response.status_code == 400
    error = error_of(response)
    assert error["param"] == field and field.split("_")[0] in error["message"], error


def test_do_nothing_values_and_nulls_are_accepted(keyed):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "n": None, "stream": None,
            "presence_penalty": None, "frequency_penalty": None, "temperature": None, "tools": None,
            "tool_choice": "none", "response_format": {"type": "text"}, "best_of": None, "store": False,
            "service_tier": "auto", "parallel_tool_calls": True, "logit_bias": None, "seed": None}
    assert post(keyed, "/v1/chat/completions", body).status_code == 200
    completion = {"prompt": "hi", "max_tokens": 2, "echo": None, "logprobs": None, "n": None, "best_of": 1,
                  "stream": None, "suffix": None}
    assert post(keyed, "/v1/completions", completion).status_code == 200
    missing = post(keyed, "/v1/chat/completions", {"messages": [{"role": "user"}], "max_tokens": 1})
    assert missing.status_code == 400 and error_of(missing)["param"] == "messages"


def test_logit_bias_steers_and_bans_tokens(keyed):
    from model.sampling_params import SamplingParams
    from scheduler.engine import Engine

    def token_texts(body: dict) -> list[str]:
        return post(keyed, "/v1/completions", {**body, "logprobs": 0}).json()["choices"][0]["logprobs"]["tokens"]

    text_300 = token_texts({"prompt": [300], "echo": True, "max_tokens": 0})[0]
    forced = token_texts({"prompt": "Once upon a time", "max_tokens": 6, "seed": 3, "logit_bias": {"300": 100}})
    assert forced == [text_300] * 6
    prompt = [1, 60, 90]
    first = Engine(device="cpu").generate([prompt], SamplingParams(temperature=0, max_tokens=1))[0].completions[0]
    greedy = {"prompt": prompt, "max_tokens": 4, "temperature": 0}
    plain = token_texts(greedy)
    banned = token_texts({**greedy, "logit_bias": {str(first.token_ids[0]): -100}})
    assert banned[0] != plain[0]
    bad = post(keyed, "/v1/completions", {**greedy, "logit_bias": {"999999": 1}})
    assert bad.status_code == 400 and error_of(bad)["param"] == "logit_bias"


def test_prompt_logprobs_on_both_routes(keyed):
    out = post(keyed, "/v1/completions", {"prompt": [1, 60, 90, 200], "max_tokens": 1, "prompt_logprobs": 2}).json()
    scored = out["choices"][0]["prompt_logprobs"]
    assert len(scored) == 4 and scored[0] is None
    assert "60" in scored[1] and len(scored[1]) <= 3 and scored[1]["60"]["rank"] >= 1
    chat = post(keyed, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1,
                                                "prompt_logprobs": 0}).json()
    assert len(chat["prompt_logprobs"]) == chat["usage"]["prompt_tokens"] and chat["prompt_logprobs"][0] is None
    forked = post(keyed, "/v1/completions", {"prompt": [1, 60, 90, 200], "max_tokens": 1, "prompt_logprobs": 1,
                                             "n": 3, "temperature": 1.0}).json()
    assert [c["prompt_logprobs"] for c in forked["choices"]] == [forked["choices"][0]["prompt_logprobs"]] * 3
    assert forked["choices"][0]["prompt_logprobs"][1] is not None
    streamed = post(keyed, "/v1/completions", {"prompt": "hi", "prompt_logprobs": 1, "stream": True})
    assert streamed.status_code == 400 and error_of(streamed)["param"] == "prompt_logprobs"


def sse_chunks(response) -> list[dict]:
    return [json.loads(line[6:]) for line in response.text.splitlines()
            if line.startswith("data: ") and line != "data: [DONE]"]


def test_continuous_usage_stats_and_strict_openai_types_on_every_route(keyed):
    from openai.types import Completion, Model
    from openai.types.chat import ChatCompletion, ChatCompletionChunk

    stream_options = {"include_usage": True, "continuous_usage_stats": True}
    chunks = sse_chunks(post(keyed, "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "ignore_eos": True, "stream": True,
        "stream_options": stream_options}))
    used = [c["usage"]["completion_tokens"] for c in chunks]
    assert used == sorted(used) and used[-1] == 6 and all(c["usage"] for c in chunks)
    for chunk in chunks:
        ChatCompletionChunk.model_validate(chunk)
    chunks = sse_chunks(post(keyed, "/v1/completions", {"prompt": "hi", "max_tokens": 5, "ignore_eos": True,
                                                        "stream": True, "stream_options": stream_options}))
    assert [c["usage"]["completion_tokens"] for c in chunks][-1] == 5
    # Streamed completions are Completion objects whose finish_reason is null until the last one,
    # which the SDK's type (not null-able) does not say: it builds chunks without validating.
    for chunk in chunks:
        if not chunk["choices"] or chunk["choices"][0]["finish_reason"] is not None:
            Completion.model_validate(chunk)
    # a deadline that passes mid-way: "length" (the reply is incomplete), the detail in stop_reason
    late = post(keyed, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                "max_tokens": 100, "ignore_eos": True,
                                                "request_timeout": 0.001}).json()
    ChatCompletion.model_validate(late)
    assert late["choices"][0]["finish_reason"] == "length" and late["choices"][0]["stop_reason"] == "timeout"
    late_stream = sse_chunks(post(keyed, "/v1/completions", {"prompt": "hi", "max_tokens": 100, "stream": True,
                                                             "ignore_eos": True, "request_timeout": 0.001}))
    Completion.model_validate(late_stream[-1])
    assert late_stream[-1]["choices"][0]["finish_reason"] == "length"
    Completion.model_validate(post(keyed, "/v1/completions", {"prompt": "hi", "max_tokens": 2}).json())
    models = httpx.get(f"{keyed.url}/v1/models/stories260K", headers={"Authorization": f"Bearer {KEY_A}"})
    Model.model_validate(models.json())
    missing = httpx.get(f"{keyed.url}/v1/models/gpt-4", headers={"Authorization": f"Bearer {KEY_A}"})
    assert missing.status_code == 404 and error_of(missing)["code"] == "model_not_found"


def test_head_probes_and_the_completions_context_error(keyed):
    assert httpx.head(f"{keyed.url}/health").status_code == 200
    assert httpx.head(f"{keyed.url}/metrics").status_code == 200
    response = post(keyed, "/v1/completions", {"prompt": [5] * 600, "max_tokens": 1})
    error = error_of(response)
    assert error["code"] == "context_length_exceeded" and "prompt" in error["message"]
    assert "messages" not in error["message"]


# -- the text a request brings, and what a model writes -----------------------------------------

def test_every_text_a_request_brings_is_bounded_before_it_is_rendered(keyed, windowed):
    tools = [{"type": "function", "function": {"name": f"tool_{i}", "description": "x" * 115_000,
                                               "parameters": {"type": "object"}}} for i in range(128)]
    hello = [{"role": "user", "content": "hi"}]
    before = rss_mb(keyed.process.pid)
    with health_probe(keyed) as probe:
        started = time.perf_counter()
        responses = [post(keyed, "/v1/chat/completions", {"messages": hello, "tools": tools, "max_tokens": 1})
                     for _ in range(3)]
        seconds = (time.perf_counter() - started) / 3
    after = rss_mb(keyed.process.pid)
    print(f"\n3 x 128 tools of 115 KB (14.8 MB bodies): {[r.status_code for r in responses]}, {seconds:.2f} s each; "
          f"RSS {before:.0f} -> {after:.0f} MB; {probe.summary()}")
    for response in responses:
        error = error_of(response)
        assert response.status_code == 400 and error["param"] == "tools"
        assert error["code"] == "context_length_exceeded"
    assert probe.failures == 0 and after - before < 256
    # tools sit before the window: past the context they are refused with a window too
    response = post(windowed, "/v1/chat/completions", {"messages": hello, "tools": tools[:2], "max_tokens": 1})
    assert response.status_code == 400 and error_of(response)["param"] == "tools"
    # a tool message, a tool call's arguments and the Responses instructions count as well
    big = "word " * 20_000
    conversation = hello + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "tool_0", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": big}]
    response = post(keyed, "/v1/chat/completions", {"messages": conversation, "max_tokens": 1})
    assert response.status_code == 400 and error_of(response)["param"] == "messages"
    conversation[1]["tool_calls"][0]["function"]["arguments"] = '{"a": "' + big + '"}'
    conversation[2]["content"] = "sunny"
    response = post(keyed, "/v1/chat/completions", {"messages": conversation, "max_tokens": 1})
    assert response.status_code == 400 and error_of(response)["param"] == "messages"
    response = post(windowed, "/v1/responses", {"input": "hi", "instructions": big, "max_output_tokens": 1})
    assert response.status_code == 400 and error_of(response)["param"] == "instructions"
    # what fits is served
    response = post(keyed, "/v1/chat/completions", {"messages": hello, "tools": [
        {"type": "function", "function": {"name": "f", "description": "A tool.", "parameters": {"type": "object"}}}],
        "max_tokens": 1})
    assert response.status_code == 200


def test_deeply_nested_tool_call_arguments_are_a_400(keyed):
    deep = '{"a": ' + "[" * 5000 + "]" * 5000 + "}"
    messages = [{"role": "user", "content": "hi"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "f", "arguments": deep}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "ok"}]
    response = post(keyed, "/v1/chat/completions", {"messages": messages, "max_tokens": 1})
    assert response.status_code == 400 and error_of(response)["param"] == "messages"
    assert "nested too deeply" in error_of(response)["message"]


def test_a_lone_surrogate_a_model_writes_into_a_tool_call_reaches_the_client_as_u_fffd(keyed):
    # The output is forced to a call whose name is the JSON escape of a lone surrogate.
    call = '<tool_call>[{"name": "\\ud800x", "arguments": {"q": "\\udfff"}}]</tool_call>'
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 80,
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
            "structured_outputs": {"choice": [call]}}
    plain = post(keyed, "/v1/chat/completions", body)
    assert plain.status_code == 200, plain.text
    message = plain.json()["choices"][0]["message"]
    assert message["tool_calls"][0]["function"]["name"] == "\ufffdx"
    assert message["tool_calls"][0]["function"]["arguments"] == '{"q": "\\udfff"}'  # JSON text, as written
    streamed = post(keyed, "/v1/chat/completions", {**body, "stream": True})
    assert streamed.status_code == 200 and streamed.text.rstrip().endswith("data: [DONE]")
    chunks = sse_chunks(streamed)
    names = [call["function"].get("name") for chunk in chunks for choice in chunk["choices"]
             for call in (choice["delta"].get("tool_calls") or [])]
    assert "\ufffdx" in names and chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_lone_surrogates_anywhere_a_client_can_put_them_are_never_a_5xx(keyed, windowed):
    bad = "x\ud800y\udfffz"
    tool = {"type": "function", "function": {"name": "f", "description": bad, "parameters": {
        "type": "object", "properties": {"q": {"type": "string", "description": bad}}}}}
    chats = [
        {"messages": [{"role": "user", "content": bad, "name": bad}]},
        {"messages": [{"role": "system", "content": [{"type": "text", "text": bad}]},
                      {"role": "user", "content": "hi"}], "stop": [bad], "user": bad, "cache_salt": bad},
        {"messages": [{"role": "user", "content": "hi"}], "tools": [tool]},
        {"messages": [{"role": "user", "content": "hi"}], "tools": [tool], "tool_choice": "required"},
        {"messages": [{"role": "user", "content": "hi"},
                      {"role": "assistant", "content": None, "tool_calls": [
                          {"id": bad, "type": "function",
                           "function": {"name": bad, "arguments": '{"q": "' + bad + '"}'}}]},
                      {"role": "tool", "tool_call_id": bad, "content": bad}]},
        {"messages": [{"role": "user", "content": "hi"}], "structured_outputs": {"choice": [bad, "plain"]}},
        {"messages": [{"role": "user", "content": "hi"}], "structured_outputs": {"regex": bad}},
        {"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_schema", "json_schema": {
            "name": "s", "schema": {"type": "object", "properties": {bad: {"type": "string"}}}}}},
    ]
    def post_escaped(server, path: str, body: dict) -> httpx.Response:
        # JSON's "\ud800" escapes: valid JSON, not valid text
        return httpx.post(f"{server.url}{path}", content=json.dumps(body), timeout=120,
                          headers={"Authorization": f"Bearer {KEY_A}", "Content-Type": "application/json"})

    statuses = []
    for body in chats:
        for stream in (False, True):
            response = post_escaped(keyed, "/v1/chat/completions", {**body, "max_tokens": 4, "stream": stream})
            statuses.append(response.status_code)
            assert response.status_code < 500, (body, response.text)
            if stream and response.status_code == 200:
                assert response.text.rstrip().endswith("data: [DONE]")
            response.content.decode("utf-8")  # the body is UTF-8
    for body in ({"input": bad, "instructions": bad, "metadata": {"k": bad}, "user": bad},
                 {"input": [{"role": "user", "content": [{"type": "input_text", "text": bad}]}]}):
        response = post_escaped(windowed, "/v1/responses", {**body, "max_output_tokens": 4})
        statuses.append(response.status_code)
        assert response.status_code < 500, response.text
        if response.status_code == 200:
            stored = httpx.get(f"{windowed.url}/v1/responses/{response.json()['id']}",
                               headers={"Authorization": f"Bearer {KEY_A}"})
            assert stored.status_code == 200 and "\\ud800" not in stored.text
    print(f"\n{len(statuses)} requests with lone surrogates in every field: statuses {sorted(set(statuses))}")
    assert httpx.get(f"{keyed.url}/health").status_code == 200

"""Bad input gets an OpenAI-shaped 4xx, never a 500 or a hang; auth on and off."""

from __future__ import annotations

import httpx
import pytest

from tests.server_process import ServerProcess

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
HELLO = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def server():
    with ServerProcess("--max-request-body-bytes", "100000") as proc:
        yield proc


def _assert_error(response: httpx.Response, status: int, param: str | None = None, match: str = "") -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    if param is not None:
        assert error["param"] == param
    assert match.lower() in error["message"].lower()
    return error


@pytest.mark.parametrize("path, body, param, match", [
    (COMPLETIONS, {"prompt": "x", "max_tokens": "ten"}, "max_tokens", "integer"),
    (COMPLETIONS, {"prompt": 5}, "prompt", ""),
    (COMPLETIONS, {}, "prompt", "required"),
    (COMPLETIONS, {"prompt": []}, "prompt", "empty"),
    (COMPLETIONS, {"prompt": "x", "n": 0}, "n", ""),
    (COMPLETIONS, {"prompt": "x", "n": 1000}, "n", ""),
    (COMPLETIONS, {"prompt": "x", "max_tokens": -1}, "max_tokens", ""),
    (COMPLETIONS, {"prompt": "x", "temperature": 5}, "temperature", ""),
    (COMPLETIONS, {"prompt": "x", "top_p": 0}, "top_p", ""),
    (COMPLETIONS, {"prompt": "x", "logprobs": 50}, "logprobs", ""),
    (COMPLETIONS, {"prompt": "x", "suffix": "y"}, "suffix", "not supported"),
    (COMPLETIONS, {"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options", "stream"),
    (COMPLETIONS, {"prompt": [[1, 2], [999999]]}, "prompt", "token ids"),
    (COMPLETIONS, {"prompt": "x", "stop": [""]}, "stop", "empty"),
    (COMPLETIONS, {"prompt": "x", "min_tokens": 10, "max_tokens": 5}, "min_tokens", "max_tokens"),
    (COMPLETIONS, {"prompt": "x", "echo": True, "logprobs": 1, "session_id": "s"}, "echo", "session"),
    (CHAT, {"messages": []}, "messages", ""),
    (CHAT, {"messages": [{"role": "wizard", "content": "x"}]}, None, ""),
    (CHAT, {"messages": "hello"}, "messages", ""),
    (CHAT, {"messages": HELLO, "max_tokens": 0}, "max_tokens", ""),
    (CHAT, {"messages": HELLO, "top_logprobs": 2}, "top_logprobs", "logprobs"),
    (CHAT, {"messages": HELLO, "stream": "yes"}, "stream", ""),
    ("/detokenize", {"tokens": [-1]}, "tokens", ""),
])
def test_bad_requests_are_400(server, path, body, param, match):
    _assert_error(httpx.post(server.url + path, json=body), 400, param, match)


def test_malformed_json(server):
    response = httpx.post(server.url + COMPLETIONS, content=b'{"prompt": ',
                          headers={"content-type": "application/json"})
    _assert_error(response, 400, None, "not valid JSON")
    response = httpx.post(server.url + CHAT, content=b"\xff\xfe\x00", headers={"content-type": "application/json"})
    _assert_error(response, 400)


def test_unknown_model_is_404(server):
    error = _assert_error(httpx.post(server.url + COMPLETIONS, json={"prompt": "x", "model": "gpt-4"}), 404, "model")
    assert error["code"] == "model_not_found"
    served = httpx.get(server.url + "/v1/models").json()["data"][0]["id"]
    assert f"serves `{served}`" in error["message"]  # what to ask for instead
    _assert_error(httpx.post(server.url + CHAT, json={"messages": HELLO, "model": "nope"}), 404, "model")


def test_prompt_over_the_context(server):
    error = _assert_error(httpx.post(server.url + COMPLETIONS, json={"prompt": "x", "max_tokens": 600}), 400, "prompt")
    assert "maximum context length is 512 tokens" in error["message"] and "603 tokens" in error["message"]
    long_prompt = "Once upon a time " * 200
    error = _assert_error(httpx.post(server.url + CHAT, json={"messages": [{"role": "user", "content": long_prompt}]}),
                          400, "messages")
    assert "512" in error["message"] and error["code"] == "context_length_exceeded"


def test_body_over_the_limit_is_413(server):
    big = {"prompt": "a " * 60000}
    _assert_error(httpx.post(server.url + COMPLETIONS, json=big), 413)

    def chunked():
        yield b'{"prompt": "'
        for _ in range(200):
            yield b"a" * 1000
        yield b'"}'

    response = httpx.post(server.url + COMPLETIONS, content=chunked(), headers={"content-type": "application/json"})
    _assert_error(response, 413)


def test_unknown_route_is_404_in_shape(server):
    _assert_error(httpx.get(server.url + "/v1/nothing"), 404)


def test_server_still_answers_after_bad_input(server):
    response = httpx.post(server.url + COMPLETIONS, json={"prompt": "Once", "max_tokens": 3})
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 3


def test_api_keys():
    with ServerProcess("--api-key", "key-one", env={"SINKSERVE_API_KEY": "key-two,key-three"}) as server:
        body = {"prompt": "Once", "max_tokens": 2}
        _assert_error(httpx.post(server.url + COMPLETIONS, json=body), 401, match="didn't provide an API key")
        _assert_error(httpx.post(server.url + COMPLETIONS, json=body, headers={"Authorization": "Bearer wrong"}), 401,
                      match="Incorrect API key")
        _assert_error(httpx.get(server.url + "/v1/models", headers={"Authorization": "Basic key-one"}), 401)
        _assert_error(httpx.post(server.url + "/tokenize", json={"prompt": "x"}), 401)
        _assert_error(httpx.post(server.url + "/detokenize", json={"tokens": [1]}), 401)
        _assert_error(httpx.get(server.url + "/tokenizer_info"), 401)  # as the README says
        assert httpx.get(server.url + "/tokenizer_info", headers={"Authorization": "Bearer key-one"}).status_code == 200
        for key in ("key-one", "key-two", "key-three"):
            response = httpx.post(server.url + COMPLETIONS, json=body, headers={"Authorization": f"Bearer {key}"})
            assert response.status_code == 200
        assert httpx.get(server.url + "/health").status_code == 200
        assert httpx.get(server.url + "/metrics").status_code == 200
        assert "key-one" not in server.log() and "key-two" not in server.log()
        # CORS is off unless asked for.
        preflight = httpx.options(server.url + COMPLETIONS, headers={
            "Origin": "http://example.com", "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in preflight.headers


@pytest.mark.parametrize("body, param, says", [
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                                {"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}]},
     "messages", "this model takes text only: a content part of type 'image_url' cannot be read"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio",
                                                 "input_audio": {"data": "", "format": "wav"}}]}]},
     "messages", "type 'input_audio'"),
    ({"modalities": ["text", "audio"]}, "modalities", 'this model writes text only: modalities can only be ["text"]'),
    ({"audio": {"voice": "alloy", "format": "wav"}}, "audio", "audio output is not supported"),
    ({"reasoning_effort": "low"}, "reasoning_effort", "this model does not reason before it answers"),
    ({"prediction": {"type": "content", "content": "x"}}, "prediction", "predicted outputs"),
    ({"web_search_options": {}}, "web_search_options", "does not search the web"),  # {}: search, by default
    ({"functions": []}, None, None),  # asks for nothing
    ({"function_call": "none"}, None, None),
    ({"modalities": ["text"]}, None, None),
])
def test_openai_fields_for_other_models_say_what_this_one_does(server, body, param, says):
    """Known OpenAI fields are never "Unrecognized": asking for nothing is fine, asking for what
    this text model cannot do is a 400 that says so."""
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, **body}
    response = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
    if param is None:
        assert response.status_code == 200, response.text
        return
    error = _assert_error(response, 400, param)
    assert says in error["message"] and "Unrecognized" not in error["message"], error


def test_refusals_are_logged_with_their_reason_but_not_the_body():
    secret = "my-private-prompt-text"
    with ServerProcess("--log-level", "info") as server:
        response = httpx.post(f"{server.url}/v1/chat/completions", timeout=60, headers={"X-Request-Id": "req-7"},
                              json={"messages": [{"role": "user", "content": secret}], "reasoning_effort": "high"})
        assert response.status_code == 400
        response = httpx.post(f"{server.url}/v1/completions", json={"prompt": secret, "bogus": 1}, timeout=60)
        assert response.status_code == 400
        log = server.log()
    assert ("[req-7] POST /v1/chat/completions refused with 400 (param reasoning_effort): Invalid value for "
            "'reasoning_effort': reasoning_effort is not supported") in log, log
    assert "POST /v1/completions refused with 400 (param bogus): Unrecognized request argument supplied: bogus" in log
    assert secret not in log

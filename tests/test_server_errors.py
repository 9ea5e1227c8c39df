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
    response = httpx.post(server.url + COMPLETIONS, content=b'{"prompt": ', headers={"content-type": "application/json"})
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

"""Hostile input against a real server: every case gets a clear 4xx or a normal answer, never a
5xx or a hang, and the server goes on serving."""

from __future__ import annotations

import json

import httpx
import pytest

from model.sampling_params import MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS
from tests.server_process import ServerProcess

CASES = [
    # (name, raw body, expected status)
    ("deeply nested", b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400),
    ("not UTF-8", b'{"prompt": "\xff\xfe abc"}', 400),
    ("NaN", b'{"prompt": "x", "temperature": NaN}', 400),
    ("Infinity", b'{"prompt": "x", "top_p": Infinity}', 400),
    ("huge max_tokens", json.dumps({"prompt": "x", "max_tokens": 10**30}).encode(), 400),
    ("seed past 64 bits", json.dumps({"prompt": "x", "seed": 2**100}).encode(), 400),
    ("huge n", json.dumps({"prompt": "x", "n": 10**9}).encode(), 400),
    ("lone surrogate", b'{"prompt": "\\ud800 and \\udfff", "max_tokens": 3}', 200),
    ("control characters", json.dumps({"prompt": "\x00\x01\x1b[31m\u202e\U0010ffff", "max_tokens": 5,
                                       "stop": ["\x00", "\u2028", "\ud7ff"]}).encode(), 200),
    ("5,000 stop strings", json.dumps({"prompt": "Once upon a time", "max_tokens": 32,
                                       "stop": [f"zz{i}" for i in range(5000)]}).encode(), 400),
    ("a 100,000-character stop string", json.dumps({"prompt": "Once", "max_tokens": 8,
                                                    "stop": ["a" * 100_000]}).encode(), 400),
    ("the most stop strings, of the most characters", json.dumps({
        "prompt": "Once upon a time", "max_tokens": 32,
        "stop": [f"{i:03}" + "z" * (MAX_STOP_STRING_CHARS - 3) for i in range(MAX_STOP_STRINGS)]}).encode(), 200),
    ("a string where a list is expected", b'{"messages": "hi"}', 400),
    ("an empty body", b"", 400),
    ("a JSON array", b"[1, 2, 3]", 400),
]


@pytest.fixture(scope="module")
def server():
    with ServerProcess() as proc:
        yield proc


@pytest.mark.parametrize("name, body, status", CASES, ids=[c[0] for c in CASES])
def test_hostile_input(server, name, body, status):
    path = "/v1/chat/completions" if b'"messages"' in body else "/v1/completions"
    response = httpx.post(server.url + path, content=body, headers={"content-type": "application/json"}, timeout=60)
    assert response.status_code == status, response.text[:300]
    if status >= 400:
        error = response.json()["error"]
        assert error["message"] and error["type"] == "invalid_request_error"
        if b'"stop"' in body:  # too many or too long stop strings
            assert error["param"] == "stop"
    else:
        assert response.json()["choices"][0]["finish_reason"] in ("stop", "length")
    assert httpx.get(server.url + "/health").status_code == 200
    ok = httpx.post(server.url + "/v1/completions", json={"prompt": "Once", "max_tokens": 2}, timeout=60)
    assert ok.status_code == 200


UNICODE_EDGES = ["\x00", "\ufeff BOM", "👩\u200d💻 ZWJ", "\u202e bidi override", "line\u2028separator",
                 "\uffff \U0010ffff", "e\u0301 combining", "العربية", "\U000e0041 tag", "\u2581 meta"]


@pytest.mark.parametrize("text", UNICODE_EDGES)
def test_unicode_edges_survive_tokenize_detokenize_and_stop_strings(server, text):
    from model.checkpoints.model_path import BUNDLED_MODEL_DIR
    from model.tokenizers.tokenizer_loader import load_tokenizer

    tok = load_tokenizer(BUNDLED_MODEL_DIR)
    tokens = httpx.post(server.url + "/tokenize", json={"prompt": text}, timeout=60)
    assert tokens.status_code == 200 and tokens.json()["tokens"] == tok.encode(text)
    back = httpx.post(server.url + "/detokenize", json={"tokens": tokens.json()["tokens"]}, timeout=60)
    assert back.status_code == 200 and back.json()["prompt"] == tok.decode(tok.encode(text))
    # The edge text as a stop string of a streamed completion whose prompt ends with it.
    with httpx.stream("POST", server.url + "/v1/completions", timeout=60,
                      json={"prompt": text, "max_tokens": 8, "stream": True, "stop": [text]}) as response:
        assert response.status_code == 200
        events = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and all('"error"' not in event for event in events)

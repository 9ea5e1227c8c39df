"""Protocol details a new user runs into first, through the server on the bundled stories260K:
the streamed role chunk comes with the first token, chat logprobs join back into content cut by
a stop string, /tokenizer_info serves evaluation tools, and a resent conversation matches the
tokens the model generated."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import httpx
import pytest

from model.sampling_params import SamplingParams
from scheduler.engine import Engine
from server.chat_template import ChatTemplate
from tests.server_process import ServerProcess

REPO = Path(__file__).resolve().parents[1]
STORY = [{"role": "user", "content": "Tell me a story."}]


@pytest.fixture(scope="module")
def server():
    with ServerProcess() as proc:
        yield proc


def _chat(server, **body) -> dict:
    response = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": STORY, "temperature": 0, **body},
                          timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def _stream(server, **body) -> list[dict]:
    events = []
    with httpx.stream("POST", f"{server.url}/v1/chat/completions",
                      json={"messages": STORY, "temperature": 0, "stream": True, **body}, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[len("data: "):]))
    return events


def test_each_streamed_role_chunk_comes_with_its_choices_first_token(server):
    events = [e["choices"][0] for e in _stream(server, n=2, max_tokens=8)]
    for index in (0, 1):
        mine = [e for e in events if e["index"] == index]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert mine[1]["delta"].get("content")  # the first token, right after the role
        assert sum("role" in e["delta"] for e in mine) == 1
    # Both choices sample their first token in the same step: the role of choice 1 follows
    # choice 0's first token instead of going out, with choice 0's, before prefill.
    assert "role" not in events[1]["delta"]


def test_chat_logprobs_join_back_into_content_cut_by_a_stop_string(server):
    free = _chat(server, max_tokens=24)["choices"][0]["message"]["content"]
    words = free.split(" ")
    assert len(words) > 4, free
    stop = " " + words[3]  # starts at a token boundary: the tokens after it are all stop string
    cut = _chat(server, max_tokens=24, stop=[stop], logprobs=True, top_logprobs=2)
    choice = cut["choices"][0]
    content = choice["message"]["content"]
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] == stop and free.startswith(content)
    tokens = [entry["token"] for entry in choice["logprobs"]["content"]]
    assert "".join(tokens) == content
    assert len(tokens) < cut["usage"]["completion_tokens"]  # the stop string's tokens were generated
    streamed = _stream(server, max_tokens=24, stop=[stop], logprobs=True, top_logprobs=2)
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in streamed)
    streamed_tokens = [entry["token"] for e in streamed if e["choices"][0]["logprobs"]
                       for entry in e["choices"][0]["logprobs"]["content"]]
    assert text == content and streamed_tokens == tokens


def test_tokenizer_info_serves_an_evaluation_tools_remote_tokenizer(server):
    info = httpx.get(f"{server.url}/tokenizer_info").json()
    assert info["eos_token"] == "</s>" and info["bos_token"] == "<s>" and info["model_max_length"] == 512
    assert info["chat_template"] and info["tokenizer_class"] == "SentencePieceTokenizer"
    # lm-eval's remote tokenizer finds the EOS id by tokenizing the EOS text without specials.
    tokenize = lambda text, special: httpx.post(f"{server.url}/tokenize", json={  # noqa: E731
        "prompt": text, "add_special_tokens": special}).json()["tokens"]
    assert tokenize(info["eos_token"], False) == [info["eos_token_id"]]
    plain = tokenize("Once upon a time", False)
    assert tokenize("Once upon a time", True) == [info["bos_token_id"], *plain]
    assert httpx.post(f"{server.url}/detokenize", json={"tokens": plain}).json()["prompt"] == "Once upon a time"


def test_a_resent_conversation_matches_the_tokens_the_model_generated():
    # The fallback template renders a past reply as the exact continuation of `assistant:`, so a
    # session's next turn finds its whole history, reply included, in the cache.
    engine = Engine(None, device="cpu", num_kv_blocks=64)
    template = ChatTemplate(engine.tokenizer)
    messages = list(STORY)
    for _ in range(3):
        prompt = template.encode(messages)
        reply = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)[0]
        messages += [{"role": "assistant", "content": reply.text}, {"role": "user", "content": "And then?"}]
        resent = template.encode(messages)
        generated = prompt + reply.token_ids
        assert resent[:len(generated)] == generated


def test_the_bench_extra_holds_only_what_the_load_tester_imports():
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    source = (REPO / "clients" / "bench.py").read_text()
    for requirement in extras["bench"]:
        name = requirement.split(">")[0].split("=")[0].split("[")[0].strip()
        assert f"import {name}" in source or f"from {name}" in source, name

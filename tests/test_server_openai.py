"""The real server on loopback, driven by the official openai client."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from model.sampling_params import SamplingParams
from scheduler.engine import Engine
from tests.server_process import ServerProcess

openai = pytest.importorskip("openai")

STORY_PROMPTS = ["Once upon a time", "Lily and Ben", "The big dog", "One day, a little bird",
                 "Tom had a red ball", "The sun was hot", "Mia wanted to", "In the park"]


@pytest.fixture(scope="module")
def server():
    with ServerProcess("--num-kv-blocks", "512") as proc:
        yield proc


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def test_models(client):
    assert [m.id for m in client.models.list().data] == ["stories260K"]


def test_completion_and_usage(client):
    out = client.completions.create(model="stories260K", prompt="Once upon a time", max_tokens=20, temperature=0)
    choice = out.choices[0]
    assert choice.text.startswith(", there was a little girl named Lily")
    assert choice.finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (5, 20, 25)


def test_streamed_text_equals_non_streamed(client):
    kwargs = dict(model="stories260K", prompt="The cat", max_tokens=40, temperature=0)
    full = client.completions.create(**kwargs).choices[0].text
    chunks = list(client.completions.create(stream=True, **kwargs))
    assert "".join(c.choices[0].text for c in chunks) == full
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])

    messages = [{"role": "user", "content": "Tell me a story about a dog."}]
    chat = client.chat.completions.create(model="stories260K", messages=messages, max_tokens=30, temperature=0)
    stream = list(client.chat.completions.create(model="stories260K", messages=messages, max_tokens=30,
                                                 temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert stream[0].choices[0].delta.role == "assistant"
    content = [c for c in stream if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in content) == chat.choices[0].message.content
    assert content[-1].choices[0].finish_reason == "length"
    assert stream[-1].choices == [] and stream[-1].usage.completion_tokens == 30
    assert stream[-1].usage.prompt_tokens == chat.usage.prompt_tokens


def test_n_and_seed(client):
    out = client.completions.create(model="stories260K", prompt="Once upon a time", max_tokens=16, n=2,
                                    temperature=1.0, seed=3)
    assert sorted(c.index for c in out.choices) == [0, 1]
    assert out.usage.completion_tokens == 32
    again = client.completions.create(model="stories260K", prompt="Once upon a time", max_tokens=16, n=2,
                                      temperature=1.0, seed=3)
    assert [c.text for c in again.choices] == [c.text for c in out.choices]
    chat = client.chat.completions.create(model="stories260K", messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=8, n=3)
    assert sorted(c.index for c in chat.choices) == [0, 1, 2]


def test_stop_strings(client):
    full = client.completions.create(model="stories260K", prompt="Once upon a time", max_tokens=40,
                                     temperature=0).choices[0].text
    out = client.completions.create(model="stories260K", prompt="Once upon a time", max_tokens=40, temperature=0,
                                    stop=["Lily"])
    assert out.choices[0].text == full[:full.index("Lily")]
    assert out.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="stories260K", prompt="Once upon a time", max_tokens=40,
                                         temperature=0, stop=["Lily"], stream=True)
    assert "".join(c.choices[0].text for c in streamed) == out.choices[0].text


def test_logprobs(client):
    out = client.completions.create(model="stories260K", prompt="Once upon a time", max_tokens=5, temperature=0,
                                    logprobs=3)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert "".join(lp.tokens) == out.choices[0].text
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 3 and logprob <= 0
        assert logprob == pytest.approx(max(top.values()))  # greedy: the sampled token is the top one
    echo = client.completions.create(model="stories260K", prompt="Once upon a time", max_tokens=0, echo=True,
                                     logprobs=1)
    assert echo.choices[0].text == "Once upon a time"
    assert echo.choices[0].logprobs.token_logprobs[0] is None
    assert all(x < 0 for x in echo.choices[0].logprobs.token_logprobs[1:])

    chat = client.chat.completions.create(model="stories260K", messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=4, temperature=0, logprobs=True, top_logprobs=2)
    entries = chat.choices[0].logprobs.content
    assert len(entries) == 4 and all(len(e.top_logprobs) == 2 for e in entries)
    assert "".join(e.token for e in entries) == chat.choices[0].message.content


def test_prompt_forms(server, client):
    ids = httpx.post(f"{server.url}/tokenize", json={"prompt": "Once upon a time"}).json()["tokens"]
    by_ids = client.completions.create(model="stories260K", prompt=ids, max_tokens=8, temperature=0)
    by_text = client.completions.create(model="stories260K", prompt="Once upon a time", max_tokens=8,
                                        temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    many = client.completions.create(model="stories260K", prompt=["Once upon a time", "The dog"], max_tokens=8,
                                     temperature=0, n=2)
    assert [c.index for c in sorted(many.choices, key=lambda c: c.index)] == [0, 1, 2, 3]
    assert sorted(many.choices, key=lambda c: c.index)[0].text == by_text.choices[0].text
    text = httpx.post(f"{server.url}/detokenize", json={"tokens": ids}).json()["prompt"]
    assert text == "Once upon a time"


def test_64_concurrent_streams_match_the_offline_engine(server):
    params = SamplingParams(temperature=0, max_tokens=24)
    prompts = [f"{STORY_PROMPTS[i % len(STORY_PROMPTS)]} {'and ' * (i % 5)}".strip() for i in range(64)]
    offline = Engine(device="cpu", num_kv_blocks=512)
    expected = [r.text for r in offline.generate(prompts, params, use_tqdm=False)]

    async def run():
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)

        async def one(prompt: str) -> str:
            stream = await client.completions.create(model="stories260K", prompt=prompt, max_tokens=24,
                                                     temperature=0, stream=True)
            return "".join([chunk.choices[0].text async for chunk in stream])

        return await asyncio.gather(*(one(p) for p in prompts))

    assert asyncio.run(run()) == expected
    assert server.metric("sinkserve_kv_blocks_used") == 0

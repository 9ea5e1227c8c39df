"""Fault isolation in the engine: a request that makes a step raise fails alone.

Faults are injected where they can happen: in the batched part of a step (the model or the
sampler, which cannot say which request broke them) and in one request's output processing.
The other requests must produce exactly what they produce in a clean run, every block must be
back in the pool, and the engine must go on serving.
"""

from __future__ import annotations

import random

import pytest

from model.sampling_params import SamplingParams
from scheduler import fault_isolation
from scheduler.engine import Engine

POISON = 509  # a token id no clean prompt contains
MAX_TOKENS = 12


def _engine() -> Engine:
    # Small budget and blocks: prompts prefill in chunks and requests share steps.
    return Engine(device="cpu", block_size=4, num_kv_blocks=256, max_num_batched_tokens=48, seed=0)


def _prompts(count: int, seed: int, low: int = 4, high: int = 70) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 500) for _ in range(rng.randint(low, high))] for _ in range(count)]


def _run(engine: Engine, prompts: list[list[int]], params: list[SamplingParams], max_steps: int = 2000):
    """Every prompt at once; per request id: token ids per completion, finish reasons."""
    tokens, reasons = {}, {}
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        engine.add_request(str(i), prompt, p)
        tokens[str(i)] = [[] for _ in range(p.n)]
        reasons[str(i)] = [None] * p.n
    for _ in range(max_steps):
        if not engine.has_unfinished_requests():
            break
        for out in engine.step():
            assert reasons[out.request_id][out.index] is None, "an output after the completion finished"
            tokens[out.request_id][out.index].extend(out.new_token_ids)
            if out.finished:
                assert reasons[out.request_id][out.index] is None, "a completion finished twice"
                reasons[out.request_id][out.index] = out.finish_reason
    assert not engine.has_unfinished_requests(), "the engine did not finish within the step bound"
    return tokens, reasons


def _greedy(n: int = 1) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, n=n)


def _assert_idle(engine: Engine) -> None:
    assert engine.block_manager.num_used_blocks == 0
    assert not engine.scheduler.running and not engine.scheduler.waiting
    assert not engine._groups and not engine.fault_isolation.suspects


@pytest.fixture(scope="module")
def clean():
    """What 8 greedy requests produce with no fault (the reference)."""
    prompts = _prompts(8, seed=3)
    assert all(POISON not in p for p in prompts)
    tokens, reasons = _run(_engine(), prompts, [_greedy()] * 8)
    return prompts, tokens


def _poison_model(engine: Engine, monkeypatch, when) -> list[int]:
    """Make the runner raise when `when(model_input)`; returns the sizes of the failed steps."""
    execute = engine.runner.execute
    failed = []

    def faulty(model_input):
        if when(model_input):
            failed.append(len(model_input.query_lens))
            raise RuntimeError("injected fault")
        return execute(model_input)

    monkeypatch.setattr(engine.runner, "execute", faulty)
    return failed


def test_a_request_that_breaks_the_model_fails_alone(clean, monkeypatch):
    prompts, expected = clean
    poisoned = list(prompts) + [prompts[2][:5] + [POISON] + prompts[2][5:]]
    engine = _engine()
    failed = _poison_model(engine, monkeypatch, lambda model_input: POISON in model_input.token_ids)
    tokens, reasons = _run(engine, poisoned, [_greedy()] * 9)
    assert reasons["8"] == ["error"] and tokens["8"] == [[]]
    for i in range(8):  # the others: exactly the clean run's tokens
        assert reasons[str(i)] == ["length"] and tokens[str(i)] == expected[str(i)]
    assert failed[0] > 1 and failed[-1] == 1  # a batch failed, then the culprit alone
    _assert_idle(engine)
    # The engine serves on.
    after, after_reasons = _run(engine, prompts[:2], [_greedy()] * 2)
    assert after_reasons == {"0": ["length"], "1": ["length"]}
    assert after["0"] == expected["0"] and after["1"] == expected["1"]


def test_a_request_that_breaks_the_sampler_mid_generation_fails_alone(clean, monkeypatch):
    """The fault comes after the culprit has streamed tokens, during decode steps."""
    prompts, expected = clean
    engine = _engine()
    culprit = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, seed=1234)
    samples = {"culprit": 0}

    def breaks(model_input) -> bool:
        if any(row.params.seed == 1234 for row in model_input.sampling_rows):
            samples["culprit"] += 1
            return samples["culprit"] > 4
        return False

    failed = _poison_model(engine, monkeypatch, breaks)
    tokens, reasons = _run(engine, prompts + [prompts[0]], [_greedy()] * 8 + [culprit])
    assert reasons["8"] == ["error"]
    assert len(tokens["8"][0]) == 4 and tokens["8"][0] == expected["0"][0][:4]  # what it had before the fault
    for i in range(8):
        assert reasons[str(i)] == ["length"] and tokens[str(i)] == expected[str(i)]
    assert failed and failed[-1] == 1
    _assert_idle(engine)


def test_a_culprit_with_n_completions_fails_all_of_them(clean, monkeypatch):
    prompts, expected = clean
    engine = _engine()
    _poison_model(engine, monkeypatch, lambda model_input: POISON in model_input.token_ids)
    poisoned = prompts[:4] + [[POISON] + prompts[4]]
    tokens, reasons = _run(engine, poisoned, [_greedy()] * 4 + [_greedy(n=3)])
    assert reasons["4"] == ["error"] * 3
    for i in range(4):
        assert reasons[str(i)] == ["length"] and tokens[str(i)] == expected[str(i)]
    _assert_idle(engine)


def test_a_fault_in_one_requests_output_fails_it_without_touching_the_batch(clean, monkeypatch):
    prompts, expected = clean
    engine = _engine()
    process_token = engine.output_processor.process_token
    calls = {"n": 0}

    def faulty(request, token_id, entry, grammar):
        if request.request_id == "5":
            calls["n"] += 1
            if calls["n"] == 3:
                raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected")
        return process_token(request, token_id, entry, grammar)

    monkeypatch.setattr(engine.output_processor, "process_token", faulty)
    tokens, reasons = _run(engine, prompts, [_greedy()] * 8)
    assert reasons["5"] == ["error"] and tokens["5"][0] == expected["5"][0][:2]
    for i in (0, 1, 2, 3, 4, 6, 7):
        assert reasons[str(i)] == ["length"] and tokens[str(i)] == expected[str(i)]
    assert engine.scheduler.num_preemptions == 0  # nothing was requeued
    _assert_idle(engine)


def test_a_fault_that_only_batches_trigger_ends_every_request_in_bounded_steps(monkeypatch):
    """No request is to blame (each runs fine alone): after MAX_FAULTS such rounds each
    request is failed rather than retried forever."""
    engine = _engine()
    _poison_model(engine, monkeypatch, lambda model_input: len(model_input.query_lens) > 1)
    tokens, reasons = _run(engine, _prompts(4, seed=5, high=8), [_greedy()] * 4, max_steps=500)
    assert all(r == ["error"] for r in reasons.values())
    # Short prompts: every step batches all four. Each failed batch is followed by one token
    # from every request run alone; the MAX_FAULTS-th round without a culprit ends them.
    assert all(len(t[0]) == fault_isolation.MAX_FAULTS for t in tokens.values())
    _assert_idle(engine)


def test_an_engine_that_fails_every_step_raises(monkeypatch):
    """Not one request's fault: the request that fails alone is followed by a probe step on a
    scratch block, which fails too, and the step raises (the server turns unhealthy)."""
    engine = _engine()
    _poison_model(engine, monkeypatch, lambda model_input: True)
    for i, prompt in enumerate(_prompts(12, seed=4, high=4)):  # one step holds all twelve
        engine.add_request(str(i), prompt, _greedy())
    assert engine.step() == []  # the batch fails: its requests will run alone
    with pytest.raises(RuntimeError, match="injected"):
        engine.step()  # the first fails alone, and so does the probe


def test_an_engine_whose_prefill_is_broken_raises(monkeypatch):
    """Decode steps work, every prefill fails: the probe's prefill fails too, and the step
    raises rather than failing every new request forever."""
    engine = _engine()
    _poison_model(engine, monkeypatch, lambda model_input: max(model_input.query_lens) > 1)
    for i, prompt in enumerate(_prompts(3, seed=8, low=4, high=6)):
        engine.add_request(str(i), prompt, _greedy())
    with pytest.raises(RuntimeError, match="injected"):
        for _ in range(3):
            engine.step()


def test_a_request_failed_at_the_end_of_a_round_is_reported_even_if_it_was_the_last(monkeypatch):
    """A batch-only fault, its third round: B goes away while A runs alone, so A is the last
    suspect; the round ends with A failed, and that failure still reaches the caller."""
    engine = _engine()
    _poison_model(engine, monkeypatch, lambda model_input: len(model_input.query_lens) > 1)
    engine.add_request("A", [1, 30, 31], _greedy())
    engine.add_request("B", [1, 40, 41], _greedy())
    finished = {}
    for _ in range(100):
        if not engine.has_unfinished_requests():
            break
        a = engine._groups.get("A", [None])[0]
        if "B" in engine._groups and a is not None and a.num_faults == fault_isolation.MAX_FAULTS - 1 \
                and engine.fault_isolation.suspects and engine.fault_isolation.suspects[0] is a:
            engine.abort("B")
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out.finish_reason
    assert finished.get("A") == "error"
    assert not engine.has_unfinished_requests()
    _assert_idle(engine)


def test_many_bad_requests_fail_alone_without_killing_the_engine(clean, monkeypatch):
    """Twelve poisoned prompts in one batch with the clean ones: twelve failures in a row, each
    alone, each followed by a passing probe; the engine lives and the others finish."""
    prompts, expected = clean
    engine = _engine()
    _poison_model(engine, monkeypatch, lambda model_input: POISON in model_input.token_ids)
    bad = [[POISON, 7 + i] for i in range(12)]
    tokens, reasons = _run(engine, bad + prompts[:3], [_greedy()] * 15)
    assert all(reasons[str(i)] == ["error"] for i in range(12))
    for i in range(3):
        assert reasons[str(12 + i)] == ["length"] and tokens[str(12 + i)] == expected[str(i)]
    _assert_idle(engine)


def test_innocent_requests_survive_any_number_of_culprits(monkeypatch):
    """Long-running requests share steps with one culprit after another: each time the culprit
    is found, so they are never counted at fault."""
    engine = _engine()
    _poison_model(engine, monkeypatch, lambda model_input: POISON in model_input.token_ids)
    params = SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True)
    for i, prompt in enumerate(_prompts(4, seed=6, high=10)):
        engine.add_request(f"long-{i}", prompt, params)
    reasons = {}
    for culprit in range(2 * fault_isolation.MAX_FAULTS):
        engine.add_request(f"bad-{culprit}", [POISON, 5], _greedy())
        for _ in range(6):
            for out in engine.step():
                if out.finished:
                    reasons[out.request_id] = out.finish_reason
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                reasons[out.request_id] = out.finish_reason
    assert all(reasons[f"bad-{i}"] == "error" for i in range(2 * fault_isolation.MAX_FAULTS))
    assert all(reasons[f"long-{i}"] == "length" for i in range(4))
    _assert_idle(engine)


def test_a_long_windowed_request_is_not_recomputed_after_a_failed_step(monkeypatch):
    """The failed step committed nothing, so the others keep their caches: a StreamingLLM
    request far past its window goes on after one step alone, with no recompute."""
    engine = Engine(device="cpu", block_size=4, num_kv_blocks=256, max_num_batched_tokens=48,
                    attention_sinks=4, attention_window=28)
    params = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)
    engine.add_request("long", [1, 400, 37, 9], params)
    while engine._groups["long"][0].num_output_tokens < 300:
        engine.step()
    sizes = _poison_model(engine, monkeypatch, lambda model_input: POISON in model_input.token_ids)
    executed = []
    execute = engine.runner.execute
    monkeypatch.setattr(engine.runner, "execute", lambda mi: executed.append(sum(mi.query_lens)) or execute(mi))
    engine.add_request("bad", [POISON, 5], _greedy())
    reasons = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                reasons[out.request_id] = out.finish_reason
    assert reasons == {"bad": "error", "long": "length"}
    assert engine._groups == {} and engine.block_manager.num_used_blocks == 0
    # Tokens per step: the failed batch (long's decode + bad's prompt), long alone (one token,
    # no recompute of its window), bad alone (fails),
    # the probe (a 2-token prefill and a 1-token decode), then long's decodes.
    assert executed[:5] == [3, 1, 2, 2, 1] and max(executed[5:]) == 1
    assert sizes == [2, 1]


def _prompt_logprobs(engine: Engine, request_id: str, prompt: list[int]) -> list:
    engine.add_request(request_id, prompt, SamplingParams(max_tokens=1, prompt_logprobs=2, temperature=0.0))
    found = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id == request_id and out.prompt_logprobs:
                found = [(e.token_id, round(e.logprob, 5)) if e else None for e in out.prompt_logprobs]
    return found


def test_prompt_logprobs_are_whole_with_a_prefix_cache_hit_and_after_a_failed_step(clean, monkeypatch):
    prompts, _ = clean
    prompt = [1] + prompts[0] + prompts[1] + prompts[2]  # > 100 tokens: prefilled in chunks of 48
    reference = _prompt_logprobs(_engine(), "alone", prompt)
    assert len(reference) == len(prompt) and [e[0] for e in reference[1:]] == prompt[1:]
    # The same prompt once more in the same engine: its blocks are in the prefix cache, but a
    # scored prompt computes every token.
    engine = _engine()
    _prompt_logprobs(engine, "first", prompt)
    assert _prompt_logprobs(engine, "again", prompt) == reference
    # A step that fails in the middle of its prefill: the scored chunk is computed again once.
    engine = _engine()
    _poison_model(engine, monkeypatch, lambda model_input: POISON in model_input.token_ids)
    engine.add_request("bad", [POISON, 3], _greedy())
    assert _prompt_logprobs(engine, "scored", prompt) == reference


def test_completions_forked_in_a_failed_step_fork_again(clean, monkeypatch):
    """A seeded n=3 request forks in the step that fails: its completions are those of a clean run."""
    prompts, _ = clean
    params = SamplingParams(temperature=1.0, max_tokens=MAX_TOKENS, ignore_eos=True, n=3, seed=7)
    expected, _ = _run(_engine(), [prompts[3]], [params])
    engine = _engine()
    _poison_model(engine, monkeypatch, lambda model_input: POISON in model_input.token_ids)
    tokens, reasons = _run(engine, [prompts[3], [POISON, 4]], [params, _greedy()])
    assert reasons == {"0": ["length"] * 3, "1": ["error"]}
    assert tokens["0"] == expected["0"]
    _assert_idle(engine)


def test_a_failed_session_request_leaves_no_session_cache(clean, monkeypatch):
    prompts, _ = clean
    engine = _engine()
    _poison_model(engine, monkeypatch, lambda model_input: POISON in model_input.token_ids)
    engine.add_request("clean", prompts[0], _greedy())
    engine.add_request("bad", [POISON] + prompts[1], _greedy(), session_id="chat-1")
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.num_sessions == 0 and engine.block_manager.num_used_blocks == 0
    # The session goes on: its next requests keep and reuse a cache as usual.
    _run(engine, [prompts[1]], [_greedy()])
    for request_id, prompt in (("turn-2", prompts[1]), ("turn-3", prompts[1] + [5, 6])):
        engine.add_request(request_id, prompt, _greedy(), session_id="chat-1")
        while engine.has_unfinished_requests():
            engine.step()
    assert engine.num_sessions == 1 and engine.scheduler.sessions.num_reused_tokens > 0
    with pytest.raises(ValueError, match="prompt logprobs"):
        engine.add_request("scored", prompts[0], SamplingParams(prompt_logprobs=1), session_id="chat-2")

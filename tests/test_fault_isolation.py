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
from scheduler import engine as engine_module
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
    assert not engine._groups and not engine._suspects


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

    def faulty(request, token_id, entry):
        if request.request_id == "5":
            calls["n"] += 1
            if calls["n"] == 3:
                raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected")
        return process_token(request, token_id, entry)

    monkeypatch.setattr(engine.output_processor, "process_token", faulty)
    tokens, reasons = _run(engine, prompts, [_greedy()] * 8)
    assert reasons["5"] == ["error"] and tokens["5"][0] == expected["5"][0][:2]
    for i in (0, 1, 2, 3, 4, 6, 7):
        assert reasons[str(i)] == ["length"] and tokens[str(i)] == expected[str(i)]
    assert engine.scheduler.num_preemptions == 0  # nothing was requeued
    _assert_idle(engine)


def test_a_fault_that_only_batches_trigger_ends_every_request_in_bounded_steps(clean, monkeypatch):
    """No request is to blame (each runs fine alone): after MAX_FAULTS failed steps each
    request is failed rather than retried forever."""
    engine = _engine()
    _poison_model(engine, monkeypatch, lambda model_input: len(model_input.query_lens) > 1)
    tokens, reasons = _run(engine, _prompts(4, seed=5, high=8), [_greedy()] * 4, max_steps=500)
    assert all(r == ["error"] for r in reasons.values())
    # Short prompts: every step batches all four. Each failed batch is followed by one token
    # from every request run alone, until the MAX_FAULTS-th failure.
    assert all(len(t[0]) == engine_module.MAX_FAULTS - 1 for t in tokens.values())
    _assert_idle(engine)


def test_an_engine_that_fails_every_step_raises(monkeypatch):
    """Not one request's fault: after MAX_CONSECUTIVE_FAILED_STEPS the step raises (the server
    turns unhealthy) instead of failing every request forever."""
    engine = _engine()
    _poison_model(engine, monkeypatch, lambda model_input: True)
    for i, prompt in enumerate(_prompts(12, seed=4, high=4)):  # one step holds all twelve
        engine.add_request(str(i), prompt, _greedy())
    errors = 0
    with pytest.raises(RuntimeError, match="injected"):
        for _ in range(engine_module.MAX_CONSECUTIVE_FAILED_STEPS):
            errors += sum(out.finish_reason == "error" for out in engine.step())
    assert errors == engine_module.MAX_CONSECUTIVE_FAILED_STEPS - 2  # the ones that ran alone

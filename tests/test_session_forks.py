"""Requests of one session that run at once (branches of a response chain) each fork the session's
cache: every branch reuses the whole shared history and computes exactly what it computes alone,
with sink eviction (a windowed session's evicted tokens are in no prefix cache) and without."""

from __future__ import annotations

import time

import pytest

from model.sampling_params import SamplingParams
from scheduler.engine import Engine

PROMPT = list(range(10, 50))  # 40 tokens: 10 blocks of 4


def _engine() -> Engine:
    return Engine(device="cpu", block_size=4, num_kv_blocks=64, max_model_len=128, max_num_batched_tokens=256,
                  seed=0, session_memory=0)


def _greedy() -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=0)


def _run(engine: Engine, requests: dict[str, list[int]], **policy) -> dict[str, tuple[list, list, int]]:
    """Run requests of session "chat" together: request id -> (tokens, logprobs, cached tokens)."""
    for request_id, prompt in requests.items():
        engine.add_request(request_id, prompt, _greedy(), session_id="chat", **policy)
    results = {request_id: ([], [], None) for request_id in requests}
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens, logprobs, _ = results[out.request_id]
            tokens += out.new_token_ids
            logprobs += [lp.logprob for lp in out.logprobs or ()]
            if out.finished:
                results[out.request_id] = (tokens, logprobs, out.num_cached_tokens)
    return results


@pytest.mark.parametrize("policy", [{}, {"attention_sinks": 4, "attention_window": 16}], ids=["dense", "windowed"])
def test_concurrent_branches_of_a_session_each_reuse_its_cache_and_match_running_alone(policy):
    branches = {"left": [60, 61, 62], "right": [70, 71]}

    def first_turn(engine: Engine) -> list[int]:
        tokens, _, _ = _run(engine, {"turn-1": PROMPT}, **policy)["turn-1"]
        return PROMPT + tokens

    alone = {}
    for name, suffix in branches.items():
        engine = _engine()
        history = first_turn(engine)
        alone[name] = _run(engine, {name: history + suffix}, **policy)[name]
    engine = _engine()
    history = first_turn(engine)
    evictions = engine.scheduler.num_evictions
    together = _run(engine, {name: history + suffix for name, suffix in branches.items()}, **policy)
    for name in branches:
        tokens, logprobs, cached = together[name]
        assert tokens == alone[name][0] and cached == alone[name][2], (name, together[name], alone[name])
        assert logprobs == pytest.approx(alone[name][1], abs=1e-4)  # batched, not alone: float rounding
        assert cached == len(history) - 1  # the last output token of turn 1 was never computed
    assert (evictions > 0) == bool(policy)
    # one session, holding the cache of the branch that finished last; nothing else is held
    assert engine.num_sessions == 1
    engine.scheduler.sessions.expire(time.monotonic() + engine.config.session_ttl + 1)
    assert engine.num_sessions == 0 and engine.block_manager.num_used_blocks == 0

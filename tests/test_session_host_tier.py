"""Idle sessions under memory pressure move to host memory (`session_memory`) and come back by
copying: the next turn reuses every cached token and computes exactly what it would have with
the cache never moved; the host tier's byte budget holds, least recently used first."""

from __future__ import annotations

import time

import torch

from model.execution.host_kv import HostKVPool
from model.sampling_params import SamplingParams
from scheduler.engine import Engine

PROMPT = list(range(10, 26))  # 16 tokens: 4 blocks of 4


def _engine(session_memory_blocks: int | None = 64) -> Engine:
    # 12 blocks of 4 tokens: a windowed endless request (4 sinks + a 32-token window) holds 9.
    engine = Engine(device="cpu", block_size=4, num_kv_blocks=12, max_model_len=48, max_num_batched_tokens=64,
                    seed=0, session_memory=0)
    if session_memory_blocks is not None:  # rebuilt with a budget of that many blocks
        per_block = HostKVPool.bytes_per_block(engine.runner.kv_caches)
        engine = Engine(device="cpu", block_size=4, num_kv_blocks=12, max_model_len=48,
                        max_num_batched_tokens=64, seed=0, session_memory=session_memory_blocks * per_block)
    return engine


def _greedy(max_tokens: int = 4) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=0)


def _turn(engine: Engine, request_id: str, prompt: list[int], session_id: str, **policy) -> tuple[list, list, int]:
    """Run one request of a session to its end: (its output tokens, their logprobs, its cached tokens)."""
    engine.add_request(request_id, prompt, _greedy(), session_id=session_id, **policy)
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    tokens = [t for out in outputs for t in out.new_token_ids]
    logprobs = [lp.logprob for out in outputs for lp in (out.logprobs or [])]
    return tokens, logprobs, outputs[-1].num_cached_tokens


def _squeeze(engine: Engine) -> None:
    """An endless windowed request fills the pool (idle sessions give up their blocks), then ends."""
    engine.add_request("hog", list(range(30, 38)), _greedy(10**6), attention_sinks=4, attention_window=32)
    hog = engine._groups["hog"][0]
    while hog.num_kept_tokens < hog.sink_policy.capacity:
        engine.step()
    engine.abort("hog")


def _session_turns(engine: Engine, squeeze: bool, **policy) -> tuple[list, list, int]:
    tokens, _, _ = _turn(engine, "turn-1", PROMPT, "chat", **policy)
    if squeeze:
        _squeeze(engine)
    return _turn(engine, "turn-2", PROMPT + tokens + [40, 41], "chat", **policy)


def test_a_session_moved_to_host_memory_comes_back_exactly():
    for policy in ({}, {"attention_sinks": 2, "attention_window": 12}):  # dense, and with evictions
        kept = _engine()
        expected, expected_logprobs, expected_cached = _session_turns(kept, squeeze=False, **policy)
        assert kept.stats().num_sessions_swapped_out == 0 and expected_cached > 0

        engine = _engine()
        tokens, logprobs, cached = _session_turns(engine, squeeze=True, **policy)
        stats = engine.stats()
        assert stats.num_sessions_swapped_out == 1 and stats.num_sessions_swapped_in == 1
        assert cached == expected_cached  # nothing recomputed
        assert tokens == expected
        torch.testing.assert_close(logprobs, expected_logprobs, rtol=0, atol=1e-6)
        assert stats.num_sessions_in_host == 0 and stats.num_session_host_blocks_used == 0


def test_without_host_memory_a_squeezed_session_is_recomputed():
    engine = _engine(session_memory_blocks=None)  # session_memory=0
    tokens, _, cached = _session_turns(engine, squeeze=True)
    assert engine.scheduler.sessions.host is None
    assert engine.stats().num_sessions_swapped_out == 0
    assert cached < len(PROMPT)  # at most a prefix-cache hit on blocks the squeeze left alone
    assert tokens == _session_turns(_engine(), squeeze=False)[0]


def test_the_host_tier_keeps_its_budget_least_recently_used_first():
    engine = _engine(session_memory_blocks=6)  # room for one session of 5 blocks
    _turn(engine, "a-1", PROMPT, "a")
    _turn(engine, "b-1", list(range(60, 76)), "b")
    assert engine.block_manager.num_used_blocks == 10
    _squeeze(engine)  # "a" goes to host memory, then "b" does, and "a" leaves it
    stats = engine.stats()
    assert stats.num_sessions_swapped_out == 2 and stats.num_sessions_in_host == 1
    assert stats.num_session_host_blocks_used == 5 <= stats.num_session_host_blocks_total == 6
    assert engine.num_sessions == 1 and "b" in engine.scheduler.sessions and "a" not in engine.scheduler.sessions
    assert engine.end_session("b")
    assert engine.stats().num_session_host_blocks_used == 0 and engine.num_sessions == 0


def test_a_session_larger_than_the_host_tier_is_dropped():
    engine = _engine(session_memory_blocks=4)
    _turn(engine, "turn-1", PROMPT, "chat")  # 5 blocks
    _squeeze(engine)
    assert engine.stats().num_sessions_swapped_out == 0 and engine.num_sessions == 0


def test_sessions_in_host_memory_expire():
    engine = _engine()
    _turn(engine, "turn-1", PROMPT, "chat")
    _squeeze(engine)
    assert engine.stats().num_session_host_blocks_used == 5
    assert engine.expire_sessions() == 0
    assert engine.scheduler.sessions.expire(time.monotonic() + engine.config.session_ttl + 1) == 1
    assert engine.stats().num_session_host_blocks_used == 0 and engine.num_sessions == 0


def test_an_ended_session_back_from_host_memory_leaves_the_prefix_cache():
    engine = _engine()
    tokens, _, _ = _turn(engine, "turn-1", PROMPT, "chat")
    _squeeze(engine)
    _turn(engine, "turn-2", PROMPT + tokens + [40, 41], "chat")  # copied back into fresh blocks
    assert engine.stats().num_sessions_swapped_in == 1
    assert engine.end_session("chat")
    bm = engine.block_manager
    assert bm.start("probe", PROMPT + tokens + [40, 41]) == 0  # nobody can find its history
    bm.free("probe")

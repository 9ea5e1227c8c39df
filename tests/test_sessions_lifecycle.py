"""A session's request that ends while it waits for KV blocks (aborted or timed out; after a
preemption, or after its session's cache was adopted and given up for lack of blocks) leaves
its session free: the session's next request keeps a cache, the one after reuses it, and the
TTL expires it. (A failed session request: tests/test_fault_isolation.py.)"""

from __future__ import annotations

import time

import pytest

from model.sampling_params import SamplingParams
from scheduler.engine import Engine
from scheduler.request import RequestStatus

PROMPT = list(range(10, 26))  # 16 tokens: 4 blocks of 4


def _engine() -> Engine:
    # 12 blocks of 4 tokens: a windowed endless request (4 sinks + a 32-token window) holds 9
    # of them, leaving too few for a session request's prompt.
    return Engine(device="cpu", block_size=4, num_kv_blocks=12, max_model_len=48,
                  max_num_batched_tokens=64, seed=0)


def _greedy(max_tokens: int = 4) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def _start_hog(engine: Engine) -> None:
    """An endless windowed request that holds 9 of the 12 blocks once its window is full."""
    engine.add_request("hog", list(range(30, 38)), _greedy(10**6), attention_sinks=4, attention_window=32)
    hog = engine._groups["hog"][0]
    while hog.num_kept_tokens < hog.sink_policy.capacity:
        engine.step()


def _finish(engine: Engine, request_id: str, prompt: list[int], session_id: str) -> list:
    engine.add_request(request_id, prompt, _greedy(), session_id=session_id)
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    assert outputs[-1].finished and outputs[-1].finish_reason == "length"
    return outputs


def _assert_session_goes_on(engine: Engine, prompt: list[int]) -> None:
    """The session's next request keeps its cache, the one after reuses it, and the idle
    session expires after its TTL, giving its blocks back."""
    second = _finish(engine, "next-1", prompt, "chat")
    assert engine.num_sessions == 1 and engine.block_manager.num_used_blocks > 0
    history = prompt + [t for out in second for t in out.new_token_ids]
    third = _finish(engine, "next-2", history + [40, 41], "chat")
    assert third[-1].num_cached_tokens == len(history) - 1  # the last output token was never computed
    assert engine.scheduler.sessions.expire(time.monotonic() + engine.config.session_ttl + 1) == 1
    assert engine.num_sessions == 0 and engine.block_manager.num_used_blocks == 0


@pytest.mark.parametrize("end", ["abort", "timeout"])
def test_a_session_request_ended_while_waiting_for_blocks_leaves_the_session_usable(end):
    engine = _engine()
    _start_hog(engine)
    deadline = time.monotonic() + 1.0 if end == "timeout" else None
    engine.add_request("turn-1", PROMPT, _greedy(), session_id="chat", deadline=deadline)
    for _ in range(3):  # it asks for blocks at every step, and waits
        engine.step()
    assert engine._groups["turn-1"][0].status is RequestStatus.WAITING
    if end == "abort":
        outputs = engine.abort("turn-1")
    else:
        outputs = []
        while not outputs:
            time.sleep(0.01)
            outputs = [out for out in engine.step() if out.request_id == "turn-1"]
    assert [out.finish_reason for out in outputs] == [end]
    engine.abort("hog")
    assert engine.block_manager.num_used_blocks == 0
    _assert_session_goes_on(engine, PROMPT)


def test_a_session_whose_adopted_cache_cannot_grow_is_not_left_busy():
    """The session's idle cache is adopted but the pool has no room for the new tokens: the
    cache is given up and the request waits, and when it is aborted the session goes on."""
    engine = _engine()
    first = _finish(engine, "turn-1", PROMPT[:8], "chat")
    assert engine.block_manager.num_used_blocks == 3  # the idle session's cache
    _start_hog(engine)  # 9 + 3: the pool is full, and the idle session stays
    assert engine.num_sessions == 1 and engine.block_manager.num_used_blocks == 12
    history = PROMPT[:8] + [t for out in first for t in out.new_token_ids]
    engine.add_request("turn-2", history + list(range(50, 62)), _greedy(), session_id="chat")
    for _ in range(3):
        engine.step()
    assert engine._groups["turn-2"][0].status is RequestStatus.WAITING
    assert engine.block_manager.num_used_blocks == 9  # the adopted cache went back to the pool
    engine.abort("turn-2")
    engine.abort("hog")
    _assert_session_goes_on(engine, history)


def test_a_preempted_session_request_that_is_aborted_leaves_the_session_usable():
    engine = _engine()
    engine.add_request("hog", list(range(30, 38)), _greedy(10**6), attention_sinks=4, attention_window=32)
    engine.step()
    engine.add_request("turn-1", PROMPT, _greedy(32), session_id="chat")
    request = engine._groups["turn-1"][0]
    while not request.num_preemptions:  # both grow until the newest, the session's, gives way
        engine.step()
    for _ in range(3):
        engine.step()
    assert request.status is RequestStatus.WAITING
    engine.abort("turn-1")
    engine.abort("hog")
    _assert_session_goes_on(engine, PROMPT)

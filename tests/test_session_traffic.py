"""Random traffic through the scheduler, the block manager and the session store (with a host
tier), on a model-free device that records which (position, token) each KV slot holds: sessions
of two API keys resent, cut back and branched, concurrent requests of one session, n > 1,
aborts, failures, session ends, expiry, memory pressure, preemption, copies to host memory and
back. After every step: reference counts equal the tables that hold each block, no block is
lost or held while free, host blocks are all accounted for, no request ever writes into a block
someone else holds, and every slot a dense request reads holds that request's own token at that
position (a prefix-cache hit or a session's cache included). At the end nothing is held."""

from __future__ import annotations

import random
import time
from collections import Counter

import pytest

from model.sampling_params import SamplingParams
from scheduler.block_manager import BlockManager
from scheduler.request import FinishReason, Request
from scheduler.scheduler import Scheduler, SchedulerConfig
from scheduler.sessions import HostTier
from scheduler.sink_policy import SinkPolicy

BLOCK = 4


class FakeKV:
    """Device and host blocks as lists of (position, token) per slot."""

    def __init__(self):
        self.device: dict[int, list] = {}
        self.host: dict[int, list] = {}

    def save(self, device_blocks: list[int], host_blocks: list[int]) -> None:
        for d, h in zip(device_blocks, host_blocks):
            self.host[h] = list(self.device.get(d, [None] * BLOCK))

    def load(self, host_blocks: list[int], device_blocks: list[int]) -> None:
        for h, d in zip(host_blocks, device_blocks):
            self.device[d] = list(self.host[h])

    def copy(self, src: int, dst: int) -> None:
        self.device[dst] = list(self.device.get(src, [None] * BLOCK))


def check(bm: BlockManager, sch: Scheduler, kv: FakeKV, windowed: bool) -> None:
    holders = Counter(b for seq in bm._seqs.values() for b in seq.table)
    for block in range(bm.num_blocks):
        assert bm.ref_count(block) == holders[block], ("reference count", block)
        if holders[block]:
            assert block not in bm._free and block not in bm._evictable, ("held block is free", block)
        else:
            assert block in bm._free or block in bm._evictable or block in bm._copy_sources, ("lost", block)
    sessions = sch.sessions
    for session in sessions._sessions.values():
        assert bm.has_seq(session.blocks_key) and session.host_blocks is None
    for session in sessions._swapped.values():
        assert not bm.has_seq(session.blocks_key) and session.host_blocks is not None
    host_blocks = [b for s in sessions._swapped.values() for b in s.host_blocks] + sessions.host.free
    assert sorted(host_blocks) == list(range(sessions.host.num_blocks))
    if windowed:
        return
    for session in sessions._sessions.values():
        table = bm.block_table(session.blocks_key)
        for position, token in enumerate(session.token_ids):
            assert kv.device[table[position // BLOCK]][position % BLOCK] == (position, token), session.session_id


def max_tokens(bm: BlockManager) -> int:
    """Tokens a sequence may reach: a third of the pool, so that two completions of one prompt
    and a session's cache fit together (a real pool holds the whole context)."""
    return bm.num_blocks * BLOCK // 3


def check_reads(bm: BlockManager, requests: list[Request], kv: FakeKV) -> None:
    """Every slot a dense request is about to read holds its own token at that position."""
    for request in requests:
        table = bm.block_table(request.request_id)
        for position in range(request.num_computed_tokens):
            slot = kv.device.get(table[position // BLOCK], [None] * BLOCK)[position % BLOCK]
            assert slot == (position, request.token_ids[position]), (request.request_id, position, slot)


def run_step(bm: BlockManager, sch: Scheduler, kv: FakeKV, rng: random.Random, windowed: bool,
             histories: dict | None) -> None:
    max_len = max_tokens(bm)
    batch = sch.schedule()
    for src, dst in batch.blocks_to_copy:
        kv.copy(src, dst)
    if not windowed:
        check_reads(bm, batch.requests, kv)
    for request, num_new in zip(batch.requests, batch.num_new_tokens):
        table = bm.block_table(request.request_id)
        forked_now = any(child.parent_id == request.request_id for child in batch.forked)
        for j in range(num_new):
            slot = request.num_cache_slots + j
            block = table[slot // BLOCK]
            assert forked_now or bm.ref_count(block) == 1, ("a write into a shared block", request.request_id, block)
            position = request.num_computed_tokens + j
            kv.device.setdefault(block, [None] * BLOCK)[slot % BLOCK] = (position, request.token_ids[position])
    sch.update(batch)
    for request, _ in batch.samplers:
        if request.is_finished:
            continue
        request.append_token(rng.randint(0, 9))
        if request.num_output_tokens >= request.params.max_tokens or request.num_tokens >= max_len:
            request.finish(FinishReason.LENGTH)
            if request.session_id is not None and histories is not None:
                histories[request.session_id] = list(request.token_ids)
            sch.finish_request(request, FinishReason.LENGTH)


@pytest.mark.parametrize("windowed", [False, True], ids=["dense", "windowed"])
@pytest.mark.parametrize("seed", range(40))
def test_random_session_traffic_keeps_every_block_and_slot_right(seed, windowed):
    rng = random.Random(seed)
    bm = BlockManager(rng.choice([12, 20, 40]), BLOCK)
    sch = Scheduler(SchedulerConfig(max_num_seqs=6, max_num_batched_tokens=rng.choice([8, 16, 64]),
                                    max_model_len=200), bm)
    kv = FakeKV()
    sch.sessions.host = HostTier(rng.choice([0, 4, 10, 30]), kv)
    policy = SinkPolicy(2, 10, BLOCK) if windowed else None
    histories: dict[str, list[int]] = {}
    for step in range(300):
        if rng.random() < 0.5:
            session = rng.choice(["a", "b", "c", None])
            history = histories.get(session, [])
            if history and rng.random() < 0.8:  # resent whole, or cut back (a branch)
                cut = rng.randint(1, len(history)) if rng.random() < 0.3 else len(history)
                prompt = history[:min(cut, max_tokens(bm) - 8)] + [rng.randint(0, 9) for _ in range(rng.randint(1, 6))]
            else:
                prompt = [rng.randint(0, 9) for _ in range(rng.randint(2, min(20, max_tokens(bm) - 2)))]
            n = 1 if session else rng.choice([1, 2])
            sch.add_request(Request(f"r{step}", prompt, SamplingParams(max_tokens=rng.randint(1, 8), n=n),
                                    sink_policy=policy, session_id=session, tenant=rng.choice(["k1", "k2"])))
        if rng.random() < 0.05:
            sch.sessions.drop(rng.choice("abc"))
        if rng.random() < 0.03:
            sch.sessions.expire(time.monotonic() + (1e9 if rng.random() < 0.5 else 0))
        if rng.random() < 0.1:
            live = [r for r in sch.running + list(sch.waiting) if not r.is_finished]
            if live:
                sch.finish_request(rng.choice(live), rng.choice([FinishReason.ABORT, FinishReason.ERROR]))
        check(bm, sch, kv, windowed)
        run_step(bm, sch, kv, rng, windowed, histories)
        check(bm, sch, kv, windowed)
    for _ in range(2000):  # the rest run to their ends
        if not (sch.running or sch.waiting):
            break
        run_step(bm, sch, kv, rng, windowed, None)
    assert not (sch.running or sch.waiting)
    for session in "abc":
        sch.sessions.drop(session)
    bm.release_copy_sources()
    check(bm, sch, kv, windowed)
    assert bm.num_used_blocks == 0 and len(sch.sessions) == 0
    assert not sch.sessions._running and not sch.sessions._ended

"""The block manager on its own: reference counts, exhaustion, the prefix cache and copy-on-write.

A shadow KV store (`FakeKV`, one token id per slot) stands in for the model's cache: every
write goes through the block table, so a block wrongly shared or reused shows up as a sequence
reading back tokens that are not its own.
"""

from __future__ import annotations

import random
from collections import Counter

import pytest

from scheduler.block_manager import BlockManager, block_hash

BS = 4  # block size in the hand-written tests


def check_invariants(bm: BlockManager, seq_ids) -> None:
    """Ref counts recomputed from every live block table equal `ref_count()`; free + used == total."""
    owners = Counter()
    for seq_id in seq_ids:
        table = bm.block_table(seq_id)
        assert len(set(table)) == len(table), f"{seq_id} holds a block twice: {table}"
        owners.update(table)
    for block_id in range(bm.num_blocks):
        assert bm.ref_count(block_id) == owners[block_id], (
            f"block {block_id}: ref_count {bm.ref_count(block_id)}, held by {owners[block_id]} tables")
    assert bm.num_used_blocks == len(owners)
    assert bm.num_free_blocks + bm.num_used_blocks == bm.num_blocks
    assert 0 <= bm.num_free_blocks <= bm.num_blocks


class FakeKV:
    """One token id per slot of every physical block: what a model would have written there."""

    def __init__(self, bm: BlockManager):
        self.bm = bm
        self.slots = [[None] * bm.block_size for _ in range(bm.num_blocks)]

    def copy(self, copies) -> None:
        for src, dst in copies:
            self.slots[dst] = list(self.slots[src])

    def write(self, seq_id: str, token_ids, start: int, stop: int) -> None:
        table, bs = self.bm.block_table(seq_id), self.bm.block_size
        for pos in range(start, stop):
            self.slots[table[pos // bs]][pos % bs] = token_ids[pos]

    def read(self, seq_id: str, stop: int) -> list:
        table, bs = self.bm.block_table(seq_id), self.bm.block_size
        return [self.slots[table[pos // bs]][pos % bs] for pos in range(stop)]


def compute(bm: BlockManager, kv: FakeKV, seq_id: str, token_ids, num_computed: int, num_new: int,
            commit: bool = True):
    """allocate_slots, perform the copies, write the tokens, commit; returns the copies."""
    copies = bm.allocate_slots(seq_id, num_computed, num_new)
    assert copies is not None, "the pool should have room here"
    kv.copy(copies)
    bm.release_copy_sources()  # the step has run its copies
    kv.write(seq_id, token_ids, num_computed, num_computed + num_new)
    if commit:
        bm.commit(seq_id, token_ids, num_computed + num_new)
    return copies


def tokens(n: int, start: int = 100) -> list[int]:
    return list(range(start, start + n))


# -- a long random workload, invariants checked after every operation ---------------------------

class Workload:
    """Sequences with prompts drawn from a few shared prefixes, computed in random chunks,
    forked, committed (or not yet) and freed in random order."""

    def __init__(self, seed: int, num_blocks: int, block_size: int):
        self.rng = random.Random(seed)
        self.bm = BlockManager(num_blocks, block_size)
        self.kv = FakeKV(self.bm)
        self.token_ids: dict[str, list[int]] = {}
        self.num_computed: dict[str, int] = {}
        self.prefixes = [[self.rng.randrange(50) for _ in range(self.rng.randint(1, 4 * block_size))]
                         for _ in range(4)]
        self.next_id = 0
        self.counts = Counter()

    def new_id(self) -> str:
        self.next_id += 1
        return f"s{self.next_id}"

    def op_start(self) -> None:
        seq_id = self.new_id()
        prompt = list(self.rng.choice(self.prefixes)) + [self.rng.randrange(50) for _ in range(self.rng.randint(1, 6))]
        num_hit = self.bm.start(seq_id, prompt)
        assert num_hit % self.bm.block_size == 0 and num_hit < len(prompt)
        self.token_ids[seq_id], self.num_computed[seq_id] = prompt, num_hit
        self.counts["hit blocks"] += num_hit // self.bm.block_size

    def op_allocate(self, seq_id: str) -> None:
        bm, bs = self.bm, self.bm.block_size
        token_ids, num_computed = self.token_ids[seq_id], self.num_computed[seq_id]
        num_new = self.rng.randint(1, 3 * bs)
        while len(token_ids) < num_computed + num_new:  # decode: the sequence grows
            token_ids.append(self.rng.randrange(50))
        table_before = list(bm.block_table(seq_id))
        others = {b for s in self.token_ids if s != seq_id for b in bm.block_table(s)}
        refs_before = [bm.ref_count(b) for b in range(bm.num_blocks)]
        free_before = bm.num_free_blocks
        first = num_computed // bs
        shared_first = first < len(table_before) and bm.ref_count(table_before[first]) > 1
        needed = max(bm.blocks_for(num_computed + num_new) - len(table_before), 0) + shared_first

        copies = bm.allocate_slots(seq_id, num_computed, num_new)

        if copies is None:
            self.counts["exhausted"] += 1
            assert needed > free_before, "allocate_slots refused although the pool had room"
            assert bm.block_table(seq_id) == table_before
            assert [bm.ref_count(b) for b in range(bm.num_blocks)] == refs_before
            assert bm.num_free_blocks == free_before
            return
        assert needed <= free_before
        table = bm.block_table(seq_id)
        assert len(table) == bm.blocks_for(num_computed + num_new)
        new_blocks = set(table) - set(table_before)
        assert not new_blocks & others, "a block handed out is still held by another sequence"
        assert bool(copies) == shared_first
        if copies:
            self.counts["copies"] += 1
            (src, dst), = copies
            assert src == table_before[first] and dst == table[first] and dst in new_blocks
        self.kv.copy(copies)
        bm.release_copy_sources()
        self.kv.write(seq_id, token_ids, num_computed, num_computed + num_new)
        self.num_computed[seq_id] = num_computed + num_new
        if self.rng.random() < 0.7:  # some blocks stay written but not yet offered to the cache
            bm.commit(seq_id, token_ids, num_computed + num_new)

    def op_fork(self, parent_id: str) -> None:
        child_id = self.new_id()
        self.bm.fork(parent_id, child_id)
        num_computed = self.num_computed[parent_id]
        self.token_ids[child_id] = self.token_ids[parent_id][:num_computed]
        self.num_computed[child_id] = num_computed
        assert self.bm.block_table(child_id) == self.bm.block_table(parent_id)
        self.counts["forks"] += 1

    def op_free(self, seq_id: str) -> None:
        self.bm.free(seq_id)
        del self.token_ids[seq_id], self.num_computed[seq_id]
        assert not self.bm.has_seq(seq_id)

    def step(self) -> None:
        live = sorted(self.token_ids)
        r = self.rng.random()
        if not live or (r < 0.2 and len(live) < 10):
            self.op_start()
        elif r < 0.65:
            self.op_allocate(self.rng.choice(live))
        elif r < 0.75 and len(live) < 10:
            self.op_fork(self.rng.choice(live))
        else:
            self.op_free(self.rng.choice(live))

    def check(self) -> None:
        check_invariants(self.bm, self.token_ids)
        for seq_id, token_ids in self.token_ids.items():
            num_computed = self.num_computed[seq_id]
            assert self.kv.read(seq_id, num_computed) == token_ids[:num_computed], (
                f"{seq_id} reads back tokens that are not its own")


@pytest.mark.parametrize("seed", range(6))
def test_random_workload_keeps_refcounts_and_ownership(seed):
    work = Workload(seed, num_blocks=24, block_size=4)
    for _ in range(1500):
        work.step()
        work.check()
    # The workload must have exercised every path it checks.
    for what in ("hit blocks", "exhausted", "copies", "forks"):
        assert work.counts[what] > 0, f"seed {seed} never hit {what!r}: {dict(work.counts)}"
    for seq_id in list(work.token_ids):
        work.op_free(seq_id)
        work.check()
    assert work.bm.num_free_blocks == work.bm.num_blocks
    assert all(work.bm.ref_count(b) == 0 for b in range(work.bm.num_blocks))


# -- freeing -------------------------------------------------------------------------------------

def test_free_everything_returns_every_block():
    bm = BlockManager(16, BS)
    kv = FakeKV(bm)
    prompt = tokens(10)
    for seq_id in ("a", "b"):
        num_hit = bm.start(seq_id, prompt)
        compute(bm, kv, seq_id, prompt, num_hit, len(prompt) - num_hit)
    assert bm.block_table("a")[:2] == bm.block_table("b")[:2]  # b hit a's full blocks
    bm.fork("a", "a1")
    compute(bm, kv, "a1", prompt + [7], 10, 1)  # copy-on-write of the shared last block
    assert bm.num_used_blocks > 0
    check_invariants(bm, ["a", "b", "a1"])
    for seq_id in ("b", "a", "a1"):
        bm.free(seq_id)
    assert bm.num_free_blocks == bm.num_blocks == 16
    assert bm.num_used_blocks == 0
    assert [bm.ref_count(b) for b in range(16)] == [0] * 16


# -- exhaustion ----------------------------------------------------------------------------------

def test_exhaustion_returns_none_and_changes_nothing():
    bm = BlockManager(4, BS)
    bm.start("a", tokens(12))
    assert bm.allocate_slots("a", 0, 12) == []
    bm.start("b", tokens(12, start=500))
    table_a = list(bm.block_table("a"))

    assert bm.allocate_slots("b", 0, 8) is None  # needs 2, 1 left
    assert bm.block_table("b") == [] and bm.block_table("a") == table_a
    assert bm.num_free_blocks == 1
    check_invariants(bm, ["a", "b"])

    assert bm.allocate_slots("b", 0, 4) == []  # exactly what is left
    assert bm.num_free_blocks == 0
    assert bm.allocate_slots("b", 4, 1) is None
    assert bm.allocate_slots("a", 12, 1) is None
    assert bm.block_table("a") == table_a and len(bm.block_table("b")) == 1
    check_invariants(bm, ["a", "b"])


def test_copy_on_write_needs_a_free_block_too():
    bm = BlockManager(2, BS)
    bm.start("a", tokens(6))
    bm.allocate_slots("a", 0, 6)
    bm.fork("a", "b")
    assert bm.num_free_blocks == 0
    refs = [bm.ref_count(b) for b in range(2)]
    assert bm.allocate_slots("a", 6, 1) is None  # the shared partial block must be copied
    assert [bm.ref_count(b) for b in range(2)] == refs
    assert bm.block_table("a") == bm.block_table("b")
    check_invariants(bm, ["a", "b"])


# -- the prefix cache ----------------------------------------------------------------------------

def test_prefix_hit_shares_full_blocks_and_counts():
    bm = BlockManager(16, BS)
    kv = FakeKV(bm)
    prompt = tokens(10)
    assert bm.start("a", prompt) == 0
    bm.count_prefix_query(10, 0)
    compute(bm, kv, "a", prompt, 0, 10)
    assert (bm.prefix_cache_queries, bm.prefix_cache_hits) == (10, 0)

    other = prompt[:8] + [1, 2, 3]  # same two full blocks, then different
    assert bm.start("b", other) == 8
    bm.count_prefix_query(11, 8)
    assert bm.block_table("b") == bm.block_table("a")[:2]
    assert [bm.ref_count(b) for b in bm.block_table("a")] == [2, 2, 1]
    assert (bm.prefix_cache_queries, bm.prefix_cache_hits) == (21, 8)
    compute(bm, kv, "b", other, 8, 3)
    assert bm.block_table("b")[2] != bm.block_table("a")[2]
    assert kv.read("b", 11) == other and kv.read("a", 10) == prompt
    check_invariants(bm, ["a", "b"])


@pytest.mark.parametrize("num_full_blocks", [1, 2, 3])
def test_the_last_token_is_never_taken_from_the_cache(num_full_blocks):
    bm = BlockManager(16, BS)
    kv = FakeKV(bm)
    prompt = tokens(num_full_blocks * BS)
    bm.start("a", prompt)
    compute(bm, kv, "a", prompt, 0, len(prompt))
    assert bm.start("b", prompt) == (num_full_blocks - 1) * BS
    assert bm.start("c", prompt + [9]) == num_full_blocks * BS  # one more token: every block hits


def test_blocks_hit_only_after_commit():
    bm = BlockManager(16, BS)
    kv = FakeKV(bm)
    prompt = tokens(9)
    bm.start("a", prompt)
    compute(bm, kv, "a", prompt, 0, 9, commit=False)
    assert bm.start("b", prompt) == 0  # written but not committed
    bm.commit("a", prompt, 4)
    assert bm.start("c", prompt) == 4
    bm.commit("a", prompt, 9)
    assert bm.start("d", prompt) == 8
    assert bm.block_table("d") == bm.block_table("a")[:2]


def test_chain_hash_needs_the_same_beginning():
    bm = BlockManager(16, BS)
    kv = FakeKV(bm)
    first, second = tokens(4), tokens(4, start=200)
    prompt = first + second + [1]
    bm.start("a", prompt)
    compute(bm, kv, "a", prompt, 0, len(prompt))
    changed = [first[0] + 1] + first[1:] + second + [1]  # only the first block differs
    assert bm.start("b", changed) == 0
    assert block_hash(None, second) != block_hash(block_hash(None, first), second)
    assert bm.start("c", prompt) == 8


def test_freed_cached_blocks_still_hit_until_reused():
    bm = BlockManager(8, BS)
    kv = FakeKV(bm)
    prompt = tokens(9)
    bm.start("a", prompt)
    compute(bm, kv, "a", prompt, 0, 9)
    cached = bm.block_table("a")[:2]
    bm.free("a")
    assert bm.num_free_blocks == 8
    assert bm.start("b", prompt) == 8
    assert bm.block_table("b") == cached
    assert bm.num_free_blocks == 6  # taking a cached block takes it out of the free pool
    bm.free("b")

    # Six blocks were never cached: they are used before the two cached ones.
    bm.start("x", tokens(24, start=700))
    assert bm.allocate_slots("x", 0, 24) == []
    assert not set(bm.block_table("x")) & set(cached)
    bm.free("x")  # x's blocks were never committed: they go back uncached
    assert bm.start("c", prompt) == 8
    bm.free("c")

    # With every block in use, the cached ones are reused and stop hitting.
    bm.start("y", tokens(32, start=900))
    assert bm.allocate_slots("y", 0, 32) == []
    assert set(cached) <= set(bm.block_table("y"))
    assert bm.start("d", prompt) == 0
    check_invariants(bm, ["y", "d"])


def test_eviction_is_least_recently_used_first():
    bm = BlockManager(4, BS)
    kv = FakeKV(bm)
    old, new = tokens(5, start=100), tokens(5, start=300)
    for seq_id, prompt in (("old", old), ("new", new)):
        bm.start(seq_id, prompt)
        compute(bm, kv, seq_id, prompt, 0, 5)
    old_block, new_block = bm.block_table("old")[0], bm.block_table("new")[0]
    bm.free("old")
    bm.free("new")
    # Touch "old" again: now "new"'s block is the least recently used.
    assert bm.start("old again", old) == 4
    bm.free("old again")

    bm.start("z", tokens(12, start=900))
    assert bm.allocate_slots("z", 0, 12) == []  # the two uncached blocks, then one cached
    assert new_block in bm.block_table("z") and old_block not in bm.block_table("z")
    assert bm.start("p", new) == 0
    assert bm.start("q", old) == 4


def test_a_freed_prompt_loses_its_tail_before_its_beginning():
    bm = BlockManager(3, BS)
    kv = FakeKV(bm)
    prompt = tokens(9)
    bm.start("a", prompt)
    compute(bm, kv, "a", prompt, 0, 9)
    bm.free("a")
    bm.start("b", tokens(8, start=600))
    assert bm.allocate_slots("b", 0, 8) == []  # the uncached block, then the LRU cached one
    assert bm.start("c", prompt) == 4  # the first block survived


# -- copy-on-write -------------------------------------------------------------------------------

def test_fork_copies_the_shared_partial_block_on_first_write():
    bm = BlockManager(8, BS)
    kv = FakeKV(bm)
    prompt = tokens(6)
    bm.start("a", prompt)
    compute(bm, kv, "a", prompt, 0, 6)
    bm.fork("a", "b")
    full, partial = bm.block_table("a")
    assert bm.block_table("b") == [full, partial]
    assert bm.ref_count(full) == bm.ref_count(partial) == 2

    a_tokens, b_tokens = prompt + [1], prompt + [2]
    copies = compute(bm, kv, "a", a_tokens, 6, 1)
    (src, dst), = copies
    assert src == partial and dst not in (full, partial)
    assert bm.block_table("a") == [full, dst]
    assert bm.block_table("b") == [full, partial]  # the other owner keeps the old block
    assert (bm.ref_count(full), bm.ref_count(partial), bm.ref_count(dst)) == (2, 1, 1)

    assert compute(bm, kv, "b", b_tokens, 6, 1) == []  # no longer shared: written in place
    assert bm.block_table("b") == [full, partial]
    assert compute(bm, kv, "a", a_tokens + [3], 7, 1) == []  # a's own block: no copy
    assert kv.read("a", 8) == a_tokens + [3] and kv.read("b", 7) == b_tokens
    check_invariants(bm, ["a", "b"])


def test_a_copy_source_is_held_until_the_step_has_copied_it():
    """Between scheduling and the step, a copy-on-write source that its other owner frees is
    not handed out again (a session copied back from host memory would overwrite it)."""
    bm = BlockManager(3, BS)
    bm.start("a", tokens(6))
    bm.allocate_slots("a", 0, 6)
    bm.fork("a", "b")
    partial = bm.block_table("a")[1]
    (src, dst), = bm.allocate_slots("a", 6, 1)
    assert src == partial
    bm.free("b")  # the source's last owner goes before the copy has run
    assert bm.ref_count(partial) == 0 and bm.num_free_blocks == 0
    assert bm.allocate_slots("a", 7, 2) is None  # the source is not free yet
    bm.release_copy_sources()
    assert bm.ref_count(partial) == 0 and bm.num_free_blocks == 1
    check_invariants(bm, ["a"])


def test_fork_at_a_block_boundary_needs_no_copy():
    bm = BlockManager(8, BS)
    kv = FakeKV(bm)
    prompt = tokens(8)
    bm.start("a", prompt)
    compute(bm, kv, "a", prompt, 0, 8)
    bm.fork("a", "b")
    assert compute(bm, kv, "a", prompt + [1], 8, 1) == []
    assert compute(bm, kv, "b", prompt + [2], 8, 1) == []
    assert bm.block_table("a")[:2] == bm.block_table("b")[:2]
    assert bm.block_table("a")[2] != bm.block_table("b")[2]
    check_invariants(bm, ["a", "b"])


def test_prefix_caching_disabled_never_hits():
    bm = BlockManager(8, BS, enable_prefix_caching=False)
    kv = FakeKV(bm)
    prompt = tokens(9)
    bm.start("a", prompt)
    compute(bm, kv, "a", prompt, 0, 9)
    assert bm.start("b", prompt) == 0
    assert bm.prefix_cache_hits == 0


def test_a_cut_back_cached_block_written_in_place_leaves_the_prefix_cache():
    # A session's fork cut back into a cached full block, which stays cached while it is shared
    # (the write would copy it); when the session lets go first, the write goes in place and the
    # block must no longer be found under its old tokens.
    bm = BlockManager(num_blocks=4, block_size=4)
    bm.start("session", [1, 2, 3, 4, 5])
    assert bm.allocate_slots("session", 0, 5) == []
    bm.commit("session", [1, 2, 3, 4, 5], 5)
    bm.fork("session", "turn")
    bm.truncate("turn", 2)  # the next prompt differs from its third token on
    assert bm.start("probe", [1, 2, 3, 4, 9]) == 4  # still shared, still cached
    bm.free("probe")
    bm.free("session")
    assert bm.allocate_slots("turn", 2, 3) == []  # in place: nobody else holds it
    assert bm.start("later", [1, 2, 3, 4, 9]) == 0

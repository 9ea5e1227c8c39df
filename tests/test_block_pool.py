"""scheduler/block_pool.py on its own: the free list, reference counts, the LRU of cached blocks
nobody holds, and copy sources held until their step has run."""

from __future__ import annotations

import pytest

from scheduler.block_pool import BlockPool

A, B, C = b"digest-a", b"digest-b", b"digest-c"


def test_blocks_are_handed_out_in_free_list_order_and_come_back_at_its_end():
    pool = BlockPool(3)
    assert [pool.allocate() for _ in range(3)] == [0, 1, 2]
    assert pool.num_free_blocks == 0
    pool.release(1)
    pool.release(0)
    assert list(pool.free_ids) == [1, 0]
    assert pool.allocate() == 1


def test_a_block_is_free_only_when_its_last_holder_lets_go():
    pool = BlockPool(2)
    block = pool.allocate()
    pool.take(block)
    assert pool.ref_count(block) == 2
    pool.release(block)
    assert pool.ref_count(block) == 1 and pool.num_free_blocks == 1
    pool.release(block)
    assert pool.ref_count(block) == 0 and pool.num_free_blocks == 2


def test_an_unreferenced_cached_block_still_hits_until_the_pool_needs_it():
    pool = BlockPool(2)
    block = pool.allocate()
    pool.cache(block, A)
    pool.release(block)
    assert pool.num_free_blocks == 2 and block in pool.evictable and block not in pool.free_ids
    assert pool.cached_block(A) == block
    pool.take(block)  # a hit: held again, no longer evictable
    assert pool.ref_count(block) == 1 and block not in pool.evictable
    pool.release(block)
    other = pool.allocate()  # the free block goes first
    assert other != block and pool.cached_block(A) == block
    assert pool.allocate() == block  # then the cached one, which leaves the cache
    assert pool.cached_block(A) is None


def test_cached_blocks_are_evicted_least_recently_released_first():
    pool = BlockPool(3)
    blocks = [pool.allocate() for _ in range(3)]
    for block, digest in zip(blocks, (A, B, C)):
        pool.cache(block, digest)
    for block in (blocks[1], blocks[0], blocks[2]):
        pool.release(block)
    pool.take(blocks[1])  # a hit takes it out of the LRU ...
    pool.release(blocks[1])  # ... and released again it is the most recent
    assert [pool.allocate() for _ in range(3)] == [blocks[0], blocks[2], blocks[1]]
    assert [pool.cached_block(d) for d in (A, B, C)] == [None, None, None]


def test_the_first_block_cached_under_a_digest_keeps_it():
    pool = BlockPool(2)
    first, second = pool.allocate(), pool.allocate()
    pool.cache(first, A)
    pool.cache(second, A)  # the same block computed twice at once
    pool.cache(first, B)  # a block is cached under one digest only
    assert pool.cached_block(A) == first and pool.cached_block(B) is None
    pool.uncache(first)
    assert pool.cached_block(A) is None
    pool.release(first)
    assert first in pool.free_ids


def test_a_copy_source_is_not_handed_out_before_its_step_has_run():
    pool = BlockPool(2)
    src = pool.allocate()
    pool.release_copy_source(src)
    assert pool.ref_count(src) == 0 and src in pool.copy_sources
    assert pool.num_free_blocks == 1
    dst = pool.allocate()
    assert dst != src
    assert pool.num_free_blocks == 0  # the source is held back
    pool.release_copy_sources()
    assert not pool.copy_sources and list(pool.free_ids) == [src]


def test_a_copy_source_released_again_in_its_step_waits_for_the_step_and_a_held_one_stays():
    pool = BlockPool(3)
    shared, held = pool.allocate(), pool.allocate()
    pool.take(shared)
    pool.take(held)
    pool.release_copy_source(shared)
    pool.release(shared)  # its last holder lets go in the same step
    pool.release_copy_source(held)  # one holder remains
    assert shared not in pool.free_ids
    pool.release_copy_sources()
    assert list(pool.free_ids) == [2, shared] and pool.ref_count(held) == 1


def test_a_cached_copy_source_becomes_evictable_after_its_step():
    pool = BlockPool(1)
    src = pool.allocate()
    pool.cache(src, A)
    pool.release_copy_source(src)
    assert src not in pool.evictable
    pool.release_copy_sources()
    assert src in pool.evictable and pool.cached_block(A) == src


def test_forget_frees_unreferenced_cached_blocks_only():
    pool = BlockPool(3)
    held, idle, source = pool.allocate(), pool.allocate(), pool.allocate()
    for block, digest in ((held, A), (idle, B), (source, C)):
        pool.cache(block, digest)
    pool.release(idle)
    pool.release_copy_source(source)
    pool.forget([A, B, C, b"never cached"])
    assert pool.cached_block(A) == held  # still held: stays cached
    assert pool.cached_block(B) is None and list(pool.free_ids) == [idle]
    assert pool.cached_block(C) is None and source not in pool.free_ids  # freed after its step
    pool.release_copy_sources()
    assert list(pool.free_ids) == [idle, source]


def test_prefix_cache_counters():
    pool = BlockPool(1)
    pool.count_prefix_query(10, 8)
    pool.count_prefix_query(5, 0)
    assert (pool.prefix_cache_queries, pool.prefix_cache_hits) == (15, 8)


def test_the_pool_needs_a_block():
    with pytest.raises(ValueError):
        BlockPool(0)

"""scheduler/sink_window.py on its own: how much of a chunk fits under a sink policy, and the
evictions it makes through the block manager (a sink block's tail first, then a block at a time)."""

from __future__ import annotations

from model.sampling_params import SamplingParams
from scheduler.block_manager import BlockManager
from scheduler.request import Request
from scheduler.sink_policy import SinkPolicy
from scheduler.sink_window import SinkWindow

BS = 4


def _running(bm: BlockManager, policy: SinkPolicy | None, num_tokens: int, request_id: str = "r") -> Request:
    """A request whose first num_tokens tokens are computed into fresh blocks."""
    request = Request(request_id, list(range(100, 100 + num_tokens)), SamplingParams(max_tokens=100),
                      sink_policy=policy)
    bm.start(request_id, request.token_ids, max_hit_tokens=0)
    assert bm.allocate_slots(request_id, 0, num_tokens) == []
    bm.commit(request_id, request.token_ids, num_tokens)
    request.num_computed_tokens = num_tokens
    request.append_token(7)
    return request


def test_without_a_policy_every_token_fits_and_nothing_is_evicted():
    bm = BlockManager(8, BS)
    window = SinkWindow(bm)
    request = _running(bm, None, 10)
    assert window.fit(request, 25) == 25
    assert window.num_evictions == 0 and len(bm.block_table("r")) == 3


def test_a_chunk_stops_at_the_capacity():
    bm = BlockManager(8, BS)
    window = SinkWindow(bm)
    request = _running(bm, SinkPolicy(num_sinks=2, window=8, block_size=BS), 7)  # capacity 10
    assert window.fit(request, 5) == 3
    assert window.fit(request, 2) == 2
    assert window.num_evictions == 0 and request.num_evicted_tokens == 0


def test_a_full_cache_evicts_the_sink_blocks_tail_first_then_a_block_at_a_time():
    bm = BlockManager(8, BS)
    window = SinkWindow(bm)
    policy = SinkPolicy(num_sinks=2, window=8, block_size=BS)  # sink gap 2, one sink block
    request = _running(bm, policy, 10)
    table = list(bm.block_table("r"))  # 3 blocks: sinks + gap, then 8 window tokens
    assert window.fit(request, 1) == 1
    # First eviction: the sink block's 2 non-sink slots; the table is untouched, caching stops.
    assert (request.sink_gap, request.num_evicted_tokens, request.num_kept_tokens) == (2, 2, 8)
    assert bm.block_table("r") == table and window.num_evictions == 1
    assert bm.allocate_slots("r", request.num_cache_slots, 2) == []
    request.append_token(8)
    request.num_computed_tokens += 2  # the kept tokens reach the capacity again
    bm.commit("r", request.token_ids, request.num_computed_tokens)
    # The cache was edited: the block completed after the eviction is not offered to others.
    assert bm.start("probe", request.token_ids + [9]) == 2 * BS
    bm.free("probe")
    free_before = bm.num_free_blocks
    assert window.fit(request, 3) == 3
    # Second eviction: the oldest block after the sink block goes back to the pool.
    assert bm.block_table("r") == [table[0], table[2]]
    assert request.num_evicted_tokens == 2 + BS and request.sink_gap == 2
    assert bm.num_free_blocks == free_before + 1 and window.num_evictions == 2


def test_sinks_that_fill_whole_blocks_evict_whole_blocks_from_the_start():
    bm = BlockManager(8, BS)
    window = SinkWindow(bm)
    request = _running(bm, SinkPolicy(num_sinks=4, window=8, block_size=BS), 12)
    table = list(bm.block_table("r"))
    assert window.fit(request, 9) == BS
    assert bm.block_table("r") == [table[0], table[2]] and request.sink_gap == 0
    assert request.num_evicted_tokens == BS and window.num_evictions == 1


def test_a_block_another_sequence_holds_stays_out_of_the_pool():
    bm = BlockManager(8, BS)
    window = SinkWindow(bm)
    request = _running(bm, SinkPolicy(num_sinks=4, window=8, block_size=BS), 12)
    bm.fork("r", "sibling")
    dropped = bm.block_table("r")[1]
    free_before = bm.num_free_blocks
    window.fit(request, 1)
    assert bm.ref_count(dropped) == 1 and bm.num_free_blocks == free_before
    assert dropped in bm.block_table("sibling")

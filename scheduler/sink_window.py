"""The StreamingLLM window applied step by step: how much of a chunk fits, and the evictions. Plain Python.

A request's `SinkPolicy` (sink_policy.py) says how many sinks it keeps and how wide its window
is; `SinkWindow` applies it step by step. Before a sequence whose cache is full computes more
tokens, the oldest non-sink tokens go (first a sink block's non-sink tail, then a block at a
time, through the block manager), and a chunk stops at the capacity, so that every eviction
falls between chunks where token-by-token processing would make it.
"""

from __future__ import annotations

from scheduler.block_manager import BlockManager
from scheduler.request import Request


class SinkWindow:
    """Keeps each sequence under a sink policy within its capacity, evicting through `block_manager`."""

    def __init__(self, block_manager: BlockManager):
        self.block_manager = block_manager
        self.num_evictions = 0  # a block, or a sink block's tail, each

    def fit(self, request: Request, num_new: int) -> int:
        """How many of the request's next num_new tokens to compute now: all without a sink
        policy; else up to the capacity, after an eviction if the cache is full."""
        policy = request.sink_policy
        if policy is None:
            return num_new
        if request.num_kept_tokens == policy.capacity:
            self.evict(request)
        return min(num_new, policy.capacity - request.num_kept_tokens)

    def evict(self, request: Request) -> None:
        """Drop the oldest non-sink tokens of the request's full cache (sink_policy.py)."""
        policy = request.sink_policy
        if policy.sink_gap and not request.sink_gap:
            # The last sink block's non-sink tail goes; the block stays for its sinks.
            request.sink_gap = policy.sink_gap
            request.num_evicted_tokens += policy.sink_gap
            self.block_manager.stop_caching(request.request_id)
        else:
            self.block_manager.drop_block(request.request_id, policy.num_sink_blocks)
            request.num_evicted_tokens += policy.block_size
        self.num_evictions += 1

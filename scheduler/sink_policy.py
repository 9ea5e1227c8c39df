"""StreamingLLM attention sinks in a paged cache: which tokens a long sequence keeps. Plain Python.

A sequence under a sink policy keeps its first `num_sinks` tokens (the attention sinks) and a
recent window, never more than `capacity = num_sinks + window` tokens. When a new token would
overflow it, the oldest non-sink tokens are evicted, a block at a time:

- the first eviction of a sequence whose sinks end inside a block drops that block's non-sink
  tail (`sink_gap` slots): the block stays, since it holds the sinks, and later keys are read
  `sink_gap` slots further on (model/layers/attention.py);
- every other eviction drops the oldest block after the sink blocks from the block table; the
  block goes back to the pool when no other sequence holds it.

So the window holds between `window - block_size + 1` and `window` recent tokens. Positions are
positions in the cache: the kept tokens are 0..kept-1 and the next one is `kept`. Keys are
stored rotated at their absolute positions and the sinks are scored by a query rotated at its
cache position (model/layers/attention.py), so none of this rewrites a block. Prefill chunks stop at the capacity, so
evictions fall between chunks exactly where token-by-token processing would make them (sink_window.py
makes both decisions each step).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SinkPolicy:
    num_sinks: int
    window: int
    block_size: int

    def __post_init__(self):
        if self.num_sinks < 0:
            raise ValueError(f"attention_sinks must be at least 0, got {self.num_sinks}")
        if self.window < self.block_size:
            raise ValueError(f"attention_window must be at least the block size ({self.block_size}), "
                             f"got {self.window}")

    @property
    def capacity(self) -> int:
        """The most tokens the sequence's cache ever holds."""
        return self.num_sinks + self.window

    @property
    def num_sink_blocks(self) -> int:
        return -(-self.num_sinks // self.block_size)

    @property
    def sink_gap(self) -> int:
        """Slots of the last sink block that hold non-sink tokens (evicted first)."""
        return self.num_sink_blocks * self.block_size - self.num_sinks

    def capacity_blocks(self) -> int:
        """Blocks one sequence can hold at most (the sink gap wastes part of one)."""
        return -(-(self.capacity + self.sink_gap) // self.block_size)

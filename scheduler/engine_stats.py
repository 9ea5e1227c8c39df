"""A snapshot of an engine's state and counters, for metrics and load reporting."""

from __future__ import annotations

from dataclasses import dataclass

from scheduler.scheduler import Scheduler
from scheduler.structured_output import StructuredOutput


@dataclass(frozen=True)
class EngineStats:
    """What `Engine.stats()` saw: gauges at that moment, counters since the engine started."""

    num_running: int  # sequences in the running batch
    num_waiting: int  # sequences waiting for admission
    num_kv_blocks_used: int  # KV blocks held by sequences (and idle sessions)
    num_kv_blocks_total: int  # KV blocks in the pool
    prefix_cache_queries: int  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int  # of which found there
    num_prompt_tokens: int  # prompt tokens received
    num_generation_tokens: int  # tokens generated
    num_preemptions: int  # requests preempted for lack of KV blocks
    num_sink_evictions: int  # StreamingLLM evictions (a block, or a sink block's tail)
    num_sessions: int  # long sessions holding a KV cache
    num_session_reused_tokens: int  # tokens session requests did not recompute
    num_sessions_in_host: int = 0  # idle sessions whose K/V is in the host tier
    num_session_host_blocks_used: int = 0  # host blocks holding them
    num_session_host_blocks_total: int = 0  # host blocks in the tier (--session-memory)
    num_sessions_swapped_out: int = 0  # sessions moved to the host tier
    num_sessions_swapped_in: int = 0  # sessions copied back from it instead of recomputed
    num_grammars_compiled: int = 0  # grammars compiled (a cache hit compiles nothing)
    num_grammars_cached: int = 0  # compiled grammars in the cache now
    grammar_cache_bytes: int = 0  # what they hold (as measured when compiled)
    num_grammar_errors: int = 0  # requests ended because their grammar gave up on a token
    num_grammar_timeouts: int = 0  # requests ended because a mask of their grammar overran its budget


def collect_stats(scheduler: Scheduler, grammars: StructuredOutput, num_prompt_tokens: int,
                  num_generation_tokens: int) -> EngineStats:
    """The stats of an engine's scheduler (its blocks and sessions) and grammars, now."""
    blocks, sessions = scheduler.block_manager, scheduler.sessions
    return EngineStats(
        num_running=len(scheduler.running), num_waiting=len(scheduler.waiting),
        num_kv_blocks_used=blocks.num_used_blocks, num_kv_blocks_total=blocks.num_blocks,
        prefix_cache_queries=blocks.prefix_cache_queries, prefix_cache_hits=blocks.prefix_cache_hits,
        num_prompt_tokens=num_prompt_tokens, num_generation_tokens=num_generation_tokens,
        num_preemptions=scheduler.num_preemptions, num_sink_evictions=scheduler.num_evictions,
        num_sessions=len(sessions), num_session_reused_tokens=sessions.num_reused_tokens,
        num_sessions_in_host=sessions.num_swapped, num_session_host_blocks_used=sessions.num_host_blocks_used,
        num_session_host_blocks_total=sessions.num_host_blocks,
        num_sessions_swapped_out=sessions.num_swapped_out, num_sessions_swapped_in=sessions.num_swapped_in,
        num_grammars_compiled=grammars.num_compiled, num_grammars_cached=len(grammars.cache),
        grammar_cache_bytes=grammars.cache.num_bytes, num_grammar_errors=grammars.num_grammar_errors,
        num_grammar_timeouts=grammars.num_mask_timeouts)

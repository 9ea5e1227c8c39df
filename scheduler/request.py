"""The state of one request (one completion) as the scheduler tracks it. Plain Python."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field, replace

from model.sampling_params import SamplingParams
from scheduler.sink_policy import SinkPolicy


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # a stop token or stop string
    LENGTH = "length"  # max_tokens, or the context is full
    ABORT = "abort"  # the client went away or asked
    TIMEOUT = "timeout"  # the request's deadline passed
    ERROR = "error"  # the server failed while computing it (the others go on)
    GRAMMAR = "grammar"  # its grammar gave up or took too long (stop_reason says which)


class GrammarOutcome(enum.Enum):
    """What a sampled token did to a request's grammar, when it ends the request."""

    COMPLETE = "complete"  # nothing but EOS may follow: the request finishes with "stop"
    ERROR = "grammar_error"  # the matcher gave up (its lexer or parser ran past its limits)
    TIMEOUT = "grammar_timeout"  # the step's mask took longer than the budget


@dataclass(eq=False)
class Request:
    """One sequence: its prompt, what it has generated, and how much of it is in the KV cache.

    Every step computes tokens `[num_computed_tokens, num_tokens)` (or a chunk of them):
    the whole prompt at first, then one token, the last sampled. A preempted request drops
    its cache (`num_computed_tokens = 0`) and recomputes prompt and output alike later.
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    sink_policy: SinkPolicy | None = None  # StreamingLLM eviction; None: dense attention
    session_id: str | None = None  # keep the cache for the session's next request
    cache_salt: str | None = None  # shares prefix-cache blocks only with requests of the same salt
    tenant: str | None = None  # the API key (its id) whose share of idle-session memory its session uses
    index: int = 0  # which of the params.n completions of one prompt this is
    parent_id: str | None = None  # the request that prompt belongs to (None: this one)
    token_ids: list[int] = field(init=False)  # prompt + output
    num_computed_tokens: int = 0
    num_cached_prompt_tokens: int = 0  # prompt tokens found in the prefix cache at admission
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None  # the stop token id or string that ended it
    num_preemptions: int = 0
    num_faults: int = 0  # failed steps it was part of (fault_isolation.py)
    forked: bool = False  # its n - 1 sibling completions exist (n > 1 only)
    num_evicted_tokens: int = 0  # computed tokens dropped from the cache (sink policy)
    sink_gap: int = 0  # slots skipped after the sinks once their block's tail is evicted

    def __post_init__(self):
        self.token_ids = list(self.prompt_token_ids)

    @property
    def group_id(self) -> str:
        """The id the client knows: the parent's for forked completions."""
        return self.parent_id or self.request_id

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids):]

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def num_kept_tokens(self) -> int:
        """Tokens in the cache: computed minus evicted; the next token's position."""
        return self.num_computed_tokens - self.num_evicted_tokens

    @property
    def num_cache_slots(self) -> int:
        """Block-table slots in use: the kept tokens plus the sink gap once it applies."""
        return self.num_kept_tokens + self.sink_gap

    def fork(self, index: int) -> Request:
        """Sibling completion `index` (1..n-1), made in the step that computes this one's last
        prompt token: it starts with every token computed and this one's cache layout."""
        child = Request(request_id=f"{self.request_id}-{index}", prompt_token_ids=self.prompt_token_ids,
                        params=replace(self.params, n=1), arrival_time=self.arrival_time,
                        sink_policy=self.sink_policy, cache_salt=self.cache_salt, tenant=self.tenant, index=index,
                        parent_id=self.request_id)
        child.num_computed_tokens = self.num_tokens
        child.num_evicted_tokens = self.num_evicted_tokens
        child.sink_gap = self.sink_gap
        child.num_cached_prompt_tokens = self.num_cached_prompt_tokens
        child.status = RequestStatus.RUNNING
        return child

    def reset_cache_state(self) -> None:
        """Forget the cache (preemption): everything is recomputed from the first token."""
        self.num_computed_tokens = 0
        self.num_evicted_tokens = 0
        self.sink_gap = 0

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    def finish(self, reason: FinishReason, stop_reason: int | str | None = None) -> None:
        self.status = RequestStatus.FINISHED
        self.finish_reason = reason
        self.stop_reason = stop_reason

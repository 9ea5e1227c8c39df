"""The state of one request (one completion) as the scheduler tracks it. Plain Python."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from model.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # a stop token or stop string
    LENGTH = "length"  # max_tokens, or the context is full
    ABORT = "abort"  # the client went away or asked


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
    index: int = 0  # which of the params.n completions of one prompt this is
    parent_id: str | None = None  # the request that prompt belongs to (None: this one)
    token_ids: list[int] = field(init=False)  # prompt + output
    num_computed_tokens: int = 0
    num_cached_prompt_tokens: int = 0  # prompt tokens found in the prefix cache at admission
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None  # the stop token id or string that ended it
    num_preemptions: int = 0
    forked: bool = False  # its n - 1 sibling completions exist (n > 1 only)

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
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    def finish(self, reason: FinishReason, stop_reason: int | str | None = None) -> None:
        self.status = RequestStatus.FINISHED
        self.finish_reason = reason
        self.stop_reason = stop_reason

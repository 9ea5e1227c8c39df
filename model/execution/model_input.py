"""What an executor receives and returns for one step: plain data only (lists, ints, params).

`ModelInput` is one scheduled step as the scheduler writes it (scheduler/scheduler_output.py),
`GrammarBitmask` the grammar masks of its constrained rows, `ModelOutput` what the step produced.
None of them holds a tensor on a device, a generator or a live request, so each could be pickled
to a worker process or another GPU (scheduler/executor.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from model.sampling_params import SamplingParams


@dataclass
class PromptLogprobRequest:
    """Logprobs of prompt tokens predicted inside one sequence's chunk.

    Chunk token j predicts `target_token_ids[j]`; only the first len(target_token_ids) tokens
    of the chunk have a prompt token to predict.
    """

    seq_index: int
    target_token_ids: list[int]
    num_top: int


@dataclass
class SamplingInput:
    """One sampling row: whose it is and how it samples. The runner keeps a seeded request's
    generator (made from `seed` at its first row) until the request is listed as finished.
    Histories are set only when a penalty reads them: a long generation must not pay O(length)
    per step."""

    request_id: str
    params: SamplingParams
    seed: int | None = None  # params.seed + the completion's index
    num_output_tokens: int = 0  # stop tokens are banned while this is below params.min_tokens
    prompt_token_ids: Sequence[int] = ()
    output_token_ids: Sequence[int] = ()


@dataclass
class ModelInput:
    """One step as plain lists: each sequence's new tokens, decodes first."""

    token_ids: list[int]  # flat new tokens of every sequence
    query_lens: list[int]
    context_lens: list[int]  # cache length of each sequence after this step
    block_tables: list[list[int]]
    sample_seq_indices: list[int]  # per sampling row, the sequence whose last token it samples from
    sampling_rows: list[SamplingInput]
    blocks_to_copy: list[tuple[int, int]] = field(default_factory=list)
    prompt_logprobs: list[PromptLogprobRequest] = field(default_factory=list)
    sink_lens: list[int] | None = None  # per sequence, for StreamingLLM eviction (attention.py)
    sink_gaps: list[int] | None = None
    num_evicted: list[int] | None = None  # per sequence: tokens evicted, absolute = cache position + this
    finished_request_ids: list[str] = field(default_factory=list)  # ended since the last step: forget them


@dataclass
class GrammarBitmask:
    """The grammar masks of a step's constrained sampling rows (scheduler/structured_output.py)."""

    rows: list[int]  # ascending
    bitmask: torch.Tensor  # [len(rows), ceil(V / 32)] int32 on the CPU; bit t of a row: token t is allowed


@dataclass
class TokenLogprobs:
    """Per position, of its token: logprob, 1-based rank, and the K most likely tokens' ids and
    logprobs, most likely first (for sampled tokens K is the largest `params.logprobs` of the step)."""

    token_ids: list[int]
    logprobs: list[float]
    ranks: list[int]
    top_token_ids: list[list[int]]
    top_logprobs: list[list[float]]


@dataclass
class ModelOutput:
    sampled_token_ids: list[int]  # per sampling row; empty when no row samples
    logprobs: TokenLogprobs | None  # of the sampled tokens, when any row asked for them
    prompt_logprobs: list[TokenLogprobs]  # in the order of ModelInput.prompt_logprobs

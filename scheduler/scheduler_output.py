"""One scheduled step: the scheduler's record of it, and the plain data the executor receives.

`Scheduler.schedule()` returns a `SchedulerOutput`. Its first fields name the live requests the
step computes and samples (what `Scheduler.update`, the engine's output processing and fault
isolation read); `model_input` is the same step written out as plain lists (model/execution/
model_input.py): per scheduled sequence the tokens it computes, its block table, context length,
sink state and prompt-logprob targets; per sampling row its request id, params, seed and the
histories its penalties read. Only `model_input` crosses to the executor.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from model.execution.model_input import ModelInput, PromptLogprobRequest, SamplingInput
from scheduler.request import Request


@dataclass
class SchedulerOutput:
    """One step's work. `requests[i]` computes `num_new_tokens[i]` tokens from its
    `num_computed_tokens`; decodes come first. `samplers` are the requests that sample a token
    after this step, each with the batch row whose last token's logits it samples from (forked
    completions share their parent's row). `model_input` is the step as plain data, built on
    first read (None for an empty step): the engine reads it first inside the part of the step
    whose failure fault isolation handles (engine.py `_execute`)."""

    requests: list[Request] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    samplers: list[tuple[Request, int]] = field(default_factory=list)
    blocks_to_copy: list[tuple[int, int]] = field(default_factory=list)
    forked: list[Request] = field(default_factory=list)  # completions created this step (n > 1)
    scheduled: set[Request] = field(default_factory=set)  # the requests and samplers above, never preempted
    build_input: Callable[[], ModelInput] | None = None  # set by the scheduler once the step is complete
    _model_input: ModelInput | None = None

    @property
    def model_input(self) -> ModelInput | None:
        if self._model_input is None and self.build_input is not None:
            self._model_input = self.build_input()
        return self._model_input

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def __len__(self) -> int:
        return len(self.requests)


def build_model_input(output: SchedulerOutput, block_table: Callable[[str], list[int]],
                      finished_request_ids: list[str]) -> ModelInput:
    """The step as plain data; `block_table`: a request's blocks, `finished_request_ids`: the
    requests that ended since the last step."""
    token_ids, context_lens, tables, prompt_logprobs = [], [], [], []
    sink_lens, sink_gaps, num_evicted = [], [], []
    for i, (request, num_new) in enumerate(zip(output.requests, output.num_new_tokens)):
        start = request.num_computed_tokens
        token_ids.extend(request.token_ids[start:start + num_new])
        context_lens.append(request.num_kept_tokens + num_new)
        tables.append(list(block_table(request.request_id)))  # a copy: the message is plain data
        sink_lens.append(request.sink_policy.num_sinks if request.sink_policy else 0)
        sink_gaps.append(request.sink_gap)
        num_evicted.append(request.num_evicted_tokens)
        wanted = request.params.prompt_logprobs
        if wanted is not None and request.num_output_tokens == 0:
            # Chunk token j predicts prompt token start + j + 1.
            targets = request.prompt_token_ids[start + 1:start + num_new + 1]
            if targets:
                prompt_logprobs.append(PromptLogprobRequest(i, targets, wanted))
    return ModelInput(
        token_ids=token_ids, query_lens=list(output.num_new_tokens), context_lens=context_lens,
        block_tables=tables, sample_seq_indices=[row for _, row in output.samplers],
        sampling_rows=[_sampling_input(request) for request, _ in output.samplers],
        blocks_to_copy=output.blocks_to_copy, prompt_logprobs=prompt_logprobs,
        sink_lens=sink_lens, sink_gaps=sink_gaps, num_evicted=num_evicted,
        finished_request_ids=finished_request_ids)


def _sampling_input(request: Request) -> SamplingInput:
    params = request.params
    seed = None if params.seed is None else params.seed + request.index
    # Token histories go along only for the penalties that read them.
    if not (params.presence_penalty or params.frequency_penalty or params.repetition_penalty != 1.0):
        return SamplingInput(request.request_id, params, seed, request.num_output_tokens)
    return SamplingInput(request.request_id, params, seed, request.num_output_tokens, request.prompt_token_ids,
                         request.output_token_ids)

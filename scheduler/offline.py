"""The offline API: run prompts to completion through an engine and collect each one's
completions (`Engine.generate`)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Protocol

from tqdm import tqdm

from model.sampling_params import SamplingParams
from scheduler.output_processor import RequestOutput, TokenLogprob


@dataclass
class Completion:
    index: int
    token_ids: list[int]
    text: str
    finish_reason: str | None
    logprobs: list[TokenLogprob] | None = None


@dataclass
class GenerationResult:
    """The offline result for one prompt: its n completions."""

    prompt_token_ids: list[int]
    completions: list[Completion] = field(default_factory=list)

    @property
    def token_ids(self) -> list[int]:
        return self.completions[0].token_ids

    @property
    def text(self) -> str:
        return self.completions[0].text


class StepEngine(Protocol):
    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams) -> list[int]: ...

    def has_unfinished_requests(self) -> bool: ...

    def step(self) -> list[RequestOutput]: ...


_offline_ids = itertools.count()


def generate(engine: StepEngine, prompts: str | list[str] | list[list[int]], params: SamplingParams | None = None,
             use_tqdm: bool = True) -> list[GenerationResult]:
    """Run prompts (text or token ids) to completion; one result per prompt, in order."""
    if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
        prompts = [prompts]
    params = params or SamplingParams()
    ids = [f"generate-{next(_offline_ids)}" for _ in prompts]
    results = {}
    for request_id, prompt in zip(ids, prompts):
        token_ids = engine.add_request(request_id, prompt, params)
        results[request_id] = GenerationResult(token_ids, [
            Completion(i, [], "", None, [] if params.logprobs is not None else None) for i in range(params.n)])
    total = len(prompts) * params.n
    with tqdm(total=total, desc="generate", unit="seq", disable=not use_tqdm) as bar:
        while engine.has_unfinished_requests():
            for out in engine.step():
                completion = results[out.request_id].completions[out.index]
                completion.token_ids.extend(out.new_token_ids)
                completion.text += out.text
                if out.logprobs:
                    completion.logprobs.extend(out.logprobs)
                if out.finished:
                    completion.finish_reason = out.finish_reason
                    bar.update(1)
    return [results[request_id] for request_id in ids]

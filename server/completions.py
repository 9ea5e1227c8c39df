"""POST /v1/completions: one or more prompts (text or token ids), streamed or not."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from scheduler.output_processor import RequestOutput
from server.errors import APIError
from server.job_runner import collected_response, openai_finish, run_prompts
from server.logprobs import completion_logprobs, prompt_logprobs_list, with_top
from server.protocol import CompletionRequest
from server.serving import (Job, ServerState, capped_output, check_stream_options, request_sampling_params,
                            prepare_job, sampling_options)
from server.streaming import ChunkStream, UsageCounter, guarded
from server.structured_outputs import output_grammar


@dataclass
class _Choice:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprob_token_ids: list[int] = field(default_factory=list)
    logprob_entries: list = field(default_factory=list)
    prompt_logprobs: list | None = None
    prompt_scored: bool = False  # its prompt's logprobs are in (when asked for)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    echoed: bool = False


def _prompts(state: ServerState, prompt, windowed: bool) -> list[list[int]]:
    """Token ids of each prompt (run in a worker thread: it tokenizes)."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if isinstance(prompt[0], int):
        prompt = [prompt]
    if isinstance(prompt[0], str):
        for text in prompt:
            state.check_text_length(text, windowed, "prompt")
        return [state.tokenizer.encode(p) for p in prompt]
    return prompt


def _prompt_texts(state: ServerState, prompt, requests: list, echo: bool) -> list[str]:
    """The text of each prompt for `echo` (token ids decoded once the input processor checked
    them); without echo nobody reads it."""
    if not echo:
        return [""] * len(requests)
    if isinstance(prompt, str) or isinstance(prompt[0], str):
        return [prompt] if isinstance(prompt, str) else list(prompt)
    return [state.tokenizer.decode(request.prompt_token_ids) for request in requests]


async def create_completion(state: ServerState, body: CompletionRequest, raw: Request) -> Response:
    state.check_model(body.model)
    if body.suffix is not None:
        raise APIError(400, "suffix is not supported", param="suffix")
    check_stream_options(body)
    if body.prompt_logprobs is not None and body.stream:
        raise APIError(400, "prompt_logprobs is not supported with stream (use echo with logprobs)",
                       param="prompt_logprobs")
    options = sampling_options(state, body, raw)
    max_tokens = capped_output(state, options.windowed, body.max_tokens, "max_tokens")
    num_prompts = 1 if isinstance(body.prompt, str) or isinstance(body.prompt[0], int) else len(body.prompt)
    if options.session_id is not None and num_prompts > 1:
        raise APIError(400, "session_id takes a single prompt", param="prompt")
    state.check_capacity(num_prompts * body.n)
    echo_logprobs = body.logprobs if body.echo and body.logprobs is not None else None
    scored = [k for k in (echo_logprobs, body.prompt_logprobs) if k is not None]
    prompt_logprobs = max(scored) if scored else None
    if prompt_logprobs is not None and options.session_id is not None:
        raise APIError(400, "prompt logprobs (echo with logprobs, or prompt_logprobs) cannot be combined with a "
                            "session: the session's cached tokens are not scored again", param="echo")
    params = request_sampling_params(state, body, max_tokens, body.logprobs, prompt_logprobs)
    grammar, compiled = await output_grammar(state, body, options.cache_salt, options.tenant)
    params = replace(params, grammar=grammar)
    request_id = f"cmpl-{uuid.uuid4().hex}"
    header = {"id": request_id, "object": "text_completion", "created": int(time.time()), "model": state.model_name}

    def prepare() -> tuple[Job, list[str]]:  # one worker-thread call: tokenize, check, decode for echo
        prompts = _prompts(state, body.prompt, options.windowed)
        job = prepare_job(state, request_id, header, prompts, params, options, compiled, "prompt", body.stream)
        return job, _prompt_texts(state, body.prompt, job.requests, body.echo)

    job, prompt_texts = await run_in_threadpool(prepare)
    if body.stream:
        return StreamingResponse(guarded(_stream(state, body, job, prompt_texts)), media_type="text/event-stream")
    return await collected_response(raw, _collect(state, body, job, prompt_texts))


def _echo(body: CompletionRequest, choice: _Choice, prompt_ids: list[int], prompt_text: str,
          scores: list | None) -> None:
    """Put the prompt (and its logprobs, `scores`: None while unknown) in front of a choice, once.
    The n completions of a prompt share one scoring, which arrives with the first of them."""
    choice.echoed = True
    choice.prompt_scored = scores is not None
    if body.prompt_logprobs is not None:
        choice.prompt_logprobs = scores or [None] * len(prompt_ids)
    if not body.echo:
        return
    choice.text += prompt_text
    if body.logprobs is not None:
        choice.logprob_token_ids += prompt_ids
        entries = scores or [None] * len(prompt_ids)
        if (body.prompt_logprobs or 0) > body.logprobs:  # the engine computed more alternatives
            entries = with_top(entries, body.logprobs)
        choice.logprob_entries += entries


def _score_late(body: CompletionRequest, choice: _Choice, prompt_ids: list[int], scores: list) -> None:
    """Give a choice echoed before its prompt's scoring arrived the prompt's logprobs."""
    choice.prompt_scored = True
    if body.prompt_logprobs is not None:
        choice.prompt_logprobs = scores
    if body.echo and body.logprobs is not None:
        entries = with_top(scores, body.logprobs) if (body.prompt_logprobs or 0) > body.logprobs else scores
        choice.logprob_entries[:len(prompt_ids)] = entries


def _add(choice: _Choice, out: RequestOutput) -> None:
    choice.text += out.text
    choice.token_ids += out.new_token_ids
    if out.logprobs:
        choice.logprob_token_ids += out.new_token_ids
        choice.logprob_entries += out.logprobs


async def _collect(state: ServerState, body: CompletionRequest, job: Job, prompt_texts: list[str]) -> dict:
    n = job.params.n
    choices = [_Choice() for _ in range(len(job.prompts) * n)]
    counter = UsageCounter(sum(map(len, job.prompts)))
    scores: dict[int, list] = {}  # prompt index -> its prompt logprobs
    async for p, out in run_prompts(state, job):
        choice = choices[p * n + out.index]
        if out.prompt_logprobs:
            scores.setdefault(p, out.prompt_logprobs)
        if not choice.echoed:
            _echo(body, choice, job.prompts[p], prompt_texts[p], scores.get(p))
        _add(choice, out)
        counter.add(p, out)
        if out.finished:
            choice.finish_reason, choice.stop_reason = openai_finish(out)
    for i, choice in enumerate(choices):
        if not choice.prompt_scored and i // n in scores:
            _score_late(body, choice, job.prompts[i // n], scores[i // n])
    return await run_in_threadpool(_response, state, body, job, choices, counter.total())


def _response(state: ServerState, body: CompletionRequest, job: Job, choices: list[_Choice], totals: dict) -> dict:
    def choice(i: int, c: _Choice) -> dict:
        item = {"index": i, "text": c.text, "finish_reason": c.finish_reason, "stop_reason": c.stop_reason,
                "logprobs": completion_logprobs(state.tokenizer, c.logprob_token_ids, c.logprob_entries, 0)
                if body.logprobs is not None else None}
        if body.prompt_logprobs is not None:
            item["prompt_logprobs"] = prompt_logprobs_list(state.tokenizer, c.prompt_logprobs, body.prompt_logprobs)
        return item

    return {**job.header, "choices": [choice(i, c) for i, c in enumerate(choices)], "usage": totals}


async def _stream(state: ServerState, body: CompletionRequest, job: Job, prompt_texts: list[str]
                  ) -> AsyncIterator[str]:
    n = job.params.n
    chunks = ChunkStream(job.header, body.stream_options, sum(map(len, job.prompts)))
    echoed: set[int] = set()
    scores: dict[int, list] = {}  # prompt index -> its prompt logprobs
    text_offsets = [0] * (len(job.prompts) * n)
    async for p, out in run_prompts(state, job):
        chunks.usage.add(p, out)
        index = p * n + out.index
        choice = _Choice()  # this chunk's part of the choice
        if out.prompt_logprobs:
            scores.setdefault(p, out.prompt_logprobs)
        if index not in echoed:
            echoed.add(index)
            _echo(body, choice, job.prompts[p], prompt_texts[p], scores.get(p))
        _add(choice, out)
        logprobs = None
        if body.logprobs is not None:
            logprobs = completion_logprobs(state.tokenizer, choice.logprob_token_ids, choice.logprob_entries,
                                           text_offsets[index])
        text_offsets[index] += len(choice.text)
        if choice.text or out.finished or (logprobs and logprobs["tokens"]):
            finish_reason, stop_reason = openai_finish(out) if out.finished else (None, None)
            yield chunks.chunk({"index": index, "text": choice.text, "logprobs": logprobs,
                                "finish_reason": finish_reason, "stop_reason": stop_reason})
    for event in chunks.end():
        yield event

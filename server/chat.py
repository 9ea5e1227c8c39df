"""POST /v1/chat/completions: messages rendered with the chat template, streamed or not."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from server.chat_template import ChatTemplateError
from server.errors import APIError
from server.protocol import ChatCompletionRequest
from server.serving import (SSE_DONE, Job, ServerState, chat_logprobs, check_prompt, check_stream_options,
                            engine_options, guarded, run_prompts, sampling_params, sse, until_disconnected, usage)


def chat_prompt(state: ServerState, body) -> list[int]:
    messages = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})}
                for m in body.messages]
    try:
        return state.chat_template.encode(messages, body.add_generation_prompt)
    except ChatTemplateError as exc:
        raise APIError(400, str(exc), param="messages") from exc


async def create_chat_completion(state: ServerState, body: ChatCompletionRequest, raw: Request) -> Response:
    state.check_model(body.model)
    check_stream_options(body)
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs requires logprobs to be true", param="top_logprobs")
    prompt = chat_prompt(state, body)
    options = engine_options(state, body, raw.headers.get("x-session-id"))
    max_tokens = body.max_completion_tokens or body.max_tokens
    windowed = state.engine.sink_policy(body.attention_sinks, body.attention_window) is not None
    if max_tokens is None and windowed:
        max_tokens = state.max_model_len  # a window never fills up: bound the reply anyway
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    params = sampling_params(state, body, max_tokens, logprobs)
    check_prompt(state, prompt, params, options, "messages")
    state.check_capacity()
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    header = {"id": request_id, "created": int(time.time()), "model": state.model_name}
    job = Job(request_id, header, [prompt], params, options)
    if body.stream:
        return StreamingResponse(guarded(_stream(state, body, job)), media_type="text/event-stream")
    result = await until_disconnected(raw, _collect(state, body, job))
    return JSONResponse(result) if result is not None else Response(status_code=499)


async def _collect(state: ServerState, body: ChatCompletionRequest, job: Job) -> dict:
    n = job.params.n
    texts = [""] * n
    entries = [[] for _ in range(n)]
    finish, stop_reasons = [None] * n, [None] * n
    completion_tokens = cached = 0
    async for _, out in run_prompts(state, job):
        texts[out.index] += out.text
        entries[out.index] += out.logprobs or []
        if out.finished:
            finish[out.index], stop_reasons[out.index] = out.finish_reason, out.stop_reason
            completion_tokens += out.num_output_tokens
            cached = out.num_cached_tokens if out.index == 0 else cached
    choices = [{
        "index": i, "message": {"role": "assistant", "content": texts[i]},
        "logprobs": chat_logprobs(state.tokenizer, entries[i]) if body.logprobs else None,
        "finish_reason": finish[i], "stop_reason": stop_reasons[i],
    } for i in range(n)]
    return {**job.header, "object": "chat.completion", "choices": choices,
            "usage": usage(len(job.prompts[0]), completion_tokens, cached)}


async def _stream(state: ServerState, body: ChatCompletionRequest, job: Job) -> AsyncIterator[str]:
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    chunk = {**job.header, "object": "chat.completion.chunk"}
    extra = {"usage": None} if include_usage else {}

    def event(index: int, delta: dict, logprobs=None, finish_reason=None, stop_reason=None) -> str:
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        if finish_reason is not None:
            choice["stop_reason"] = stop_reason
        return sse({**chunk, "choices": [choice], **extra})

    for index in range(job.params.n):
        yield event(index, {"role": "assistant", "content": ""})
    completion_tokens = cached = 0
    async for _, out in run_prompts(state, job):
        logprobs = chat_logprobs(state.tokenizer, out.logprobs) if body.logprobs and out.logprobs else None
        if out.finished:
            completion_tokens += out.num_output_tokens
            cached = out.num_cached_tokens if out.index == 0 else cached
            yield event(out.index, {"content": out.text}, logprobs, out.finish_reason, out.stop_reason)
        elif out.text or logprobs:
            yield event(out.index, {"content": out.text}, logprobs)
    if include_usage:
        yield sse({**chunk, "choices": [], "usage": usage(len(job.prompts[0]), completion_tokens, cached)})
    yield SSE_DONE

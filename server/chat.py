"""POST /v1/chat/completions: messages rendered with the chat template, streamed or not."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from server.chat_template import ChatTemplateError, ToolsNotRenderedError
from server.errors import APIError
from server.job_runner import collected_response, openai_finish, run_prompts
from server.logprobs import chat_logprobs, logprobs_of_text, prompt_logprobs_list
from server.protocol import ChatCompletionRequest
from server.request_text import chat_text_sizes, check_text_sizes
from server.serving import (Job, ServerState, capped_output, check_stream_options, request_sampling_params,
                            prepare_job, sampling_options)
from server.streaming import ChunkStream, UsageCounter, guarded
from server.structured_outputs import output_grammar
from server.tools import ToolCallStream, parses_calls, reply_message, template_message, template_tools, tool_grammar


def render_chat_prompt(state: ServerState, body) -> list[int]:
    """The rendered and tokenized messages and tools (call it in a worker thread; their size is
    checked before: check_text_sizes)."""
    messages = [template_message(m) for m in body.messages]
    tools = template_tools(body)  # a chat request's, or /tokenize's
    try:
        return state.chat_template.encode(messages, body.add_generation_prompt, tools)
    except ToolsNotRenderedError as exc:
        raise APIError(400, str(exc), param="tools") from exc
    except ChatTemplateError as exc:
        raise APIError(400, str(exc), param="messages") from exc


async def create_chat_completion(state: ServerState, body: ChatCompletionRequest, raw: Request) -> Response:
    state.check_model(body.model)
    check_stream_options(body)
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs requires logprobs to be true", param="top_logprobs")
    if body.prompt_logprobs is not None and body.stream:
        raise APIError(400, "prompt_logprobs is not supported with stream", param="prompt_logprobs")
    options = sampling_options(state, body, raw)
    if body.prompt_logprobs is not None and options.session_id is not None:
        raise APIError(400, "prompt_logprobs cannot be combined with a session: the session's cached tokens are "
                            "not scored again", param="prompt_logprobs")
    max_tokens = capped_output(state, options.windowed, body.max_completion_tokens or body.max_tokens, "max_tokens")
    await run_in_threadpool(lambda: check_text_sizes(state.max_text_bytes, state.max_model_len,
                                                     chat_text_sizes(body), options.windowed, evictable="messages"))
    state.check_capacity(body.n)
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    params = request_sampling_params(state, body, max_tokens, logprobs, body.prompt_logprobs)
    forced_calls = lambda: tool_grammar(state.tool_parser, body)  # noqa: E731
    grammar, compiled = await output_grammar(state, body, options.cache_salt, options.tenant, forced_calls)
    params = replace(params, grammar=grammar)
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    header = {"id": request_id, "created": int(time.time()), "model": state.model_name}
    job = await run_in_threadpool(lambda: prepare_job(state, request_id, header, [render_chat_prompt(state, body)],
                                                      params, options, compiled, "messages", body.stream))
    if body.stream:
        return StreamingResponse(guarded(_stream(state, body, job)), media_type="text/event-stream")
    return await collected_response(raw, _collect(state, body, job))


async def _collect(state: ServerState, body: ChatCompletionRequest, job: Job) -> dict:
    n = job.params.n
    texts = [""] * n
    entries = [[] for _ in range(n)]
    finish, stop_reasons = [None] * n, [None] * n
    prompt_logprobs = None
    counter = UsageCounter(len(job.prompts[0]))
    async for _, out in run_prompts(state, job):
        texts[out.index] += out.text
        entries[out.index] += out.logprobs or []
        if out.prompt_logprobs is not None and prompt_logprobs is None:
            prompt_logprobs = out.prompt_logprobs
        counter.add(0, out)
        if out.finished:
            finish[out.index], stop_reasons[out.index] = openai_finish(out)

    def choice(i: int) -> dict:
        if finish[i] == "stop" and isinstance(stop_reasons[i], str) and not job.params.include_stop_str_in_output:
            entries[i] = logprobs_of_text(state.tokenizer, entries[i], texts[i])
        message, called = reply_message(state.tool_parser, body, texts[i])
        return {"index": i, "message": message,
                "logprobs": chat_logprobs(state.tokenizer, entries[i]) if body.logprobs else None,
                "finish_reason": "tool_calls" if called and finish[i] == "stop" else finish[i],
                "stop_reason": stop_reasons[i]}

    def response() -> dict:
        choices = [choice(i) for i in range(n)]
        result = {**job.header, "object": "chat.completion", "choices": choices,
                  "usage": counter.total()}
        if body.prompt_logprobs is not None:
            result["prompt_logprobs"] = prompt_logprobs_list(
                state.tokenizer, prompt_logprobs or [None] * len(job.prompts[0]), body.prompt_logprobs)
        return result

    return await run_in_threadpool(response)


async def _stream(state: ServerState, body: ChatCompletionRequest, job: Job) -> AsyncIterator[str]:
    chunks = ChunkStream({**job.header, "object": "chat.completion.chunk"}, body.stream_options,
                         len(job.prompts[0]))

    def event(index: int, delta: dict, logprobs=None, finish_reason=None, stop_reason=None) -> str:
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        if finish_reason is not None:
            choice["stop_reason"] = stop_reason
        return chunks.chunk(choice)

    calls = [ToolCallStream(state.tool_parser, body.parallel_tool_calls) if parses_calls(body) else None
             for _ in range(job.params.n)]
    # Each choice's role chunk goes with its first output, as OpenAI and vLLM send it: a client
    # timing the first event measures the time to the first token, not to admission.
    started = [False] * job.params.n
    # Logprobs travel with the text of their tokens: held while that text is (it may begin a
    # stop string), and dropped when it was all stop string.
    pending: list[list] = [[] for _ in range(job.params.n)]
    async for _, out in run_prompts(state, job):
        if not started[out.index]:
            started[out.index] = True
            yield event(out.index, {"role": "assistant", "content": ""})
        chunks.usage.add(0, out)
        if body.logprobs and out.logprobs:
            pending[out.index] += out.logprobs
        stopped_by_string = out.finish_reason == "stop" and isinstance(out.stop_reason, str)
        if out.finished and stopped_by_string and not job.params.include_stop_str_in_output:
            pending[out.index] = logprobs_of_text(state.tokenizer, pending[out.index], out.text)
        text, tool_calls = out.text, []
        stream = calls[out.index]
        if stream is not None:
            text, tool_calls = stream.push(out.text)
            if out.finished:
                rest, more_calls = stream.finish()
                text, tool_calls = text + rest, tool_calls + more_calls
        if not (text or tool_calls or out.finished):
            continue
        logprobs = chat_logprobs(state.tokenizer, pending[out.index]) if pending[out.index] else None
        pending[out.index] = []
        if tool_calls:
            yield event(out.index, {"content": text} if text else {"tool_calls": tool_calls}, logprobs)
            if text:
                yield event(out.index, {"tool_calls": tool_calls})
            text, logprobs = "", None
        if out.finished:
            finish_reason, stop_reason = openai_finish(out)
            if stream is not None and stream.called and finish_reason == "stop":
                finish_reason = "tool_calls"
            yield event(out.index, {"content": text}, logprobs, finish_reason, stop_reason)
        elif text or logprobs:
            yield event(out.index, {"content": text}, logprobs)
    for event_text in chunks.end():
        yield event_text

"""OpenAI's Responses API on top of sessions: POST /v1/responses (the stored responses' routes:
server/stored_responses.py).

A response chain is a session. A response's conversation is its chain's stored messages (every
earlier turn's input and output, found by walking `previous_response_id`) plus this request's
input, with this request's `instructions` (only) as the system message; it is rendered with the
chat template and run under the chain's engine session (named after the chain's root response,
per API key), so turn k takes over the KV cache turn k-1 left and prefills only what is new
(scheduler/sessions.py matches the resent history against the session's tokens). When the
session's cache is gone (memory pressure, its TTL, a delete), the next turn prefills the stored
history again: correct, only slower. `store: false` runs without a session and keeps nothing.
Storage and its bounds: server/response_store.py.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from model.sampling_params import SamplingParams
from scheduler.input_processor import PromptTooLongError
from server.chat_template import ChatTemplateError
from server.errors import APIError, utf8_safe
from server.job_runner import collected_response, run_prompts
from server.response_store import Chain, StoredResponse
from server.request_text import check_text_sizes, utf8_size
from server.responses_protocol import ResponseRequest
from server.serving import (Job, ServerState, capped_output, check_stream_options, request_options, sampling_params,
                            prepare_job, session_key)
from server.stored_responses import lookup, message_item, not_found, spawn_session_ends, text_part, using_store
from server.streaming import stream_error


@dataclass
class _Turn:
    """A validated request, ready to run."""

    body: ResponseRequest
    response_id: str
    message_id: str
    created_at: int
    tenant: str | None
    previous: StoredResponse | None
    chain: Chain | None  # None: not stored
    input_items: tuple[tuple[str, str, str], ...]  # (item id, role, text)
    temperature: float
    top_p: float
    job: Job | None = None
    stored: bool = False


async def create_response(state: ServerState, body: ResponseRequest, raw: Request) -> Response:
    state.check_model(body.model)
    check_stream_options(body)
    previous = None
    if body.previous_response_id is not None:
        previous = await lookup(state, body.previous_response_id, raw)
        if previous is None:
            raise not_found(body.previous_response_id, "previous_response_id", "previous_response_not_found")
    response_id = f"resp_{uuid.uuid4().hex}"
    chain = None
    if body.store:
        chain = previous.chain if previous is not None else Chain(
            session_key(raw, f"responses:{response_id[len('resp_'):]}", "previous_response_id"))
    # A response's cache salt is its API key's alone; its deadline, the server's --request-timeout.
    options = request_options(state, raw, body.attention_sinks, body.attention_window,
                              chain.session_id if chain is not None else None, None, None)
    params = sampling_params(state, body, capped_output(state, options.windowed, body.max_output_tokens,
                                                        "max_output_tokens"))
    state.check_capacity()
    turn = _Turn(body, response_id, f"msg_{uuid.uuid4().hex}", int(time.time()), options.tenant,
                 previous, chain, tuple((f"msg_{uuid.uuid4().hex}", role, text) for role, text in body.messages()),
                 params.temperature, params.top_p)
    turn.job = await run_in_threadpool(lambda: prepare_job(state, response_id, {}, [_prompt(state, turn, params,
                                                                                          options.windowed)],
                                                           params, options, None, "input", body.stream))
    if body.stream:
        return StreamingResponse(_stream(state, turn), media_type="text/event-stream")
    return await collected_response(raw, _collect(state, turn))


def _prompt(state: ServerState, turn: _Turn, params: SamplingParams, windowed: bool) -> list[int]:
    """The conversation's prompt tokens (in a worker thread): the chain's history, this
    request's input, this request's instructions first; checked against the chain's bound
    and the context, with the oldest messages dropped to fit under `truncation: "auto"`."""
    body = turn.body
    system = [("system", body.instructions)] if body.instructions is not None else []
    new = [(role, text) for _, role, text in turn.input_items]
    # Before anything is rendered: text that cannot fit the context at all (under truncation
    # "auto" only the last message has to; with a window, only the instructions).
    checked = new if body.truncation == "disabled" else new[-1:]
    check_text_sizes(state.max_text_bytes, state.max_model_len,
                     {"instructions": utf8_size(body.instructions or ""),
                      "input": sum(utf8_size(text) for _, text in checked)}, windowed, evictable="input")
    messages = (turn.previous.conversation() if turn.previous is not None else []) + new

    def encode(kept: list[tuple[str, str]]) -> list[int]:
        try:
            return state.chat_template.encode([{"role": role, "content": text} for role, text in system + kept])
        except ChatTemplateError as exc:
            raise APIError(400, str(exc), param="input") from exc

    prompt = encode(messages)
    limit = state.response_store.max_chain_tokens
    if len(prompt) > limit:
        raise APIError(400, f"This conversation has {len(prompt)} tokens, more than this server keeps for one "
                            f"response chain ({limit}). Start a new chain (without previous_response_id), for "
                            "example from a summary of this one.",
                       param="previous_response_id" if turn.previous is not None else "input",
                       code="response_chain_too_long")
    if not windowed and body.truncation == "auto" and not _fits(state, prompt, params):
        prompt = _truncated(state, messages, encode, params)
    return prompt  # checked by the input processor (serving.prepare_job)


def _fits(state: ServerState, prompt: list[int], params: SamplingParams) -> bool:
    try:
        state.engine.input_processor.check_prompt(prompt, params, None)
    except PromptTooLongError:
        return False
    except ValueError:
        return True  # another problem: check_prompt reports it
    return True


def _truncated(state: ServerState, messages: list[tuple[str, str]], encode, params: SamplingParams) -> list[int]:
    """`truncation: "auto"` on a dense request: the prompt without the fewest oldest messages
    (the last one is always kept) that fits the context, starting at a message that is not an
    assistant's; the last message alone when nothing fits (check_prompt then refuses it)."""
    low, high = 1, len(messages) - 1
    best = None
    while low <= high:  # the fewest messages to drop (a shorter conversation fits if a longer one does)
        mid = (low + high) // 2
        prompt = encode(messages[mid:])
        if _fits(state, prompt, params):
            best, high = (mid, prompt), mid - 1
        else:
            low = mid + 1
    if best is None:
        return encode(messages[-1:])
    dropped, prompt = best
    if messages[dropped][0] == "assistant" and dropped < len(messages) - 1:
        while messages[dropped][0] == "assistant" and dropped < len(messages) - 1:
            dropped += 1
        prompt = encode(messages[dropped:])
    return prompt


# -- response objects ------------------------------------------------------------------------


def _usage(turn: _Turn, output_tokens: int, cached: int) -> dict:
    input_tokens = len(turn.job.prompts[0])
    # What this turn wrote into its chain's session, for the next turn: the input tokens it computed.
    written = input_tokens - cached if turn.job.requests[0].session_id is not None else 0
    return {"input_tokens": input_tokens,
            "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": written},
            "output_tokens": output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": input_tokens + output_tokens}


def _response_object(state: ServerState, turn: _Turn, status: str, *, output: list[dict], usage: dict | None = None,
                     incomplete: str | None = None, error: dict | None = None) -> dict:
    body = turn.body
    done = status in ("completed", "incomplete", "failed")
    return {
        "id": turn.response_id, "object": "response", "created_at": turn.created_at, "status": status,
        "background": False, "completed_at": int(time.time()) if status == "completed" else None,
        "error": error, "incomplete_details": {"reason": incomplete} if status == "incomplete" else None,
        "instructions": body.instructions, "max_output_tokens": body.max_output_tokens,
        "max_tool_calls": body.max_tool_calls, "model": state.model_name, "output": output,
        "parallel_tool_calls": body.parallel_tool_calls, "previous_response_id": body.previous_response_id,
        "prompt_cache_key": body.prompt_cache_key, "prompt_cache_retention": None,
        "reasoning": {"effort": None, "summary": None}, "safety_identifier": body.safety_identifier,
        "service_tier": "default", "store": body.store, "temperature": turn.temperature,
        "text": {"format": {"type": "text"}, "verbosity": "medium"}, "tool_choice": body.tool_choice or "auto",
        "tools": [], "top_logprobs": 0, "top_p": turn.top_p, "truncation": body.truncation,
        "usage": usage if done else None, "user": body.user, "metadata": body.metadata or {},
    }


def _outcome(finish_reason: str | None) -> tuple[str, str | None]:
    """(status, incomplete_details.reason) of a finished reply: cut by max_output_tokens or a
    full context is OpenAI's "max_output_tokens"; cut by the request deadline or the server
    (finish reasons "timeout", "abort") is incomplete with no reason of OpenAI's."""
    if finish_reason == "length":
        return "incomplete", "max_output_tokens"
    if finish_reason in ("timeout", "abort"):
        return "incomplete", None
    return "completed", None


def _finish(state: ServerState, turn: _Turn, text: str, finish_reason: str | None, output_tokens: int,
            cached: int) -> tuple[dict, list[str]]:
    """The finished response object, stored when asked (in a worker thread: the text may be
    long); and the sessions that storing it ended."""
    status, reason = _outcome(finish_reason)
    item_status = "completed" if status == "completed" else "incomplete"
    payload = _response_object(state, turn, status, output=[message_item(turn.message_id, item_status, text)],
                               usage=_usage(turn, output_tokens, cached), incomplete=reason)
    ended: list[str] = []
    if turn.chain is not None:
        fields = {key: value for key, value in payload.items() if key not in ("instructions", "output")}
        node = StoredResponse(turn.response_id, turn.tenant, turn.chain, turn.previous, turn.input_items,
                              turn.body.instructions, text, turn.message_id, fields)
        ended = using_store(state.response_store.add, node)
        turn.stored = True
    return payload, ended


def _abandon(state: ServerState, turn: _Turn) -> None:
    """A turn that ended without a stored response (the client left, or an error): a chain it
    would have started has nothing to continue from, so its session goes too."""
    if turn.chain is not None and turn.previous is None and not turn.stored:
        spawn_session_ends(state, [turn.chain.session_id])


async def _collect(state: ServerState, turn: _Turn) -> dict:
    parts: list[str] = []
    finish_reason, output_tokens, cached = None, 0, 0
    try:
        async for _, out in run_prompts(state, turn.job):
            parts.append(out.text)
            if out.finished:
                finish_reason, output_tokens, cached = out.finish_reason, out.num_output_tokens, out.num_cached_tokens
        payload, ended = await run_in_threadpool(_finish, state, turn, "".join(parts), finish_reason, output_tokens,
                                                 cached)
    finally:
        _abandon(state, turn)
    spawn_session_ends(state, ended)
    return payload


def _event(kind: str, sequence_number: int, **fields) -> str:
    payload = {"type": kind, **fields, "sequence_number": sequence_number}
    return f"event: {kind}\ndata: {utf8_safe(json.dumps(payload, ensure_ascii=False))}\n\n"


async def _stream(state: ServerState, turn: _Turn) -> AsyncIterator[str]:
    """response.created, response.in_progress, the message item and its text part added, the
    text deltas, then the text, part and item done and response.completed (or .incomplete); an
    error after the stream began ends it with an `error` event and response.failed. A client
    that leaves aborts the request (closing run_prompts)."""
    try:
        async with contextlib.aclosing(_stream_events(state, turn)) as events:
            async for event in events:
                yield event
    finally:
        _abandon(state, turn)


async def _stream_events(state: ServerState, turn: _Turn) -> AsyncIterator[str]:
    sequence = itertools.count()
    message_id = turn.message_id
    started = _response_object(state, turn, "in_progress", output=[])
    created, in_progress = next(sequence), next(sequence)
    # The response object repeats the instructions (as long as the body allowed): off the loop.
    opening = await run_in_threadpool(lambda: (_event("response.created", created, response=started),
                                               _event("response.in_progress", in_progress, response=started)))
    for event in opening:
        yield event
    yield _event("response.output_item.added", next(sequence), output_index=0,
                 item=message_item(message_id, "in_progress", None))
    yield _event("response.content_part.added", next(sequence), item_id=message_id, output_index=0, content_index=0,
                 part=text_part(""))
    parts: list[str] = []
    finish_reason, output_tokens, cached = None, 0, 0
    try:
        async with contextlib.aclosing(run_prompts(state, turn.job)) as outputs:
            async for _, out in outputs:
                if out.text:
                    parts.append(out.text)
                    yield _event("response.output_text.delta", next(sequence), item_id=message_id, output_index=0,
                                 content_index=0, delta=out.text, logprobs=[])
                if out.finished:
                    finish_reason = out.finish_reason
                    output_tokens, cached = out.num_output_tokens, out.num_cached_tokens
        first = next(sequence)
        events, ended = await run_in_threadpool(_final_events, state, turn, "".join(parts), finish_reason,
                                                output_tokens, cached, first)
    except Exception as exc:  # the headers are sent: the error travels inside the stream
        error = stream_error(exc)
        yield _event("error", next(sequence), code=error.code or error.type, message=error.message, param=error.param)
        item = message_item(message_id, "incomplete", "".join(parts))
        failed = _response_object(state, turn, "failed", output=[item],
                                  error={"code": "server_error", "message": error.message})
        yield _event("response.failed", next(sequence), response=failed)
        return
    for event in events:
        yield event
    spawn_session_ends(state, ended)


def _final_events(state: ServerState, turn: _Turn, text: str, finish_reason: str | None, output_tokens: int,
                  cached: int, first: int) -> tuple[list[str], list[str]]:
    payload, ended = _finish(state, turn, text, finish_reason, output_tokens, cached)
    item = payload["output"][0]
    ids = {"item_id": turn.message_id, "output_index": 0, "content_index": 0}
    events = [
        _event("response.output_text.done", first, **ids, text=text, logprobs=[]),
        _event("response.content_part.done", first + 1, **ids, part=text_part(text)),
        _event("response.output_item.done", first + 2, output_index=0, item=item),
        _event(f"response.{payload['status']}", first + 3, response=payload),
    ]
    return events, ended



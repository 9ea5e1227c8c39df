"""What the completion and chat routes share: server state, request -> SamplingParams, running
prompts through the async engine with latency metrics, logprob and usage formatting."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import Request

from model.sampling_params import SamplingParams, SamplingParamsError
from model.tokenizer import Tokenizer
from scheduler.engine import PromptTooLongError
from scheduler.output_processor import RequestOutput, TokenLogprob
from server.async_engine import AsyncEngine, EngineDeadError, RequestFailedError
from server.chat_template import ChatTemplate
from server.errors import APIError, sse_error
from server.metrics import Metrics
from server.protocol import SamplingFields

logger = logging.getLogger(__name__)

# Request fields that take their default from generation_config.json when the client omits them.
GENERATION_CONFIG_DEFAULTS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


@dataclass
class ServerState:
    engine: AsyncEngine
    tokenizer: Tokenizer
    chat_template: ChatTemplate
    metrics: Metrics
    model_name: str
    max_model_len: int
    defaults: dict = field(default_factory=dict)
    max_waiting_requests: int | None = None  # None: unbounded
    request_timeout: float | None = None  # seconds; None: no deadline unless a request sets one

    def check_capacity(self) -> None:
        """A fast 503 with Retry-After when the waiting queue is full (admitted requests run on)."""
        if self.max_waiting_requests is not None and self.engine.num_waiting_requests >= self.max_waiting_requests:
            self.metrics.requests_rejected.inc()
            raise APIError(503, f"The server is overloaded ({self.max_waiting_requests} requests are waiting). "
                                "Retry later.", "service_unavailable", code="overloaded", headers={"Retry-After": "1"})

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(404, f"The model `{model}` does not exist.", "not_found_error", "model",
                           "model_not_found")


@dataclass
class Job:
    """One validated API request, ready to run: its prompts and how to run them."""

    request_id: str
    header: dict  # id, object, created, model: the fields every response chunk repeats
    prompts: list[list[int]]
    params: SamplingParams
    options: dict  # Engine.add_request options (engine_options)


def load_generation_defaults(model_dir: Path) -> dict:
    path = model_dir / "generation_config.json"
    if not path.is_file():
        return {}
    config = json.loads(path.read_text())
    return {key: config[key] for key in GENERATION_CONFIG_DEFAULTS if config.get(key) is not None}


def sampling_params(state: ServerState, body: SamplingFields, max_tokens: int | None,
                    logprobs: int | None, prompt_logprobs: int | None = None) -> SamplingParams:
    def pick(name: str, fallback):
        value = getattr(body, name)
        return value if value is not None else state.defaults.get(name, fallback)

    try:
        return SamplingParams(
            n=body.n, temperature=pick("temperature", 1.0), top_p=pick("top_p", 1.0),
            top_k=pick("top_k", None), min_p=pick("min_p", 0.0),
            presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
            repetition_penalty=pick("repetition_penalty", 1.0), seed=body.seed, max_tokens=max_tokens,
            min_tokens=body.min_tokens, stop=body.stop or (), stop_token_ids=body.stop_token_ids or (),
            ignore_eos=body.ignore_eos, include_stop_str_in_output=body.include_stop_str_in_output,
            logprobs=logprobs, prompt_logprobs=prompt_logprobs, skip_special_tokens=body.skip_special_tokens,
        )
    except SamplingParamsError as exc:
        raise APIError(400, str(exc), param=exc.param) from exc


def engine_options(state: ServerState, body: SamplingFields, session_header: str | None) -> dict:
    """Engine.add_request options of a request: its sink policy, session and deadline, checked."""
    session_id = body.session_id or session_header
    try:
        state.engine.sink_policy(body.attention_sinks, body.attention_window)
    except ValueError as exc:
        raise APIError(400, str(exc), param="attention_window") from exc
    if session_id is not None and body.n != 1:
        raise APIError(400, "session_id needs n = 1", param="n")
    timeout = body.request_timeout or state.request_timeout
    return {"attention_sinks": body.attention_sinks, "attention_window": body.attention_window,
            "session_id": session_id, "deadline": time.monotonic() + timeout if timeout else None}


def check_prompt(state: ServerState, token_ids: list[int], params: SamplingParams, options: dict,
                 param: str) -> None:
    engine = state.engine
    try:
        engine.check_prompt(token_ids, params, engine.sink_policy(options["attention_sinks"],
                                                                   options["attention_window"]))
    except PromptTooLongError as exc:
        raise APIError(400, str(exc), param=param, code="context_length_exceeded") from exc
    except ValueError as exc:
        raise APIError(400, str(exc), param=param) from exc


def check_stream_options(body: SamplingFields) -> None:
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "stream_options is only allowed when stream is true", param="stream_options")


async def run_prompts(state: ServerState, job: Job) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Every prompt's outputs as (prompt index, output), merged in arrival order, with metrics.

    Closing the iterator early (disconnect, shutdown) aborts what is still running.
    """
    arrival = time.monotonic()
    last_token_time: dict[tuple[int, int], float] = {}
    num_finished = [0] * len(job.prompts)
    failed_prompt = None  # the prompt whose request failed in the engine
    try:
        async with contextlib.aclosing(_engine_outputs(state, job)) as items:
            async for index, item in items:
                if isinstance(item, Exception):
                    if isinstance(item, RequestFailedError):
                        failed_prompt = index
                    raise item
                now = time.monotonic()
                for out in item:
                    key = (index, out.index)
                    if out.new_token_ids:
                        previous = last_token_time.get(key)
                        if previous is None:
                            state.metrics.time_to_first_token.observe(now - arrival)
                        else:
                            state.metrics.inter_token_latency.observe(now - previous)
                        last_token_time[key] = now
                    if out.finished:
                        num_finished[index] += 1
                        state.metrics.e2e_latency.observe(now - arrival)
                        state.metrics.finished(out.finish_reason or "abort")
                    yield index, out
    finally:
        # Completions cut short here (the client left, or an error) are aborted by the engine.
        for index, finished in enumerate(num_finished):
            for _ in range(job.params.n - finished):
                state.metrics.finished("error" if index == failed_prompt else "abort")


async def _engine_outputs(state: ServerState, job: Job
                          ) -> AsyncIterator[tuple[int, list[RequestOutput] | Exception]]:
    """(prompt index, one engine step's outputs) for every prompt of a job, in arrival order; an
    engine error ends a prompt as (index, exception). One prompt (the usual case) is read
    directly, several through a task each and a queue. Closing the iterator aborts the prompts
    still running (closing or cancelling `AsyncEngine.generate` aborts its request)."""
    def request_id(index: int) -> str:
        return f"{job.request_id}-{index}"

    if len(job.prompts) == 1:
        try:
            async with contextlib.aclosing(state.engine.generate(request_id(0), job.prompts[0], job.params,
                                                                 **job.options)) as outputs:
                async for item in outputs:
                    yield 0, item
        except Exception as exc:
            yield 0, exc
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(index: int, token_ids: list[int]):
        try:
            async for outputs in state.engine.generate(request_id(index), token_ids, job.params, **job.options):
                await queue.put((index, outputs))
            await queue.put((index, done))
        except Exception as exc:
            await queue.put((index, exc))

    tasks = [asyncio.create_task(pump(i, ids)) for i, ids in enumerate(job.prompts)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if item is done:
                remaining -= 1
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def until_disconnected(request: Request, coro):
    """Run coro, cancelling it (and so aborting its requests) if the client disconnects first."""
    task = asyncio.ensure_future(coro)

    async def watch():
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return None
    return task.result()


def token_text(tokenizer: Tokenizer, token_id: int) -> str:
    """A token's own text; bytes that are not UTF-8 on their own are shown as OpenAI does."""
    raw = tokenizer.token_bytes(token_id)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "".join(f"bytes:\\x{b:02x}" for b in raw)


def completion_logprobs(tokenizer: Tokenizer, token_ids: list[int], entries: list[TokenLogprob | None],
                        text_offset: int) -> dict:
    """The legacy completions `logprobs` object for a run of tokens (None: an unscored first
    prompt token)."""
    tokens, token_logprobs, top, offsets = [], [], [], []
    offset = text_offset
    for token_id, entry in zip(token_ids, entries):
        text = token_text(tokenizer, token_id)
        tokens.append(text)
        token_logprobs.append(entry.logprob if entry else None)
        top.append({token_text(tokenizer, t): lp for t, lp in entry.top} if entry else None)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}


def chat_logprobs(tokenizer: Tokenizer, entries: list[TokenLogprob]) -> dict:
    def item(token_id: int, logprob: float) -> dict:
        return {"token": token_text(tokenizer, token_id), "logprob": logprob,
                "bytes": list(tokenizer.token_bytes(token_id))}

    return {"content": [{**item(e.token_id, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]}
                        for e in entries]}


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def engine_api_error(exc: Exception) -> APIError | None:
    """The client's view of an engine error (None: an unexpected one, shown as a bare 500)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, EngineDeadError):
        return APIError(503, "The engine is not running; the server cannot serve requests.",
                        "service_unavailable", code="engine_dead")
    if isinstance(exc, RequestFailedError):  # the engine has logged the cause
        return APIError(500, str(exc), "internal_error", code="generation_failed")
    return None


async def guarded(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """A stream that ends with an error event and [DONE] instead of a cut connection."""
    try:
        async for event in events:
            yield event
    except Exception as exc:  # headers are sent: the error has to travel inside the stream
        error = engine_api_error(exc)
        if error is None:
            logger.exception("stream failed")
            error = APIError(500, "The server had an error while processing the request.", "internal_error")
        yield sse_error(error.message, error.type, error.code)
        yield SSE_DONE

"""What the completion and chat routes share: server state, request -> SamplingParams, running
prompts through the async engine with latency metrics, logprob and usage formatting."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from model.sampling_params import SamplingParams, SamplingParamsError
from model.tokenizers.tokenizer import Tokenizer
from scheduler.engine import PromptTooLongError
from scheduler.output_processor import RequestOutput, TokenLogprob
from scheduler.stop_strings import automaton_for
from server.async_engine import AsyncEngine, EngineDeadError, RequestFailedError, ServerShuttingDownError
from server.chat_template import ChatTemplate
from server.tool_parsers import ToolParser, tool_parser
from server.errors import APIError, sse_error, utf8_safe
from server.generation_config import GenerationDefaults
from server.grammar_compiler import DEFAULT_COMPILE_TIMEOUT, GrammarCompiler
from server.metrics import Metrics
from server.middleware import request_tenant
from server.protocol import SESSION_ID_PATTERN, SamplingFields
from server.response_store import MemoryResponseStore, ResponseStore

logger = logging.getLogger(__name__)

# Output tokens a request with a StreamingLLM window may ask for (its context never fills up);
# `--max-output-tokens` sets it, by default to the CLI's default (server/defaults.py).
from server.defaults import DEFAULT_MAX_OUTPUT_TOKENS, DEFAULT_MAX_TOKENS  # noqa: E402
# Logprob entries (the token's and each alternative) one request may hold, prompt and output
# together: about 100 bytes each in memory and in the JSON, so 25-50 MB at most per request.
MAX_LOGPROB_ENTRIES = 2**18
# Bytes of text per token at most, times this, bounds the text a dense prompt may have before it
# is tokenized: Unicode normalisation composes a few bytes into one character at most.
_NORMALIZATION_SLACK = 4
_SESSION_ID = re.compile(SESSION_ID_PATTERN)


@dataclass
class ServerState:
    engine: AsyncEngine
    tokenizer: Tokenizer
    chat_template: ChatTemplate
    metrics: Metrics
    model_name: str
    max_model_len: int
    # Defaults of the sampling fields a request leaves out, from the model (server/generation_config.py).
    generation: GenerationDefaults = field(default_factory=GenerationDefaults)
    # Output tokens a request that sets no max_tokens gets at most (--default-max-tokens; None:
    # up to the context).
    default_max_tokens: int | None = DEFAULT_MAX_TOKENS
    max_waiting_requests: int | None = None  # None: unbounded
    request_timeout: float | None = None  # seconds; None: no deadline unless a request sets one
    max_output_tokens: int = DEFAULT_MAX_OUTPUT_TOKENS  # per completion, with a StreamingLLM window
    # With API keys, each key's requests share prefix-cache blocks only among themselves, unless
    # the operator shares the cache between keys (--shared-prefix-cache).
    shared_prefix_cache: bool = False
    # The Responses API's stored responses and their bounds (server/response_store.py;
    # --max-stored-responses, --response-ttl, --response-store-memory, --max-chain-tokens).
    response_store: ResponseStore = field(default_factory=MemoryResponseStore)
    # How model replies are read for tool calls (server/tool_parsers.py; "auto": the format the
    # chat template teaches).
    tool_call_parser: str = "auto"
    # Seconds a grammar may take to compile in its sandbox (--grammar-compile-timeout).
    grammar_compile_timeout: float = DEFAULT_COMPILE_TIMEOUT
    # How the model is served (Engine.served_as: quantization, dtype, weight and KV bytes).
    served_as: dict = field(default_factory=dict)

    @functools.cached_property
    def grammar_compiler(self) -> GrammarCompiler:
        """Compiles requests' grammars (sandboxes started on first use, or by the app at startup)."""
        return GrammarCompiler(self.engine.structured_output, timeout=self.grammar_compile_timeout)

    @functools.cached_property
    def tool_parser(self) -> ToolParser:
        name = self.chat_template.tool_format if self.tool_call_parser == "auto" else self.tool_call_parser
        return tool_parser(name)

    def check_capacity(self, num_sequences: int = 1) -> None:
        """A fast 503 with Retry-After when the waiting queue cannot take the request's sequences
        (prompts x n); a request larger than the whole queue is a 400."""
        limit = self.max_waiting_requests
        if limit is None:
            return
        if num_sequences > limit:
            raise APIError(400, f"This request has {num_sequences} sequences (prompts x n), more than the "
                                f"server queues ({limit}).", param="n")
        if self.engine.num_waiting_requests + num_sequences > limit:
            self.metrics.requests_rejected.inc()
            raise APIError(503, f"The server is overloaded ({limit} requests are waiting). "
                                "Retry later.", "service_unavailable", code="overloaded", headers={"Retry-After": "1"})

    @functools.cached_property
    def max_token_bytes(self) -> int:
        """The longest token's UTF-8 bytes (at least 1)."""
        return max((len(self.tokenizer.token_bytes(i)) for i in range(self.tokenizer.vocab_size)), default=1) or 1

    @property
    def max_text_bytes(self) -> int:
        """Bytes of text that the context can hold at most (server/request_text.py)."""
        return self.max_model_len * self.max_token_bytes * _NORMALIZATION_SLACK

    def check_text_length(self, text: str, windowed: bool, param: str) -> None:
        """Refuse, before tokenizing it, a dense prompt whose text cannot fit the context."""
        if windowed:
            return
        limit = self.max_text_bytes
        # UTF-8 takes at most 4 bytes a character: most texts need no encoding to be cleared.
        if len(text) * 4 > limit and (size := len(text.encode("utf-8", "surrogatepass"))) > limit:
            raise APIError(400, f"This model's maximum context length is {self.max_model_len} tokens; the "
                                f"{param} has {size} bytes of text, more than that many tokens can hold.",
                           param=param, code="context_length_exceeded")

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(404, f"The model `{model}` does not exist; this server serves `{self.model_name}` "
                                f"(GET /v1/models lists it).", "not_found_error", "model", "model_not_found")


@dataclass
class Job:
    """One validated API request, ready to run: its prompts and how to run them."""

    request_id: str
    header: dict  # id, object, created, model: the fields every response chunk repeats
    prompts: list[list[int]]
    params: SamplingParams
    options: dict  # Engine.add_request options (engine_options)
    streamed: bool = False  # the client reads the outputs as they come (backpressure applies)


def output_budget(state: ServerState, body: SamplingFields, max_tokens: int | None) -> int | None:
    """A chat or completions request's max_tokens (`capped_output`)."""
    windowed = state.engine.sink_policy(body.attention_sinks, body.attention_window) is not None
    return capped_output(state, windowed, max_tokens, "max_tokens")


def capped_output(state: ServerState, windowed: bool, requested: int | None, param: str) -> int | None:
    """The output tokens a request may generate: what it asks for, else the server's default
    (--default-max-tokens; None: up to the context). With a StreamingLLM window, whose context
    never fills, --max-output-tokens bounds both (more is refused); a dense request is bounded
    by the context too."""
    if requested is None:
        # Dense: None, and the sampling params carry the default (it must not make a long prompt
        # a context error: the context ends the reply first).
        return min(state.default_max_tokens or state.max_output_tokens, state.max_output_tokens) if windowed else None
    if windowed and requested > state.max_output_tokens:
        raise APIError(400, f"{param} is {requested}, more than this server's limit of "
                            f"{state.max_output_tokens} output tokens per completion.", param=param)
    return requested


def check_logprob_volume(state: ServerState, params: SamplingParams, prompt_lengths: list[int]) -> None:
    """Bound the logprobs one request may hold: (k + 1) entries per scored token, the prompt's
    counted once per choice (each of the n choices repeats them)."""
    entries = 0
    if params.prompt_logprobs is not None:
        entries += sum(prompt_lengths) * params.n * (params.prompt_logprobs + 1)
    if params.logprobs is not None:
        longest = max(state.max_model_len - min(prompt_lengths), 1)
        max_tokens = params.max_tokens if params.max_tokens is not None else min(
            longest, max(params.default_max_tokens or longest, params.min_tokens))
        entries += len(prompt_lengths) * params.n * max_tokens * (params.logprobs + 1)
    if entries > MAX_LOGPROB_ENTRIES:
        raise APIError(400, f"This request asks for {entries} logprobs (tokens x (logprobs + 1), prompt and output "
                            f"together), more than the limit of {MAX_LOGPROB_ENTRIES}: lower max_tokens, n, "
                            "the number of logprobs, or the prompt's length.", param="logprobs")


def sampling_params(state: ServerState, body: SamplingFields, max_tokens: int | None,
                    logprobs: int | None, prompt_logprobs: int | None = None) -> SamplingParams:
    def pick(name: str, fallback):
        value = getattr(body, name)
        return value if value is not None else state.generation.sampling.get(name, fallback)

    vocab = state.tokenizer.vocab_size
    if body.logit_bias and any(not 0 <= t < vocab for t in body.logit_bias):
        raise APIError(400, f"logit_bias keys must be token ids in [0, {vocab})", param="logit_bias")
    if body.stop_token_ids and any(not 0 <= t < vocab for t in body.stop_token_ids):
        raise APIError(400, f"stop_token_ids must be token ids in [0, {vocab})", param="stop_token_ids")
    try:
        return SamplingParams(
            n=body.n, temperature=pick("temperature", 1.0), top_p=pick("top_p", 1.0),
            top_k=pick("top_k", None), min_p=pick("min_p", 0.0),
            presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
            repetition_penalty=pick("repetition_penalty", 1.0), seed=body.seed, max_tokens=max_tokens,
            default_max_tokens=state.default_max_tokens,
            min_tokens=body.min_tokens, stop=body.stop or (), stop_token_ids=body.stop_token_ids or (),
            ignore_eos=body.ignore_eos, include_stop_str_in_output=body.include_stop_str_in_output,
            logprobs=logprobs, prompt_logprobs=prompt_logprobs, skip_special_tokens=body.skip_special_tokens,
            logit_bias=body.logit_bias or None,
        )
    except SamplingParamsError as exc:
        raise APIError(400, str(exc), param=exc.param) from exc


def session_key(raw: Request, session_id: str, param: str) -> str:
    """The engine's name for a client's session: checked, and kept apart per API key (two keys
    using one session id have two sessions, and neither can reach or detect the other's)."""
    if not _SESSION_ID.fullmatch(session_id):
        raise APIError(400, "session ids are 1-256 letters, digits and ._:/+=-", param=param)
    tenant = request_tenant(raw.scope)
    return session_id if tenant is None else f"{tenant}/{session_id}"


def cache_salt(state: ServerState, raw: Request, body: SamplingFields) -> str | None:
    """The prefix-cache salt of a request: its API key's tenant (unless the operator shares the
    cache between keys and the request has no salt of its own), with its `cache_salt` on top."""
    tenant = request_tenant(raw.scope)
    if state.shared_prefix_cache and body.cache_salt is None:
        tenant = None  # shared between keys; a request's own salt stays its key's
    parts = [part for part in (tenant, body.cache_salt) if part is not None]
    return "\0".join(parts) if parts else None


def engine_options(state: ServerState, body: SamplingFields, raw: Request) -> dict:
    """Engine.add_request options of a request: its sink policy, session, cache salt, API key
    (tenant) and deadline, checked."""
    session_id = None
    if body.session_id is not None:
        session_id = session_key(raw, body.session_id, "session_id")
    elif raw.headers.get("x-session-id") is not None:
        session_id = session_key(raw, raw.headers["x-session-id"], "X-Session-ID")
    try:
        state.engine.sink_policy(body.attention_sinks, body.attention_window)
    except ValueError as exc:
        raise APIError(400, str(exc), param="attention_window") from exc
    if session_id is not None and body.n != 1:
        raise APIError(400, "session_id needs n = 1", param="n")
    timeout = body.request_timeout or state.request_timeout
    return {"attention_sinks": body.attention_sinks, "attention_window": body.attention_window,
            "session_id": session_id, "cache_salt": cache_salt(state, raw, body), "tenant": request_tenant(raw.scope),
            "deadline": time.monotonic() + timeout if timeout else None}


def check_prompt(state: ServerState, token_ids: list[int], params: SamplingParams, options: dict,
                 param: str) -> None:
    engine = state.engine
    try:
        engine.check_prompt(token_ids, params, engine.sink_policy(options["attention_sinks"],
                                                                   options["attention_window"]))
    except PromptTooLongError as exc:
        where = "messages" if param == "messages" else "prompt"
        max_tokens = params.max_tokens or 0
        raise APIError(
            400, f"This model's maximum context length is {state.max_model_len} tokens. However, you requested "
                 f"{len(token_ids) + max_tokens} tokens ({len(token_ids)} in the {where}, {max_tokens} in the "
                 f"completion). Please reduce the length of the {where} or completion.",
            param=param, code="context_length_exceeded") from exc
    except ValueError as exc:
        raise APIError(400, str(exc), param=param) from exc


def openai_finish(out: RequestOutput) -> tuple[str | None, int | str | None]:
    """(finish_reason, stop_reason) as OpenAI's clients know them: a request cut short by its
    deadline, by the server or by its grammar is "length" (the reply is incomplete), and
    sinkserve's own reason ("timeout", "abort", "grammar_error", "grammar_timeout") is in
    stop_reason, as vLLM puts its details there."""
    if out.finish_reason in ("timeout", "abort"):
        return "length", out.finish_reason
    if out.finish_reason == "grammar":  # its grammar gave up or took too long: stop_reason says which
        return "length", out.stop_reason
    return out.finish_reason, out.stop_reason


async def json_response(payload: dict) -> Response:
    """A JSON response serialized in a worker thread, piece by piece, so that a large one (many
    choices, logprobs) never holds the event loop."""
    return Response(await run_in_threadpool(_encode_json, payload), media_type="application/json")


def _encode_json(payload) -> bytes:
    parts: list[str] = []

    def encode(value, depth: int) -> None:
        # The response's outer levels (choices, a choice's logprobs, the list of logprob entries)
        # are written element by element, and an entry (depth 4 and below) in one call: no single
        # C call runs long, so the interpreter can switch to the event loop's thread between them.
        if isinstance(value, list):
            parts.append("[")
            for start in range(0, len(value), 1024):
                if start:
                    parts.append(",")
                piece = value[start:start + 1024]
                if all(not isinstance(item, (list, dict)) for item in piece):  # numbers: 1024 at once
                    parts.append(json.dumps(piece, ensure_ascii=False, allow_nan=False)[1:-1])
                    continue
                for i, item in enumerate(piece):
                    if i:
                        parts.append(",")
                    encode(item, depth + 1)
            parts.append("]")
        elif isinstance(value, dict) and depth < 4:
            parts.append("{")
            for i, (key, item) in enumerate(value.items()):
                parts.append(("," if i else "") + json.dumps(str(key), ensure_ascii=False) + ":")
                encode(item, depth + 1)
            parts.append("}")
        else:
            parts.append(json.dumps(value, ensure_ascii=False, allow_nan=False))

    encode(payload, 0)
    return utf8_safe("".join(parts)).encode()


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
                                                                 job.streamed, **job.options)) as outputs:
                async for item in outputs:
                    yield 0, item
        except Exception as exc:
            yield 0, exc
        return
    # Bounded: when the client stops reading, the pumps stop reading their streams too, so that
    # AsyncEngine's backpressure (MAX_UNREAD_TOKENS) sees it.
    queue: asyncio.Queue = asyncio.Queue(maxsize=len(job.prompts))
    done = object()

    async def pump(index: int, token_ids: list[int]):
        try:
            async for outputs in state.engine.generate(request_id(index), token_ids, job.params, job.streamed,
                                                       **job.options):
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


def with_top(entries: list[TokenLogprob | None], k: int) -> list[TokenLogprob | None]:
    """The entries with their k most likely alternatives only (the engine computed the most any
    part of the request asked for)."""
    return [entry and dataclasses.replace(entry, top=entry.top[:k]) for entry in entries]


def prompt_logprobs_list(tokenizer: Tokenizer, entries: list[TokenLogprob | None] | None, k: int) -> list | None:
    """vLLM's `prompt_logprobs`: per prompt token, null for the first, else {token id: {logprob,
    rank, decoded_token}} for the prompt token and its k most likely alternatives."""
    if entries is None:
        return None

    def position(entry: TokenLogprob | None) -> dict | None:
        if entry is None:
            return None
        ranked = {entry.token_id: (entry.logprob, entry.rank)}
        for rank, (token_id, logprob) in enumerate(entry.top[:k], start=1):
            ranked.setdefault(token_id, (logprob, rank))
        return {str(t): {"logprob": lp, "rank": r, "decoded_token": token_text(tokenizer, t)}
                for t, (lp, r) in ranked.items()}

    return [position(entry) for entry in entries]


class UsageCounter:
    """The usage of a streamed request so far (`stream_options.continuous_usage_stats`)."""

    def __init__(self, prompt_tokens: int):
        self.prompt_tokens = prompt_tokens
        self._output_tokens: dict[tuple[int, int], int] = {}  # (prompt, completion) -> tokens

    def add(self, prompt_index: int, out: RequestOutput) -> None:
        self._output_tokens[prompt_index, out.index] = max(out.num_output_tokens,
                                                           self._output_tokens.get((prompt_index, out.index), 0))

    def usage(self) -> dict:
        completion_tokens = sum(self._output_tokens.values())
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens}


def chat_logprobs(tokenizer: Tokenizer, entries: list[TokenLogprob]) -> dict:
    def item(token_id: int, logprob: float) -> dict:
        return {"token": token_text(tokenizer, token_id), "logprob": logprob,
                "bytes": list(tokenizer.token_bytes(token_id))}

    return {"content": [{**item(e.token_id, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]}
                        for e in entries]}


def logprobs_of_text(tokenizer: Tokenizer, entries: list[TokenLogprob], text: str) -> list[TokenLogprob]:
    """The leading entries whose tokens make up `text`: for a reply cut by a stop string, the
    tokens that hold only stop-string text are dropped, so that the logprob tokens join back into
    the content (a token holding both the end of the content and the start of the stop string
    stays). Counted in UTF-8 bytes, which tokens split exactly."""
    kept, size, target = [], 0, len(text.encode("utf-8", "surrogatepass"))
    for entry in entries:
        if size >= target:
            break
        kept.append(entry)
        size += len(tokenizer.token_bytes(entry.token_id))
    return kept


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def sse(payload: dict) -> str:
    return f"data: {utf8_safe(json.dumps(payload, ensure_ascii=False))}\n\n"


SSE_DONE = "data: [DONE]\n\n"


async def build_stop_strings(params: SamplingParams) -> None:
    """Build the request's stop-string automaton in a worker thread (up to ~30 ms for 64 strings
    of 256 characters), so that neither the event loop nor the engine thread builds it: the
    engine finds it in `automaton_for`'s cache."""
    if params.stop:
        await run_in_threadpool(automaton_for, params.stop)


def engine_api_error(exc: Exception) -> APIError | None:
    """The client's view of an engine error (None: an unexpected one, shown as a bare 500)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, EngineDeadError):
        return APIError(503, "The engine is not running; the server cannot serve requests.",
                        "service_unavailable", code="engine_dead")
    if isinstance(exc, ServerShuttingDownError):
        return APIError(503, "The server is shutting down; retry the request.", "service_unavailable",
                        code="shutting_down", headers={"Retry-After": "1"})
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

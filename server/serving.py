"""The serving base of chat, completions and responses: the server's state, and an API request
turned into what the engine runs, once.

A route checks its body, then resolves here what it asks of the engine (`request_options`: the
StreamingLLM policy, session, cache salt, API key and deadline, each decided once), its output
budget and sampling params, and builds its `Job`: one `EngineRequest` per prompt, made by the
engine's input processor (`engine_requests`, in a worker thread), whose errors become the API's
400s. server/job_runner.py runs the job; each endpoint keeps only its own format.
"""

from __future__ import annotations

import functools
import re
import time
from dataclasses import dataclass, field

from fastapi import Request

from model.sampling_params import SamplingParams, SamplingParamsError
from model.tokenizers.tokenizer import Tokenizer
from scheduler.engine_request import EngineRequest
from scheduler.input_processor import PromptTooLongError
from scheduler.sink_policy import SinkPolicy
from scheduler.stop_strings import automaton_for
from server.async_engine import AsyncEngine
from server.chat_template import ChatTemplate
from server.defaults import DEFAULT_MAX_OUTPUT_TOKENS, DEFAULT_MAX_TOKENS
from server.errors import APIError
from server.generation_config import GenerationDefaults
from server.grammar_compiler import DEFAULT_COMPILE_TIMEOUT, GrammarCompiler
from server.logprobs import check_logprob_volume
from server.metrics import Metrics
from server.middleware import request_tenant
from server.protocol import SESSION_ID_PATTERN, SamplingFields
from server.response_store import MemoryResponseStore, ResponseStore
from server.tool_parsers import ToolParser, tool_parser

# Bytes of text per token at most, times this, bounds the text a dense prompt may have before it
# is tokenized: Unicode normalisation composes a few bytes into one character at most.
_NORMALIZATION_SLACK = 4
_SESSION_ID = re.compile(SESSION_ID_PATTERN)
# The fields of SamplingParams whose default a request that leaves them out takes from the
# model's generation config (server/generation_config.py), with the API's own default.
_MODEL_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": None, "min_p": 0.0, "repetition_penalty": 1.0}


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
        return GrammarCompiler(self.engine, timeout=self.grammar_compile_timeout)

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


@dataclass(frozen=True)
class RequestOptions:
    """What a request asks of the engine besides its prompts and sampling, checked and decided once."""

    sink_policy: SinkPolicy | None  # its StreamingLLM policy; None: dense attention within the context
    session_id: str | None  # the engine's name for its session (`session_key`)
    cache_salt: str | None
    tenant: str | None  # its API key's id
    deadline: float | None  # time.monotonic() at which it ends with stop_reason "timeout"

    @property
    def windowed(self) -> bool:
        """Whether a window bounds its context (so that it never fills up)."""
        return self.sink_policy is not None


@dataclass
class Job:
    """One validated API request, ready to run: an engine request per prompt."""

    request_id: str
    header: dict  # id, object, created, model: the fields every response chunk repeats
    requests: list[EngineRequest]
    streamed: bool = False  # the client reads the outputs as they come (backpressure applies)

    @property
    def params(self) -> SamplingParams:
        return self.requests[0].params

    @property
    def prompts(self) -> list[list[int]]:
        return [request.prompt_token_ids for request in self.requests]


def session_key(raw: Request, session_id: str, param: str) -> str:
    """The engine's name for a client's session: checked, and kept apart per API key (two keys
    using one session id have two sessions, and neither can reach or detect the other's)."""
    if not _SESSION_ID.fullmatch(session_id):
        raise APIError(400, "session ids are 1-256 letters, digits and ._:/+=-", param=param)
    tenant = request_tenant(raw.scope)
    return session_id if tenant is None else f"{tenant}/{session_id}"


def request_options(state: ServerState, raw: Request, attention_sinks: int | None, attention_window: int | None,
                    session_id: str | None, salt: str | None, timeout: float | None) -> RequestOptions:
    """A request's RequestOptions: the StreamingLLM policy its sinks and window resolve to (400 if
    it cannot run), and its prefix-cache salt: its API key's tenant (unless the operator shares the
    cache between keys and the request has no `salt` of its own), with `salt` on top."""
    try:
        policy = state.engine.input_processor.sink_policy(attention_sinks, attention_window)
    except ValueError as exc:
        raise APIError(400, str(exc), param="attention_window") from exc
    tenant = request_tenant(raw.scope)
    key_salt = None if state.shared_prefix_cache and salt is None else tenant  # a request's own salt stays its key's
    parts = [part for part in (key_salt, salt) if part is not None]
    timeout = timeout or state.request_timeout
    return RequestOptions(policy, session_id, "\0".join(parts) if parts else None, tenant,
                          time.monotonic() + timeout if timeout else None)


def sampling_options(state: ServerState, body: SamplingFields, raw: Request) -> RequestOptions:
    """The RequestOptions of a chat or completions request: its session (`session_id`, else the
    X-Session-ID header) needs n = 1."""
    session_id = None
    if body.session_id is not None:
        session_id = session_key(raw, body.session_id, "session_id")
    elif raw.headers.get("x-session-id") is not None:
        session_id = session_key(raw, raw.headers["x-session-id"], "X-Session-ID")
    options = request_options(state, raw, body.attention_sinks, body.attention_window, session_id, body.cache_salt,
                              body.request_timeout)
    if session_id is not None and body.n != 1:
        raise APIError(400, "session_id needs n = 1", param="n")
    return options


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


def sampling_params(state: ServerState, body, max_tokens: int | None, **fields) -> SamplingParams:
    """A request's SamplingParams: `body`'s temperature, top_p, top_k, min_p and
    repetition_penalty, or the model's defaults for those it leaves out, and `fields`."""
    def pick(name: str):
        value = getattr(body, name, None)
        return value if value is not None else state.generation.sampling.get(name, _MODEL_DEFAULTS[name])

    try:
        return SamplingParams(**{name: pick(name) for name in _MODEL_DEFAULTS}, max_tokens=max_tokens,
                              default_max_tokens=state.default_max_tokens, **fields)
    except SamplingParamsError as exc:
        raise APIError(400, str(exc), param=exc.param) from exc


def request_sampling_params(state: ServerState, body: SamplingFields, max_tokens: int | None,
                            logprobs: int | None, prompt_logprobs: int | None = None) -> SamplingParams:
    """The SamplingParams of a chat or completions request."""
    return sampling_params(
        state, body, max_tokens, n=body.n, presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty, seed=body.seed, min_tokens=body.min_tokens, stop=body.stop or (),
        stop_token_ids=body.stop_token_ids or (), ignore_eos=body.ignore_eos,
        include_stop_str_in_output=body.include_stop_str_in_output, logprobs=logprobs,
        prompt_logprobs=prompt_logprobs, skip_special_tokens=body.skip_special_tokens,
        logit_bias=body.logit_bias or None)


def check_stream_options(body) -> None:
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "stream_options is only allowed when stream is true", param="stream_options")


def engine_requests(state: ServerState, request_id: str, prompts: list[list[int]], params: SamplingParams,
                    options: RequestOptions, compiled_grammar: object | None, param: str) -> list[EngineRequest]:
    """The engine's request for each prompt (`{request_id}-{index}`), built and checked by its input
    processor: call it in a worker thread. A prompt past the context is a 400 as OpenAI words it
    (naming `param`, the messages or the prompt), any other problem a 400 naming its field."""
    process = state.engine.input_processor.process
    requests = []
    for index, token_ids in enumerate(prompts):
        try:
            requests.append(process(f"{request_id}-{index}", token_ids, params, sink_policy=options.sink_policy,
                                    session_id=options.session_id,
                                    deadline=options.deadline, cache_salt=options.cache_salt,
                                    tenant=options.tenant, compiled_grammar=compiled_grammar))
        except PromptTooLongError as exc:
            where = "messages" if param == "messages" else "prompt"
            max_tokens = params.max_tokens or 0
            raise APIError(
                400, f"This model's maximum context length is {state.max_model_len} tokens. However, you "
                     f"requested {len(token_ids) + max_tokens} tokens ({len(token_ids)} in the {where}, {max_tokens} "
                     f"in the completion). Please reduce the length of the {where} or completion.",
                param=param, code="context_length_exceeded") from exc
        except ValueError as exc:
            raise APIError(400, str(exc), param=getattr(exc, "param", None) or param) from exc
    return requests


def prepare_job(state: ServerState, request_id: str, header: dict, prompts: list[list[int]],
                params: SamplingParams, options: RequestOptions, compiled_grammar: object | None, param: str,
                streamed: bool) -> Job:
    """The Job of a checked request: its engine requests, its logprobs and the waiting queue
    checked, and its stop strings' automaton built (up to ~30 ms for 64 strings of 256
    characters), where the engine finds it in `automaton_for`'s cache. Call it in a worker thread,
    in the same call that renders or tokenizes the prompts: each hop to a worker thread is a wait
    a request pays in its time to first token."""
    requests = engine_requests(state, request_id, prompts, params, options, compiled_grammar, param)
    check_logprob_volume(state.max_model_len, params, [len(ids) for ids in prompts])
    state.check_capacity(len(prompts) * params.n)
    if params.stop:
        automaton_for(params.stop)
    return Job(request_id, header, requests, streamed)

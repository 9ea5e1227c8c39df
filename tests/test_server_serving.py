"""The serving base's seams, without a model: a request's EngineRequests built once by the
engine's input processor (and its errors as the API's 400s), the async engine handing those
requests to `Engine.add` and ending sessions on its own thread, the grammar compiler reading
the engine's cache through AsyncEngine, and the chunk stream's usage."""

from __future__ import annotations

import asyncio
import json
import threading
from types import SimpleNamespace

import pytest

from model.sampling_params import SamplingParams
from scheduler.engine_request import EngineRequest
from scheduler.input_processor import InputLimits, InputProcessor
from scheduler.output_processor import RequestOutput
from server.async_engine import ENGINE_THREAD_NAME, AsyncEngine
from server.errors import APIError
from server.grammar_compiler import GrammarCompiler
from server.protocol import StreamOptions
from server.serving import RequestOptions, engine_requests
from server.streaming import SSE_DONE, ChunkStream

LIMITS = InputLimits(vocab_size=100, max_model_len=32, max_num_seqs=4, num_kv_blocks=64, block_size=4,
                     attention_sinks=4, attention_window=None)


def _state() -> SimpleNamespace:
    processor = InputProcessor(tokenizer=None, limits=LIMITS)  # token-id prompts are never encoded
    return SimpleNamespace(engine=SimpleNamespace(input_processor=processor), max_model_len=LIMITS.max_model_len)


def _options(policy=None, session_id=None) -> RequestOptions:
    return RequestOptions(policy, session_id, "salt", "tenant", None)


def test_engine_requests_are_built_once_per_prompt_with_the_decided_options():
    state = _state()
    policy = state.engine.input_processor.sink_policy(2, 8)
    params = SamplingParams(max_tokens=4)
    requests = engine_requests(state, "cmpl-1", [[1, 2], [3]], params, _options(policy), "compiled", "prompt")
    assert [r.request_id for r in requests] == ["cmpl-1-0", "cmpl-1-1"]
    assert [r.prompt_token_ids for r in requests] == [[1, 2], [3]]
    assert all(r.sink_policy == policy and r.params is params and r.compiled_grammar == "compiled"
               and (r.cache_salt, r.tenant) == ("salt", "tenant") for r in requests)
    dense = engine_requests(state, "cmpl-2", [[1]], params, _options(), None, "prompt")
    assert dense[0].sink_policy is None


@pytest.mark.parametrize("params, param", [
    (SamplingParams(logit_bias={100: 1.0}), "logit_bias"),
    (SamplingParams(stop_token_ids=(100,)), "stop_token_ids"),
    (SamplingParams(n=5), "messages"),
])
def test_an_input_the_processor_refuses_is_a_400_naming_its_field(params, param):
    with pytest.raises(APIError) as caught:
        engine_requests(_state(), "chatcmpl-1", [[1, 2]], params, _options(), None, "messages")
    assert caught.value.status == 400 and caught.value.param == param


def test_a_prompt_past_the_context_is_openais_context_length_error():
    with pytest.raises(APIError) as caught:
        engine_requests(_state(), "chatcmpl-1", [list(range(30))], SamplingParams(max_tokens=5), _options(), None,
                        "messages")
    error = caught.value
    assert error.code == "context_length_exceeded" and error.param == "messages"
    assert error.message.startswith("This model's maximum context length is 32 tokens. However, you requested 35 "
                                    "tokens (30 in the messages, 5 in the completion).")


class _FakeEngine:
    """What AsyncEngine drives of the engine, recording the thread each call ran on."""

    def __init__(self):
        self.added: list[tuple[EngineRequest, str]] = []
        self.ended: list[tuple[str, str]] = []
        self.sessions = {"a", "b", "c"}
        self.structured_output = SimpleNamespace(cached=lambda grammar, salt: f"cached {grammar} for {salt}")
        self.num_sessions = 0
        self._pending: list[EngineRequest] = []

    def add(self, request: EngineRequest) -> None:
        self.added.append((request, threading.current_thread().name))
        self._pending.append(request)

    def has_unfinished_requests(self) -> bool:
        return bool(self._pending)

    def step(self) -> list[RequestOutput]:
        done, self._pending = self._pending, []
        return [RequestOutput(r.request_id, 0, [7], "x", True, "stop", num_output_tokens=1) for r in done]

    def abort(self, request_id: str) -> list:
        return []

    def end_session(self, session_id: str) -> bool:
        self.ended.append((session_id, threading.current_thread().name))
        if session_id not in self.sessions:
            return False
        self.sessions.discard(session_id)
        return True

    def expire_sessions(self) -> int:
        return 0


def _with_async_engine(scenario):
    engine = _FakeEngine()

    async def run():
        async_engine = AsyncEngine(engine)
        async_engine.start()
        try:
            return await scenario(async_engine)
        finally:
            async_engine.stop()

    return engine, asyncio.run(run())


def test_generate_hands_the_request_itself_to_engine_add_on_the_engine_thread():
    request = EngineRequest("r-0", [1, 2], SamplingParams(max_tokens=1))

    async def scenario(async_engine):
        return [outputs async for outputs in async_engine.generate(request, client_reads=False)]

    engine, outputs = _with_async_engine(scenario)
    assert engine.added == [(request, ENGINE_THREAD_NAME)]
    assert [[out.text for out in step] for step in outputs] == [["x"]]


def test_sessions_end_on_the_engine_thread():
    async def scenario(async_engine):
        found = await async_engine.end_session("a")
        missing = await async_engine.end_session("nope")
        await async_engine.end_sessions(["b", "c"])
        await async_engine.end_sessions([])
        return found, missing

    engine, (found, missing) = _with_async_engine(scenario)
    assert (found, missing) == (True, False)
    assert engine.ended == [(s, ENGINE_THREAD_NAME) for s in ("a", "nope", "b", "c")]
    assert engine.sessions == set()


def test_ending_sessions_of_a_stopped_engine_is_not_an_error():
    async def run():
        await AsyncEngine(_FakeEngine()).end_sessions(["a"])

    asyncio.run(run())


def test_the_grammar_compiler_finds_a_cached_grammar_through_the_async_engine():
    async def run():
        return await GrammarCompiler(AsyncEngine(_FakeEngine())).compile("start: /a/", "salt", "tenant")

    assert asyncio.run(run()) == "cached start: /a/ for salt"


def _payloads(events: list[str]) -> list:
    return [event if event == SSE_DONE else json.loads(event.removeprefix("data: ")) for event in events]


def _out(index: int, tokens: int, finished: bool = False, cached: int = 0) -> RequestOutput:
    return RequestOutput("r", index, [1], "t", finished, "stop" if finished else None, num_output_tokens=tokens,
                         num_cached_tokens=cached)


def test_a_chunk_stream_carries_the_usage_stream_options_ask_for():
    continuous = ChunkStream({"id": "c"}, StreamOptions(include_usage=True, continuous_usage_stats=True), 5)
    first = continuous.chunk({"index": 0})
    continuous.usage.add(0, _out(0, 1))
    continuous.usage.add(0, _out(1, 2, finished=True))
    continuous.usage.add(0, _out(0, 3, finished=True, cached=4))
    events = _payloads([first, continuous.chunk({"index": 0}), *continuous.end()])
    assert events[0]["usage"]["completion_tokens"] == 0 and events[1]["usage"]["completion_tokens"] == 5
    assert events[2] == {"id": "c", "choices": [], "usage": {
        "prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10, "prompt_tokens_details": {"cached_tokens": 4}}}
    assert events[3] == SSE_DONE
    only_final = ChunkStream({"id": "c"}, StreamOptions(include_usage=True), 5)
    assert _payloads([only_final.chunk({})])[0]["usage"] is None
    plain = ChunkStream({"id": "c"}, None, 5)
    assert "usage" not in _payloads([plain.chunk({})])[0] and list(plain.end()) == [SSE_DONE]

"""Server-sent events of chat and completions, and errors in and after a stream.

`ChunkStream` writes a streamed request's chunks: each carries the response's header and, as
`stream_options` asks, the usage so far (`continuous_usage_stats`) or a null usage
(`include_usage`); the stream ends with the usage chunk (with its cached tokens) and [DONE].
Once the headers are sent an error has to travel inside the stream: `guarded` ends a stream with
an error event and [DONE] instead of a cut connection.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Iterator

from scheduler.output_processor import RequestOutput
from server.async_engine import EngineDeadError, RequestFailedError, ServerShuttingDownError
from server.errors import APIError, sse_error, utf8_safe
from server.protocol import StreamOptions

logger = logging.getLogger(__name__)

SSE_DONE = "data: [DONE]\n\n"


def sse(payload: dict) -> str:
    return f"data: {utf8_safe(json.dumps(payload, ensure_ascii=False))}\n\n"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


class UsageCounter:
    """A request's usage: the tokens generated so far, and the totals of its finished completions
    (the cached prompt tokens counted once per prompt, from its first completion)."""

    def __init__(self, prompt_tokens: int):
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0  # of the finished completions
        self.cached_tokens = 0
        self._output_tokens: dict[tuple[int, int], int] = {}  # (prompt, completion) -> tokens so far
        self._output_total = 0  # their sum

    def add(self, prompt_index: int, out: RequestOutput) -> None:
        key = (prompt_index, out.index)
        previous = self._output_tokens.get(key, 0)
        if out.num_output_tokens > previous:
            self._output_tokens[key] = out.num_output_tokens
            self._output_total += out.num_output_tokens - previous
        if out.finished:
            self.completion_tokens += out.num_output_tokens
            if out.index == 0:
                self.cached_tokens += out.num_cached_tokens

    def so_far(self) -> dict:
        """`stream_options.continuous_usage_stats`'s usage."""
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self._output_total,
                "total_tokens": self.prompt_tokens + self._output_total}

    def total(self) -> dict:
        return usage(self.prompt_tokens, self.completion_tokens, self.cached_tokens)


class ChunkStream:
    """The chunks of one streamed chat or completions response (see the module's docstring)."""

    def __init__(self, header: dict, stream_options: StreamOptions | None, prompt_tokens: int):
        self.header = header  # id, object, created, model
        self.include_usage = bool(stream_options and stream_options.include_usage)
        self.continuous_usage = bool(stream_options and stream_options.continuous_usage_stats)
        self.usage = UsageCounter(prompt_tokens)

    def chunk(self, choice: dict) -> str:
        payload = {**self.header, "choices": [choice]}
        if self.continuous_usage:
            payload["usage"] = self.usage.so_far()
        elif self.include_usage:
            payload["usage"] = None
        return sse(payload)

    def end(self) -> Iterator[str]:
        if self.include_usage:
            yield sse({**self.header, "choices": [], "usage": self.usage.total()})
        yield SSE_DONE


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


def stream_error(exc: Exception) -> APIError:
    """What a stream whose headers are sent tells its client about an error (an unexpected one is
    logged, and shown as a bare 500)."""
    error = engine_api_error(exc)
    if error is None:
        logger.exception("stream failed")
        error = APIError(500, "The server had an error while processing the request.", "internal_error")
    return error


async def guarded(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """A stream that ends with an error event and [DONE] instead of a cut connection."""
    try:
        async for event in events:
            yield event
    except Exception as exc:  # headers are sent: the error has to travel inside the stream
        error = stream_error(exc)
        yield sse_error(error.message, error.type, error.code)
        yield SSE_DONE

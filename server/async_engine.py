"""The engine in its own thread, and the asyncio side that requests await.

The event loop never runs the model. Requests hand commands (add, abort) to the engine thread
under a condition variable; the thread sleeps on it while idle (no polling), runs `step()`
while there is work, and hands each step's outputs back to the event loop in one
`call_soon_threadsafe`, where they are routed to per-request streams.

Backpressure: a request's outputs wait in its stream until its reader takes them. A client that
stops reading an SSE stream stalls its reader (the server's `send` waits on the socket) while
the engine goes on generating; once more than MAX_UNREAD_TOKENS tokens are unread, the request
is aborted (its KV blocks go back at once), its unread outputs are dropped, and its stream ends
with StreamStalledError if it is ever read again.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import threading
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from scheduler.engine import Engine
from scheduler.engine_request import EngineRequest
from scheduler.engine_stats import EngineStats
from scheduler.input_processor import InputProcessor
from scheduler.output_processor import RequestOutput
from server.errors import APIError

logger = logging.getLogger(__name__)

ENGINE_THREAD_NAME = "sinkserve-engine"  # the OS keeps 15 characters: "sinkserve-engin"
PR_SET_NAME = 15  # prctl option (linux/prctl.h)

# How far a request's reader may fall behind before the request is aborted: unread generated
# tokens, each logprob alternative sent with a token counting as one more (until read, a token
# costs ~0.5 KB of memory, an alternative ~0.15 KB). A reader that keeps up is never more than a
# step behind, and the socket's buffers (megabytes on Linux) absorb a pause in its reading first;
# a client that stops reading costs at most ~2-3 MB of RSS (measured). A reader slower than
# generation falls behind by the difference, and is aborted once it is this far behind.
MAX_UNREAD_TOKENS = 4096


class EngineDeadError(RuntimeError):
    """The engine loop has stopped; no request can be served."""


class ServerShuttingDownError(RuntimeError):
    """The server is shutting down and ended this request before it produced anything: the
    client should retry it elsewhere (503)."""


class RequestFailedError(RuntimeError):
    """The engine failed while computing this request (the others go on); the cause is logged."""


class StreamStalledError(APIError):
    """The client left more than MAX_UNREAD_TOKENS generated tokens unread: its request was
    aborted. An APIError, since the client caused it: its stream ends with this error event."""

    def __init__(self):
        super().__init__(408, f"The client did not read this stream: more than {MAX_UNREAD_TOKENS} generated "
                              "tokens were unread, so the request was aborted.", code="stream_stalled")


def _unread_weight(outputs: list[RequestOutput]) -> int:
    """What outputs count against MAX_UNREAD_TOKENS: their tokens and logprob alternatives."""
    return sum(len(out.new_token_ids) + sum(len(entry.top) for entry in out.logprobs or ()) for out in outputs)


@dataclass
class _Stream:
    """A request's outputs (a list per step) or error, on their way to its reader."""

    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    unread: int = 0  # the weight of the outputs queued (_unread_weight)
    limit: float = float("inf")  # past it the request is aborted (inf: the server reads it all)


class AsyncEngine:
    """Runs Engine.step() in a dedicated thread; `generate` yields a request's outputs."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._cond = threading.Condition()
        self._adds: list[EngineRequest] = []
        self._aborts: list[str] = []
        self._calls: list[tuple[Callable[[Engine], Any], asyncio.Future]] = []
        self._stopping = False
        self._shutting_down = False  # abort_all was called
        self._streams: dict[str, _Stream] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self._last_expiry = time.monotonic()
        self.num_stalled_streams = 0  # requests aborted because their client stopped reading

    @property
    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    @property
    def num_active_requests(self) -> int:
        return len(self._streams)

    @property
    def num_waiting_requests(self) -> int:
        """Requests not yet running: handed over to the engine thread or in its waiting queue."""
        return len(self._adds) + self.engine.stats().num_waiting

    def stats(self) -> EngineStats:
        """The engine's state and counters now (read from this thread: a step may be under way)."""
        return self.engine.stats()

    @property
    def input_processor(self) -> InputProcessor:
        """Turns a prompt and a request's options into the EngineRequest `generate` takes; it
        reads only startup settings and the tokenizer, so any thread may call it."""
        return self.engine.input_processor

    # Grammars: the server's GrammarCompiler tries each in a sandbox, then compiles it into the
    # engine's cache (in a thread of its own), and hands the compiled form to the request.

    def cached_grammar(self, grammar: str, salt: str | None) -> object | None:
        """The compiled grammar in the engine's cache under this prefix-cache salt, if any."""
        return self.engine.structured_output.cached(grammar, salt)

    def compile_grammar(self, grammar: str, salt: str | None, tenant: str | None, num_bytes: int | None) -> object:
        """Compile a grammar into tenant's share of the engine's cache (`num_bytes`: what the
        sandbox measured); GrammarError if it does not compile. Blocking: call it in a thread."""
        return self.engine.structured_output.compile(grammar, salt, tenant, num_bytes)

    def grammar_vocabulary(self) -> dict:
        """What a grammar sandbox needs to compile as the engine does: the vocabulary's payload,
        the model's vocabulary size and its end-of-sequence ids. Blocking (the vocabulary is
        built on first use, ~0.1 s)."""
        structured = self.engine.structured_output
        return {"vocab": structured.vocab.payload(), "n_vocab": structured.vocab_size,
                "eos_token_ids": structured.eos_token_ids}

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name=ENGINE_THREAD_NAME, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)

    async def generate(self, request: EngineRequest, client_reads: bool = True) -> AsyncIterator[list[RequestOutput]]:
        """The request's outputs, a list per engine step, until all n completions finish.

        Leaving the iteration early (the client went away) aborts the request. Raises
        ServerShuttingDownError if the shutdown (abort_all) ends it before it produced a token,
        and, when `client_reads` (a stream: the client reads the outputs as they come),
        StreamStalledError once the reader is MAX_UNREAD_TOKENS (or 8 steps) behind.
        """
        if not self.is_alive:
            raise EngineDeadError("the engine loop is not running")
        if self._shutting_down:
            raise ServerShuttingDownError("the server is shutting down")
        request_id, params = request.request_id, request.params
        stream = _Stream()
        if client_reads:
            # A step adds n x (1 + alternatives) to the weight: a reader a few steps behind (the
            # event loop busy for a moment) is never taken for one that stopped reading.
            stream.limit = max(MAX_UNREAD_TOKENS, 8 * params.n * (1 + (params.logprobs or 0)))
        self._streams[request_id] = stream
        self._submit(adds=[request])
        remaining = params.n
        produced = False  # any output token yet
        try:
            while remaining:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                if any(out.finish_reason == "error" for out in item):
                    remaining = 0  # the engine has ended all n completions
                    raise RequestFailedError("The server had an error while generating this request. "
                                             "Other requests are not affected; it may be retried.")
                stream.unread -= _unread_weight(item)
                produced = produced or any(out.new_token_ids for out in item)
                if not produced and self._shutting_down and any(out.finish_reason == "abort" for out in item):
                    raise ServerShuttingDownError("the server shut down before this request was served")
                remaining -= sum(out.finished for out in item)
                yield item
        finally:
            self._streams.pop(request_id, None)
            if remaining:
                self._submit(aborts=[request_id])

    async def end_session(self, session_id: str) -> bool:
        """End a session (drop its cache) on the engine thread, between steps; False if there
        was none."""
        return await self._call(lambda engine: engine.end_session(session_id))

    async def end_sessions(self, session_ids: list[str]) -> None:
        """End several sessions in one trip to the engine thread; a dead engine keeps none."""
        if session_ids:
            with contextlib.suppress(EngineDeadError):
                await self._call(lambda engine: [engine.end_session(session) for session in session_ids])

    async def _call(self, fn: Callable[[Engine], Any]) -> Any:
        """Run fn(engine) on the engine thread, between steps, and return its result."""
        if not self.is_alive:
            raise EngineDeadError("the engine loop is not running")
        future = self._loop.create_future()
        with self._cond:
            self._calls.append((fn, future))
            self._cond.notify()
        return await future

    def abort_all(self) -> None:
        """Abort every request (shutdown) and take no new one. Requests that produced tokens
        end with finish_reason 'abort'; the others raise ServerShuttingDownError, to be retried."""
        self._shutting_down = True
        self._submit(aborts=list(self._streams))

    def _submit(self, adds: list[EngineRequest] = (), aborts: list[str] = ()) -> None:
        with self._cond:
            self._adds.extend(adds)
            self._aborts.extend(aborts)
            self._cond.notify()

    # -- engine thread -----------------------------------------------------------------------

    def _run(self) -> None:
        _name_os_thread(ENGINE_THREAD_NAME)
        try:
            while True:
                with self._cond:
                    while not (self._adds or self._aborts or self._calls or self._stopping
                               or self.engine.has_unfinished_requests()):
                        # Idle: sleep until work arrives, waking once a second only while
                        # sessions are kept, to expire them.
                        self._cond.wait(timeout=1.0 if self.engine.num_sessions else None)
                        self._expire_sessions()
                    if self._stopping:
                        return
                    adds, self._adds = self._adds, []
                    aborts, self._aborts = self._aborts, []
                    calls, self._calls = self._calls, []
                self._expire_sessions()
                for fn, future in calls:
                    self._loop.call_soon_threadsafe(settle, future, *_run(fn, self.engine))
                outputs: list[RequestOutput | tuple[str, BaseException]] = []
                for request in adds:
                    try:
                        self.engine.add(request)
                    except ValueError as exc:  # its id is in use, or its grammar is refused
                        outputs.append((request.request_id, exc))
                    except Exception as exc:  # a bug this request hit fails it alone, not the loop
                        logger.exception("adding request %s failed", request.request_id)
                        self.engine.abort(request.request_id)
                        outputs.append((request.request_id, exc))
                for request_id in aborts:
                    outputs.extend(self.engine.abort(request_id))
                if self.engine.has_unfinished_requests():
                    outputs.extend(self.engine.step())
                if outputs:
                    self._loop.call_soon_threadsafe(self._dispatch, outputs)
        except BaseException as exc:  # the loop is dead: fail everyone instead of hanging them
            logger.exception("engine loop died")
            self.error = exc
            # The details are in the log above; clients learn only that the engine stopped.
            self._loop.call_soon_threadsafe(self._fail_all, EngineDeadError("the engine loop has stopped"))

    def _expire_sessions(self) -> None:
        now = time.monotonic()
        if now - self._last_expiry >= 1.0:
            self._last_expiry = now
            self.engine.expire_sessions()

    # -- event loop side ---------------------------------------------------------------------

    def _dispatch(self, outputs: list) -> None:
        by_request: dict[str, list] = defaultdict(list)
        for item in outputs:
            if isinstance(item, tuple):
                stream = self._streams.get(item[0])
                if stream is not None:
                    stream.queue.put_nowait(item[1])
            else:
                by_request[item.request_id].append(item)
        for request_id, items in by_request.items():
            stream = self._streams.get(request_id)
            if stream is None:
                continue
            stream.queue.put_nowait(items)
            stream.unread += _unread_weight(items)
            if stream.unread > stream.limit:
                self._abort_stalled(request_id, stream)

    def _abort_stalled(self, request_id: str, stream: _Stream) -> None:
        """Abort a request whose client stopped reading, drop its unread outputs, and leave
        StreamStalledError for its reader."""
        self.num_stalled_streams += 1
        logger.warning("request %s aborted: its client stopped reading its stream (more than %d tokens unread)",
                       request_id, MAX_UNREAD_TOKENS)
        del self._streams[request_id]  # its last outputs (the abort) go nowhere
        while not stream.queue.empty():
            stream.queue.get_nowait()
        stream.queue.put_nowait(StreamStalledError())
        self._submit(aborts=[request_id])

    def _fail_all(self, error: BaseException) -> None:
        for stream in self._streams.values():
            stream.queue.put_nowait(error)
        for _, future in self._calls:
            settle(future, None, error)


def _name_os_thread(name: str) -> None:
    """Give the calling thread its name in the OS too (Linux: `top -H`, /proc/PID/task/*/comm),
    where Python 3.11 leaves every thread named after the process."""
    with contextlib.suppress(Exception):  # not Linux, or no libc: the name is only cosmetic
        ctypes.CDLL(None).prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0)


def _run(fn: Callable[[Engine], Any], engine: Engine) -> tuple[Any, BaseException | None]:
    try:
        return fn(engine), None
    except Exception as exc:
        return None, exc


def settle(future: asyncio.Future, result: Any = None, error: BaseException | None = None) -> None:
    """Give a future its result or error, unless it has one already (cancelled)."""
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)

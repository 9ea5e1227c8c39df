"""Grammars compiled for the engine without letting any request crash, stall or crowd out the
server.

llguidance is native code: a deep rule chain overflows its compiler's stack (the process dies),
a pattern-heavy schema compiles for minutes, and a regex of nested repetitions builds tens of
megabytes of lexer. So a grammar the cache does not hold is first tried in a sandbox process
(server/grammar_worker.py) that compiles it exactly as the engine will, on a stack a fraction
of the server's threads' (SERVER_THREAD_STACK_BYTES, server/defaults.py), under an
address-space limit, and is killed (then replaced) when the trial outruns `timeout`. A grammar
that crashed its sandbox, outran the deadline, or measured more than `max_grammar_bytes` is
refused (GrammarError: a 400 naming the parameter and the limit); one that passed is compiled
in the server, in one of the compiler's own threads, and cached in its API key's share of the
engine's grammar cache with the bytes the sandbox measured.

Compiles wait in a queue per API key (tenant), served in turn: one key's flood of slow grammars
delays that key's own, and another key's next grammar waits at most for the compiles already
running (`workers` of them, each at most `timeout` in the sandbox and about as long in the
server). No compile holds one of the server's request threads, and the same grammar asked by
several requests at once is compiled once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import pickle
import signal
import struct
import sys
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from scheduler.grammar_vocab import MAX_GRAMMAR_CHARS, PARSER_LIMITS
from scheduler.structured_output import GrammarError
from server.async_engine import AsyncEngine, settle
from server.defaults import DEFAULT_GRAMMAR_COMPILE_TIMEOUT

logger = logging.getLogger(__name__)

DEFAULT_COMPILE_TIMEOUT = DEFAULT_GRAMMAR_COMPILE_TIMEOUT  # seconds, --grammar-compile-timeout
DEFAULT_WORKERS = 2
# What one compiled grammar may hold (its lexer, mostly): a JSON schema takes some 0.1 MiB, a
# grammar of 128 tools 4 MiB, the nested repetitions ((a{100}){100}){300} 37.5 MiB.
MAX_GRAMMAR_BYTES = 32 * 2**20
# Address space a sandbox may add to what it holds when ready, before its allocations fail.
SANDBOX_MEMORY_BYTES = 2**30
MAX_QUEUED = 1024  # compiles of one API key waiting at most (then 503 for that key)
_STARTUP_TIMEOUT = 120.0


class CompilerBusyError(RuntimeError):
    """Too many compiles are waiting: the request should be retried later (503)."""


class CompilerUnavailableError(RuntimeError):
    """The sandbox processes cannot start: grammars cannot be compiled (503)."""


@dataclass
class _Job:
    grammar: str
    salt: str | None
    tenant: str | None
    future: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class _Sandbox:
    """One sandbox process and its pipes. A trial that does not end in its own answer (a
    deadline, a crash, a cancelled wait, an answer out of turn) leaves no process behind: the
    next trial starts a fresh one, so answers can never be read for the wrong grammar."""

    def __init__(self, setup: bytes):
        self._setup = setup
        self._process: asyncio.subprocess.Process | None = None
        self._trials = 0  # each request and its answer carry the trial's number

    async def start(self) -> None:
        root = str(Path(__file__).resolve().parents[1])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        try:
            self._process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "server.grammar_worker", stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE, env=env, start_new_session=True)
            self._send(self._setup)
            answer = await asyncio.wait_for(self._receive(), _STARTUP_TIMEOUT)
            if answer is None or not json.loads(answer).get("ready"):
                raise CompilerUnavailableError("a grammar sandbox did not start")
        except BaseException:
            await self.kill()
            raise

    async def trial(self, grammar: str, timeout: float) -> dict:
        """The sandbox's verdict on a grammar; GrammarError when the trial crashed the process
        or outran `timeout` (the process is replaced)."""
        if self._process is None or self._process.returncode is not None:
            await self.start()
        process = self._process
        self._trials += 1
        number = self._trials
        try:
            self._send(json.dumps({"id": number, "grammar": grammar}).encode())
            answer = await asyncio.wait_for(self._receive(), timeout)
        except asyncio.TimeoutError:
            await self.kill()
            raise GrammarError(f"the grammar took longer than {timeout:g} s to compile") from None
        except BaseException:  # cancelled: its answer would come to the next trial
            await asyncio.shield(self.kill())
            raise
        if answer is None:
            code = await process.wait()
            if self._process is process:
                self._process = None
            logger.warning("a grammar crashed its sandbox (exit status %d)", code)
            if code == -signal.SIGSEGV:  # llguidance's compiler overflowed its stack
                raise GrammarError("the grammar crashed the grammar compiler: it is nested too deeply (rules or "
                                   "$refs that refer to each other a few hundred levels deep)")
            raise GrammarError(f"the grammar crashed the grammar compiler (exit status {code}): it may need more "
                               f"than {SANDBOX_MEMORY_BYTES >> 20} MiB to compile")
        verdict = json.loads(answer)
        if verdict.get("id") != number:
            await self.kill()
            raise CompilerUnavailableError("a grammar sandbox answered out of turn")
        return verdict

    async def kill(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()

    def _send(self, payload: bytes) -> None:
        self._process.stdin.write(struct.pack(">I", len(payload)) + payload)

    async def _receive(self) -> bytes | None:
        stdout = self._process.stdout
        try:
            (size,) = struct.unpack(">I", await stdout.readexactly(4))
            return await stdout.readexactly(size)
        except (asyncio.IncompleteReadError, ConnectionError):
            return None


class GrammarCompiler:
    """The server's way to a compiled grammar: the cache, else a sandbox trial and a compile."""

    def __init__(self, engine: AsyncEngine, workers: int = DEFAULT_WORKERS,
                 timeout: float = DEFAULT_COMPILE_TIMEOUT, max_grammar_bytes: int = MAX_GRAMMAR_BYTES,
                 max_queued: int = MAX_QUEUED):
        self.engine = engine  # its grammar cache: cached_grammar, compile_grammar, grammar_vocabulary
        self.timeout = timeout
        self.max_grammar_bytes = max_grammar_bytes
        self.max_queued = max_queued
        self._num_slots = workers
        self._slots: list[tuple[_Sandbox, ThreadPoolExecutor]] = []  # built on first use
        self._idle: list[tuple[_Sandbox, ThreadPoolExecutor]] | None = None
        self._queues: OrderedDict[str | None, deque[_Job]] = OrderedDict()  # per tenant, served in turn
        self._inflight: dict[tuple[str | None, str], asyncio.Future] = {}
        self._starting: asyncio.Task | None = None
        self._stopped = False
        self.num_refused = 0  # grammars the sandbox refused (crash, deadline, memory)

    @property
    def num_queued(self) -> int:
        return sum(len(queue) for queue in self._queues.values())

    def start(self) -> None:
        """Start the sandboxes in the background (else the first grammar starts them)."""
        if self._starting is None and not self._stopped:
            self._starting = asyncio.ensure_future(self._start())
            # Its failure is logged, and given to the jobs waiting for it.
            self._starting.add_done_callback(lambda task: task.cancelled() or task.exception())

    async def _start(self) -> None:
        # The vocabulary is some 0.1 s of work for 49k tokens: not on the event loop.
        vocabulary = await asyncio.get_running_loop().run_in_executor(None, self.engine.grammar_vocabulary)
        setup = pickle.dumps({**vocabulary, "limits": PARSER_LIMITS, "memory_bytes": SANDBOX_MEMORY_BYTES})
        slots = [(_Sandbox(setup), ThreadPoolExecutor(1, thread_name_prefix="sinkserve-compile"))
                 for _ in range(self._num_slots)]
        started = await asyncio.gather(*(sandbox.start() for sandbox, _ in slots), return_exceptions=True)
        failures = [result for result in started if isinstance(result, BaseException)]
        if failures:
            logger.error("the grammar sandboxes did not start: %r", failures[0])
            for sandbox, executor in slots:
                await sandbox.kill()
                executor.shutdown(wait=False)
            self._starting = None  # the next request tries again
            self._fail_queued(CompilerUnavailableError("the grammar compiler is not available"))
            raise CompilerUnavailableError("the grammar sandboxes did not start") from failures[0]
        self._slots, self._idle = slots, list(slots)
        self._dispatch()

    async def stop(self) -> None:
        """Fail what waits and kill the sandboxes (they also die with the server process)."""
        self._stopped = True
        if self._starting is not None and not self._starting.done():
            self._starting.cancel()
        self._fail_queued(CompilerUnavailableError("the server is shutting down"))
        for sandbox, executor in self._slots:
            await sandbox.kill()
            executor.shutdown(wait=False)

    async def compile(self, grammar: str, salt: str | None, tenant: str | None) -> object:
        """The compiled matcher of `grammar` for a request with prefix-cache `salt` of API key
        `tenant`. Raises GrammarError (the grammar is refused), CompilerBusyError,
        CompilerUnavailableError."""
        if len(grammar) > MAX_GRAMMAR_CHARS:
            raise GrammarError(f"the grammar is longer than {MAX_GRAMMAR_CHARS} characters")
        matcher = self.engine.cached_grammar(grammar, salt)
        if matcher is not None:
            return matcher
        key = (salt, grammar)
        running = self._inflight.get(key)
        if running is not None:
            return await asyncio.shield(running)
        if self._stopped:
            raise CompilerUnavailableError("the server is shutting down")
        queued = len(self._queues.get(tenant, ()))
        if queued >= self.max_queued:
            raise CompilerBusyError(f"{queued} grammars of this API key are waiting to be compiled")
        job = _Job(grammar, salt, tenant)
        self._inflight[key] = job.future
        job.future.add_done_callback(lambda _: self._inflight.pop(key, None))
        self._queues.setdefault(tenant, deque()).append(job)
        if self._idle is None:
            self.start()  # its failure fails every queued job, this one included
        else:
            self._dispatch()
        return await asyncio.shield(job.future)

    def _fail_queued(self, error: Exception) -> None:
        """Fail every job still waiting for a slot (and the requests waiting for them)."""
        queues, self._queues = self._queues, OrderedDict()
        for queue in queues.values():
            for job in queue:
                settle(job.future, error=error)
                job.future.exception()  # retrieved: no warning when nobody waits for it any more

    def _dispatch(self) -> None:
        """Give idle slots the next jobs, one tenant after another."""
        while self._idle and self._queues and not self._stopped:
            tenant, queue = next(iter(self._queues.items()))
            job = queue.popleft()
            del self._queues[tenant]
            if queue:
                self._queues[tenant] = queue  # to the back of the turn
            slot = self._idle.pop()
            asyncio.ensure_future(self._run(job, slot))

    async def _run(self, job: _Job, slot: tuple[_Sandbox, ThreadPoolExecutor]) -> None:
        sandbox, executor = slot
        try:
            verdict = await sandbox.trial(job.grammar, self.timeout)
            if verdict["error"] is not None:
                raise GrammarError(verdict["error"])
            if verdict["bytes"] > self.max_grammar_bytes:
                raise GrammarError(f"the compiled grammar needs {verdict['bytes'] / 2**20:.1f} MiB, more than the "
                                   f"limit of {self.max_grammar_bytes / 2**20:g} MiB")
            matcher = await asyncio.get_running_loop().run_in_executor(
                executor, self.engine.compile_grammar, job.grammar, job.salt, job.tenant, verdict["bytes"] or None)
        except GrammarError as exc:
            self.num_refused += 1
            settle(job.future, error=exc)
        except Exception as exc:  # the sandbox could not be restarted, or a bug: this job fails alone
            logger.exception("compiling a grammar failed")
            settle(job.future, error=CompilerUnavailableError(str(exc)))
        else:
            settle(job.future, result=matcher)
        finally:
            self._idle.append(slot)
            self._dispatch()


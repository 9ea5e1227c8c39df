"""Running a Job through the async engine: every prompt's outputs merged in arrival order, with
latency metrics; a client that leaves (or an error) aborts what is still running."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable

from fastapi import Request
from fastapi.responses import Response

from scheduler.engine_request import EngineRequest
from scheduler.output_processor import RequestOutput
from server.async_engine import RequestFailedError
from server.json_response import json_response
from server.serving import Job, ServerState


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


async def run_prompts(state: ServerState, job: Job) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Every prompt's outputs as (prompt index, output), merged in arrival order, with metrics.

    Closing the iterator early (disconnect, shutdown) aborts what is still running.
    """
    arrival = time.monotonic()
    last_token_time: dict[tuple[int, int], float] = {}
    num_finished = [0] * len(job.requests)
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
    if len(job.requests) == 1:
        try:
            async with contextlib.aclosing(state.engine.generate(job.requests[0], job.streamed)) as outputs:
                async for item in outputs:
                    yield 0, item
        except Exception as exc:
            yield 0, exc
        return
    # Bounded: when the client stops reading, the pumps stop reading their streams too, so that
    # AsyncEngine's backpressure (MAX_UNREAD_TOKENS) sees it.
    queue: asyncio.Queue = asyncio.Queue(maxsize=len(job.requests))
    done = object()

    async def pump(index: int, request: EngineRequest):
        try:
            async for outputs in state.engine.generate(request, job.streamed):
                await queue.put((index, outputs))
            await queue.put((index, done))
        except Exception as exc:
            await queue.put((index, exc))

    tasks = [asyncio.create_task(pump(i, request)) for i, request in enumerate(job.requests)]
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


async def collected_response(raw: Request, collect: Awaitable[dict]) -> Response:
    """The JSON response `collect` builds, or 499 when the client left first (its requests aborted)."""
    result = await until_disconnected(raw, collect)
    return await json_response(result) if result is not None else Response(status_code=499)

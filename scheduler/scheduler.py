"""Continuous batching: which requests compute how many tokens in each step. Plain Python.

Each step fills a token budget and a sequence cap: running decodes first (one token each),
then prefill chunks of running requests, then newly admitted requests, first come first
served. A prompt longer than the budget is prefilled over several steps. When the pool has no
block for a running request, the newest running request is preempted: its blocks are freed and
it goes back to the front of the waiting queue, to be recomputed (prompt and output so far)
when there is room. The oldest request is preempted last, so it always progresses.

After a failed step the engine requeues the step's requests the same way and runs each one
alone (`schedule_alone`) to find the one that fails (fault_isolation.py).
"""

from __future__ import annotations

import functools
from collections import deque
from dataclasses import dataclass

from scheduler.block_manager import BlockManager
from scheduler.request import FinishReason, Request, RequestStatus
from scheduler.scheduler_output import SchedulerOutput, build_model_input
from scheduler.sessions import HostTier, SessionStore
from scheduler.sink_window import SinkWindow


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int = 2048

    def __post_init__(self):
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1 or self.max_model_len < 1:
            raise ValueError("max_num_seqs, max_num_batched_tokens and max_model_len must be positive")


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager, session_ttl: float = 600.0,
                 host: HostTier | None = None):
        self.config = config
        self.block_manager = block_manager
        self.sessions = SessionStore(block_manager, session_ttl, host)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self.sink_window = SinkWindow(block_manager)
        self._finished_request_ids: list[str] = []  # ended since the last step, for the executor to forget

    @property
    def num_evictions(self) -> int:
        """Sink evictions so far (sink_window.py)."""
        return self.sink_window.num_evictions

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def add_request(self, request: Request) -> None:
        self.waiting.append(request)

    def finish_request(self, request: Request, reason: FinishReason, stop_reason: int | str | None = None) -> None:
        """Take a request out of the queues and free its blocks at once (idempotent)."""
        if request.status is RequestStatus.WAITING:
            if request in self.waiting:  # else not queued yet: nothing to take out
                self.waiting.remove(request)
        elif request in self.running:  # running, or already marked finished by the output processor
            self.running.remove(request)
        has_cache = self.block_manager.has_seq(request.request_id)
        # A cache from a failed computation is not kept. A session request that ends with no
        # cache (waiting, or failed) frees its session all the same.
        if request.session_id is not None and has_cache and reason is not FinishReason.ERROR:
            self.sessions.keep(request)
        else:
            if has_cache:
                self.block_manager.free(request.request_id)
            if request.session_id is not None:
                self.sessions.release(request)
        if not request.is_finished:
            request.finish(reason, stop_reason)
        self._finished_request_ids.append(request.request_id)

    def schedule(self) -> SchedulerOutput:
        self.block_manager.release_copy_sources()
        batch = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        preemptions_before = self.num_preemptions
        # Running decodes first, then running prefill chunks, each in arrival order. Completions
        # forked during this loop are not in these lists: they only sample this step.
        decodes = [r for r in self.running if r.num_uncomputed_tokens == 1]
        prefills = [r for r in self.running if r.num_uncomputed_tokens > 1]
        for request in decodes + prefills:
            if budget == 0:
                break
            if request.status is not RequestStatus.RUNNING:
                continue  # preempted earlier in this step
            num_new = self.sink_window.fit(request, min(request.num_uncomputed_tokens, budget))
            copies = self._allocate_or_preempt(request, num_new, batch)
            if copies is not None:
                self._add(batch, request, num_new, copies)
                budget -= num_new
        # Admit waiting requests in order while they fit; none after a preemption this step.
        seats = self._num_seats()
        while (self.waiting and budget > 0 and self.num_preemptions == preemptions_before
               and seats + self.waiting[0].params.n <= self.config.max_num_seqs):
            request = self.waiting[0]
            admitted = self._admit(request, budget)
            if admitted is None:
                break
            num_new, copies = admitted
            self.waiting.popleft()
            seats += request.params.n if not request.forked else 1  # it, and the completions it will fork
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            self._add(batch, request, num_new, copies)
            budget -= num_new
        return self._complete(batch)

    def _admit(self, request: Request, budget: int) -> tuple[int, list[tuple[int, int]]] | None:
        """Give a waiting request its blocks: its session's cache, or prefix-cache hits plus new
        blocks for its first chunk. Returns that chunk's size and block copies, or None when the
        pool is short."""
        bm = self.block_manager
        reused = self.sessions.adopt(request) if request.session_id is not None else None
        if reused is None:
            policy = request.sink_policy
            max_hit = policy.capacity if policy else None
            if request.params.prompt_logprobs is not None and request.num_output_tokens == 0:
                max_hit = 0  # every prompt token is scored: none may come from the prefix cache
            request.num_computed_tokens = bm.start(request.request_id, request.token_ids, max_hit,
                                                   request.cache_salt)
        num_hit = request.num_computed_tokens
        num_new = self.sink_window.fit(request, min(request.num_uncomputed_tokens, budget))
        while (copies := bm.allocate_slots(request.request_id, request.num_cache_slots, num_new)) is None:
            if not self.sessions.release_idle():
                bm.free(request.request_id)  # an adopted session is lost: rebuilt from the prompt
                if request.session_id is not None:
                    self.sessions.release(request)
                request.reset_cache_state()
                return None
        if reused is None:
            bm.count_prefix_query(request.num_tokens, num_hit)
        if request.num_preemptions == 0:
            request.num_cached_prompt_tokens = num_hit
        return num_new, copies

    def _num_seats(self) -> int:
        """Running sequences, counting the completions that parents not yet forked will add."""
        pending = sum(r.params.n - 1 for r in self.running if r.params.n > 1 and not r.forked)
        return len(self.running) + pending

    def _allocate_or_preempt(self, request: Request, num_new: int,
                             batch: SchedulerOutput) -> list[tuple[int, int]] | None:
        """Blocks for the request's next tokens, preempting the newest running requests for them.

        Requests already in this step's batch are never preempted. Returns None when the
        request itself had to be preempted.
        """
        while True:
            copies = self.block_manager.allocate_slots(request.request_id, request.num_cache_slots, num_new)
            if copies is not None:
                return copies
            if self.sessions.release_idle():
                continue  # idle sessions go first
            victim = next(r for r in reversed(self.running) if r not in batch.scheduled)
            self._preempt(victim)
            if victim is request:
                return None

    def _preempt(self, request: Request) -> None:
        self.requeue(request)
        self.num_preemptions += 1

    def requeue(self, request: Request) -> None:
        """Drop a running request's cache and put it at the front of the waiting queue, to be
        recomputed (prompt and output so far)."""
        self.running.remove(request)
        self.block_manager.free(request.request_id)
        if request.session_id is not None:
            self.sessions.release(request)
        request.reset_cache_state()
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1  # its own count; the scheduler's counts lack of memory only
        self.waiting.appendleft(request)

    def unfork(self, child: Request) -> None:
        """Undo a fork whose step failed: the child goes, and its parent forks again when its
        prompt is computed."""
        self.running.remove(child)
        self.block_manager.free(child.request_id)
        parent = next(r for r in self.running + list(self.waiting) if r.request_id == child.parent_id)
        parent.forked = False
        child.status = RequestStatus.FINISHED
        self._finished_request_ids.append(child.request_id)

    def schedule_alone(self, request: Request) -> SchedulerOutput:
        """A step of this one request and nothing else (waiting: admitted first). Empty when
        the pool or the sequence cap has no room for it now."""
        self.block_manager.release_copy_sources()
        batch = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        if request.status is RequestStatus.WAITING:
            if self._num_seats() + request.params.n > self.config.max_num_seqs:
                return batch
            admitted = self._admit(request, budget)
            if admitted is None:
                return batch
            num_new, copies = admitted
            self.waiting.remove(request)
            request.status = RequestStatus.RUNNING
            self.running.append(request)
        else:
            num_new = self.sink_window.fit(request, min(request.num_uncomputed_tokens, budget))
            copies = self.block_manager.allocate_slots(request.request_id, request.num_cache_slots, num_new)
            if copies is None:
                return batch
        self._add(batch, request, num_new, copies)
        return self._complete(batch)

    def _complete(self, batch: SchedulerOutput) -> SchedulerOutput:
        """Write a non-empty step out as the executor's plain data."""
        if batch.requests:
            finished, self._finished_request_ids = self._finished_request_ids, []
            batch.build_input = functools.partial(build_model_input, batch, self.block_manager.block_table, finished)
        return batch

    def _add(self, batch: SchedulerOutput, request: Request, num_new: int, copies: list[tuple[int, int]]) -> None:
        row = len(batch.requests)
        batch.requests.append(request)
        batch.num_new_tokens.append(num_new)
        batch.blocks_to_copy.extend(copies)
        batch.scheduled.add(request)
        if num_new == request.num_uncomputed_tokens:
            batch.samplers.append((request, row))
            if request.params.n > 1 and not request.forked:
                for child in self._fork(request):
                    batch.samplers.append((child, row))
                    batch.forked.append(child)
                    batch.scheduled.add(child)

    def _fork(self, parent: Request) -> list[Request]:
        """The parent's n-1 sibling completions, sharing its prompt blocks from this step on."""
        parent.forked = True
        children = [parent.fork(index) for index in range(1, parent.params.n)]
        for child in children:
            self.block_manager.fork(parent.request_id, child.request_id)
            self.running.append(child)
        return children

    def update(self, batch: SchedulerOutput) -> None:
        """Record that the batch's tokens are computed and their full blocks may be shared."""
        for request, num_new in zip(batch.requests, batch.num_new_tokens):
            if request.is_finished:
                continue
            request.num_computed_tokens += num_new
            self.block_manager.commit(request.request_id, request.token_ids, request.num_computed_tokens)

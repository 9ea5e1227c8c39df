"""Fault isolation: a request that makes a step raise fails alone.

An exception while one request's output is processed fails that request alone (finish reason
"error"; the engine does that). An exception in the batched part of a step (inputs, model,
sampler) cannot name its request, so the step's requests run again one at a time (each alone
until it samples a token, at most MAX_SOLO_STEPS steps): one that fails alone is failed, the
others go back to batching. Their caches stay: the failed step committed nothing, and its
slots are rewritten by the retry (a request whose step also copied a shared block, or whose
n completions forked in it, is set back further, see `retry_alone`). A failure alone is followed
by the runner's probe on its scratch blocks (a short prefill and a decode, `ModelRunner.probe`):
if it fails too, the engine itself is broken and `step()` raises. A request in MAX_FAULTS rounds
that found no culprit (the fault needs a batch) is failed.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable

from scheduler.block_manager import BlockManager
from scheduler.output_processor import RequestOutput
from scheduler.request import Request
from scheduler.scheduler import Scheduler
from scheduler.scheduler_output import SchedulerOutput

logger = logging.getLogger(__name__)

MAX_FAULTS = 3
MAX_SOLO_STEPS = 4


class FaultIsolation:
    """The suspects of failed steps, run alone one after another. `fail(group_id)` ends every
    completion of a request with finish reason "error" (the engine's `fail`)."""

    def __init__(self, scheduler: Scheduler, block_manager: BlockManager,
                 fail: Callable[[str], list[RequestOutput]]):
        self.scheduler = scheduler
        self.block_manager = block_manager
        self.fail = fail
        self.suspects: deque[Request] = deque()  # requests of a failed step, to run alone
        self._round: list[Request] = []  # the requests of the failed step being isolated
        self._culprit_found = False  # in this round
        self._solo_request: Request | None = None  # the suspect running alone,
        self._solo_steps = 0  # and its steps so far
        self.pending_failures: list[RequestOutput] = []  # failed between steps, to report

    def schedule(self) -> SchedulerOutput:
        """The next step: the first suspect alone while there are any, else a normal batch."""
        while self.suspects:
            suspect = self.suspects[0]
            output = SchedulerOutput() if suspect.is_finished else self.scheduler.schedule_alone(suspect)
            if output.requests:
                return output
            self._clear_first_suspect()  # finished, or no room to run it alone: back to batching
        return self.scheduler.schedule()

    def culprit(self, output: SchedulerOutput) -> str | None:
        """After a failed step: the request (group id) to fail when the step was its alone."""
        groups = {r.group_id for r in output.requests}
        if len(groups) != 1:
            return None
        self._culprit_found = True
        return groups.pop()

    def retry_alone(self, output: SchedulerOutput) -> None:
        """After a failed step of several requests: run them one at a time. The failed step wrote
        K/V only into slots it had not committed, which the retry rewrites; a request whose block
        copies (copy-on-write) may not have run is recomputed, and completions forked in the step
        are dropped, to fork again (the engine forgets them)."""
        for child in output.forked:
            self.scheduler.unfork(child)
        copied = {dst for _, dst in output.blocks_to_copy}
        for request in reversed(output.requests):
            if copied & set(self.block_manager.block_table(request.request_id)):
                self.scheduler.requeue(request)
        self.suspects.extend(output.requests)
        self._round, self._culprit_found = list(output.requests), False

    def step_done(self, output: SchedulerOutput) -> None:
        """After a step that ran: a suspect that ran alone up to a sampled token is cleared."""
        if self.suspects and output.requests[0] is self.suspects[0]:
            if self._solo_request is not self.suspects[0]:
                self._solo_request, self._solo_steps = self.suspects[0], 0
            self._solo_steps += 1
            if self._solo_steps >= MAX_SOLO_STEPS or any(r is self.suspects[0] for r, _ in output.samplers):
                self._clear_first_suspect()  # it ran alone (up to a sampled token): not the culprit

    def end_step(self) -> list[RequestOutput]:
        """The failures decided between steps, once the step's own outputs are out (a failure is
        a request's last word); suspects that ended meanwhile (failed with their group,
        aborted, ...) are dropped."""
        if self.suspects:
            self.suspects = deque(r for r in self.suspects if not r.is_finished)
            if not self.suspects:
                self._end_round()
        failures, self.pending_failures = self.pending_failures, []
        return failures

    def _clear_first_suspect(self) -> None:
        self.suspects.popleft()
        if not self.suspects:
            self._end_round()

    def _end_round(self) -> None:
        """Every suspect has run alone. If none failed, the fault needs a batch: count it, so
        that such a fault cannot be retried forever."""
        if not self._culprit_found:
            for request in self._round:
                if not request.is_finished:
                    request.num_faults += 1
                    if request.num_faults >= MAX_FAULTS:
                        logger.error("request %s was in %d failed steps without a culprit", request.group_id,
                                     request.num_faults)
                        self.pending_failures += self.fail(request.group_id)
        self._round = []

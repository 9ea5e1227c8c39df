"""The scheduler driven by a fake runner (no model, no torch): what every step must respect.

`Driver` loops schedule -> fake forward -> update -> sample, like the engine. The fake forward
keeps one token id per KV slot: it performs the batch's block copies, writes each row's new
tokens through its block table, then reads every row's whole context back through the table.
The "sampled" token is a hash of the context it read (and the completion's index), so a token
computed twice, skipped, written to the wrong block or read from a stale one changes the
outputs; batched runs are compared with each request run alone in a big pool.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest

from model.sampling_params import SamplingParams
from scheduler.block_manager import BlockManager
from scheduler.request import FinishReason, Request, RequestStatus
from scheduler.scheduler import Scheduler, SchedulerConfig
from scheduler.scheduler_output import SchedulerOutput

VOCAB = 1000
BS = 4


def next_token(index: int, context: list[int]) -> int:
    """The fake model's greedy token: a function of everything before it (hash of ints is stable)."""
    return hash((index, tuple(context))) % VOCAB


@dataclass
class Row:
    request_id: str
    start: int
    num_new: int
    kind: str  # "decode" / "prefill" (running before this step) / "admitted"


@dataclass
class Step:
    rows: list[Row] = field(default_factory=list)
    sampler_ids: list[str] = field(default_factory=list)
    forked_ids: list[str] = field(default_factory=list)
    preempted_ids: list[str] = field(default_factory=list)


class Driver:
    def __init__(self, num_blocks: int = 256, max_num_batched_tokens: int = 32, max_num_seqs: int = 16,
                 enable_prefix_caching: bool = True, check_cap: bool = True):
        self.bm = BlockManager(num_blocks, BS, enable_prefix_caching)
        self.config = SchedulerConfig(max_num_seqs, max_num_batched_tokens)
        self.scheduler = Scheduler(self.config, self.bm)
        self.check_cap = check_cap
        self.slots = [[None] * BS for _ in range(num_blocks)]
        self.requests: dict[str, Request] = {}  # every request, forked ones too, in creation order
        self.arrived_at: dict[str, int] = {}
        self.first_scheduled: list[str] = []
        self.finished_at: dict[str, int] = {}
        self.next_start: dict[str, int] = {}  # running request -> where its next chunk must begin
        self.preempted_outputs: list[tuple[str, list[int]]] = []
        self.steps: list[Step] = []

    def add(self, request_id: str, prompt: list[int], max_tokens: int, n: int = 1, index: int = 0) -> Request:
        request = Request(request_id, list(prompt), SamplingParams(n=n, max_tokens=max_tokens, temperature=0),
                          index=index)
        self.requests[request_id] = request
        self.arrived_at[request_id] = len(self.steps)
        self.scheduler.add_request(request)
        return request

    def step(self) -> SchedulerOutput:
        sched = self.scheduler
        running_before = {r.request_id for r in sched.running}
        before = {r.request_id: (list(r.token_ids), r.num_preemptions) for r in [*sched.running, *sched.waiting]}
        batch = sched.schedule()
        preempted = []
        for request in [*sched.running, *sched.waiting]:
            if request.request_id not in before:
                continue
            token_ids, num_preemptions = before[request.request_id]
            assert request.token_ids == token_ids  # scheduling never changes a request's tokens
            if request.num_preemptions > num_preemptions:  # recomputed later from its cache hits
                assert request.request_id in running_before
                preempted.append(request.request_id)
                self.next_start.pop(request.request_id)
                self.preempted_outputs.append((request.request_id, request.output_token_ids))
        step = self._check_batch(batch, running_before.difference(preempted))
        step.preempted_ids = preempted
        contexts = self._forward(batch)
        sched.update(batch)
        for row, request in zip(step.rows, batch.requests):
            if not request.is_finished:
                assert request.num_computed_tokens == row.start + row.num_new
                self.next_start[request.request_id] = request.num_computed_tokens
        for child in batch.forked:
            self.requests[child.request_id] = child
            self.arrived_at[child.request_id] = len(self.steps)
            self.next_start[child.request_id] = child.num_computed_tokens
        for request, row in batch.samplers:
            if request.is_finished:
                continue
            assert contexts[row] == request.token_ids, f"{request.request_id} sampled from the wrong context"
            request.append_token(next_token(request.index, contexts[row]))
            if request.num_output_tokens >= request.params.max_tokens:
                self.finish(request, FinishReason.LENGTH)
        self.steps.append(step)
        return batch

    def finish(self, request: Request, reason: FinishReason) -> None:
        self.scheduler.finish_request(request, reason)
        self.next_start.pop(request.request_id, None)
        self.finished_at[request.request_id] = len(self.steps)
        assert not self.bm.has_seq(request.request_id)

    def run(self, max_steps: int = 2000, arrivals: dict[int, list[tuple]] | None = None) -> None:
        arrivals = dict(arrivals or {})
        while self.scheduler.num_unfinished or arrivals:
            for args in arrivals.pop(len(self.steps), []):
                self.add(*args)
            assert len(self.steps) < max_steps, "requests did not finish"
            self.step()
        self.assert_all_free()

    def assert_all_free(self) -> None:
        assert not self.scheduler.running and not self.scheduler.waiting
        assert all(r.is_finished for r in self.requests.values())
        assert self.bm.num_free_blocks == self.bm.num_blocks
        assert all(self.bm.ref_count(b) == 0 for b in range(self.bm.num_blocks))

    def _check_batch(self, batch: SchedulerOutput, running_before: set[str]) -> Step:
        """running_before: the requests that were running before this step and still are."""
        sched, config = self.scheduler, self.config
        assert len(batch.requests) == len(batch.num_new_tokens)
        assert len({id(r) for r in batch.requests}) == len(batch.requests)
        assert batch.num_tokens <= config.max_num_batched_tokens
        if self.check_cap:
            sequences = {id(r) for r in batch.requests} | {id(r) for r, _ in batch.samplers}
            assert len(sequences) <= config.max_num_seqs
            assert len(sched.running) <= config.max_num_seqs
        step = Step(forked_ids=[r.request_id for r in batch.forked])
        for request, num_new in zip(batch.requests, batch.num_new_tokens):
            request_id, start = request.request_id, request.num_computed_tokens
            assert request.status is RequestStatus.RUNNING and request in sched.running
            assert num_new >= 1 and start + num_new <= request.num_tokens
            if request_id in running_before:
                kind = "decode" if request.num_uncomputed_tokens == 1 else "prefill"
                assert start == self.next_start[request_id], f"{request_id} skipped or repeated tokens"
            else:
                kind = "admitted"
                assert start % BS == 0 and start < request.num_tokens  # only whole cached blocks
                if not self.bm.enable_prefix_caching:
                    assert start == 0
            assert len(self.bm.block_table(request_id)) == self.bm.blocks_for(start + num_new)
            step.rows.append(Row(request_id, start, num_new, kind))
            if request_id not in self.first_scheduled:
                self.first_scheduled.append(request_id)
        order = {"decode": 0, "prefill": 1, "admitted": 2}
        kinds = [order[row.kind] for row in step.rows]
        assert kinds == sorted(kinds), f"decodes, then prefill chunks, then admissions: {kinds}"
        # Exactly the rows that reach the end of their tokens sample; forked ones share the row.
        own = [row for request, row in batch.samplers if request is batch.requests[row]]
        finishing = [i for i, r in enumerate(step.rows) if r.start + r.num_new == batch.requests[i].num_tokens]
        assert sorted(own) == finishing
        for request, row in batch.samplers:
            if request is not batch.requests[row]:
                assert request in batch.forked and request.parent_id == batch.requests[row].request_id
            step.sampler_ids.append(request.request_id)
        assert len(set(step.sampler_ids)) == len(step.sampler_ids)
        return step

    def _forward(self, batch: SchedulerOutput) -> list[list[int]]:
        """Copy blocks, write every row's new tokens, then read every row's context back."""
        for src, dst in batch.blocks_to_copy:
            self.slots[dst] = list(self.slots[src])
        for request, num_new in zip(batch.requests, batch.num_new_tokens):
            table, start = self.bm.block_table(request.request_id), request.num_computed_tokens
            for pos in range(start, start + num_new):
                self.slots[table[pos // BS]][pos % BS] = request.token_ids[pos]
        contexts = []
        for request, num_new in zip(batch.requests, batch.num_new_tokens):
            table, stop = self.bm.block_table(request.request_id), request.num_computed_tokens + num_new
            context = [self.slots[table[pos // BS]][pos % BS] for pos in range(stop)]
            assert context == request.token_ids[:stop], f"{request.request_id} reads a wrong KV cache"
            contexts.append(context)
        return contexts


def run_alone(prompt: list[int], max_tokens: int, index: int = 0) -> list[int]:
    driver = Driver(num_blocks=256, max_num_batched_tokens=2048, enable_prefix_caching=False)
    driver.add("alone", prompt, max_tokens, index=index)
    driver.run()
    return driver.requests["alone"].output_token_ids


def random_requests(seed: int, count: int, max_prompt: int = 30, max_tokens: int = 20, n_choices=(1,)):
    """(request_id, prompt, max_tokens, n); half the prompts start with one of two shared prefixes."""
    rng = random.Random(seed)
    prefixes = [[rng.randrange(VOCAB) for _ in range(rng.randint(4, 12))] for _ in range(2)]
    out = []
    for i in range(count):
        prompt = [rng.randrange(VOCAB) for _ in range(rng.randint(1, max_prompt))]
        if rng.random() < 0.5:
            prompt = (rng.choice(prefixes) + prompt)[:max_prompt]
        out.append((f"r{i}", prompt, rng.randint(1, max_tokens), rng.choice(n_choices)))
    return out


def check_outputs_alone(driver: Driver) -> None:
    for request_id, request in driver.requests.items():
        expected = run_alone(request.prompt_token_ids, request.params.max_tokens, request.index)
        assert request.output_token_ids == expected, \
            f"{request_id}: batched {request.output_token_ids} != alone {expected}"
        assert request.finish_reason is FinishReason.LENGTH


# -- every step ------------------------------------------------------------------------------------

@pytest.mark.parametrize("budget,max_num_seqs,num_blocks,caching", [
    (16, 4, 256, True), (32, 8, 40, True), (24, 6, 30, False), (7, 5, 256, True),
])
def test_budget_cap_order_and_chunks_hold_in_every_step(budget, max_num_seqs, num_blocks, caching):
    driver = Driver(num_blocks, budget, max_num_seqs, caching)
    requests = random_requests(seed=budget, count=30)
    arrivals = {}
    for i, args in enumerate(requests):
        arrivals.setdefault(i // 3, []).append(args)
    driver.run(arrivals=arrivals)  # the per-step checks live in Driver._check_batch
    # The limits were actually reached, so the checks had something to hold.
    assert any(sum(r.num_new for r in s.rows) == budget for s in driver.steps)
    assert any(len(s.rows) == max_num_seqs for s in driver.steps)
    assert any(r.kind == "decode" for s in driver.steps for r in s.rows)
    assert any(r.kind != "decode" and r.num_new < len(driver.requests[r.request_id].prompt_token_ids)
               for s in driver.steps for r in s.rows)  # some prompt was chunked
    check_outputs_alone(driver)


def test_a_long_prompt_is_chunked_alongside_decodes():
    driver = Driver(max_num_batched_tokens=16)
    short = driver.add("short", list(range(4)), max_tokens=30)
    driver.step()  # the short prompt is prefilled; it decodes from now on
    long_prompt = list(range(100, 150))
    driver.add("long", long_prompt, max_tokens=3)
    chunks = []
    while not driver.requests["long"].output_token_ids:
        driver.step()
        rows = driver.steps[-1].rows
        assert [(r.request_id, r.num_new, r.kind) for r in rows[:1]] == [("short", 1, "decode")]
        chunks.append((rows[1].start, rows[1].num_new))
        assert ("long" in driver.steps[-1].sampler_ids) == (rows[1].start + rows[1].num_new == 50)
    assert chunks == [(0, 15), (15, 15), (30, 15), (45, 5)]
    driver.run()
    assert short.output_token_ids == run_alone(list(range(4)), 30)
    assert driver.requests["long"].output_token_ids == run_alone(long_prompt, 3)


# -- preemption ----------------------------------------------------------------------------------

@pytest.mark.parametrize("caching,budget,n_choices", [
    (True, 32, (1,)),
    (False, 32, (1,)),
    (False, 32, (1, 2, 3)),
    (True, 2048, (1, 2, 3)),  # no prompt is ever chunked
    (True, 32, (1, 2, 3)),
])
def test_preemption_gives_the_same_tokens_as_running_alone(caching, budget, n_choices):
    # 20 blocks of 4 hold the longest request (30 + 20 tokens) but not many at once.
    driver = Driver(num_blocks=20, max_num_batched_tokens=budget, max_num_seqs=32, enable_prefix_caching=caching)
    for args in random_requests(seed=7, count=16, n_choices=n_choices):
        driver.add(*args)
    driver.run()
    assert driver.scheduler.num_preemptions > 0
    assert any(output for _, output in driver.preempted_outputs), "no request was preempted mid-generation"
    for request_id, output_then in driver.preempted_outputs:  # kept, not regenerated
        assert driver.requests[request_id].output_token_ids[:len(output_then)] == output_then
    if n_choices != (1,):
        assert any(step.forked_ids for step in driver.steps)
        assert any("-" in request_id for request_id, _ in driver.preempted_outputs)  # a forked one
    check_outputs_alone(driver)


def test_no_request_is_admitted_in_a_step_that_preempted():
    # A (1 token) and B (2 tokens) fill 3 blocks; when A needs a fourth, B is preempted, A takes
    # one of B's blocks and B's first chunk (3 tokens of budget) fits the other.
    driver = Driver(num_blocks=3, max_num_batched_tokens=4, enable_prefix_caching=False)
    driver.add("A", [1], max_tokens=5)
    driver.add("B", [2, 3], max_tokens=5)
    driver.run()
    check_outputs_alone(driver)
    assert driver.scheduler.num_preemptions > 0
    for i, step in enumerate(driver.steps):
        if step.preempted_ids:
            admitted = [r.request_id for r in step.rows if r.kind == "admitted"]
            assert not admitted, f"step {i} preempted {step.preempted_ids} and admitted {admitted}"


# -- fairness ------------------------------------------------------------------------------------

def test_a_steady_stream_finishes_every_request_in_bounded_steps_first_come_first_served():
    rng = random.Random(3)
    arrivals = {}
    for i in range(120):  # one request every other step, about half the pool's throughput
        arrivals[2 * i] = [(f"r{i:03}", [rng.randrange(VOCAB) for _ in range(rng.randint(1, 20))],
                            rng.randint(1, 12))]
    arrivals[11] = [("long", [rng.randrange(VOCAB) for _ in range(90)], 20)]  # 6 budgets of prompt
    driver = Driver(num_blocks=32, max_num_batched_tokens=16, max_num_seqs=8)
    driver.run(arrivals=arrivals)
    assert driver.scheduler.num_preemptions > 0
    assert driver.first_scheduled == list(driver.requests)  # first admissions in arrival order
    latency = {r: driver.finished_at[r] - driver.arrived_at[r] for r in driver.requests}
    assert max(latency.values()) <= 60, sorted(latency.items(), key=lambda kv: -kv[1])[:5]


# -- n > 1 ---------------------------------------------------------------------------------------

def test_n_completions_fork_from_the_parents_row_and_blocks():
    driver = Driver(max_num_batched_tokens=8)
    prompt = list(range(10))  # two full blocks and a partial one
    parent = driver.add("p", prompt, max_tokens=6, n=3)
    other = driver.add("q", list(range(500, 503)), max_tokens=6)

    batch = driver.step()
    assert batch.forked == [] and [r.request_id for r, _ in batch.samplers] == []  # p: 8 of 10
    batch = driver.step()
    p_row = batch.requests.index(parent)
    children = batch.forked
    assert [(c.request_id, c.index, c.parent_id) for c in children] == [("p-1", 1, "p"), ("p-2", 2, "p")]
    assert [(r.request_id, row) for r, row in batch.samplers if r.group_id == "p"] == [
        ("p", p_row), ("p-1", p_row), ("p-2", p_row)]
    table = driver.bm.block_table("p")
    for child in children:
        assert child in driver.scheduler.running and child.num_computed_tokens == len(prompt)
        assert driver.bm.block_table(child.request_id) == table
    assert [driver.bm.ref_count(b) for b in table] == [3, 3, 3]

    batch = driver.step()  # all three decode: two of them copy the shared partial block
    assert {r.request_id for r in batch.requests} >= {"p", "p-1", "p-2"}
    assert len(batch.blocks_to_copy) == 2
    assert [driver.bm.ref_count(b) for b in table[:2]] == [3, 3]
    assert len({driver.bm.block_table(r)[2] for r in ("p", "p-1", "p-2")}) == 3

    driver.run()
    outputs = [r.output_token_ids for r in (parent, *children)]
    assert outputs == [run_alone(prompt, 6, index) for index in range(3)]
    assert len({tuple(o) for o in outputs}) == 3
    assert other.output_token_ids == run_alone(other.prompt_token_ids, 6)


def test_fork_when_the_last_prompt_chunk_is_one_token():
    driver = Driver(max_num_batched_tokens=8)
    driver.add("p", list(range(9)), max_tokens=4, n=3)
    driver.step()  # 8 of the 9 prompt tokens
    batch = driver.scheduler.schedule()  # the last one: p runs in the decode pass and forks
    assert [r.request_id for r in batch.forked] == ["p-1", "p-2"]
    assert [(r.request_id, n) for r, n in zip(batch.requests, batch.num_new_tokens)] == [("p", 1)]
    assert [(r.request_id, row) for r, row in batch.samplers] == [("p", 0), ("p-1", 0), ("p-2", 0)]


def test_forked_completions_count_against_max_num_seqs():
    driver = Driver(max_num_seqs=2, check_cap=False)
    driver.add("p", list(range(6)), max_tokens=4, n=3)
    driver.add("q", list(range(50, 56)), max_tokens=4)
    for _ in range(3):
        batch = driver.step()
        assert len(driver.scheduler.running) <= 2
        assert len({id(r) for r in batch.requests} | {id(r) for r, _ in batch.samplers}) <= 2


# -- aborts --------------------------------------------------------------------------------------

def test_abort_of_a_running_request_frees_its_blocks_at_once():
    driver = Driver(max_num_batched_tokens=64)
    victim = driver.add("victim", list(range(30)), max_tokens=50)
    keeper = driver.add("keeper", list(range(100, 110)), max_tokens=5)
    driver.step()
    driver.step()
    held = len(driver.bm.block_table("victim"))
    free_before = driver.bm.num_free_blocks
    assert victim.status is RequestStatus.RUNNING and held == 8

    driver.finish(victim, FinishReason.ABORT)
    assert driver.bm.num_free_blocks == free_before + held
    assert victim.finish_reason is FinishReason.ABORT and victim not in driver.scheduler.running
    driver.finish(victim, FinishReason.ABORT)  # idempotent
    driver.run()
    assert "victim" not in {r.request_id for s in driver.steps[2:] for r in s.rows}
    assert keeper.output_token_ids == run_alone(keeper.prompt_token_ids, 5)


def test_abort_between_schedule_and_update_is_not_computed_further():
    driver = Driver()
    request = driver.add("a", list(range(9)), max_tokens=10)
    driver.step()
    batch = driver.scheduler.schedule()
    driver.finish(request, FinishReason.ABORT)
    assert driver.bm.num_free_blocks == driver.bm.num_blocks
    driver.scheduler.update(batch)
    assert not driver.bm.has_seq("a")
    assert (request.num_computed_tokens, request.num_output_tokens) == (9, 1)
    driver.assert_all_free()


def test_abort_of_a_waiting_request_removes_it_and_holds_no_blocks():
    driver = Driver(max_num_seqs=1)
    first = driver.add("first", list(range(8)), max_tokens=4)
    waiting = driver.add("waiting", list(range(8)), max_tokens=4)
    driver.step()
    assert waiting in driver.scheduler.waiting and not driver.bm.has_seq("waiting")
    used = driver.bm.num_used_blocks
    driver.finish(waiting, FinishReason.ABORT)
    assert waiting not in driver.scheduler.waiting and waiting.finish_reason is FinishReason.ABORT
    assert driver.bm.num_used_blocks == used
    driver.run()
    assert "waiting" not in driver.first_scheduled
    assert first.output_token_ids == run_alone(first.prompt_token_ids, 4)


def test_abort_of_a_forked_parent_leaves_its_children_their_blocks():
    driver = Driver()
    parent = driver.add("p", list(range(10)), max_tokens=8, n=3)
    driver.step()
    table = list(driver.bm.block_table("p"))
    assert [driver.bm.ref_count(b) for b in table] == [3, 3, 3]
    driver.finish(parent, FinishReason.ABORT)
    assert [driver.bm.ref_count(b) for b in table] == [2, 2, 2]
    driver.run()
    for index in (1, 2):
        assert driver.requests[f"p-{index}"].output_token_ids == run_alone(list(range(10)), 8, index)

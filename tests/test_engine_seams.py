"""The seams of an engine step: the scheduler writes a step out as plain data (SchedulerOutput
.model_input), the executor takes only that (it pickles) and runs it in two calls, and the
runner side keeps the seeded generators and builds the same step from a copy of the message."""

from __future__ import annotations

import pickle

import pytest
import torch

from model.execution.model_input import GrammarBitmask, ModelInput, ModelOutput, SamplingInput
from model.execution.sampler import Sampler, SamplingRow
from model.sampling_params import SamplingParams
from scheduler.block_manager import BlockManager
from scheduler.engine import Engine
from scheduler.request import FinishReason, Request
from scheduler.scheduler import Scheduler, SchedulerConfig

BS = 4


def _scheduler(max_num_batched_tokens: int = 8) -> Scheduler:
    return Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=max_num_batched_tokens),
                     BlockManager(32, BS, enable_prefix_caching=False))


def test_scheduler_output_of_a_known_schedule():
    sched = _scheduler()
    a = Request("a", [1, 2, 3], SamplingParams(max_tokens=4, seed=7))
    b = Request("b", [4, 5, 6, 7, 8, 9], SamplingParams(max_tokens=4, prompt_logprobs=1, repetition_penalty=1.5))
    sched.add_request(a)
    sched.add_request(b)
    first = sched.schedule()  # a whole, b's first 5 tokens (budget 8)
    inp = first.model_input
    assert inp.token_ids == [1, 2, 3, 4, 5, 6, 7, 8]
    assert inp.query_lens == [3, 5] and inp.context_lens == [3, 5]
    assert inp.block_tables == [sched.block_manager.block_table("a"), sched.block_manager.block_table("b")]
    assert inp.block_tables[0] is not sched.block_manager.block_table("a")  # a copy, not the live table
    assert [len(t) for t in inp.block_tables] == [1, 2]
    assert inp.sample_seq_indices == [0]  # b is mid-prompt: it does not sample
    assert inp.sampling_rows == [SamplingInput("a", a.params, seed=7, num_output_tokens=0)]
    [target] = inp.prompt_logprobs
    assert (target.seq_index, target.target_token_ids, target.num_top) == (1, [5, 6, 7, 8, 9], 1)
    assert inp.sink_lens == [0, 0] and inp.sink_gaps == [0, 0] and inp.num_evicted == [0, 0]
    sched.update(first)
    a.append_token(11)
    sched.finish_request(a, FinishReason.ABORT)
    second = sched.schedule()  # b's last prompt token; a ended since the last step
    inp = second.model_input
    assert inp.token_ids == [9] and inp.context_lens == [6] and inp.finished_request_ids == ["a"]
    # b's repetition penalty reads its histories; the prompt-logprob target past the prompt is none.
    [row] = inp.sampling_rows
    assert (row.request_id, list(row.prompt_token_ids), list(row.output_token_ids)) == ("b", b.prompt_token_ids, [])
    assert inp.prompt_logprobs == []
    assert sched.schedule().model_input.finished_request_ids == []  # told once


def test_an_empty_schedule_keeps_the_finished_ids_for_the_next_step():
    sched = _scheduler()
    gone = Request("gone", [1, 2], SamplingParams())
    sched.add_request(gone)
    sched.finish_request(gone, FinishReason.ABORT)
    assert sched.schedule().model_input is None
    sched.add_request(Request("next", [3], SamplingParams()))
    assert sched.schedule().model_input.finished_request_ids == ["gone"]


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(device="cpu", num_kv_blocks=256, block_size=4, seed=0)


def test_the_executor_receives_plain_data_only(engine, monkeypatch):
    """Every message to the executor pickles and holds no tensor of a device, generator or request;
    and the step the runner runs from an unpickled copy is the same step."""
    received, outputs = [], []
    execute_model, sample_tokens = engine.executor.execute_model, engine.executor.sample_tokens

    def record_execute(model_input: ModelInput) -> None:
        copy = pickle.loads(pickle.dumps(model_input))
        assert copy == model_input
        received.append(model_input)
        execute_model(copy)

    def record_sample(grammar: GrammarBitmask | None) -> ModelOutput:
        assert grammar is None or grammar.bitmask.device.type == "cpu"
        output = sample_tokens(pickle.loads(pickle.dumps(grammar)))
        outputs.append(pickle.loads(pickle.dumps(output)))
        return output

    monkeypatch.setattr(engine.executor, "execute_model", record_execute)
    monkeypatch.setattr(engine.executor, "sample_tokens", record_sample)
    params = [SamplingParams(max_tokens=5, seed=3, logprobs=2, ignore_eos=True),
              SamplingParams(max_tokens=5, temperature=0, n=2, prompt_logprobs=1, frequency_penalty=0.5),
              SamplingParams(max_tokens=5, temperature=0, grammar=None, min_tokens=3)]
    expected = [engine.generate([[1, 9, 20, 31]], p, use_tqdm=False)[0] for p in params]
    assert received and len(outputs) == len(received)
    assert any(m.prompt_logprobs for m in received) and any(o.logprobs for o in outputs)
    for message in received:
        for value in _leaves(message):
            assert not isinstance(value, (torch.Tensor, torch.Generator, Request)), type(value)
    monkeypatch.undo()
    again = [engine.generate([[1, 9, 20, 31]], p, use_tqdm=False)[0] for p in params]
    assert [[c.token_ids for c in r.completions] for r in again] == \
        [[c.token_ids for c in r.completions] for r in expected]


def _leaves(value):
    if isinstance(value, (list, tuple)):
        for item in value:
            yield from _leaves(item)
    elif hasattr(value, "__dataclass_fields__") and not isinstance(value, SamplingParams):
        for name in value.__dataclass_fields__:
            yield from _leaves(getattr(value, name))
    else:
        yield value


def test_the_runner_keeps_a_seeded_generator_until_told_the_request_ended(engine):
    runner = engine.runner
    params = SamplingParams(temperature=1.0, seed=5)
    rows = [SamplingInput("s", params, seed=5)]

    def step(finished: list[str]) -> int:
        engine.executor.execute_model(ModelInput(
            token_ids=[1, 2], query_lens=[2], context_lens=[2], block_tables=[[0]], sample_seq_indices=[0],
            sampling_rows=rows, sink_lens=[0], sink_gaps=[0], num_evicted=[0], finished_request_ids=finished))
        [token] = engine.executor.sample_tokens(None).sampled_token_ids
        return token

    first = [step([]), step([])]
    assert "s" in runner.generators
    # The same draws as the sampler with the request's own generator, kept across steps.
    generator = torch.Generator().manual_seed(5)
    logits = engine.model.compute_logits(engine.model(torch.tensor([1, 2]), _meta(engine), runner.kv_caches)[-1:])
    reference = [int(Sampler()(logits, [SamplingRow(params, generator)]).token_ids[0]) for _ in range(2)]
    assert first == reference
    assert step(["s"]) == first[0]  # forgotten first: a fresh generator
    runner.forget(["s"])
    assert "s" not in runner.generators


def _meta(engine):
    from model.layers.attention import AttentionMetadata
    return AttentionMetadata.build([2], [2], [[0]], engine.runner.block_size, engine.device, [0], [0], [0])


def test_the_grammar_bitmask_between_the_two_calls_restricts_the_sample(engine):
    vocab = engine.model.config.vocab_size
    bitmask = torch.zeros((1, -(-vocab // 32)), dtype=torch.int32)
    bitmask[0, 42 // 32] = 1 << (42 % 32)  # token 42 alone
    engine.executor.execute_model(ModelInput(
        token_ids=[1, 2], query_lens=[2], context_lens=[2], block_tables=[[0]], sample_seq_indices=[0, 0],
        sampling_rows=[SamplingInput("g", SamplingParams(temperature=0)), SamplingInput("h", SamplingParams())],
        sink_lens=[0], sink_gaps=[0], num_evicted=[0]))
    output = engine.executor.sample_tokens(GrammarBitmask([0], bitmask))
    assert output.sampled_token_ids[0] == 42 and output.logprobs is None


def test_min_tokens_bans_the_stop_tokens_on_the_runner_side(engine):
    eos = engine.stop_token_ids[0]
    vocab = engine.model.config.vocab_size
    allowed = torch.zeros((1, -(-vocab // 32)), dtype=torch.int32)
    allowed[0, eos // 32] = 1 << (eos % 32)
    allowed[0, 7 // 32] |= 1 << (7 % 32)  # eos or 7
    for num_output, expected in ((0, 7), (2, None)):
        engine.executor.execute_model(ModelInput(
            token_ids=[1], query_lens=[1], context_lens=[1], block_tables=[[0]], sample_seq_indices=[0],
            sampling_rows=[SamplingInput("m", SamplingParams(temperature=0, min_tokens=2), None, num_output)],
            sink_lens=[0], sink_gaps=[0], num_evicted=[0]))
        [token] = engine.executor.sample_tokens(GrammarBitmask([0], allowed.clone())).sampled_token_ids
        assert token in (eos, 7) and (expected is None or token == expected)


def test_a_request_whose_step_input_cannot_be_built_fails_alone(monkeypatch):
    """Building the step's plain data is part of the step that fault isolation guards: a request
    that breaks it ends with "error", the others finish, the engine goes on."""
    from scheduler import scheduler as scheduler_module

    engine = Engine(device="cpu", num_kv_blocks=256, block_size=4, seed=0)
    build = scheduler_module.build_model_input

    def poisoned(output, block_table, finished):
        if any(r.group_id == "bad" for r in output.requests):
            raise RuntimeError("cannot build this step")
        return build(output, block_table, finished)

    monkeypatch.setattr(scheduler_module, "build_model_input", poisoned)
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    engine.add_request("good", [1, 2, 3], greedy)
    engine.add_request("bad", [4, 5, 6], greedy)
    reasons = {}
    for _ in range(100):
        for out in engine.step():
            if out.finished:
                reasons[out.request_id] = out.finish_reason
        if not engine.has_unfinished_requests():
            break
    assert reasons == {"good": "length", "bad": "error"}
    assert engine.block_manager.num_used_blocks == 0

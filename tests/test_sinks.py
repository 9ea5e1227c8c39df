"""StreamingLLM eviction in the paged cache against a dense float64 reference that applies the
same eviction schedule (per layer, kept pre-RoPE K and V; keys rotated at arange(L), the query
at L). The engine runs for real; a teacher-forcing sampler feeds fixed token streams and the
model's hidden states are recorded to get the logits of every token."""

from __future__ import annotations

import copy
import random

import pytest
import torch

from model.execution.sampler import SamplerOutput
from model.sampling_params import SamplingParams
from scheduler.engine import Engine
from scheduler.sink_policy import SinkPolicy
from tests.conftest import max_relative_error, save_hf_checkpoint

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("sinks")
    save_hf_checkpoint(path, seed=31, num_attention_heads=8, num_key_value_heads=2)
    return path


class TeacherForcedRun:
    """Drives an engine over fixed token streams and records the logits of every token."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.streams: dict[str, list[int]] = {}
        self.logits: dict[str, list[torch.Tensor]] = {}
        self.used_blocks: list[int] = []
        self._batch = None
        schedule, forward = engine.scheduler.schedule, engine.model.forward

        def recording_schedule():
            self._batch = schedule()
            return self._batch

        def recording_forward(input_ids, meta, kv_caches):
            hidden = forward(input_ids, meta, kv_caches)
            logits = engine.model.compute_logits(hidden).double()
            start = 0
            for request, num_new in zip(self._batch.requests, self._batch.num_new_tokens):
                self.logits[request.request_id].append(logits[start:start + num_new])
                start += num_new
            self.used_blocks.append(engine.block_manager.num_used_blocks)
            return hidden

        def teacher(logits, rows, token_masks=None):
            tokens = [self.streams[r.request_id][r.num_tokens] for r, _ in self._batch.samplers]
            return SamplerOutput(torch.tensor(tokens))

        engine.scheduler.schedule = recording_schedule
        engine.model.forward = recording_forward
        engine.runner.sampler = teacher

    def add(self, request_id: str, stream: list[int], prompt_len: int, **sinks) -> None:
        self.streams[request_id] = stream
        self.logits[request_id] = []
        params = SamplingParams(temperature=0, max_tokens=len(stream) - prompt_len, ignore_eos=True)
        self.engine.add_request(request_id, stream[:prompt_len], params, **sinks)

    def step(self) -> None:
        self.engine.step()

    def run(self) -> dict[str, torch.Tensor]:
        while self.engine.has_unfinished_requests():
            self.step()
        # The last token of each stream is never fed to the model.
        return {rid: torch.cat(chunks) for rid, chunks in self.logits.items()}


def dense_reference(model, tokens: list[int], policy: SinkPolicy | None) -> torch.Tensor:
    """float64 logits of each token, evicting as the sink policy says, token by token."""
    ref = copy.deepcopy(model).double()
    cfg = ref.config
    rotary = ref.model.rotary
    kept_k = [torch.zeros(0, cfg.num_key_value_heads, cfg.head_dim, dtype=torch.float64)
              for _ in ref.model.layers]
    kept_v = [k.clone() for k in kept_k]
    gap_applied = False
    out = []
    for token in tokens:
        if policy is not None and kept_k[0].shape[0] == policy.capacity:
            s = policy.num_sinks
            if policy.sink_gap and not gap_applied:
                drop, gap_applied = policy.sink_gap, True
            else:
                drop = policy.block_size
            kept_k = [torch.cat([k[:s], k[s + drop:]]) for k in kept_k]
            kept_v = [torch.cat([v[:s], v[s + drop:]]) for v in kept_v]
        x = ref.model.embed_tokens(torch.tensor([token]))  # [1, hidden]
        for i, layer in enumerate(ref.model.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q, k, v = attn.qkv_proj(h).split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
            q = q.view(cfg.num_attention_heads, cfg.head_dim)
            kept_k[i] = torch.cat([kept_k[i], k.view(1, cfg.num_key_value_heads, cfg.head_dim)])
            kept_v[i] = torch.cat([kept_v[i], v.view(1, cfg.num_key_value_heads, cfg.head_dim)])
            length = kept_k[i].shape[0]
            keys = rotary.rotate(kept_k[i], torch.arange(length))  # [L, Hkv, D]
            query = rotary.rotate(q[None], torch.tensor([length - 1]))[0]  # [Hq, D]
            group = cfg.num_attention_heads // cfg.num_key_value_heads
            keys = keys.repeat_interleave(group, dim=1)  # [L, Hq, D]
            values = kept_v[i].repeat_interleave(group, dim=1)
            scores = torch.einsum("hd,lhd->hl", query, keys) * cfg.head_dim ** -0.5
            attended = torch.einsum("hl,lhd->hd", scores.softmax(-1), values)
            x = x + attn.o_proj(attended.reshape(1, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        out.append(ref.compute_logits(ref.model.norm(x))[0])
    return torch.stack(out)


def _stream(length: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 500) for _ in range(length)]


@pytest.mark.parametrize("sinks, window", [
    (2, 12),  # sinks smaller than a block (block size 4)
    (4, 12),  # sinks equal to a block
    (6, 8),  # sinks ending inside the second block
    (0, 12),  # a plain sliding window
])
def test_eviction_matches_the_dense_reference(checkpoint, sinks, window):
    engine = Engine(checkpoint, device="cpu", block_size=4, num_kv_blocks=64, max_num_batched_tokens=9,
                    attention_sinks=sinks, attention_window=window)
    policy = engine.sink_policy()
    run = TeacherForcedRun(engine)
    # Mixed batches: a prompt longer than the cache (chunked prefill across evictions), short
    # prompts with long generations, each evicting at its own steps; all >= 3x the capacity.
    lengths = [(3 * policy.capacity + 5, 2 * policy.capacity), (3 * policy.capacity + 9, 3),
               (3 * policy.capacity + 1, 1), (4 * policy.capacity, policy.capacity + 2)]
    for i, (length, prompt_len) in enumerate(lengths):
        run.add(f"s{i}", _stream(length, seed=i), prompt_len)
    logits = run.run()
    assert engine.scheduler.num_evictions > 0
    for i, (length, _) in enumerate(lengths):
        stream = run.streams[f"s{i}"]
        expected = dense_reference(engine.model, stream[:-1], policy)
        got = logits[f"s{i}"]
        assert got.shape == expected.shape
        errors = [max_relative_error(g, e) for g, e in zip(got, expected)]
        worst = max(range(len(errors)), key=errors.__getitem__)
        assert errors[worst] <= TOLERANCE, f"s{i} token {worst}: max relative error {errors[worst]:.2e}"
    # Evicted blocks went back to the pool: never more than each sequence's capacity in use.
    assert max(run.used_blocks) <= len(lengths) * policy.capacity_blocks()
    assert engine.block_manager.num_used_blocks == 0


def test_before_the_first_eviction_the_output_is_the_plain_models(checkpoint):
    stream = _stream(30, seed=7)
    results = []
    for window in (None, 28):
        engine = Engine(checkpoint, device="cpu", block_size=4, num_kv_blocks=64, attention_sinks=4,
                        attention_window=window)
        run = TeacherForcedRun(engine)
        run.add("a", stream, prompt_len=11)
        results.append(run.run()["a"])
        assert engine.scheduler.num_evictions == 0
    assert torch.equal(results[0], results[1])


def test_physical_block_ids_do_not_matter(checkpoint):
    stream = _stream(70, seed=8)
    results = []
    for seed in (1, 2):
        engine = Engine(checkpoint, device="cpu", block_size=4, num_kv_blocks=64, attention_sinks=3,
                        attention_window=12)
        random.Random(seed).shuffle(engine.block_manager._free)  # hand blocks out in another order
        run = TeacherForcedRun(engine)
        run.add("a", stream, prompt_len=20)
        results.append(run.run()["a"])
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=1e-6)


def test_a_long_sequence_holds_a_constant_number_of_blocks(checkpoint):
    engine = Engine(checkpoint, device="cpu", block_size=4, num_kv_blocks=64, attention_sinks=2,
                    attention_window=16)
    policy = engine.sink_policy()
    run = TeacherForcedRun(engine)
    run.add("a", _stream(200, seed=9), prompt_len=5)
    run.run()
    assert engine.scheduler.num_evictions > 10
    # Flat after warm-up: between one block short of the capacity and the capacity.
    assert set(run.used_blocks[40:]) <= {policy.capacity_blocks() - 1, policy.capacity_blocks()}
    assert engine.block_manager.num_used_blocks == 0


def test_shared_prefix_blocks_are_never_modified(checkpoint):
    engine = Engine(checkpoint, device="cpu", block_size=4, num_kv_blocks=64, attention_sinks=4,
                    attention_window=12)
    policy = engine.sink_policy()
    prefix = _stream(12, seed=10)
    first, second = prefix + _stream(60, seed=11), prefix + _stream(50, seed=12)
    run = TeacherForcedRun(engine)
    run.add("first", first, prompt_len=13)
    run.step()  # the first prompt is computed and its full blocks committed
    shared = list(engine.block_manager.block_table("first")[:3])
    snapshot = [(k[shared].clone(), v[shared].clone()) for k, v in engine.runner.kv_caches]
    run.add("second", second, prompt_len=20)
    run.step()
    assert engine.block_manager.block_table("second")[:3] == shared  # a prefix-cache hit
    logits = run.run()
    assert engine.scheduler.num_evictions > 0
    for (k, v), (k0, v0) in zip(engine.runner.kv_caches, snapshot):
        assert torch.equal(k[shared], k0) and torch.equal(v[shared], v0)
    for rid, stream in (("first", first), ("second", second)):
        expected = dense_reference(engine.model, stream[:-1], policy)
        # The second request computed nothing for its 12 cached prefix tokens.
        assert max_relative_error(logits[rid], expected[-len(logits[rid]):]) <= TOLERANCE
    assert len(logits["second"]) == len(second) - 1 - 12

"""The int8 KV cache (model/layers/kv_quant.py): its rounding against a float64 reference, and an engine
with it against the same engine with a float cache whose writes are rounded the same way: the
int8 pool stores, moves (sink eviction, copy-on-write, the host tier) and reads exactly those
values. What the rounding costs in quality: benchmarks/quantization_quality.py."""

from __future__ import annotations

import pytest
import torch

from model.layers import kv_quant
from model.layers.attention import write_kv
from model.sampling_params import SamplingParams
from scheduler.engine import Engine
from tests.conftest import max_relative_error, save_hf_checkpoint
from tests.test_sinks import TeacherForcedRun, _stream


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("kv-int8")
    save_hf_checkpoint(path, seed=41, num_attention_heads=8, num_key_value_heads=2)
    return path


def test_a_row_rounds_to_within_half_a_step():
    torch.manual_seed(0)
    x = torch.randn(5, 3, 64) * torch.logspace(-3, 2, 5)[:, None, None]  # rows of very different sizes
    packed = kv_quant.quantize(x)
    assert packed.dtype == torch.int8 and packed.shape == (5, 3, 66)
    back = kv_quant.dequantize(packed, torch.float64)
    step = x.double().abs().amax(dim=-1, keepdim=True) / 127  # the ideal scale
    # half a step, plus the scale's float16 rounding (2^-11 relative) applied to up to 127 steps
    assert ((back - x.double()).abs() <= step / 2 + 127 * step * 2.0 ** -11 + 1e-12).all()
    zeros = kv_quant.dequantize(kv_quant.quantize(torch.zeros(2, 8)), torch.float32)
    assert torch.equal(zeros, torch.zeros(2, 8))


def _rounding_writes(engine: Engine) -> None:
    """Give a float-cache engine's layers the int8 cache's rounding at every write."""
    def write(k_cache, v_cache, k, v, slot_mapping):
        rounded = [kv_quant.dequantize(kv_quant.quantize(x), x.dtype) for x in (k, v)]
        write_kv(k_cache, v_cache, *rounded, slot_mapping)

    for layer in engine.model.model.layers:
        layer.self_attn.write_kv = write


@pytest.mark.parametrize("sinks, window", [(None, None), (4, 12), (6, 8)])
def test_an_int8_cache_computes_exactly_its_rounded_values(checkpoint, sinks, window):
    """Mixed batches, chunked prefill across evictions, sinks ending inside a block."""
    runs = {}
    for kv in ("int8", "rounded float"):
        engine = Engine(checkpoint, device="cpu", block_size=4, num_kv_blocks=96, max_num_batched_tokens=9,
                        attention_sinks=sinks or 4, attention_window=window,
                        kv_cache_dtype="int8" if kv == "int8" else "auto")
        if kv != "int8":
            _rounding_writes(engine)
        run = TeacherForcedRun(engine)
        for i, (length, prompt_len) in enumerate([(60, 30), (45, 3), (52, 1)]):
            run.add(f"s{i}", _stream(length, seed=i), prompt_len)
        runs[kv] = run.run()
        if window:
            assert engine.scheduler.num_evictions > 0
        assert engine.block_manager.num_used_blocks == 0
    for request_id, expected in runs["rounded float"].items():
        assert max_relative_error(runs["int8"][request_id], expected) <= 1e-5, request_id


def test_sessions_prefix_caching_and_the_host_tier_keep_int8_blocks_exactly(checkpoint):
    """A session squeezed to host memory and back, and a prompt served from the prefix cache,
    continue exactly as they would have with their blocks never moved."""
    def engine(session_memory: int) -> Engine:
        return Engine(checkpoint, device="cpu", block_size=4, num_kv_blocks=12, max_model_len=48,
                      max_num_batched_tokens=64, kv_cache_dtype="int8", session_memory=session_memory)

    greedy = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, logprobs=0)
    prompt = list(range(10, 26))

    def turn(e: Engine, request_id: str, tokens: list[int]):
        e.add_request(request_id, tokens, greedy, session_id="chat")
        outputs = []
        while e.has_unfinished_requests():
            outputs += e.step()
        return [t for o in outputs for t in o.new_token_ids], [lp.logprob for o in outputs for lp in o.logprobs or ()]

    results = []
    for squeeze in (False, True):
        e = engine(session_memory=2**20)  # room for the session in host memory
        first, _ = turn(e, "t1", prompt)
        if squeeze:  # an endless windowed request takes the pool: the idle session moves to the host
            e.add_request("hog", list(range(30, 38)), SamplingParams(temperature=0.0, max_tokens=10**6,
                                                                     ignore_eos=True),
                          attention_sinks=4, attention_window=32)
            hog = e._groups["hog"][0]
            while hog.num_kept_tokens < hog.sink_policy.capacity:
                e.step()
            e.abort("hog")
            assert e.stats().num_sessions_swapped_out == 1
        results.append(turn(e, "t2", prompt + first + [40, 41]))
    assert results[0][0] == results[1][0] and results[0][1] == results[1][1]


def test_fp8_and_unknown_kv_dtypes_are_startup_errors(checkpoint):
    with pytest.raises(ValueError, match="fp8 is not offered"):
        Engine(checkpoint, device="cpu", num_kv_blocks=16, kv_cache_dtype="fp8")
    with pytest.raises(ValueError, match="not one of auto, int8"):
        Engine(checkpoint, device="cpu", num_kv_blocks=16, kv_cache_dtype="int4")

"""The Triton attention backend and decode graphs inside the engine, against the PyTorch path.

Without CUDA the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set before anything
imports triton); the decode graphs then run their padded static-buffer forward eagerly, which
is what a CUDA graph replays.
"""

from __future__ import annotations

import random

import pytest
import torch

from tests.triton_device import DEVICE  # before triton is imported: sets up the interpreter

from model.layers.attention_backend import resolve_backend
from model.execution.cuda_graphs import batch_size_ladder
from model.sampling_params import SamplingParams
from scheduler.engine import Engine
from tests.conftest import save_hf_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    # head_dim 32 (the kernels need a power of two >= 16), GQA 4/2.
    path = tmp_path_factory.mktemp("backend") / "tiny"
    save_hf_checkpoint(path, seed=5, hidden_size=128, num_attention_heads=4, num_key_value_heads=2)
    return path


def _generate(path, prompts, graphs: bool = False, **options) -> list[list[int]]:
    engine = Engine(path, device=DEVICE, dtype="float32", block_size=4, num_kv_blocks=96, max_num_seqs=8,
                    max_num_batched_tokens=64, **options)
    graph_steps = []
    if graphs:
        if DEVICE == "cpu":
            engine.runner.use_decode_graphs(8, engine.max_model_len, capture=False)
        run = engine.runner.decode_graphs.run
        engine.runner.decode_graphs.run = lambda token_ids, *args: graph_steps.append(len(token_ids)) or run(
            token_ids, *args)
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    outputs = [out.token_ids for out in engine.generate(prompts, params, use_tqdm=False)]
    if graphs:  # decode steps of several batch sizes went through the padded buffers
        assert len(set(graph_steps)) >= 2, graph_steps
    return outputs


def _prompts(count: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[1] + [rng.randrange(3, 512) for _ in range(rng.randrange(2, 30))] for _ in range(count)]


def test_backend_resolution(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu, 64) == "torch"
    assert resolve_backend("torch", cpu, 64) == "torch"
    with pytest.raises(ValueError, match="not one of"):
        resolve_backend("flash", cpu, 64)
    with pytest.raises(ValueError, match="power of two"):
        resolve_backend("triton", cpu, 48)
    monkeypatch.setenv("SINKSERVE_ATTENTION_BACKEND", "torch")
    assert resolve_backend(None, cpu, 64) == "torch"
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        resolve_backend("triton", cpu, 64)


def test_batch_size_ladder():
    assert batch_size_ladder(1) == [1]
    assert batch_size_ladder(5) == [1, 2, 4, 8]
    assert batch_size_ladder(40) == [1, 2, 4, 8, 16, 32, 48]


@pytest.mark.parametrize("window", [None, 12], ids=["dense", "sinks"])
def test_triton_engine_matches_the_torch_engine(checkpoint, window):
    # Prompts past the window are prefilled in chunks with evictions between them; with the
    # window, decodes run past it, so sink gaps and evicted blocks are exercised in both kernels.
    prompts = _prompts(5, seed=window or 0)
    options = {"attention_sinks": 2, "attention_window": window} if window else {}
    expected = _generate(checkpoint, prompts, attention_backend="torch", **options)
    assert _generate(checkpoint, prompts, attention_backend="triton", **options) == expected
    # Decode steps through the padded static buffers (batches of 1..5 padded to 1/2/4/8).
    assert _generate(checkpoint, prompts, graphs=True, attention_backend="triton", **options) == expected


def test_triton_engine_on_an_int8_cache_matches_the_torch_engine(checkpoint):
    # The kernels write the int8 cache's bytes and read them as the PyTorch path does: the same
    # greedy tokens past the window, eager and through the decode graphs' padded buffers.
    prompts = _prompts(5, seed=3)
    options = {"attention_sinks": 2, "attention_window": 12, "kv_cache_dtype": "int8"}
    expected = _generate(checkpoint, prompts, attention_backend="torch", **options)
    assert expected != _generate(checkpoint, prompts, attention_backend="torch", attention_sinks=2,
                                 attention_window=12)  # the cache's rounding shows in the tokens
    assert _generate(checkpoint, prompts, attention_backend="triton", **options) == expected
    assert _generate(checkpoint, prompts, graphs=True, attention_backend="triton", **options) == expected

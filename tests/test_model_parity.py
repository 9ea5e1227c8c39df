"""Logits parity with transformers.LlamaForCausalLM through the paged pool."""

from __future__ import annotations

import pytest
import torch

from model.checkpoints.loader import load_model
from tests.conftest import PagedDriver, max_relative_error, save_hf_checkpoint

CONFIGS = {
    "gqa_8_4": dict(num_attention_heads=8, num_key_value_heads=4),
    "gqa_8_2": dict(num_attention_heads=8, num_key_value_heads=2),
    "mqa_8_1": dict(num_attention_heads=8, num_key_value_heads=1),
    "mha_4_4": dict(num_attention_heads=4, num_key_value_heads=4),
    "explicit_head_dim": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=32),
    "tied": dict(tie_word_embeddings=True),
    "rope_theta": dict(rope_theta=500000.0),
    "llama3_scaling": dict(rope_theta=50000.0, max_position_embeddings=512, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}),
    "linear_scaling": dict(rope_scaling={"rope_type": "linear", "factor": 4.0}),
    "attention_bias": dict(attention_bias=True),
}
TOLERANCE = 1e-4


def _prompts(vocab_size: int, lengths, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab_size, (n,), generator=g).tolist() for n in lengths]


def _reference_logits(hf, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_prefill_and_decode_match_transformers(tmp_path, name):
    hf = save_hf_checkpoint(tmp_path, seed=1, **CONFIGS[name])
    model = load_model(tmp_path)
    vocab = model.config.vocab_size
    # Three sequences of different lengths, prefilled together in one forward.
    prompts = _prompts(vocab, [7, 19, 2], seed=2)
    continuations = _prompts(vocab, [12, 5, 9], seed=3)
    driver = PagedDriver(model, num_blocks=64, block_size=4, seed=4)
    logits = driver.step(dict(enumerate(prompts)))
    for seq, prompt in enumerate(prompts):
        err = max_relative_error(logits[seq], _reference_logits(hf, prompt))
        assert err <= TOLERANCE, f"{name} prefill seq {seq}: max relative error {err:.2e}"
    # Then token by token, the sequences in one batch, each at its own length, until each
    # has consumed its continuation (so the batch shrinks as they finish).
    for step in range(max(map(len, continuations))):
        batch = {s: [c[step]] for s, c in enumerate(continuations) if step < len(c)}
        logits = driver.step(batch)
        for seq in batch:
            ids = prompts[seq] + continuations[seq][:step + 1]
            expected = _reference_logits(hf, ids)[-1]
            err = max_relative_error(logits[seq][0], expected)
            assert err <= TOLERANCE, f"{name} decode seq {seq} step {step}: max relative error {err:.2e}"


def test_chunked_prefill_mixed_with_decodes(tmp_path):
    """A prompt prefilled in chunks while other sequences decode in the same forwards."""
    hf = save_hf_checkpoint(tmp_path, seed=5, num_attention_heads=8, num_key_value_heads=2)
    model = load_model(tmp_path)
    long_prompt, short_a, short_b = _prompts(model.config.vocab_size, [23, 6, 3], seed=6)
    driver = PagedDriver(model, num_blocks=64, block_size=8, seed=7)
    driver.step({1: short_a, 2: short_b})
    history = {0: [], 1: list(short_a), 2: list(short_b)}
    for start in range(0, len(long_prompt), 5):
        chunk = long_prompt[start:start + 5]
        decode_tokens = {1: [11 + start], 2: [13 + start]}
        logits = driver.step({0: chunk, **decode_tokens})
        history[0] += chunk
        for seq, toks in decode_tokens.items():
            history[seq] += toks
        expected = _reference_logits(hf, history[0])[-len(chunk):]
        assert max_relative_error(logits[0], expected) <= TOLERANCE
        for seq in (1, 2):
            expected = _reference_logits(hf, history[seq])[-1]
            assert max_relative_error(logits[seq][0], expected) <= TOLERANCE


def test_mistral_architecture_matches(tmp_path):
    hf = save_hf_checkpoint(tmp_path, seed=8, architecture="mistral", num_key_value_heads=4)
    model = load_model(tmp_path)
    assert model.config.architecture == "MistralForCausalLM"
    prompt = _prompts(model.config.vocab_size, [17], seed=9)[0]
    logits = PagedDriver(model, block_size=16).step({0: prompt})[0]
    assert max_relative_error(logits, _reference_logits(hf, prompt)) <= TOLERANCE


def test_block_ids_do_not_change_logits(tiny_checkpoint):
    """The same sequences through two different physical layouts give identical logits."""
    path, _ = tiny_checkpoint
    model = load_model(path)
    prompts = dict(enumerate(_prompts(model.config.vocab_size, [9, 14, 5], seed=10)))
    a = PagedDriver(model, block_size=4, seed=11).step(prompts)
    b = PagedDriver(model, block_size=4, seed=12).step(prompts)
    for seq in prompts:
        torch.testing.assert_close(a[seq], b[seq], rtol=0, atol=1e-6)

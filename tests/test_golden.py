"""Greedy generation on the bundled stories260K equals transformers' greedy output."""

from __future__ import annotations

import pytest
import sentencepiece as spm
import torch

from model.checkpoints.loader import load_model
from tests.conftest import BUNDLED_MODEL, PagedDriver


def test_bundled_model_greedy_matches_transformers():
    transformers = pytest.importorskip("transformers")
    sp = spm.SentencePieceProcessor(model_file=str(BUNDLED_MODEL / "tokenizer.model"))
    prompt = [1] + sp.encode("Once upon a time")
    hf = transformers.LlamaForCausalLM.from_pretrained(BUNDLED_MODEL).eval()
    with torch.no_grad():
        expected = hf.generate(torch.tensor([prompt]), max_new_tokens=64, do_sample=False,
                               eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()

    model = load_model()  # no path: the bundled model
    driver = PagedDriver(model, num_blocks=32, block_size=16)
    logits = driver.step({0: prompt})[0][-1]
    generated = []
    for _ in range(64):
        generated.append(int(logits.argmax()))
        logits = driver.step({0: generated[-1:]})[0][-1]
    assert generated == expected, f"\nours:         {sp.decode(generated)!r}\ntransformers: {sp.decode(expected)!r}"
    assert sp.decode(generated).startswith(", there was a little girl named Lily")

"""Shared fixtures: tiny random Hugging Face checkpoints and a driver for the paged model."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest
import torch

from model.layers.attention import AttentionMetadata
from model.models.llama import LlamaForCausalLM

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLED_MODEL = REPO_ROOT / "model" / "bundled" / "stories260K"

TINY_LLAMA = dict(
    vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
    num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256,
    rms_norm_eps=1e-5, tie_word_embeddings=False, initializer_range=0.08,
)


def save_hf_checkpoint(path: Path, seed: int = 0, architecture: str = "llama", **overrides):
    """Save a random transformers model to `path`; return it (fp32, eval, eager attention)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    kwargs = {**TINY_LLAMA, **overrides}
    if architecture == "mistral":
        config = transformers.MistralConfig(sliding_window=None, **kwargs)
        hf = transformers.MistralForCausalLM(config)
    else:
        config = transformers.LlamaConfig(**kwargs)
        hf = transformers.LlamaForCausalLM(config)
    hf.config._attn_implementation = "eager"
    hf.save_pretrained(path)
    # The bundled tokenizer (vocab 512) makes the directory a complete model for the engine.
    shutil.copy(BUNDLED_MODEL / "tokenizer.model", path / "tokenizer.model")
    return hf.eval()


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """A random tiny LLaMA (GQA 8/2) saved in Hugging Face layout, and the transformers model."""
    hf = save_hf_checkpoint(tmp_path / "tiny")
    return tmp_path / "tiny", hf


class PagedDriver:
    """Runs a model over several sequences through the paged pool, allocating blocks in a
    shuffled order so that no sequence's blocks are contiguous or in order."""

    def __init__(self, model: LlamaForCausalLM, num_blocks: int = 128, block_size: int = 4, seed: int = 0):
        self.model = model
        self.block_size = block_size
        self.kv_caches = model.allocate_kv_cache(num_blocks, block_size)
        self.free_blocks = list(range(num_blocks))
        random.Random(seed).shuffle(self.free_blocks)
        self.block_tables: dict[int, list[int]] = {}
        self.lengths: dict[int, int] = {}

    def step(self, new_tokens: dict[int, list[int]]) -> dict[int, torch.Tensor]:
        """Feed each sequence its new tokens in one forward; logits [len(new), vocab] per sequence."""
        # Decodes first, as the metadata expects for its fast path.
        order = sorted(new_tokens, key=lambda s: len(new_tokens[s]) != 1)
        query_lens, context_lens, tables, flat = [], [], [], []
        for seq in order:
            table = self.block_tables.setdefault(seq, [])
            length = self.lengths.get(seq, 0) + len(new_tokens[seq])
            while len(table) * self.block_size < length:
                table.append(self.free_blocks.pop())
            self.lengths[seq] = length
            query_lens.append(len(new_tokens[seq]))
            context_lens.append(length)
            tables.append(table)
            flat.extend(new_tokens[seq])
        device = self.model.model.embed_tokens.weight.device
        meta = AttentionMetadata.build(query_lens, context_lens, tables, self.block_size, device)
        with torch.no_grad():
            hidden = self.model(torch.tensor(flat, device=device), meta, self.kv_caches)
            logits = self.model.compute_logits(hidden)
        out, start = {}, 0
        for seq, q_len in zip(order, query_lens):
            out[seq] = logits[start:start + q_len]
            start += q_len
        return out


def max_relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()

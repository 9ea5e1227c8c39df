"""Device and dtype defaults, and how many KV blocks fit in the memory budget."""

from __future__ import annotations

import logging

import torch

from model.layers.attention import AttentionMetadata
from model.models.llama import LlamaForCausalLM

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but no CUDA GPU is available")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """'auto' is bfloat16 on a GPU and float32 on a CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def kv_bytes_per_block(model: LlamaForCausalLM, block_size: int) -> int:
    cfg = model.config
    dtype, row = model.kv_cache_layout()
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * cfg.num_hidden_layers * block_size * cfg.num_key_value_heads * row * element


def size_kv_pool(model: LlamaForCausalLM, block_size: int, num_kv_blocks: int | None, kv_cache_memory: int,
                 gpu_memory_utilization: float, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int) -> int:
    """The number of KV blocks: as given, or what the memory budget holds.

    On a CPU the budget is `kv_cache_memory` bytes. On a GPU a forward at the largest batch is
    profiled and the pool gets `gpu_memory_utilization` of the device minus that peak. Never
    more than max_num_seqs full-length sequences need, never fewer than one needs.
    """
    per_block = kv_bytes_per_block(model, block_size)
    blocks_per_seq = -(-max_model_len // block_size)
    if num_kv_blocks is None:
        device = model.model.embed_tokens.weight.device
        if device.type == "cuda":
            budget = _profile_free_gpu_memory(model, max_num_batched_tokens, gpu_memory_utilization)
        else:
            budget = kv_cache_memory
        num_kv_blocks = min(budget // per_block, max_num_seqs * blocks_per_seq)
        logger.debug("KV pool: %d blocks of %d tokens (%.1f MiB)", num_kv_blocks, block_size,
                    num_kv_blocks * per_block / 2**20)
    if num_kv_blocks < blocks_per_seq:
        raise ValueError(
            f"the KV pool ({num_kv_blocks} blocks of {block_size} tokens) cannot hold one sequence of "
            f"max_model_len={max_model_len} tokens; give it more memory or lower max_model_len"
        )
    return num_kv_blocks


def _profile_free_gpu_memory(model: LlamaForCausalLM, num_tokens: int, utilization: float) -> int:
    """Bytes left for the KV pool after the weights and the peak of a largest-batch forward."""
    device = model.model.embed_tokens.weight.device
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    block_size = 16
    scratch = model.allocate_kv_cache(-(-num_tokens // block_size), block_size)
    meta = AttentionMetadata.build([num_tokens], [num_tokens], [list(range(len(scratch[0][0])))],
                                   block_size, device)
    with torch.inference_mode():
        hidden = model(torch.zeros(num_tokens, dtype=torch.int64, device=device), meta, scratch)
        model.compute_logits(hidden[-256:])
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    scratch_bytes = sum(k.numel() * k.element_size() * 2 for k, _ in scratch)
    del scratch, hidden
    torch.cuda.empty_cache()
    _, total = torch.cuda.mem_get_info(device)
    return max(int(total * utilization) - (peak - scratch_bytes), 0)

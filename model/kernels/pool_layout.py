"""The KV pool as the Triton kernels address it: layout checks, and an int8 pool's scales seen as float16."""

from __future__ import annotations

import torch

from model.layers import kv_quant


def check_pool_layout(cache: torch.Tensor) -> None:
    if cache.dim() != 4 or cache.stride(-1) != 1:
        raise ValueError("KV pool must be [num_blocks, block_size, num_kv_heads, head_dim] "
                         "with a contiguous last dimension")


def scales_view(cache: torch.Tensor) -> torch.Tensor:
    """An int8 pool [.., D + 2] seen as float16 [.., D / 2 + 1], where element D / 2 of a row is
    its scale (the kernels address it from the row's int8 offset halved); a float pool itself
    (the kernels do not read it)."""
    if not kv_quant.is_quantized(cache):
        return cache
    if cache.shape[-1] % 2 or any(stride % 2 for stride in cache.stride()[:-1]):
        raise ValueError("an int8 KV pool needs an even row length and even strides")
    return cache.view(torch.float16)


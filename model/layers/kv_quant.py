"""An int8 KV cache (`--kv-cache-dtype int8`): each token's key (and value) of each KV head stored
as head_dim int8 codes and a float16 scale, s = max |x| / 127 over the head's dims.

The pool keeps its shape and one tensor per layer for K and one for V, in int8, with two more
bytes per row: `[num_blocks, block_size, num_kv_heads, head_dim + 2]`, the row's codes followed
by its scale's bytes (the layout GGUF's Q8_0 gives its blocks). Everything that moves whole
blocks (copy-on-write, the host tier, sizing) moves scales with their codes unchanged; only the
write (`quantize`) and the attention's read (`dequantize`) know the layout. Against a float32
pool a slot takes 66 bytes per head instead of 256 (3.9x the tokens per GiB), against bfloat16
1.9x.
"""

from __future__ import annotations

import torch

INT8_MAX = 127
SCALE_BYTES = 2  # a float16 scale per row
_TINY_SCALE = 2.0 ** -24  # float16's smallest subnormal: a scale of 0 would divide by zero


def packed_head_dim(head_dim: int) -> int:
    return head_dim + SCALE_BYTES


def is_quantized(cache: torch.Tensor) -> bool:
    return cache.dtype == torch.int8


def head_dim_of(cache: torch.Tensor) -> int:
    return cache.shape[-1] - SCALE_BYTES if is_quantized(cache) else cache.shape[-1]


def quantize(x: torch.Tensor) -> torch.Tensor:
    """x [..., D] float -> [..., D + 2] int8: codes round(x / s), then s's float16 bytes."""
    scale = (x.float().abs().amax(dim=-1, keepdim=True) / INT8_MAX).to(torch.float16)
    scale = scale.clamp_(min=_TINY_SCALE)  # [..., 1]
    codes = (x.float() / scale.float()).round_().clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return torch.cat([codes, scale.view(torch.int8)], dim=-1)


def dequantize(packed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[..., D + 2] int8 -> [..., D] in dtype: codes * s, multiplied in float32 (then rounded
    to dtype once, as the Triton kernels do). Three passes over the codes, the product in place:
    a mixed int8 x float32 multiply runs unvectorized (2x slower, measured)."""
    scale = packed[..., -SCALE_BYTES:].contiguous().view(torch.float16).float()  # [..., 1]
    values = packed[..., :-SCALE_BYTES].to(torch.float32)  # [..., D]
    values.mul_(scale)
    return values if dtype == torch.float32 else values.to(dtype)

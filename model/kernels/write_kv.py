"""Triton store of new K/V at their pool slots (`write_kv_triton`), quantizing for an int8 pool.

The GPU fast path of `model.layers.attention.write_kv`: one program per new token stores its K
and V [Hkv, D] at its slot; an int8 pool gets each row's codes and float16 scale as
model/layers/kv_quant.py computes them (ties to even, the division correctly rounded).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from model.kernels.pool_layout import check_pool_layout, scales_view
from model.layers import kv_quant


@triton.jit
def _round_half_even(y):
    """y rounded to the nearest integer, ties to even (as torch.round)."""
    f = tl.floor(y)
    diff = y - f
    odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
    return tl.where((diff > 0.5) | ((diff == 0.5) & odd), f + 1.0, f)


@triton.jit
def _store_rows(x, row_off, dims, row_valid, cache_ptr, scale_ptr, KV_INT8: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Store rows x [H, D] (row_valid [H]) at cache_ptr + row_off [H]; an int8 pool gets each row's codes
    round(x / s), s = max |x| / 127 in float16, and s after them, as model/layers/kv_quant.py."""
    if KV_INT8:
        xf = x.to(tl.float32)
        step = (tl.max(tl.abs(xf), axis=1) / 127.0).to(tl.float16).to(tl.float32)  # [H]
        step = tl.maximum(step, 5.960464477539063e-08)  # float16's smallest subnormal, 2^-24
        codes = _round_half_even(tl.math.div_rn(xf, step[:, None]))
        codes = tl.minimum(tl.maximum(codes, -127.0), 127.0)
        tl.store(cache_ptr + row_off[:, None] + dims[None, :], codes.to(tl.int8), mask=row_valid[:, None])
        tl.store(scale_ptr + row_off // 2 + HEAD_DIM // 2, step.to(tl.float16), mask=row_valid)
    else:
        tl.store(cache_ptr + row_off[:, None] + dims[None, :], x.to(cache_ptr.dtype.element_ty),
                 mask=row_valid[:, None])


@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, slot_mapping_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
    NUM_KV_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, KV_INT8: tl.constexpr,
):
    """Program t stores k[t], v[t] [Hkv, D] (k already rotated) at pool slot slot_mapping[t]
    (negative: skipped)."""
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + t).to(tl.int64)
    if slot < 0:  # padding token
        return
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    heads = tl.arange(0, HEADS_PAD)  # [H]
    dims = tl.arange(0, HEAD_DIM)  # [D]
    row_valid = heads < NUM_KV_HEADS  # [H]
    mask = row_valid[:, None]  # [H, 1]
    k = tl.load(k_ptr + t * stride_kt + heads[:, None] * stride_kh + dims[None, :], mask=mask, other=0.0)  # [H, D]
    v = tl.load(v_ptr + t * stride_vt + heads[:, None] * stride_vh + dims[None, :], mask=mask, other=0.0)  # [H, D]
    k_row = block * stride_kcb + offset * stride_kcs + heads * stride_kch  # [H]
    v_row = block * stride_vcb + offset * stride_vcs + heads * stride_vch  # [H]
    _store_rows(k, k_row, dims, row_valid, k_cache_ptr, k_scale_ptr, KV_INT8, HEAD_DIM)
    _store_rows(v, v_row, dims, row_valid, v_cache_ptr, v_scale_ptr, KV_INT8, HEAD_DIM)



def write_kv_triton(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    slot_mapping: torch.Tensor) -> None:
    """Store new k (already rotated), v [T, num_kv_heads, head_dim] at their pool slots
    (slot < 0: skipped)."""
    check_pool_layout(k_cache)
    check_pool_layout(v_cache)
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    if head_dim & (head_dim - 1):
        raise ValueError(f"head_dim must be a power of two, got {head_dim}")
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    _write_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, scales_view(k_cache), scales_view(v_cache), slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads, HEADS_PAD=triton.next_power_of_2(num_kv_heads), HEAD_DIM=head_dim,
        BLOCK_SIZE=k_cache.shape[1], KV_INT8=kv_quant.is_quantized(k_cache),
        num_warps=1 if num_kv_heads * head_dim <= 512 else 4,
    )

"""Triton int8 matmuls with the scales fused: the GPU path of the `int8` and `int8-weight` formats
(model/quantization/formats.py), whose CPU path is PyTorch's `_int_mm` and int8 pack matmul.

Both compute `x @ W.T` for a weight stored as int8 codes q [N, K] with a float32 scale s [N]
per output channel (w = q * s):

- W8A8 (`int8_matmul(codes, row_scale, ...)`): activations already quantized per token, codes
  p [M, K] int8 and a float32 scale t [M]; an int8 x int8 -> int32 tl.dot over K, then
  y = acc * t * s, in float32, exact up to the final multiply (int32 sums of products of
  |codes| <= 127 cannot overflow for K < 2^17).
- W8A16 (`int8_matmul(x, None, ...)`): float16, bfloat16 (or float32) activations x [M, K]; each weight
  tile's codes are converted to x's dtype as they are loaded (exact: |q| <= 127), a tl.dot in
  float32 accumulation, then y = acc * s.

One program per [BLOCK_M, BLOCK_N] tile of the output, walking K in BLOCK_K steps with masked
loads (any M, N, K). Tiles: BLOCK_M the smallest of 16/32/64 that covers M (decode batches are
small; 16 is tl.dot's minimum), BLOCK_N 64, BLOCK_K 64; chosen without a GPU to time them, not
tuned. Under Triton's interpreter (TRITON_INTERPRET=1, CPU tensors) bfloat16 dots are computed
in float32 (its tl.dot is wrong on bfloat16 operands), as in model/kernels/paged_attention.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_K = 1 << 17  # int32 accumulation of 127 * 127 products stays exact below this


@triton.jit
def _int8_matmul_kernel(
    a_ptr, a_scale_ptr, w_ptr, w_scale_ptr, out_ptr, M, N, K,
    stride_am, stride_wn, stride_om,
    A_INT8: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Program (row tile, column tile): out[rows, cols] = a[rows] @ (w[cols] * s[cols]).T, with
    a scaled per row by t when A_INT8."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    row_valid = rows < M
    col_valid = cols < N
    offs_k = tl.arange(0, BLOCK_K)  # [BK]
    if A_INT8:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k  # [BK]
        k_valid = k < K
        a = tl.load(a_ptr + rows[:, None].to(tl.int64) * stride_am + k[None, :],
                    mask=row_valid[:, None] & k_valid[None, :], other=0)  # [BM, BK]
        # The weight's rows along columns: the right operand of a @ w.T.
        w = tl.load(w_ptr + cols[None, :].to(tl.int64) * stride_wn + k[:, None],
                    mask=col_valid[None, :] & k_valid[:, None], other=0)  # [BK, BN] int8
        if A_INT8:
            acc += tl.dot(a, w)
        elif UPCAST:
            acc += tl.dot(a.to(tl.float32), w.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(a, w.to(a.dtype))
    w_scale = tl.load(w_scale_ptr + cols, mask=col_valid, other=0.0)  # [BN]
    if A_INT8:
        a_scale = tl.load(a_scale_ptr + rows, mask=row_valid, other=0.0)  # [BM]
        out = acc.to(tl.float32) * a_scale[:, None] * w_scale[None, :]
    else:
        out = acc * w_scale[None, :]
    out_ptrs = out_ptr + rows[:, None].to(tl.int64) * stride_om + cols[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_valid[:, None] & col_valid[None, :])


def int8_matmul(x: torch.Tensor, x_scale: torch.Tensor | None, codes: torch.Tensor, scale: torch.Tensor,
                out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x [M, K] @ (codes [N, K] int8 * scale [N] float32).T -> [M, N].

    x_scale None: x is float16/bfloat16 (W8A16), the result in x's dtype; else x is int8 codes
    and x_scale [M] float32 their per-row scale (W8A8), the result float32 unless `out_dtype`."""
    if x.dim() != 2 or codes.dim() != 2 or x.shape[1] != codes.shape[1]:
        raise ValueError(f"x {tuple(x.shape)} and weight {tuple(codes.shape)} do not multiply")
    if codes.dtype != torch.int8 or scale.shape != (codes.shape[0],):
        raise ValueError("the weight must be int8 codes [N, K] with a scale [N]")
    a_int8 = x_scale is not None
    if a_int8 and (x.dtype != torch.int8 or x_scale.shape != (x.shape[0],)):
        raise ValueError("W8A8 takes int8 activation codes [M, K] and a scale [M]")
    if not a_int8 and x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"W8A16 takes float activations, got {x.dtype}")
    m, k = x.shape
    n = codes.shape[0]
    if a_int8 and k >= MAX_K:
        raise ValueError(f"K = {k} could overflow the int32 accumulator")
    x = x if x.stride(-1) == 1 else x.contiguous()
    codes = codes if codes.stride(-1) == 1 else codes.contiguous()
    out = torch.empty((m, n), dtype=out_dtype or (torch.float32 if a_int8 else x.dtype), device=x.device)
    if m == 0 or n == 0:
        return out
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    block_n, block_k = 64, 64
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _int8_matmul_kernel[grid](
        x, x_scale.float().contiguous() if a_int8 else scale, codes, scale.float().contiguous(), out, m, n, k,
        x.stride(0), codes.stride(0), out.stride(0),
        A_INT8=a_int8,
        # float32 dots (without TF32) for float32 activations and in the interpreter
        UPCAST=not a_int8 and (x.device.type == "cpu" or x.dtype == torch.float32),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=4,
    )
    return out

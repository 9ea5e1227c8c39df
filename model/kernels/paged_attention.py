"""Triton paged attention over pre-RoPE keys, with StreamingLLM sink gaps (the GPU fast path).

Same semantics as the PyTorch reference in model/attention.py, which is the oracle:

- The pool of one layer is K and V `[num_blocks, block_size, num_kv_heads, head_dim]`.
  Sequence s's key j (cache order) lives at slot index `i = j + sink_gap[s] * (j >= sink_len[s])`,
  block `block_tables[s, i // block_size]`, offset `i % block_size`.
- Keys are stored before RoPE. A kernel loads the two halves of a key tile, rotates them in fp32
  at the keys' cache indices j (rotate-half layout), and scores `q . rot(k) = q1 . r1 + q2 . r2`.
  Queries arrive already rotated.
- Flat batch: decodes first (`meta.num_decode_seqs` sequences with one token each), then prefill
  chunks at `meta.query_start_loc`. A query at position p sees keys 0..p of its sequence; the
  chunk's own K/V are already in the pool (`write_kv` runs first).
- GQA: each program loads a K/V tile once for all G = Hq / Hkv query heads of its KV head.

Kernels:
- `_write_kv_kernel`: one program per new token, stores its K and V [Hkv, D] at its slot.
- `_decode_kernel`: one program per (decode sequence, KV head, context partition), the G query
  heads of the group as the rows of a tl.dot (padded to 16, tl.dot's minimum); online softmax
  over key tiles, fp32 accumulation. With several partitions (flash-decoding) each program
  writes an unnormalised partial output with its running max and sum-exp, and
  `_merge_kernel` combines them; with one partition the decode kernel writes the output.
- `_prefill_kernel`: all prefill chunks in one launch, grid (query tile, prefill sequence,
  KV head); a tile's rows are BLOCK_M tokens x G_PAD heads; causal by position over the paged
  context; online softmax, fp32 accumulation.

Rotary cos/sin are computed in the kernel from `inv_freq` (fp32 [D/2]), not read from a
precomputed [max_len, D/2] table: the angle `j * inv_freq` is the same fp32 product the reference
forms, so the angles agree exactly; there is no table to size to the longest context or rebuild
per RoPE schedule; and decode is memory-bound, where a fp32 cos/sin table would read 4*D bytes per
key (twice the bf16 key itself) while the trig is register-only work shared by the G query heads
(and, in prefill, the BLOCK_M tokens) of a program. The trig is `_sincos` (Cody-Waite
reduction with FMAs + cephes polynomials, max abs error ~1e-7), not tl.cos/tl.sin, whose libdevice
slow paths make ptxas spill.

dtypes: float32, float16, bfloat16 (q and the pools share one dtype; the output has it too).
Head dims: any power of two >= 16 (D/2 < 16, i.e. D = 16, scores by broadcast-multiply-sum
instead of tl.dot). Block sizes: any (16 and 32 are tested). fp32 dots run with
input_precision="ieee" (no TF32), so fp32 matches the reference tightly on a GPU too.
Triton's interpreter (TRITON_INTERPRET=1, CPU tensors) runs all three dtypes; its tl.dot gives
wrong results on bfloat16 operands (triton 3.9), so on CPU tensors bf16 dot operands are cast to
fp32 first (UPCAST); on a GPU bf16 dots run natively.

Only long-standing tl APIs are used (tl.load/store with masks, tl.dot,
tl.exp, tl.fma, tl.maximum, tl.where, tl.arange, tl.program_id, tl.constexpr, and
tl.dot's `input_precision`), for triton 3.3 .. 3.9.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from model.attention import AttentionMetadata
from model.rotary import RotaryEmbedding

# Keys per context partition of the decode kernel (flash-decoding split).
DEFAULT_PARTITION_SIZE = 512


# ---------------------------------------------------------------------------------------------
# jit helpers
# ---------------------------------------------------------------------------------------------


@triton.jit
def _dot(a, b, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """a [M, K] @ b [K, N] -> fp32 [M, N]."""
    if UPCAST:  # the interpreter's tl.dot is wrong on bf16 operands
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if IEEE:  # fp32 operands: no TF32
        out = tl.dot(a, b, input_precision="ieee")
    else:
        out = tl.dot(a, b)
    return out


@triton.jit
def _scores(q1, q2, r1, r2, USE_DOT: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """q1, q2 [R, HALF] (query halves) and r1, r2 [HALF, N] (rotated key halves, transposed)
    -> q . rot(k) fp32 [R, N]."""
    if USE_DOT:
        s = _dot(q1, r1, IEEE, UPCAST) + _dot(q2, r2, IEEE, UPCAST)
    else:  # HALF < 16: below tl.dot's minimum K
        # [R, HALF, 1] * [1, HALF, N] -> sum over HALF -> [R, N]
        s = tl.sum(q1.to(tl.float32)[:, :, None] * r1.to(tl.float32)[None, :, :], axis=1)
        s += tl.sum(q2.to(tl.float32)[:, :, None] * r2.to(tl.float32)[None, :, :], axis=1)
    return s


@triton.jit
def _key_slots(block_table_row, j, valid, sink_len, sink_gap, BLOCK_SIZE: tl.constexpr,
               HAS_SINKS: tl.constexpr):
    """Block ids and in-block offsets [N] of keys j [N] (valid [N]) of one sequence."""
    if HAS_SINKS:
        i = j + sink_gap * (j >= sink_len).to(tl.int64)
    else:
        i = j
    block = tl.load(block_table_row + i // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
    return block, i % BLOCK_SIZE


@triton.jit
def _sincos(x):
    """sin(x), cos(x) in fp32 for angles x >= 0 (key positions * inv_freq).

    Cody-Waite reduction by pi/2 in three parts with fused multiply-adds (each product exact),
    then cephes' sinf/cosf polynomials on [-pi/4, pi/4] (about 1 ulp there): max abs error
    ~1e-7 for angles up to 1e7 (tested), far below the fp32 rounding of the angle itself.
    sin and cos share the reduction, and it is register-only FMA work: libdevice's sinf/cosf
    (tl.sin, tl.cos) each carry a Payne-Hanek slow path with a local array, and with them on a
    [D/2, BLOCK_N] tile ptxas spills heavily (measured by compiling for sm_80/sm_90).
    """
    k = (x * 0.6366197723675814 + 0.5).to(tl.int32)  # nearest multiple of pi/2 (x >= 0)
    kf = k.to(tl.float32)
    r = tl.fma(kf, -1.5703125, x)  # pi/2 = 1.5703125 + 4.8375e-4 + 7.5498e-8 (+ 2e-15)
    r = tl.fma(kf, -4.837512969970703125e-4, r)
    r = tl.fma(kf, -7.54978995489188216e-8, r)  # r in about [-pi/4, pi/4]
    z = r * r
    sin_r = ((-1.9515295891e-4 * z + 8.3321608736e-3) * z - 1.6666654611e-1) * z * r + r
    cos_r = ((2.443315711809948e-5 * z - 1.388731625493765e-3) * z + 4.166664568298827e-2) * z * z - 0.5 * z + 1.0
    odd = (k & 1) != 0  # quadrants 1 and 3 swap sin and cos
    sin_x = tl.where(odd, cos_r, sin_r)
    cos_x = tl.where(odd, sin_r, cos_r)
    sin_x = tl.where((k & 2) != 0, -sin_x, sin_x)  # quadrants 2, 3
    cos_x = tl.where(((k + 1) & 2) != 0, -cos_x, cos_x)  # quadrants 1, 2
    return sin_x, cos_x


@triton.jit
def _rotated_key_tile(k_cache_ptr, key_off, valid, inv_freq, j, offs_half, HALF: tl.constexpr):
    """Load the two halves of a key tile and rotate them at positions j, in fp32.

    key_off [N]: element offsets of the keys (block, slot and head applied); inv_freq [HALF];
    j [N] int64 key positions. Returns r1, r2 [HALF, N] fp32 (keys along columns, ready to be
    the right operand of q @ k^T).
    """
    ptrs = k_cache_ptr + key_off[None, :] + offs_half[:, None]  # [HALF, N]
    k1 = tl.load(ptrs, mask=valid[None, :], other=0.0).to(tl.float32)  # [HALF, N]
    k2 = tl.load(ptrs + HALF, mask=valid[None, :], other=0.0).to(tl.float32)  # [HALF, N]
    freqs = inv_freq[:, None] * j.to(tl.float32)[None, :]  # [HALF, N], as the reference forms it
    sin, cos = _sincos(freqs)
    r1 = k1 * cos - k2 * sin
    r2 = k2 * cos + k1 * sin
    return r1, r2


@triton.jit
def _attend_key_tile(
    q1, q2, m_i, l_i, acc, j, valid, allowed, table_row, sink_len, sink_gap, kv_head, inv_freq,
    offs_half, offs_d, scale, k_cache_ptr, v_cache_ptr,
    stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
    BLOCK_SIZE: tl.constexpr, HALF: tl.constexpr, HAS_SINKS: tl.constexpr,
    USE_DOT: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
):
    """One step of online softmax over the key tile j [N] (valid [N]) of one sequence and KV
    head: the rows' running max m_i [R], sum-exp l_i [R] and output acc [R, D], updated.
    `allowed` [R, N] (or [1, N]) says which keys each row may see."""
    block, offset = _key_slots(table_row, j, valid, sink_len, sink_gap, BLOCK_SIZE, HAS_SINKS)
    k_off = block * stride_kcb + offset * stride_kcs + kv_head * stride_kch  # [N]
    v_off = block * stride_vcb + offset * stride_vcs + kv_head * stride_vch  # [N]
    r1, r2 = _rotated_key_tile(k_cache_ptr, k_off, valid, inv_freq, j, offs_half, HALF)  # [HALF, N]
    s = _scores(q1, q2, r1.to(q1.dtype), r2.to(q1.dtype), USE_DOT, IEEE, UPCAST) * scale  # [R, N]
    s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))  # [R]; finite: the callers' tiles see a key
    alpha = tl.exp(m_i - m_new)  # [R]
    p = tl.exp(s - m_new[:, None])  # [R, N]
    l_i = l_i * alpha + tl.sum(p, axis=1)
    v = tl.load(v_cache_ptr + v_off[:, None] + offs_d[None, :], mask=valid[:, None], other=0.0)  # [N, D]
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE, UPCAST)  # [R, D]
    return m_new, l_i, acc


# ---------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
    NUM_KV_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """Program t stores k[t], v[t] [Hkv, D] at pool slot slot_mapping[t] (negative: skipped)."""
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + t).to(tl.int64)
    if slot < 0:  # padding token
        return
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    heads = tl.arange(0, HEADS_PAD)  # [H]
    dims = tl.arange(0, HEAD_DIM)  # [D]
    mask = (heads < NUM_KV_HEADS)[:, None]  # [H, 1]
    k = tl.load(k_ptr + t * stride_kt + heads[:, None] * stride_kh + dims[None, :], mask=mask)  # [H, D]
    v = tl.load(v_ptr + t * stride_vt + heads[:, None] * stride_vh + dims[None, :], mask=mask)  # [H, D]
    k_dst = k_cache_ptr + block * stride_kcb + offset * stride_kcs + heads[:, None] * stride_kch + dims[None, :]
    v_dst = v_cache_ptr + block * stride_vcb + offset * stride_vcs + heads[:, None] * stride_vch + dims[None, :]
    tl.store(k_dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, part_acc_ptr, part_ml_ptr,
    block_tables_ptr, context_lens_ptr, sink_lens_ptr, sink_gaps_ptr, inv_freq_ptr,
    scale,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
    stride_bt,
    stride_pas, stride_pah, stride_pap,  # part_acc [Bd, Hq, P, D] fp32
    stride_pms, stride_pmh, stride_pmp,  # part_ml [Bd, Hq, P, 2] fp32 (running max, sum-exp)
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr, PARTITION_SIZE: tl.constexpr, HAS_SINKS: tl.constexpr,
    SINGLE: tl.constexpr, USE_DOT: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
):
    HALF: tl.constexpr = HEAD_DIM // 2
    seq = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    part = tl.program_id(2)
    context_len = tl.load(context_lens_ptr + seq)
    start = part * PARTITION_SIZE
    if start >= context_len:  # this sequence has fewer partitions
        return
    end = tl.minimum(start + PARTITION_SIZE, context_len)
    if HAS_SINKS:
        sink_len = tl.load(sink_lens_ptr + seq)
        sink_gap = tl.load(sink_gaps_ptr + seq)
    else:
        sink_len = 0
        sink_gap = 0

    rows = tl.arange(0, GROUP_PAD)  # [R] query heads of the group (padding rows masked)
    row_valid = rows < GROUP
    heads = kv_head * GROUP + rows  # [R]
    offs_half = tl.arange(0, HALF)  # [HALF]
    offs_d = tl.arange(0, HEAD_DIM)  # [D]
    q_row = q_ptr + seq * stride_qt + heads * stride_qh  # [R]
    q1 = tl.load(q_row[:, None] + offs_half[None, :], mask=row_valid[:, None], other=0.0)  # [R, HALF]
    q2 = tl.load(q_row[:, None] + HALF + offs_half[None, :], mask=row_valid[:, None], other=0.0)  # [R, HALF]
    inv_freq = tl.load(inv_freq_ptr + offs_half)  # [HALF] fp32
    table_row = block_tables_ptr + seq * stride_bt

    m_i = tl.zeros([GROUP_PAD], dtype=tl.float32) - float("inf")  # running max [R]
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)  # running sum-exp [R]
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], dtype=tl.float32)  # [R, D]
    for n0 in range(start, end, BLOCK_N):
        j = n0 + tl.arange(0, BLOCK_N).to(tl.int64)  # [N] key positions
        valid = j < end  # every tile has a valid key
        m_i, l_i, acc = _attend_key_tile(
            q1, q2, m_i, l_i, acc, j, valid, valid[None, :], table_row, sink_len, sink_gap, kv_head, inv_freq,
            offs_half, offs_d, scale, k_cache_ptr, v_cache_ptr,
            stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
            BLOCK_SIZE, HALF, HAS_SINKS, USE_DOT, IEEE, UPCAST)

    if SINGLE:
        out = acc / l_i[:, None]  # [R, D]
        out_ptrs = out_ptr + seq * stride_ot + heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_valid[:, None])
    else:
        acc_ptrs = (part_acc_ptr + seq * stride_pas + heads[:, None] * stride_pah + part * stride_pap
                    + offs_d[None, :])  # [R, D]
        tl.store(acc_ptrs, acc, mask=row_valid[:, None])
        ml_ptrs = part_ml_ptr + seq * stride_pms + heads * stride_pmh + part * stride_pmp  # [R]
        tl.store(ml_ptrs, m_i, mask=row_valid)
        tl.store(ml_ptrs + 1, l_i, mask=row_valid)


@triton.jit
def _merge_kernel(
    out_ptr, part_acc_ptr, part_ml_ptr, context_lens_ptr,
    stride_ot, stride_oh,
    stride_pas, stride_pah, stride_pap,
    stride_pms, stride_pmh, stride_pmp,
    HEAD_DIM: tl.constexpr, PARTITION_SIZE: tl.constexpr, PARTS_PAD: tl.constexpr,
):
    """Program (seq, query head): combine the partitions' partial outputs by max and sum-exp."""
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    context_len = tl.load(context_lens_ptr + seq)
    num_parts = (context_len + PARTITION_SIZE - 1) // PARTITION_SIZE
    parts = tl.arange(0, PARTS_PAD)  # [P]
    part_valid = parts < num_parts
    ml = part_ml_ptr + seq * stride_pms + head * stride_pmh + parts * stride_pmp  # [P]
    m = tl.load(ml, mask=part_valid, other=float("-inf"))  # [P]
    l = tl.load(ml + 1, mask=part_valid, other=0.0)  # [P]
    m_max = tl.max(m, axis=0)
    weights = tl.exp(m - m_max)  # [P]; 0 for missing partitions
    denom = tl.sum(weights * l, axis=0)
    offs_d = tl.arange(0, HEAD_DIM)  # [D]
    acc = tl.zeros([HEAD_DIM], dtype=tl.float32)
    acc_row = part_acc_ptr + seq * stride_pas + head * stride_pah
    ml_row = part_ml_ptr + seq * stride_pms + head * stride_pmh
    for p in range(0, num_parts):  # one [D] partial at a time: no [P, D] tile in registers
        w = tl.exp(tl.load(ml_row + p * stride_pmp) - m_max)
        acc += w * tl.load(acc_row + p * stride_pap + offs_d)
    out = acc / denom
    tl.store(out_ptr + seq * stride_ot + head * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty))


@triton.jit
def _prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr,
    block_tables_ptr, context_lens_ptr, query_start_loc_ptr, positions_ptr,
    sink_lens_ptr, sink_gaps_ptr, inv_freq_ptr,
    scale, num_decode_seqs,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
    stride_bt,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, HAS_SINKS: tl.constexpr,
    USE_DOT: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
):
    """Program (query tile, prefill sequence, KV head): BLOCK_M tokens x the G heads of the group."""
    HALF: tl.constexpr = HEAD_DIM // 2
    ROWS: tl.constexpr = BLOCK_M * GROUP_PAD
    tile = tl.program_id(0)
    seq = tl.program_id(1).to(tl.int64) + num_decode_seqs
    kv_head = tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    if tile * BLOCK_M >= q_len:  # this chunk has fewer tiles
        return
    context_len = tl.load(context_lens_ptr + seq)
    if HAS_SINKS:
        sink_len = tl.load(sink_lens_ptr + seq)
        sink_gap = tl.load(sink_gaps_ptr + seq)
    else:
        sink_len = 0
        sink_gap = 0

    # Row r of the tile is token tile * BLOCK_M + r // GROUP_PAD, query head r % GROUP_PAD of the
    # group: the [BLOCK_M, G_PAD] (token, head) grid flattened row-major into [ROWS].
    rows = tl.arange(0, ROWS)  # [R]
    m_idx = tile * BLOCK_M + rows // GROUP_PAD  # [R] token index within the chunk
    g = rows % GROUP_PAD  # [R]
    token_valid = m_idx < q_len
    row_valid = token_valid & (g < GROUP)
    token = q_start + m_idx  # [R]
    heads = kv_head * GROUP + g  # [R]
    # Padding rows get position 0: they see key 0 (no all -inf row) and are never stored.
    pos = tl.load(positions_ptr + token, mask=token_valid, other=0)  # [R]
    offs_half = tl.arange(0, HALF)  # [HALF]
    offs_d = tl.arange(0, HEAD_DIM)  # [D]
    q_row = q_ptr + token * stride_qt + heads * stride_qh  # [R]
    q1 = tl.load(q_row[:, None] + offs_half[None, :], mask=row_valid[:, None], other=0.0)  # [R, HALF]
    q2 = tl.load(q_row[:, None] + HALF + offs_half[None, :], mask=row_valid[:, None], other=0.0)  # [R, HALF]
    inv_freq = tl.load(inv_freq_ptr + offs_half)  # [HALF] fp32
    table_row = block_tables_ptr + seq * stride_bt
    # Keys 0 .. (last position of the tile), all in the pool already.
    key_end = tl.minimum(tl.max(pos, axis=0) + 1, context_len)

    m_i = tl.zeros([ROWS], dtype=tl.float32) - float("inf")  # [R]
    l_i = tl.zeros([ROWS], dtype=tl.float32)  # [R]
    acc = tl.zeros([ROWS, HEAD_DIM], dtype=tl.float32)  # [R, D]
    for n0 in range(0, key_end, BLOCK_N):
        j = n0 + tl.arange(0, BLOCK_N).to(tl.int64)  # [N] key positions
        valid = j < key_end
        allowed = valid[None, :] & (j[None, :] <= pos[:, None])  # [R, N] causal by position; key 0 in tile 0
        m_i, l_i, acc = _attend_key_tile(
            q1, q2, m_i, l_i, acc, j, valid, allowed, table_row, sink_len, sink_gap, kv_head, inv_freq,
            offs_half, offs_d, scale, k_cache_ptr, v_cache_ptr,
            stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
            BLOCK_SIZE, HALF, HAS_SINKS, USE_DOT, IEEE, UPCAST)

    out = acc / l_i[:, None]  # [R, D]
    out_ptrs = out_ptr + token[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_valid[:, None])


# ---------------------------------------------------------------------------------------------
# Python wrappers
# ---------------------------------------------------------------------------------------------


def _check_cache(cache: torch.Tensor) -> None:
    if cache.dim() != 4 or cache.stride(-1) != 1:
        raise ValueError("KV pool must be [num_blocks, block_size, num_kv_heads, head_dim] "
                         "with a contiguous last dimension")


def write_kv_triton(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    slot_mapping: torch.Tensor) -> None:
    """Store new k, v [T, num_kv_heads, head_dim] at their pool slots (slot < 0: skipped)."""
    _check_cache(k_cache)
    _check_cache(v_cache)
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    if head_dim & (head_dim - 1):
        raise ValueError(f"head_dim must be a power of two, got {head_dim}")
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    _write_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads, HEADS_PAD=triton.next_power_of_2(num_kv_heads), HEAD_DIM=head_dim,
        BLOCK_SIZE=k_cache.shape[1], num_warps=1 if num_kv_heads * head_dim <= 512 else 4,
    )


def paged_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           meta: AttentionMetadata, rotary: RotaryEmbedding, scale: float,
                           partition_size: int = DEFAULT_PARTITION_SIZE,
                           block_n: int | None = None) -> torch.Tensor:
    """Paged attention for a flat batch of new queries q [T, Hq, D] (already rotated).

    Same arguments and result as `model.attention.paged_attention`; returns [T, Hq, D] in
    q's dtype. `partition_size` (keys per decode partition; a power of two >= 16) only trades
    parallelism for merge work; `block_n` (keys per tile, a power of two >= 16) overrides the
    default tile for tuning and tests. No host-device synchronisation: grids come from the Python ints
    in `meta` (num_decode_seqs, max_query_len, max_decode_context_len).
    """
    _check_cache(k_cache)
    _check_cache(v_cache)
    num_tokens, num_heads, head_dim = q.shape
    num_blocks, block_size, num_kv_heads, _ = k_cache.shape
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads are not a multiple of {num_kv_heads} KV heads")
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(f"head_dim must be a power of two >= 16, got {head_dim}")
    if partition_size < 16 or partition_size & (partition_size - 1):
        raise ValueError(f"partition_size must be a power of two >= 16, got {partition_size}")
    if not (q.dtype == k_cache.dtype == v_cache.dtype):
        raise ValueError(f"q ({q.dtype}) and the KV pool ({k_cache.dtype}, {v_cache.dtype}) differ in dtype")
    group = num_heads // num_kv_heads
    q = q if q.stride(-1) == 1 else q.contiguous()
    out = torch.empty((num_tokens, num_heads, head_dim), dtype=q.dtype, device=q.device)
    if num_tokens == 0:
        return out
    inv_freq = rotary.inv_freq.to(device=q.device, dtype=torch.float32).contiguous()  # [D/2]
    has_sinks = meta.sink_gaps is not None
    sink_lens = meta.sink_lens if has_sinks else meta.context_lens  # dummies when no sinks
    sink_gaps = meta.sink_gaps if has_sinks else meta.context_lens
    flags = dict(
        HEAD_DIM=head_dim, BLOCK_SIZE=block_size, HAS_SINKS=has_sinks,
        USE_DOT=head_dim // 2 >= 16,  # tl.dot needs K >= 16
        IEEE=q.dtype == torch.float32,  # fp32 dots without TF32
        # Triton's interpreter (CPU tensors) computes tl.dot wrongly on bf16 operands.
        UPCAST=q.dtype == torch.bfloat16 and q.device.type == "cpu",
    )
    cache_strides = (k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
                     v_cache.stride(0), v_cache.stride(1), v_cache.stride(2))
    # Tiles and warps, chosen (without a GPU to time them) so that ptxas (triton 3.9, sm_80 and
    # sm_90) keeps the 16-bit kernels for D = 32 .. 256 (nearly) free of register spills: key
    # tiles of 64 keys for D <= 64, 32 for D = 128, 16 beyond (the fp32 rotation of the two
    # [D/2, N] key halves and the [R, D] accumulator share the registers); prefill tiles of 64
    # rows for D <= 64, 32 beyond; 8 warps. fp32 (not a speed target) takes 16-key tiles; it
    # still spills a little from D = 128 on.
    is_fp32 = q.dtype == torch.float32
    num_warps = 4 if head_dim <= 32 else 8
    if block_n is None:
        block_n = 16 if is_fp32 else max(16, min(64, 4096 // head_dim))
    elif block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"block_n must be a power of two >= 16, got {block_n}")

    num_decode = meta.num_decode_seqs
    if num_decode:
        group_pad = max(16, triton.next_power_of_2(group))  # rows of tl.dot: at least 16
        block_n_decode = min(block_n, partition_size)
        num_parts = triton.cdiv(meta.max_decode_context_len, partition_size)
        single = num_parts <= 1
        if single:
            part_acc = part_ml = out  # unused
            acc_strides = ml_strides = (0, 0, 0)
        else:
            part_acc = torch.empty((num_decode, num_heads, num_parts, head_dim), dtype=torch.float32,
                                   device=q.device)  # [Bd, Hq, P, D]
            part_ml = torch.empty((num_decode, num_heads, num_parts, 2), dtype=torch.float32,
                                  device=q.device)  # [Bd, Hq, P, (max, sum-exp)]
            acc_strides = part_acc.stride()[:3]
            ml_strides = part_ml.stride()[:3]
        _decode_kernel[(num_decode, num_kv_heads, num_parts)](
            q, k_cache, v_cache, out, part_acc, part_ml,
            meta.block_tables, meta.context_lens, sink_lens, sink_gaps, inv_freq,
            scale,
            q.stride(0), q.stride(1), out.stride(0), out.stride(1),
            *cache_strides,
            meta.block_tables.stride(0),
            *acc_strides, *ml_strides,
            GROUP=group, GROUP_PAD=group_pad, BLOCK_N=block_n_decode, PARTITION_SIZE=partition_size,
            SINGLE=single, num_warps=num_warps, **flags,
        )
        if not single:
            _merge_kernel[(num_decode, num_heads)](
                out, part_acc, part_ml, meta.context_lens,
                out.stride(0), out.stride(1), *acc_strides, *ml_strides,
                HEAD_DIM=head_dim, PARTITION_SIZE=partition_size,
                PARTS_PAD=triton.next_power_of_2(num_parts), num_warps=1 if head_dim <= 64 else 2,
            )

    num_prefill = meta.num_seqs - num_decode
    if num_prefill:
        group_pad = triton.next_power_of_2(group)
        rows = max(64 if head_dim <= 64 else 32, group_pad)  # BLOCK_M tokens x G_PAD heads
        block_m = rows // group_pad
        grid = (triton.cdiv(meta.max_query_len, block_m), num_prefill, num_kv_heads)
        _prefill_kernel[grid](
            q, k_cache, v_cache, out,
            meta.block_tables, meta.context_lens, meta.query_start_loc, meta.positions,
            sink_lens, sink_gaps, inv_freq,
            scale, num_decode,
            q.stride(0), q.stride(1), out.stride(0), out.stride(1),
            *cache_strides,
            meta.block_tables.stride(0),
            GROUP=group, GROUP_PAD=group_pad, BLOCK_M=block_m, BLOCK_N=block_n,
            num_warps=num_warps, **flags,
        )
    return out

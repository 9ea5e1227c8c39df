"""Triton decode attention: one new token per sequence over its paged keys, split into partitions.

One program per (decode sequence, KV head, context partition): the G query heads of the group
are the rows of a tl.dot (padded to 16, tl.dot's minimum); online softmax over key tiles, fp32
accumulation. With several partitions (flash-decoding) each program writes an unnormalised
partial output with its running max and sum-exp, and `merge_kernel` combines them; with one
partition the decode kernel writes the output. The layout and the query/sink semantics are in
paged_attention.py, which launches these.
"""

from __future__ import annotations

import triton
import triton.language as tl

from model.kernels.attention_tiles import attend_keys, load_sink_layout, pool_args


@triton.jit
def decode_kernel(
    q_ptr, q_sink_ptr, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, out_ptr, part_acc_ptr, part_ml_ptr,
    block_tables_ptr, context_lens_ptr, sink_lens_ptr, sink_gaps_ptr,
    scale,
    stride_qt, stride_qh, stride_qst, stride_qsh, stride_ot, stride_oh,
    stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
    stride_bt,
    stride_pas, stride_pah, stride_pap,  # part_acc [Bd, Hq, P, D] fp32
    stride_pms, stride_pmh, stride_pmp,  # part_ml [Bd, Hq, P, 2] fp32 (running max, sum-exp)
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr, PARTITION_SIZE: tl.constexpr, HAS_GAPS: tl.constexpr,
    SINK_QUERY: tl.constexpr, SINGLE: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    KV_INT8: tl.constexpr,
):
    """Program (decode sequence, KV head, partition): the G query heads of the group over the
    partition's keys."""
    seq = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    part = tl.program_id(2)
    context_len = tl.load(context_lens_ptr + seq)
    start = part * PARTITION_SIZE
    if start >= context_len:  # this sequence has fewer partitions
        return
    end = tl.minimum(start + PARTITION_SIZE, context_len)
    sink_len, sink_gap = load_sink_layout(sink_lens_ptr, sink_gaps_ptr, seq, HAS_GAPS, SINK_QUERY)

    rows = tl.arange(0, GROUP_PAD)  # [R] query heads of the group (padding rows masked)
    row_valid = rows < GROUP
    heads = kv_head * GROUP + rows  # [R]
    offs_d = tl.arange(0, HEAD_DIM)  # [D]
    q_ptrs = q_ptr + seq * stride_qt + heads[:, None] * stride_qh + offs_d[None, :]  # [R, D]
    q = tl.load(q_ptrs, mask=row_valid[:, None], other=0.0)  # [R, D]
    table_row = block_tables_ptr + seq * stride_bt

    m_i = tl.zeros([GROUP_PAD], dtype=tl.float32) - float("inf")  # running max [R]
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)  # running sum-exp [R]
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], dtype=tl.float32)  # [R, D]
    q_sink = q
    if SINK_QUERY:
        q_sink_ptrs = q_sink_ptr + seq * stride_qst + heads[:, None] * stride_qsh + offs_d[None, :]  # [R, D]
        q_sink = tl.load(q_sink_ptrs, mask=row_valid[:, None], other=0.0)  # [R, D]
    # Every row sees all of the partition's keys: no causal mask (pos, here `start`, is unread).
    pool = pool_args(k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr,
                     stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch)
    m_i, l_i, acc = attend_keys(q, q_sink, m_i, l_i, acc, start, end, start, table_row, sink_len, sink_gap, kv_head,
                                offs_d, scale, pool, BLOCK_N, BLOCK_SIZE, HAS_GAPS, SINK_QUERY, False, IEEE, UPCAST,
                                KV_INT8, HEAD_DIM)

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
def merge_kernel(
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
    part_sum = tl.load(ml + 1, mask=part_valid, other=0.0)  # [P]
    m_max = tl.max(m, axis=0)
    weights = tl.exp(m - m_max)  # [P]; 0 for missing partitions
    denom = tl.sum(weights * part_sum, axis=0)
    offs_d = tl.arange(0, HEAD_DIM)  # [D]
    acc = tl.zeros([HEAD_DIM], dtype=tl.float32)
    acc_row = part_acc_ptr + seq * stride_pas + head * stride_pah
    ml_row = part_ml_ptr + seq * stride_pms + head * stride_pmh
    for p in range(0, num_parts):  # one [D] partial at a time: no [P, D] tile in registers
        w = tl.exp(tl.load(ml_row + p * stride_pmp) - m_max)
        acc += w * tl.load(acc_row + p * stride_pap + offs_d)
    out = acc / denom
    tl.store(out_ptr + seq * stride_ot + head * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty))

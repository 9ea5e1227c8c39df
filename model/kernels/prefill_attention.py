"""Triton prefill attention: every prefill chunk of a batch over its paged context, in one launch.

Grid (query tile, prefill sequence, KV head); a tile's rows are BLOCK_M tokens x G_PAD heads;
causal by cache position over the paged context (the chunk's own K/V are already in the pool);
online softmax, fp32 accumulation. The layout and the query/sink semantics are in
paged_attention.py, which launches it.
"""

from __future__ import annotations

import triton
import triton.language as tl

from model.kernels.attention_tiles import attend_keys, load_sink_layout, pool_args


@triton.jit
def prefill_kernel(
    q_ptr, q_sink_ptr, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, out_ptr,
    block_tables_ptr, context_lens_ptr, query_start_loc_ptr, positions_ptr,
    sink_lens_ptr, sink_gaps_ptr,
    scale, num_decode_seqs,
    stride_qt, stride_qh, stride_qst, stride_qsh, stride_ot, stride_oh,
    stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
    stride_bt,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, HAS_GAPS: tl.constexpr, SINK_QUERY: tl.constexpr,
    IEEE: tl.constexpr, UPCAST: tl.constexpr, KV_INT8: tl.constexpr,
):
    """Program (query tile, prefill sequence, KV head): BLOCK_M tokens x the G heads of the group."""
    ROWS: tl.constexpr = BLOCK_M * GROUP_PAD
    tile = tl.program_id(0)
    seq = tl.program_id(1).to(tl.int64) + num_decode_seqs
    kv_head = tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    if tile * BLOCK_M >= q_len:  # this chunk has fewer tiles
        return
    context_len = tl.load(context_lens_ptr + seq)
    sink_len, sink_gap = load_sink_layout(sink_lens_ptr, sink_gaps_ptr, seq, HAS_GAPS, SINK_QUERY)

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
    pos = tl.load(positions_ptr + token, mask=token_valid, other=0)  # [R] cache positions
    offs_d = tl.arange(0, HEAD_DIM)  # [D]
    q_ptrs = q_ptr + token[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :]  # [R, D]
    q = tl.load(q_ptrs, mask=row_valid[:, None], other=0.0)  # [R, D]
    table_row = block_tables_ptr + seq * stride_bt
    # Keys 0 .. (last position of the tile), all in the pool already.
    key_end = tl.minimum(tl.max(pos, axis=0) + 1, context_len)

    m_i = tl.zeros([ROWS], dtype=tl.float32) - float("inf")  # [R]
    l_i = tl.zeros([ROWS], dtype=tl.float32)  # [R]
    acc = tl.zeros([ROWS, HEAD_DIM], dtype=tl.float32)  # [R, D]
    q_sink = q
    if SINK_QUERY:
        q_sink_ptrs = (q_sink_ptr + token[:, None] * stride_qst + heads[:, None] * stride_qsh
                       + offs_d[None, :])  # [R, D]
        q_sink = tl.load(q_sink_ptrs, mask=row_valid[:, None], other=0.0)  # [R, D]
    # Causal by cache position.
    pool = pool_args(k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr,
                     stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch)
    m_i, l_i, acc = attend_keys(q, q_sink, m_i, l_i, acc, 0, key_end, pos, table_row, sink_len, sink_gap, kv_head,
                                offs_d, scale, pool, BLOCK_N, BLOCK_SIZE, HAS_GAPS, SINK_QUERY, True, IEEE, UPCAST,
                                KV_INT8, HEAD_DIM)

    out = acc / l_i[:, None]  # [R, D]
    out_ptrs = out_ptr + token[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_valid[:, None])

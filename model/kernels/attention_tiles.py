"""Triton building blocks of the paged-attention kernels: one key tile of online softmax, a range of them.

Shared by the decode kernel (decode_attention.py) and the prefill kernel (prefill_attention.py);
the layout they read is described in paged_attention.py. A key tile is loaded as it is stored
(keys rotated at write time), scored with `q`, and, where it holds sinks, with `q_sink` too.
"""

from __future__ import annotations

import triton
import triton.language as tl


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
def _key_slots(block_table_row, j, valid, sink_len, sink_gap, BLOCK_SIZE: tl.constexpr,
               HAS_GAPS: tl.constexpr):
    """Block ids and in-block offsets [N] of keys j [N] (valid [N]) of one sequence."""
    if HAS_GAPS:
        i = j + sink_gap * (j >= sink_len).to(tl.int64)
    else:
        i = j
    block = tl.load(block_table_row + i // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
    return block, i % BLOCK_SIZE


@triton.jit
def sink_tiles_end(start, end, sink_len, BLOCK_N: tl.constexpr):
    """End of the key tiles start, start + BLOCK_N, .. (< end) that hold a sink (j < sink_len):
    the first tile start at or past sink_len, at most end."""
    num_tiles = (tl.maximum(sink_len - start, 0) + BLOCK_N - 1) // BLOCK_N
    return tl.minimum(start + num_tiles * BLOCK_N, end)



@triton.jit
def load_sink_layout(sink_lens_ptr, sink_gaps_ptr, seq, HAS_GAPS: tl.constexpr, SINK_QUERY: tl.constexpr):
    """Sequence seq's sink length and sink gap (0 where the kernel does not read them)."""
    if HAS_GAPS or SINK_QUERY:
        sink_len = tl.load(sink_lens_ptr + seq)
    else:
        sink_len = 0
    if HAS_GAPS:
        sink_gap = tl.load(sink_gaps_ptr + seq)
    else:
        sink_gap = 0
    return sink_len, sink_gap


@triton.jit
def _attend_key_tile(
    q, q_sink, m_i, l_i, acc, j, valid, allowed, table_row, sink_len, sink_gap, kv_head, offs_d, scale, pool,
    BLOCK_SIZE: tl.constexpr, HAS_GAPS: tl.constexpr, SINK_TILE: tl.constexpr,
    IEEE: tl.constexpr, UPCAST: tl.constexpr, KV_INT8: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    """One step of online softmax over the key tile j [N] (valid [N]) of one sequence and KV
    head: the rows' running max m_i [R], sum-exp l_i [R] and output acc [R, D], updated.

    q [R, D] scores the keys; with SINK_TILE, q_sink [R, D] scores the keys j < sink_len
    instead (the tile holds sinks). `allowed` [R, N] (or [1, N]) says which keys each row may
    see. `pool`: the K/V pool's pointers and strides (`pool_args`)."""
    k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr = pool[0], pool[1], pool[2], pool[3]
    stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch = (pool[4], pool[5], pool[6], pool[7],
                                                                              pool[8], pool[9])
    block, offset = _key_slots(table_row, j, valid, sink_len, sink_gap, BLOCK_SIZE, HAS_GAPS)
    k_off = block * stride_kcb + offset * stride_kcs + kv_head * stride_kch  # [N]
    v_off = block * stride_vcb + offset * stride_vcs + kv_head * stride_vch  # [N]
    # Keys along columns, ready to be the right operand of q @ k^T.
    if KV_INT8:  # codes times the row's float16 scale, which follows them (in float16 units: / 2)
        k = tl.load(k_cache_ptr + k_off[None, :] + offs_d[:, None], mask=valid[None, :], other=0)  # [D, N]
        k_scale = tl.load(k_scale_ptr + k_off // 2 + HEAD_DIM // 2, mask=valid, other=0.0)  # [N]
        k = (k.to(tl.float32) * k_scale.to(tl.float32)[None, :]).to(q.dtype)
    else:
        k = tl.load(k_cache_ptr + k_off[None, :] + offs_d[:, None], mask=valid[None, :], other=0.0)  # [D, N]
    s = _dot(q, k, IEEE, UPCAST)  # [R, N]
    if SINK_TILE:
        s_sink = _dot(q_sink, k, IEEE, UPCAST)  # [R, N]
        s = tl.where((j < sink_len)[None, :], s_sink, s)
    s = tl.where(allowed, s * scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))  # [R]; finite: the callers' tiles see a key
    alpha = tl.exp(m_i - m_new)  # [R]
    p = tl.exp(s - m_new[:, None])  # [R, N]
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if KV_INT8:
        v = tl.load(v_cache_ptr + v_off[:, None] + offs_d[None, :], mask=valid[:, None], other=0)  # [N, D]
        v_scale = tl.load(v_scale_ptr + v_off // 2 + HEAD_DIM // 2, mask=valid, other=0.0)  # [N]
        v = (v.to(tl.float32) * v_scale.to(tl.float32)[:, None]).to(q.dtype)
    else:
        v = tl.load(v_cache_ptr + v_off[:, None] + offs_d[None, :], mask=valid[:, None], other=0.0)  # [N, D]
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE, UPCAST)  # [R, D]
    return m_new, l_i, acc


@triton.jit
def pool_args(k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr,
              stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch):
    """The K/V pool as the tile functions take it: its pointers, then its block, slot and head
    strides for K, then for V."""
    return (k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr,
            stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch)


@triton.jit
def _attend_key_range(
    q, q_sink, m_i, l_i, acc, lo, hi, key_end, pos, table_row, sink_len, sink_gap, kv_head, offs_d, scale, pool,
    BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, HAS_GAPS: tl.constexpr, SINK_TILE: tl.constexpr,
    CAUSAL: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, KV_INT8: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    """Online softmax over the key tiles lo, lo + BLOCK_N, .. (< hi) of one sequence and KV head,
    keys j < key_end; with CAUSAL, row r sees the keys j <= pos[r] only (pos [R] cache
    positions), else every row sees them all. SINK_TILE as in `_attend_key_tile`."""
    for n0 in range(lo, hi, BLOCK_N):
        j = n0 + tl.arange(0, BLOCK_N).to(tl.int64)  # [N] key positions
        valid = j < key_end
        if CAUSAL:
            allowed = valid[None, :] & (j[None, :] <= pos[:, None])  # [R, N]; key 0 in tile 0
        else:
            allowed = valid[None, :]  # [1, N]
        m_i, l_i, acc = _attend_key_tile(q, q_sink, m_i, l_i, acc, j, valid, allowed, table_row, sink_len, sink_gap,
                                         kv_head, offs_d, scale, pool, BLOCK_SIZE, HAS_GAPS, SINK_TILE, IEEE, UPCAST,
                                         KV_INT8, HEAD_DIM)
    return m_i, l_i, acc


@triton.jit
def attend_keys(
    q, q_sink, m_i, l_i, acc, start, key_end, pos, table_row, sink_len, sink_gap, kv_head, offs_d, scale, pool,
    BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, HAS_GAPS: tl.constexpr, SINK_QUERY: tl.constexpr,
    CAUSAL: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, KV_INT8: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    """Online softmax over the keys start .. key_end - 1 of one sequence and KV head, in tiles of
    BLOCK_N from `start`: with SINK_QUERY the tiles that hold sinks are scored by q and q_sink
    (the sinks by q_sink), the others by q alone. Every tile holds a key each row may see (the
    callers' ranges start at key 0 or within the rows' context). CAUSAL and pos as in
    `_attend_key_range`."""
    sink_end = start
    if SINK_QUERY:
        sink_end = sink_tiles_end(start, key_end, sink_len, BLOCK_N)
        m_i, l_i, acc = _attend_key_range(q, q_sink, m_i, l_i, acc, start, sink_end, key_end, pos, table_row,
                                          sink_len, sink_gap, kv_head, offs_d, scale, pool, BLOCK_N, BLOCK_SIZE,
                                          HAS_GAPS, True, CAUSAL, IEEE, UPCAST, KV_INT8, HEAD_DIM)
    return _attend_key_range(q, q, m_i, l_i, acc, sink_end, key_end, key_end, pos, table_row, sink_len, sink_gap,
                             kv_head, offs_d, scale, pool, BLOCK_N, BLOCK_SIZE, HAS_GAPS, False, CAUSAL, IEEE, UPCAST,
                             KV_INT8, HEAD_DIM)

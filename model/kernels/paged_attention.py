"""Triton paged attention over rotated keys, with StreamingLLM sinks and sink gaps (the GPU fast path).

Same semantics as the PyTorch reference in model/layers/attention.py, which is the oracle:

- The pool of one layer is K and V `[num_blocks, block_size, num_kv_heads, head_dim]`.
  Sequence s's key j (cache order) lives at slot index `i = j + sink_gap[s] * (j >= sink_len[s])`,
  block `block_tables[s, i // block_size]`, offset `i % block_size`.
- Keys are stored after RoPE, rotated at their absolute positions (the tokens' indices in
  prompt + output; the model rotates k before `write_kv_triton` stores it), and a kernel loads
  a key tile as it is stored: a score is the plain dot `q . k`.
- Queries come rotated twice. `q` is rotated at the tokens' absolute positions and scores the
  window keys (j >= sink_len); `q_sink` is rotated at their cache positions and scores the
  sink keys (j < sink_len). A RoPE score depends only on the distance between query and key:
  StreamingLLM eviction renumbers the kept tokens, which moves a window key and the query down
  by the same evicted count (distance kept, so `q` at the absolute position is exact) but leaves
  a sink where it is (so its distance is measured from the query's cache position). Without a
  sink query (`q_sink` None, or `meta.rope_positions` None: no evictions in the batch, where
  the two queries agree) every key is scored by `q`, as in the reference.
- Flat batch: decodes first (`meta.num_decode_seqs` sequences with one token each), then prefill
  chunks at `meta.query_start_loc`. A query at cache position p sees keys 0..p of its sequence;
  the chunk's own K/V are already in the pool (`write_kv` runs first).
- GQA: each program loads a K/V tile once for all G = Hq / Hkv query heads of its KV head.

No key is rotated on read: a key is written once and never changes, so eviction stays a
block-table edit and blocks shared between sequences (prefix cache, forks) are never rewritten,
and the decode loop, which is memory-bound, reads each key once with no trigonometry and no
cos/sin table. The price of sinks is one extra dot on the key tiles that start before the
sequence's sink length (sinks are few: usually only the first tile). The kernels walk those
tiles in a loop of their own, scoring each with `q` and `q_sink` and taking `q_sink`'s score
where j < sink_len, and the remaining tiles in a loop with one dot; without a sink query
(constexpr SINK_QUERY off) the first loop is not compiled at all.

Kernels:
- `_write_kv_kernel`: one program per new token, stores its K and V [Hkv, D] at its slot.
- `_decode_kernel`: one program per (decode sequence, KV head, context partition), the G query
  heads of the group as the rows of a tl.dot (padded to 16, tl.dot's minimum); online softmax
  over key tiles, fp32 accumulation. With several partitions (flash-decoding) each program
  writes an unnormalised partial output with its running max and sum-exp, and
  `_merge_kernel` combines them; with one partition the decode kernel writes the output.
- `_prefill_kernel`: all prefill chunks in one launch, grid (query tile, prefill sequence,
  KV head); a tile's rows are BLOCK_M tokens x G_PAD heads; causal by cache position over the
  paged context; online softmax, fp32 accumulation.

An int8 pool (model/layers/kv_quant.py: rows of head_dim codes and a float16 scale, `[.., D + 2]`)
is read in the same kernels (constexpr KV_INT8): each key and value tile is loaded as codes,
its rows' scales through a float16 view of the pool (element D / 2 of a row), and dequantized
to the queries' dtype before its dot; `_write_kv_kernel` quantizes as model/layers/kv_quant.py does
(ties to even, the division correctly rounded).

dtypes: float32, float16, bfloat16 (q, q_sink and the pools share one dtype, or the pools are
int8; the output has q's). Head dims: any power of two >= 16 (16 is tl.dot's minimum K, so every score is a tl.dot).
Block sizes: any (16 and 32 are tested). fp32 dots run with input_precision="ieee" (no TF32),
so fp32 matches the reference tightly on a GPU too. Triton's interpreter (TRITON_INTERPRET=1,
CPU tensors) runs all three dtypes; its tl.dot gives wrong results on bfloat16 operands
(triton 3.9), so on CPU tensors bf16 dot operands are cast to fp32 first (UPCAST); on a GPU
bf16 dots run natively.

Only long-standing tl APIs are used (tl.load/store with masks, tl.dot, tl.exp, tl.maximum,
tl.minimum, tl.where, tl.arange, tl.program_id, tl.constexpr, and tl.dot's `input_precision`),
for triton 3.3 .. 3.9.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from model.layers import kv_quant
from model.layers.attention import AttentionMetadata

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
def _sink_tiles_end(start, end, sink_len, BLOCK_N: tl.constexpr):
    """End of the key tiles start, start + BLOCK_N, .. (< end) that hold a sink (j < sink_len):
    the first tile start at or past sink_len, at most end."""
    num_tiles = (tl.maximum(sink_len - start, 0) + BLOCK_N - 1) // BLOCK_N
    return tl.minimum(start + num_tiles * BLOCK_N, end)


@triton.jit
def _attend_key_tile(
    q, q_sink, m_i, l_i, acc, j, valid, allowed, table_row, sink_len, sink_gap, kv_head,
    offs_d, scale, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr,
    stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
    BLOCK_SIZE: tl.constexpr, HAS_GAPS: tl.constexpr, SINK_TILE: tl.constexpr,
    IEEE: tl.constexpr, UPCAST: tl.constexpr, KV_INT8: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    """One step of online softmax over the key tile j [N] (valid [N]) of one sequence and KV
    head: the rows' running max m_i [R], sum-exp l_i [R] and output acc [R, D], updated.

    q [R, D] scores the keys; with SINK_TILE, q_sink [R, D] scores the keys j < sink_len
    instead (the tile holds sinks). `allowed` [R, N] (or [1, N]) says which keys each row may
    see."""
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


# ---------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------


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


@triton.jit
def _decode_kernel(
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
    if HAS_GAPS or SINK_QUERY:
        sink_len = tl.load(sink_lens_ptr + seq)
    else:
        sink_len = 0
    if HAS_GAPS:
        sink_gap = tl.load(sink_gaps_ptr + seq)
    else:
        sink_gap = 0

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
    if SINK_QUERY:
        # The partition's tiles that hold sinks, scored by q and q_sink.
        q_sink_ptrs = q_sink_ptr + seq * stride_qst + heads[:, None] * stride_qsh + offs_d[None, :]  # [R, D]
        q_sink = tl.load(q_sink_ptrs, mask=row_valid[:, None], other=0.0)  # [R, D]
        sink_end = _sink_tiles_end(start, end, sink_len, BLOCK_N)
        for n0 in range(start, sink_end, BLOCK_N):
            j = n0 + tl.arange(0, BLOCK_N).to(tl.int64)  # [N] key positions
            valid = j < end  # every tile has a valid key
            m_i, l_i, acc = _attend_key_tile(
                q, q_sink, m_i, l_i, acc, j, valid, valid[None, :], table_row, sink_len, sink_gap, kv_head,
                offs_d, scale, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr,
                stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
                BLOCK_SIZE, HAS_GAPS, True, IEEE, UPCAST, KV_INT8, HEAD_DIM)
    else:
        sink_end = start
    for n0 in range(sink_end, end, BLOCK_N):
        j = n0 + tl.arange(0, BLOCK_N).to(tl.int64)  # [N] key positions
        valid = j < end  # every tile has a valid key
        m_i, l_i, acc = _attend_key_tile(
            q, q, m_i, l_i, acc, j, valid, valid[None, :], table_row, sink_len, sink_gap, kv_head,
            offs_d, scale, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr,
            stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
            BLOCK_SIZE, HAS_GAPS, False, IEEE, UPCAST, KV_INT8, HEAD_DIM)

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


@triton.jit
def _prefill_kernel(
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
    if HAS_GAPS or SINK_QUERY:
        sink_len = tl.load(sink_lens_ptr + seq)
    else:
        sink_len = 0
    if HAS_GAPS:
        sink_gap = tl.load(sink_gaps_ptr + seq)
    else:
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
    if SINK_QUERY:
        # The tiles that hold sinks, scored by q and q_sink.
        q_sink_ptrs = (q_sink_ptr + token[:, None] * stride_qst + heads[:, None] * stride_qsh
                       + offs_d[None, :])  # [R, D]
        q_sink = tl.load(q_sink_ptrs, mask=row_valid[:, None], other=0.0)  # [R, D]
        sink_end = _sink_tiles_end(0, key_end, sink_len, BLOCK_N)
        for n0 in range(0, sink_end, BLOCK_N):
            j = n0 + tl.arange(0, BLOCK_N).to(tl.int64)  # [N] key positions
            valid = j < key_end
            allowed = valid[None, :] & (j[None, :] <= pos[:, None])  # [R, N] causal by position; key 0 in tile 0
            m_i, l_i, acc = _attend_key_tile(
                q, q_sink, m_i, l_i, acc, j, valid, allowed, table_row, sink_len, sink_gap, kv_head,
                offs_d, scale, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr,
                stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
                BLOCK_SIZE, HAS_GAPS, True, IEEE, UPCAST, KV_INT8, HEAD_DIM)
    else:
        sink_end = 0
    for n0 in range(sink_end, key_end, BLOCK_N):
        j = n0 + tl.arange(0, BLOCK_N).to(tl.int64)  # [N] key positions
        valid = j < key_end
        allowed = valid[None, :] & (j[None, :] <= pos[:, None])  # [R, N] causal by position; key 0 in tile 0
        m_i, l_i, acc = _attend_key_tile(
            q, q, m_i, l_i, acc, j, valid, allowed, table_row, sink_len, sink_gap, kv_head,
            offs_d, scale, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr,
            stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
            BLOCK_SIZE, HAS_GAPS, False, IEEE, UPCAST, KV_INT8, HEAD_DIM)

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


def _scales_view(cache: torch.Tensor) -> torch.Tensor:
    """An int8 pool [.., D + 2] seen as float16 [.., D / 2 + 1], where element D / 2 of a row is
    its scale (the kernels address it from the row's int8 offset halved); a float pool itself
    (the kernels do not read it)."""
    if not kv_quant.is_quantized(cache):
        return cache
    if cache.shape[-1] % 2 or any(stride % 2 for stride in cache.stride()[:-1]):
        raise ValueError("an int8 KV pool needs an even row length and even strides")
    return cache.view(torch.float16)


def write_kv_triton(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    slot_mapping: torch.Tensor) -> None:
    """Store new k (already rotated), v [T, num_kv_heads, head_dim] at their pool slots
    (slot < 0: skipped)."""
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
        k, v, k_cache, v_cache, _scales_view(k_cache), _scales_view(v_cache), slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads, HEADS_PAD=triton.next_power_of_2(num_kv_heads), HEAD_DIM=head_dim,
        BLOCK_SIZE=k_cache.shape[1], KV_INT8=kv_quant.is_quantized(k_cache),
        num_warps=1 if num_kv_heads * head_dim <= 512 else 4,
    )


def paged_attention_triton(q: torch.Tensor, q_sink: torch.Tensor | None, k_cache: torch.Tensor,
                           v_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                           partition_size: int = DEFAULT_PARTITION_SIZE,
                           block_n: int | None = None) -> torch.Tensor:
    """Paged attention for a flat batch of new queries q [T, Hq, D], rotated at the tokens'
    absolute positions; q_sink [T, Hq, D] (or None), rotated at their cache positions, scores
    each sequence's first `meta.sink_lens` keys.

    Same arguments and result as `model.layers.attention.paged_attention`: q_sink is ignored when
    `meta.rope_positions` is None (no evictions) or `meta.max_sink_len` is 0. Returns
    [T, Hq, D] in q's dtype. `partition_size` (keys per decode partition; a power of two >= 16)
    only trades parallelism for merge work; `block_n` (keys per tile, a power of two >= 16)
    overrides the default tile for tuning and tests. No host-device synchronisation: grids come
    from the Python ints in `meta` (num_decode_seqs, max_query_len, max_decode_context_len).
    """
    _check_cache(k_cache)
    _check_cache(v_cache)
    num_tokens, num_heads, head_dim = q.shape
    num_blocks, block_size, num_kv_heads, _ = k_cache.shape
    kv_int8 = kv_quant.is_quantized(k_cache)
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads are not a multiple of {num_kv_heads} KV heads")
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(f"head_dim must be a power of two >= 16, got {head_dim}")
    if partition_size < 16 or partition_size & (partition_size - 1):
        raise ValueError(f"partition_size must be a power of two >= 16, got {partition_size}")
    if k_cache.dtype != v_cache.dtype or (q.dtype != k_cache.dtype and not kv_int8):
        raise ValueError(f"q ({q.dtype}) and the KV pool ({k_cache.dtype}, {v_cache.dtype}) differ in dtype")
    if kv_quant.head_dim_of(k_cache) != head_dim:
        raise ValueError(f"the KV pool holds head_dim {kv_quant.head_dim_of(k_cache)}, q {head_dim}")
    k_scales, v_scales = _scales_view(k_cache), _scales_view(v_cache)
    sink_query = q_sink is not None and meta.rope_positions is not None and meta.max_sink_len > 0
    if sink_query and (q_sink.shape != q.shape or q_sink.dtype != q.dtype):
        raise ValueError(f"q_sink {tuple(q_sink.shape)} {q_sink.dtype} differs from q {tuple(q.shape)} {q.dtype}")
    group = num_heads // num_kv_heads
    q = q if q.stride(-1) == 1 else q.contiguous()
    # Without a sink query the kernels never read q_sink (SINK_QUERY off): pass q in its place.
    q_sink = (q_sink if q_sink.stride(-1) == 1 else q_sink.contiguous()) if sink_query else q
    out = torch.empty((num_tokens, num_heads, head_dim), dtype=q.dtype, device=q.device)
    if num_tokens == 0:
        return out
    has_gaps = meta.sink_gaps is not None
    # Dummy pointers where the kernels do not read them (sink_lens is set with gaps or evictions).
    sink_lens = meta.sink_lens if has_gaps or sink_query else meta.context_lens
    sink_gaps = meta.sink_gaps if has_gaps else meta.context_lens
    flags = dict(
        HEAD_DIM=head_dim, BLOCK_SIZE=block_size, HAS_GAPS=has_gaps, SINK_QUERY=sink_query,
        IEEE=q.dtype == torch.float32,  # fp32 dots without TF32
        # Triton's interpreter (CPU tensors) computes tl.dot wrongly on bf16 operands.
        UPCAST=q.dtype == torch.bfloat16 and q.device.type == "cpu",
        KV_INT8=kv_int8,
    )
    query_strides = (q.stride(0), q.stride(1), q_sink.stride(0), q_sink.stride(1), out.stride(0), out.stride(1))
    cache_strides = (k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
                     v_cache.stride(0), v_cache.stride(1), v_cache.stride(2))
    # Tiles and warps. They were chosen (without a GPU to time them) when the kernels still
    # rotated each key tile in fp32, so that ptxas (triton 3.9, sm_80 and sm_90) kept the
    # 16-bit kernels for D = 32 .. 256 (nearly) free of register spills: key tiles of 64 keys
    # for D <= 64, 32 for D = 128, 16 beyond; prefill tiles of 64 rows for D <= 64, 32 beyond;
    # 8 warps; fp32 (not a speed target) 16-key tiles. Without the rotation a tile needs fewer
    # registers, so these are conservative; they have not been re-measured.
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
            q, q_sink, k_cache, v_cache, k_scales, v_scales, out, part_acc, part_ml,
            meta.block_tables, meta.context_lens, sink_lens, sink_gaps,
            scale,
            *query_strides,
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
            q, q_sink, k_cache, v_cache, k_scales, v_scales, out,
            meta.block_tables, meta.context_lens, meta.query_start_loc, meta.positions,
            sink_lens, sink_gaps,
            scale, num_decode,
            *query_strides,
            *cache_strides,
            meta.block_tables.stride(0),
            GROUP=group, GROUP_PAD=group_pad, BLOCK_M=block_m, BLOCK_N=block_n,
            num_warps=num_warps, **flags,
        )
    return out

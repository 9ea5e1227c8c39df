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

Kernels, one file each:
- write_kv.py: `write_kv_triton`, one program per new token storing its K and V [Hkv, D] at its slot.
- decode_attention.py: one program per (decode sequence, KV head, context partition), with a
  merge of the partitions' partial outputs (flash-decoding) when there are several.
- prefill_attention.py: all prefill chunks in one launch, grid (query tile, prefill sequence, KV head).
- attention_tiles.py: the key-tile step of online softmax both attention kernels loop over.
This file checks the arguments, picks tiles and warps, and launches them.

An int8 pool (model/layers/kv_quant.py: rows of head_dim codes and a float16 scale, `[.., D + 2]`)
is read in the same kernels (constexpr KV_INT8): each key and value tile is loaded as codes,
its rows' scales through a float16 view of the pool (element D / 2 of a row), and dequantized
to the queries' dtype before its dot; the write quantizes as model/layers/kv_quant.py does
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

from model.kernels.decode_attention import decode_kernel, merge_kernel
from model.kernels.pool_layout import check_pool_layout, scales_view
from model.kernels.prefill_attention import prefill_kernel
from model.layers import kv_quant
from model.layers.attention import AttentionMetadata

# Keys per context partition of the decode kernel (flash-decoding split).
DEFAULT_PARTITION_SIZE = 512


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
    check_pool_layout(k_cache)
    check_pool_layout(v_cache)
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
    k_scales, v_scales = scales_view(k_cache), scales_view(v_cache)
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
        decode_kernel[(num_decode, num_kv_heads, num_parts)](
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
            merge_kernel[(num_decode, num_heads)](
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
        prefill_kernel[grid](
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

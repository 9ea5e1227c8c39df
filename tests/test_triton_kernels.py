"""Triton paged-attention kernels against the PyTorch reference (model/layers/attention.py).

Without CUDA the kernels run in Triton's interpreter on CPU tensors (TRITON_INTERPRET=1, set
below before anything imports triton): small shapes only, it is slow. With CUDA the same
cases run on the GPU, and the `gpu` test adds full-size batches.

Keys in the pool are random data standing for rotated keys, and q, q_sink are independent
random tensors: the kernels only have to score window keys with q and sink keys with q_sink
exactly as the reference does, whatever the rotation that made them.
"""

from __future__ import annotations

import dataclasses
import math
import random

import pytest
import torch

from tests.triton_device import DEVICE  # before triton is imported: sets up the interpreter

from model.layers import kv_quant
from model.layers.attention import AttentionMetadata, paged_attention, write_kv
from model.kernels import paged_attention_triton, write_kv_triton

# Max error relative to the largest reference value, against a float32 reference on the same
# (rounded) inputs.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def max_relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


def make_case(specs, num_kv_heads, group, head_dim, block_size, dtype, seed=0, device=DEVICE):
    """A batch over a random pool. specs: (query_len, context_len, num_sinks, num_evicted) per
    sequence, decodes first. A sequence that has evicted tokens has its keys past the sinks
    sink_gap = (sink blocks * block_size - num_sinks) slots further on, as in
    scheduler/sink_policy.py; one that has not keeps its sink length but has no gap. Blocks come
    from a shuffled pool with spare ("evicted") blocks that no table holds; the whole pool is
    random data, then the new K/V are written at their slots. q and q_sink are independent.
    Returns (q, q_sink, k_cache, v_cache, meta, new_k, new_v)."""
    gen = torch.Generator().manual_seed(seed)
    sinks = [s for _, _, s, _ in specs]
    evicted = [e for _, _, _, e in specs]
    gaps = [-(-s // block_size) * block_size - s if e else 0 for _, _, s, e in specs]
    blocks_needed = []
    for (_, ctx, sink, _), gap in zip(specs, gaps):
        last = ctx - 1 + (gap if ctx - 1 >= sink else 0)  # slot index of the last key
        blocks_needed.append(last // block_size + 1)
    num_blocks = sum(blocks_needed) + 5
    free = list(range(num_blocks))
    random.Random(seed).shuffle(free)
    tables = []
    for n in blocks_needed:
        tables.append([free.pop() for _ in range(n)])
    query_lens = [q for q, _, _, _ in specs]
    context_lens = [c for _, c, _, _ in specs]
    meta = AttentionMetadata.build(query_lens, context_lens, tables, block_size, device, sinks, gaps, evicted)
    assert (meta.sink_gaps is not None) == any(gaps)
    assert (meta.rope_positions is not None) == any(evicted)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(dtype).to(device)
    v_cache = torch.randn(shape, generator=gen).to(dtype).to(device)
    num_tokens = sum(query_lens)
    new_k = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(dtype).to(device)
    new_v = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(dtype).to(device)
    write_kv(k_cache, v_cache, new_k, new_v, meta.slot_mapping)
    # Scale 1.5 sharpens the softmax a little, so a misplaced key or a wrong query shows.
    query_shape = (num_tokens, num_kv_heads * group, head_dim)
    q = (1.5 * torch.randn(query_shape, generator=gen)).to(dtype).to(device)
    q_sink = (1.5 * torch.randn(query_shape, generator=gen)).to(dtype).to(device)
    return q, q_sink, k_cache, v_cache, meta, new_k, new_v


def check_attention(specs, num_kv_heads, group, head_dim, block_size, dtype, partition_size=512, block_n=None,
                    seed=0, sink_query=True, meta_of=None):
    """The kernels against the float32 reference on one case; sink_query False passes no q_sink;
    meta_of(meta) replaces the case's metadata (same pool layout)."""
    q, q_sink, k_cache, v_cache, meta, _, _ = make_case(specs, num_kv_heads, group, head_dim, block_size, dtype,
                                                        seed)
    if meta_of is not None:
        meta = meta_of(meta)
    if not sink_query:
        q_sink = None
    scale = head_dim ** -0.5
    out = paged_attention_triton(q, q_sink, k_cache, v_cache, meta, scale, partition_size=partition_size,
                                 block_n=block_n)
    assert out.shape == q.shape and out.dtype == dtype
    q_sink32 = q_sink.float() if q_sink is not None else None
    expected = paged_attention(q.float(), q_sink32, k_cache.float(), v_cache.float(), meta, scale)
    error = max_relative_error(out, expected)
    assert error < TOLERANCE[dtype], f"max relative error {error:.2e}"
    if q_sink is not None and meta.rope_positions is not None:
        # The case can tell q_sink from q: scoring the sinks with q is far off.
        without_sink_query = paged_attention(q.float(), None, k_cache.float(), v_cache.float(), meta, scale)
        assert max_relative_error(without_sink_query, expected) > TOLERANCE[dtype]
    if dtype != torch.float32:
        # The kernel is at least about as close to exact as the reference run in the same dtype.
        in_dtype = paged_attention(q, q_sink, k_cache, v_cache, meta, scale)
        assert error <= 2 * max_relative_error(in_dtype, expected) + 1e-3
    return error


# Decodes first, then prefill chunks. Decodes: 9 keys; 45 keys with 5 sinks after eviction;
# 100 keys with 21 sinks after eviction (the sinks span two 16-key tiles and cross a 16- or
# 32-key partition); 30 keys with 4 sinks before any eviction (sink length, no gap). Chunks:
# a first chunk of 17 tokens; a 6-token chunk after eviction with 3 sinks; a 20-token chunk
# after eviction with 18 sinks (positions 30..49, sinks across two tiles); a 1-token chunk.
MIXED = [(1, 9, 0, 0), (1, 45, 5, 40), (1, 100, 21, 300), (1, 30, 4, 0),
         (17, 17, 0, 0), (6, 60, 3, 1000), (20, 50, 18, 70), (1, 30, 0, 0)]


@pytest.mark.parametrize(
    "num_kv_heads, group, head_dim, block_size, dtype, partition_size, block_n",
    [
        (2, 1, 64, 16, torch.float32, 32, 16),  # 2 key tiles per partition: online-softmax rescale
        (1, 2, 128, 32, torch.float32, 64, None),
        (2, 8, 64, 32, torch.float32, 16, 16),
        (2, 4, 64, 32, torch.float16, 512, None),  # one decode partition: no merge
        (1, 8, 128, 16, torch.bfloat16, 32, 16),
    ],
    ids=["g1-d64-bs16-fp32", "g2-d128-bs32-fp32", "g8-d64-bs32-fp32", "g4-d64-bs32-fp16-single",
         "g8-d128-bs16-bf16"],
)
def test_mixed_batch_with_evictions(num_kv_heads, group, head_dim, block_size, dtype, partition_size, block_n):
    check_attention(MIXED, num_kv_heads, group, head_dim, block_size, dtype, partition_size, block_n)


def test_mixed_batch_without_sink_query():
    # Gaps in the slot layout, but no q_sink: every key is scored by q.
    check_attention(MIXED, 2, 2, 64, 16, torch.float32, partition_size=32, block_n=16, seed=7, sink_query=False)


def test_evictions_without_gaps():
    # Sinks fill whole blocks: no sink gaps (meta.sink_gaps is None), but sink keys still take
    # q_sink; 32 sinks fill two decode partitions.
    specs = [(1, 40, 16, 64), (1, 70, 32, 16), (1, 12, 0, 0), (5, 50, 16, 32), (3, 20, 16, 0)]
    check_attention(specs, 1, 4, 64, 16, torch.float32, partition_size=16, block_n=16, seed=8)


def test_decode_graph_metadata():
    # As model/execution/cuda_graphs.py passes it: absolute positions, sink lengths and gaps always set
    # (zeros for sequences without sinks), max_sink_len only an upper bound.
    specs = [(1, 45, 5, 40), (1, 9, 0, 0), (1, 100, 21, 300), (1, 30, 4, 0)]

    def as_in_graphs(meta: AttentionMetadata) -> AttentionMetadata:
        return dataclasses.replace(
            meta, rope_positions=meta.rope_positions.clone(), sink_lens=meta.sink_lens.clone(),
            sink_gaps=meta.sink_gaps.clone(), max_sink_len=4096, decode_groups=None)

    check_attention(specs, 2, 2, 32, 16, torch.float32, partition_size=16, block_n=16, seed=9,
                    meta_of=as_in_graphs)


def test_decode_only_many_partitions_no_sinks():
    # No evictions: q_sink is ignored (meta.rope_positions is None), as by the reference.
    specs = [(1, 3, 0, 0), (1, 77, 0, 0), (1, 130, 0, 0)]  # 130 keys: 9 partitions of 16
    check_attention(specs, 2, 2, 64, 16, torch.float32, partition_size=16, seed=1)


def test_prefill_only_long_chunk():
    # A 70-token chunk spans two query tiles (64 rows at G=1), and a chunk after eviction.
    specs = [(70, 90, 0, 0), (3, 40, 4, 20)]
    check_attention(specs, 1, 1, 64, 32, torch.float32, block_n=16, seed=2)


def test_head_dim_16():
    # D = 16: tl.dot's smallest K.
    check_attention([(1, 20, 3, 10), (5, 12, 0, 0), (4, 30, 2, 5)], 1, 4, 16, 16, torch.float32,
                    partition_size=16, seed=3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_write_kv(dtype):
    gen = torch.Generator().manual_seed(4)
    num_blocks, block_size, num_kv_heads, head_dim = 6, 16, 3, 64
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:21].to(DEVICE)
    k = torch.randn(21, num_kv_heads, head_dim, generator=gen).to(dtype).to(DEVICE)
    v = torch.randn(21, num_kv_heads, head_dim, generator=gen).to(dtype).to(DEVICE)
    base = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(dtype).to(DEVICE)
    expected_k, expected_v = base[0].clone(), base[1].clone()
    write_kv(expected_k, expected_v, k, v, slots)
    k_cache, v_cache = base[0].clone(), base[1].clone()
    write_kv_triton(k_cache, v_cache, k, v, slots)
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)
    # A negative slot (a padding token) is skipped.
    write_kv_triton(k_cache, v_cache, k[:2] + 1, v[:2] + 1, torch.tensor([-1, -1], device=DEVICE))
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)


def check_int8_attention(specs, num_kv_heads, group, head_dim, block_size, dtype, partition_size=512, seed=0):
    """The kernels on an int8 pool against the float32 reference on the same pool dequantized,
    and against the PyTorch path reading the int8 pool itself."""
    q, q_sink, k_cache, v_cache, meta, _, _ = make_case(specs, num_kv_heads, group, head_dim, block_size,
                                                        torch.float32, seed)
    k_int8, v_int8 = kv_quant.quantize(k_cache), kv_quant.quantize(v_cache)  # [.., D + 2] int8
    q, q_sink = q.to(dtype), q_sink.to(dtype)
    scale = head_dim ** -0.5
    out = paged_attention_triton(q, q_sink, k_int8, v_int8, meta, scale, partition_size=partition_size)
    assert out.shape == q.shape and out.dtype == dtype
    dequantized = [kv_quant.dequantize(c, torch.float32) for c in (k_int8, v_int8)]
    expected = paged_attention(q.float(), q_sink.float(), *dequantized, meta, scale)
    error = max_relative_error(out, expected)
    assert error < TOLERANCE[dtype], f"max relative error {error:.2e}"
    # Reading the float pool instead is measurably different: the kernel read the codes.
    assert max_relative_error(paged_attention(q.float(), q_sink.float(), k_cache, v_cache, meta, scale),
                              expected) > TOLERANCE[torch.float32]
    torch_path = paged_attention(q, q_sink, k_int8, v_int8, meta, scale)
    assert max_relative_error(out, torch_path) < 2 * TOLERANCE[dtype]


@pytest.mark.parametrize(
    "num_kv_heads, group, head_dim, block_size, dtype, partition_size",
    [(2, 2, 64, 16, torch.float32, 32), (1, 4, 32, 32, torch.bfloat16, 512), (2, 1, 16, 16, torch.float16, 16)],
    ids=["g2-d64-fp32-parts", "g4-d32-bf16-single", "g1-d16-fp16-parts"],
)
def test_int8_pool(num_kv_heads, group, head_dim, block_size, dtype, partition_size):
    check_int8_attention(MIXED, num_kv_heads, group, head_dim, block_size, dtype, partition_size)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv_int8(dtype):
    """The kernel's quantized write stores the bytes model/layers/kv_quant.py would (to one code and
    the scale's last bit on a GPU, whose float division may round differently)."""
    gen = torch.Generator().manual_seed(11)
    num_blocks, block_size, num_kv_heads, head_dim = 6, 16, 3, 64
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:21].to(DEVICE)
    rows = torch.randn(2, 21, num_kv_heads, head_dim, generator=gen) * torch.logspace(-4, 2, 21)[:, None, None]
    rows[:, 0] = 0.0  # an all-zero row: the smallest scale, codes 0
    rows[:, 1, 0, :4] = torch.tensor([0.5, -0.5, 1.5, 127.0])  # ties: 0.5 rounds to 0, 1.5 to 2
    k, v = rows[0].to(dtype).to(DEVICE), rows[1].to(dtype).to(DEVICE)
    shape = (num_blocks, block_size, num_kv_heads, head_dim + kv_quant.SCALE_BYTES)
    expected_k = torch.zeros(shape, dtype=torch.int8, device=DEVICE)
    expected_v = expected_k.clone()
    write_kv(expected_k, expected_v, k, v, slots)
    k_cache, v_cache = torch.zeros_like(expected_k), torch.zeros_like(expected_v)
    write_kv_triton(k_cache, v_cache, k, v, slots)
    for got, want in ((k_cache, expected_k), (v_cache, expected_v)):
        if DEVICE == "cpu":
            assert torch.equal(got, want)
        else:
            codes_diff = (got[..., :-2].int() - want[..., :-2].int()).abs().max().item()
            assert codes_diff <= 1
            scale_diff = (got[..., -2:].contiguous().view(torch.int16).int()
                          - want[..., -2:].contiguous().view(torch.int16).int()).abs().max().item()
            assert scale_diff <= 1
    # Padding tokens are skipped.
    before = k_cache.clone()
    write_kv_triton(k_cache, v_cache, k[:2] + 1, v[:2] + 1, torch.tensor([-1, -1], device=DEVICE))
    assert torch.equal(k_cache, before)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("block_size", [16, 32])
def test_full_size_on_gpu(dtype, block_size):
    rng = random.Random(5)
    specs = []
    for _ in range(48):  # decodes, contexts up to 4k, half after evictions, some with sinks
        specs.append((1, rng.randint(1, 4096), rng.choice([0, 0, 4, 16, 21]), rng.choice([0, rng.randint(32, 10**5)])))
    for _ in range(16):  # prefill chunks: first chunks (nothing evicted yet) and later ones
        q_len = rng.randint(1, 256)
        context_len = rng.choice([q_len, rng.randint(q_len, 4096)])
        evicted = rng.choice([0, rng.randint(32, 10**5)]) if context_len > q_len else 0
        specs.append((q_len, context_len, rng.choice([0, 4, 21]), evicted))
    specs = [(q, c, s if c > s + block_size else 0, e) for q, c, s, e in specs]
    for partition_size in (512, 256):
        check_attention(specs, 8, 4, 128, block_size, dtype, partition_size, seed=6)
    # The kernels' write matches the reference on the full batch too.
    _, _, k_cache, v_cache, meta, new_k, new_v = make_case(specs, 8, 4, 128, block_size, dtype, seed=6)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    k_cache.zero_(), v_cache.zero_()
    write_kv_triton(k_cache, v_cache, new_k, new_v, meta.slot_mapping)
    flat = meta.slot_mapping
    assert torch.equal(k_cache.view(-1, 8, 128)[flat], k_ref.view(-1, 8, 128)[flat])
    assert torch.equal(v_cache.view(-1, 8, 128)[flat], v_ref.view(-1, 8, 128)[flat])
    assert not math.isnan(float(k_cache.float().sum()))
    if dtype != torch.float32:
        check_int8_attention(specs, 8, 4, 128, block_size, dtype, partition_size=256, seed=6)

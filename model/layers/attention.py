"""Attention over a paged KV pool: metadata, K/V writes, and the pure-PyTorch reference.

The pool of one layer is two tensors `[num_blocks, block_size, num_kv_heads, head_dim]`.
A sequence's cache is the concatenation of the blocks in its block-table row; its key `j`
(0-based, in cache order) lives at index `i = j` of that concatenation, block
`block_tables[s, i // block_size]`, offset `i % block_size`. After StreamingLLM eviction has
dropped the non-sink tail of a partly-sink block, the keys past the sinks sit `sink_gap`
slots further on: `i = j + sink_gap * (j >= sink_len)` (scheduler/sink_policy.py).

Keys are stored *after* RoPE, rotated at their absolute position in the sequence (the index of
the token in prompt + output), and never rotated again. StreamingLLM eviction renumbers the
kept tokens (their cache positions are 0..context_len-1), which a RoPE score sees only through
the distance between query and key. A window key keeps its distance to the query under the
renumbering (both move down by the evicted count), so the query rotated at its absolute
position scores it exactly; a sink key does not move, so it is scored by the query rotated at
its cache position (`q_sink`). Eviction stays a block-table edit, shared blocks are never
rewritten, and no key is rotated on read (DESIGN.md, option d).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from model.layers import kv_quant



@dataclass
class AttentionMetadata:
    """Where each new token's K/V goes and what each sequence attends to, for one forward.

    Sequences are ordered decodes first: the first `num_decode_seqs` have exactly one new
    token, so decode tokens are `[:num_decode_seqs]` of the flat batch.
    """

    positions: torch.Tensor  # [T] int64 cache position of each new token (causal mask, slot)
    slot_mapping: torch.Tensor  # [T] int64 pool slot (block * block_size + offset) of each new K/V
    block_tables: torch.Tensor  # [B, max_blocks] int64 physical block ids (padding: 0)
    context_lens: torch.Tensor  # [B] int64 cache length of each sequence after this step
    query_start_loc: torch.Tensor  # [B + 1] int64 offsets of each sequence's new tokens
    num_decode_seqs: int
    max_query_len: int
    max_decode_context_len: int
    max_prefill_context_len: int
    # [T] int64 absolute position of each new token (RoPE of q and k): the cache position plus
    # the tokens its sequence has evicted. None: no sequence of the batch has evicted any, so
    # the two agree and keys need no sink query.
    rope_positions: torch.Tensor | None = None
    sink_lens: torch.Tensor | None = None  # [B] int64 attention sinks of each sequence
    sink_gaps: torch.Tensor | None = None  # [B] int64 unused slots after its sinks (None: all 0)
    max_sink_len: int = 0  # the longest of sink_lens (0 when sink_lens is None)
    # Decode rows grouped by context length for the reference attention, each group padded only
    # to its own longest context: (row indices [n], longest context). None: one group of all.
    decode_groups: list[tuple[torch.Tensor | slice, int]] | None = None
    reference_plan: object = field(default=None, repr=False)  # built by the reference attention

    @property
    def num_seqs(self) -> int:
        return self.context_lens.shape[0]

    @classmethod
    def build(
        cls,
        query_lens: list[int],
        context_lens: list[int],
        block_tables: list[list[int]],
        block_size: int,
        device: torch.device | str = "cpu",
        sink_lens: list[int] | None = None,
        sink_gaps: list[int] | None = None,
        num_evicted: list[int] | None = None,
    ) -> "AttentionMetadata":
        """Metadata for sequences whose last `query_lens[i]` cache entries are this step's tokens.

        The leading sequences with one new token take the decode path; any order is correct,
        decodes first is fastest.
        """
        num_decode = 0
        while num_decode < len(query_lens) and query_lens[num_decode] == 1:
            num_decode += 1
        num_seqs = len(query_lens)
        has_gaps = sink_gaps is not None and any(sink_gaps)
        has_evictions = num_evicted is not None and any(num_evicted)
        # Per token, in plain Python (a step's few tokens cost less so than as a dozen tensor ops):
        # each new token sits at the end of its sequence's cache, positions ctx - q .. ctx - 1.
        positions, slots, rope_positions = [], [], []
        for seq, (num_new, context_len, table) in enumerate(zip(query_lens, context_lens, block_tables)):
            first = context_len - num_new
            positions.extend(range(first, context_len))
            if has_evictions:
                rope_positions.extend(range(first + num_evicted[seq], context_len + num_evicted[seq]))
            sink, gap = (sink_lens[seq], sink_gaps[seq]) if has_gaps else (0, 0)
            for position in range(first, context_len):
                index = position + gap if gap and position >= sink else position
                slots.append(table[index // block_size] * block_size + index % block_size)
        max_blocks = max((len(t) for t in block_tables), default=0)
        padded = [t + [0] * (max_blocks - len(t)) for t in block_tables]
        starts = [0]
        for num_new in query_lens:
            starts.append(starts[-1] + num_new)

        def tensor(values: list) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.int64, device=device)

        decode_groups = None
        if torch.device(device).type == "cpu":  # only the reference path gains from groups
            groups = group_by_length(context_lens[:num_decode])
            decode_groups = [(slice(0, num_decode) if len(groups) == 1 else tensor(rows), max_len)
                             for rows, max_len in groups]
        return cls(
            positions=tensor(positions),
            slot_mapping=tensor(slots),
            block_tables=tensor(padded).view(num_seqs, max_blocks),
            context_lens=tensor(context_lens),
            query_start_loc=tensor(starts),
            num_decode_seqs=num_decode,
            max_query_len=max(query_lens, default=0),
            max_decode_context_len=max(context_lens[:num_decode], default=0),
            max_prefill_context_len=max(context_lens[num_decode:], default=0),
            rope_positions=tensor(rope_positions) if has_evictions else None,
            sink_lens=tensor(sink_lens) if has_gaps or has_evictions else None,
            sink_gaps=tensor(sink_gaps) if has_gaps else None,
            max_sink_len=max(sink_lens) if has_gaps or has_evictions else 0,
            decode_groups=decode_groups,
        )


def group_by_length(lengths: list[int], max_padding: float = 0.25, min_group: int = 8
                    ) -> list[tuple[list[int], int]]:
    """Split rows into groups of similar length: (row indices, longest length) per group.

    Rows are taken longest first; a group closes when padding its rows to its longest would
    cost more than `max_padding` over their total length (and it has `min_group` rows).
    """
    order = sorted(range(len(lengths)), key=lengths.__getitem__, reverse=True)
    groups: list[tuple[list[int], int]] = []
    rows: list[int] = []
    total = 0
    for row in order:
        if rows and len(rows) >= min_group and lengths[rows[0]] * (len(rows) + 1) > (1 + max_padding) * (
                total + lengths[row]):
            groups.append((rows, lengths[rows[0]]))
            rows, total = [], 0
        rows.append(row)
        total += lengths[row]
    if rows:
        groups.append((rows, lengths[rows[0]]))
    return groups


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Store new k, v [T, num_kv_heads, head_dim] at their pool slots (an int8 pool: quantized
    per token and head, model/layers/kv_quant.py)."""
    if kv_quant.is_quantized(k_cache):
        k, v = kv_quant.quantize(k), kv_quant.quantize(v)  # [T, Hkv, D + 2] int8
    num_kv_heads, row = k.shape[1:]
    k_cache.view(-1, num_kv_heads, row).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, num_kv_heads, row).index_copy_(0, slot_mapping, v)


def gather_blocks(cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """The whole blocks block_ids [B, nb] of a pool: [B, nb * block_size, num_kv_heads, head_dim],
    slot index i of a row at block i // block_size, offset i % block_size."""
    num_seqs, num_blocks = block_ids.shape
    return cache.index_select(0, block_ids.flatten()).view(num_seqs, num_blocks * cache.shape[1], *cache.shape[2:])


class _ReferencePlan:
    """What the reference attention of one forward reads, the same at every layer: built at the
    first layer and kept on the metadata.

    Attention runs over whole blocks of each sequence's table (a block gather is one contiguous
    copy per block), in slot space: slot index i of sequence s holds its key
    j = i - sink_gap * (i >= sink_len), and the sink gap's slots hold none. Keys are stored
    rotated, so a key's slot index does not matter, only whether a query may see it. Per decode
    group: the rows, their block ids [n, nb] and the mask of the slots each query may see,
    [n, 1, 1, nb * block_size]; for the prefill chunks, padded to the longest: block ids, the mask
    [Bp, 1, Qmax * G, L] (rows as `_grouped` orders them, G query heads per KV head), and where each
    token sits in the padding (its chunk, its offset). Masks are additive (0 where a query may
    look, -inf where not) in the queries' dtype: a boolean mask would be converted so by
    `scaled_dot_product_attention` at every layer."""

    def __init__(self, meta: AttentionMetadata, block_size: int, group: int, device: torch.device,
                 dtype: torch.dtype):
        self.decodes: list[tuple[slice | torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.block_size = block_size
        num_decode = meta.num_decode_seqs
        # Decodes, a group of similar context lengths at a time (each padded to its longest).
        groups = meta.decode_groups
        if groups is None:
            groups = [(slice(0, num_decode), meta.max_decode_context_len)] if num_decode else []
        for rows, num_keys in groups:
            block_ids, key_of_slot = self._blocks(meta, rows, num_keys)  # key_of_slot [n, L]
            allowed = key_of_slot < meta.context_lens[rows][:, None]  # [n, L]
            self.decodes.append((rows, block_ids, _additive(allowed[:, None, None], dtype)))
        self.prefill = None
        if num_decode < meta.num_seqs:
            starts = meta.query_start_loc[num_decode:] - num_decode  # [Bp + 1]
            q_lens = starts[1:] - starts[:-1]  # [Bp]
            num_prefill = q_lens.shape[0]
            num_tokens = int(starts[-1])
            seq_of_token = torch.repeat_interleave(torch.arange(num_prefill, device=device), q_lens)  # [Tp]
            offset_of_token = torch.arange(num_tokens, device=device) - starts[seq_of_token]  # [Tp]
            # Padding queries get position -1: they see nothing and are dropped.
            query_pos = torch.full((num_prefill, meta.max_query_len), -1, dtype=torch.int64, device=device)
            query_pos[seq_of_token, offset_of_token] = meta.positions[num_decode:]
            rows = slice(num_decode, None)
            block_ids, key_of_slot = self._blocks(meta, rows, meta.max_prefill_context_len)
            allowed = key_of_slot[:, None, :] <= query_pos[:, :, None]  # [Bp, Qmax, L]
            # A padding row with every key masked would softmax to NaN; let it see slot 0 instead.
            allowed[:, :, 0] |= query_pos < 0
            mask = _additive(allowed.repeat_interleave(group, dim=1)[:, None], dtype)  # [Bp, 1, Qmax * G, L]
            self.prefill = (block_ids, mask, seq_of_token, offset_of_token)

    def _blocks(self, meta: AttentionMetadata, rows: slice | torch.Tensor, num_keys: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Block ids [n, nb] holding the rows' first num_keys keys, and the key index of every
        slot [n, nb * block_size] (a huge number for the slots of a sink gap: no one sees them)."""
        max_gap = 0
        if meta.sink_gaps is not None:
            max_gap = int(meta.sink_gaps[rows].max())
        num_blocks = min(-(-(num_keys + max_gap) // self.block_size), meta.block_tables.shape[1])
        block_ids = meta.block_tables[rows, :num_blocks]  # [n, nb]
        slot = torch.arange(num_blocks * self.block_size, device=block_ids.device)[None, :]  # [1, L]
        if not max_gap:
            return block_ids, slot
        sinks, gaps = meta.sink_lens[rows][:, None], meta.sink_gaps[rows][:, None]  # [n, 1]
        key_of_slot = torch.where(slot < sinks, slot, slot - gaps)  # [n, L]
        in_gap = (slot >= sinks) & (slot < sinks + gaps)
        return block_ids, key_of_slot.masked_fill(in_gap, torch.iinfo(torch.int64).max)

    @classmethod
    def of(cls, meta: AttentionMetadata, block_size: int, group: int, device: torch.device,
           dtype: torch.dtype) -> "_ReferencePlan":
        plan = meta.reference_plan
        if plan is None:
            plan = meta.reference_plan = cls(meta, block_size, group, device, dtype)
        return plan


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask as an additive one: 0 where allowed, -inf elsewhere."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))


def _grouped(q: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """q [B, Q, Hq, D] -> [B, Hkv, Q*G, D]: each KV head's query heads as the rows of one matrix,
    query-major (row q * G + g)."""
    num_seqs, num_queries, num_heads, head_dim = q.shape
    q = q.view(num_seqs, num_queries, num_kv_heads, num_heads // num_kv_heads, head_dim).transpose(1, 2)
    return q.reshape(num_seqs, num_kv_heads, -1, head_dim)


def _attend(q: torch.Tensor, q_sink: torch.Tensor | None, k_cache: torch.Tensor, v_cache: torch.Tensor,
            block_ids: torch.Tensor, mask: torch.Tensor, sink_lens: torch.Tensor | None, max_sink_len: int,
            scale: float) -> torch.Tensor:
    """q [B, Q, Hq, D] over the slots of blocks block_ids [B, nb] (L = nb * block_size slots);
    q_sink (same shape, or None) scores each sequence's first sink_lens [B] slots (its sinks)
    instead of q.

    mask [B, 1, Q*G or 1, L], additive, says which slots each query row may see (the plan's).
    Returns [B, Q, Hq, D].
    """
    num_seqs, num_queries, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    keys = gather_blocks(k_cache, block_ids)  # [B, L, Hkv, D] (int8 pool: D + 2)
    values = gather_blocks(v_cache, block_ids)
    if kv_quant.is_quantized(k_cache):  # dequantized while contiguous
        keys, values = kv_quant.dequantize(keys, q.dtype), kv_quant.dequantize(values, q.dtype)  # [B, L, Hkv, D]
    keys, values = keys.transpose(1, 2), values.transpose(1, 2)  # [B, Hkv, L, D]
    # Each KV head serves its group of query heads without being copied.
    q_rows = _grouped(q, num_kv_heads)  # [B, Hkv, Q*G, D]
    if q_sink is not None and max_sink_len:
        # The sink keys' scores come from q_sink: added to the mask as the difference to q's.
        num_sink = min(max_sink_len, keys.shape[2])
        sink_keys = keys[:, :, :num_sink].transpose(2, 3)  # [B, Hkv, D, S]
        correction = torch.matmul(_grouped(q_sink, num_kv_heads), sink_keys).float()
        correction -= torch.matmul(q_rows, sink_keys).float()  # [B, Hkv, Q*G, S]
        is_sink = torch.arange(num_sink, device=q.device) < sink_lens[:, None]  # [B, S]
        bias = mask.expand(q_rows.shape[:-1] + keys.shape[2:3]).clone()  # [B, Hkv, Q*G, L]
        bias[..., :num_sink] += (correction * scale).masked_fill(~is_sink[:, None, None], 0.0).to(q.dtype)
        mask = bias  # [B, Hkv, Q*G, L]
    out = F.scaled_dot_product_attention(q_rows, keys, values, attn_mask=mask, scale=scale)  # [B, Hkv, Q*G, D]
    out = out.view(num_seqs, num_kv_heads, num_queries, group, head_dim).transpose(1, 2)
    return out.reshape(num_seqs, num_queries, num_heads, head_dim)


def paged_attention(q: torch.Tensor, q_sink: torch.Tensor | None, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Reference paged attention for a flat batch of new queries q [T, Hq, D].

    q is rotated at the tokens' absolute positions; q_sink, rotated at their cache positions,
    scores the sink keys (None: the batch has no evictions, q_sink would equal q).
    Batched over sequences: decodes in a few calls, each over a group of similar context lengths
    padded to its longest (`meta.decode_groups`), prefill chunks in one call padded to the
    longest chunk; each call gathers its sequences' blocks and runs PyTorch's
    scaled_dot_product_attention over them. Each query sees the cache entries at or before its
    position. Returns [T, Hq, D].
    """
    out = torch.empty_like(q)
    num_decode = meta.num_decode_seqs
    plan = _ReferencePlan.of(meta, k_cache.shape[1], q.shape[1] // k_cache.shape[2], q.device, q.dtype)
    if meta.rope_positions is None:
        q_sink = None
    for rows, block_ids, mask in plan.decodes:
        sink_lens = meta.sink_lens[rows] if q_sink is not None else None
        out[rows] = _attend(q[rows][:, None], q_sink[rows][:, None] if q_sink is not None else None,
                            k_cache, v_cache, block_ids, mask, sink_lens, meta.max_sink_len, scale)[:, 0]
    if plan.prefill is not None:
        block_ids, mask, seq_of_token, offset_of_token = plan.prefill
        sink_lens = meta.sink_lens[num_decode:] if q_sink is not None else None

        def padded(x: torch.Tensor) -> torch.Tensor:  # [Tp, Hq, D] -> [Bp, Qmax, Hq, D]
            padded_x = x.new_zeros((mask.shape[0], meta.max_query_len) + x.shape[1:])
            padded_x[seq_of_token, offset_of_token] = x
            return padded_x

        padded_out = _attend(padded(q[num_decode:]), padded(q_sink[num_decode:]) if q_sink is not None else None,
                             k_cache, v_cache, block_ids, mask, sink_lens, meta.max_sink_len, scale)
        out[num_decode:] = padded_out[seq_of_token, offset_of_token]
    return out

"""CUDA graphs for decode steps: one captured forward per batch size of a ladder.

A decode-only step (every sequence has one new token) launches the same kernels every time,
only with different data, so on a GPU it is captured once per batch size and replayed: the
host then issues one graph launch instead of hundreds of kernel launches. A batch of B
sequences runs the graph of the smallest captured size >= B; rows B.. are padding (token 0,
slot -1 so the K/V write skips them, context length 1, block table of zeros) and their outputs
are dropped.

Everything a graph reads lives in static buffers sized for the largest batch; a step copies its
metadata into them and replays. The attention metadata of a graph has fixed Python ints
(`max_decode_context_len = max_model_len`), so the decode kernel's grid is fixed too: its
programs for context partitions past a sequence's length return at once. Sink lengths and gaps
and absolute (RoPE) positions are always passed (zeros and cache positions for sequences
without eviction), so one graph serves both, and its forward always forms the sink query.

Graphs need the Triton backend (its K/V write skips the padding rows' negative slots). With
`capture=False` the same padded forward runs eagerly: that is how the padding logic is tested
on a CPU (with the Triton interpreter).
"""

from __future__ import annotations

import logging

import torch

from model.layers.attention import AttentionMetadata
from model.models.llama import KVCache, LlamaForCausalLM

logger = logging.getLogger(__name__)


def batch_size_ladder(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, 16, then every multiple of 16, up to the first size >= max_num_seqs."""
    ladder = [1]
    while ladder[-1] < max_num_seqs:
        ladder.append(ladder[-1] * 2 if ladder[-1] < 16 else ladder[-1] + 16)
    return ladder


class DecodeGraphs:
    """Captured (or, with capture=False, eagerly run) padded decode forwards."""

    def __init__(self, model: LlamaForCausalLM, kv_caches: KVCache, max_num_seqs: int, max_model_len: int,
                 block_size: int, capture: bool = True):
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.sizes = batch_size_ladder(max_num_seqs)
        device = model.model.embed_tokens.weight.device
        max_batch = self.sizes[-1]
        # A sequence's slots reach past max_model_len by its sink gap (< one block).
        self.max_blocks = -(-max_model_len // block_size) + 1
        self.input_ids = torch.zeros(max_batch, dtype=torch.int64, device=device)  # [Bmax]
        self.positions = torch.zeros(max_batch, dtype=torch.int64, device=device)  # [Bmax]
        self.rope_positions = torch.zeros(max_batch, dtype=torch.int64, device=device)  # [Bmax]
        self.slot_mapping = torch.full((max_batch,), -1, dtype=torch.int64, device=device)  # [Bmax]
        self.block_tables = torch.zeros(max_batch, self.max_blocks, dtype=torch.int64, device=device)
        self.context_lens = torch.ones(max_batch, dtype=torch.int64, device=device)  # [Bmax]
        self.sink_lens = torch.zeros(max_batch, dtype=torch.int64, device=device)  # [Bmax]
        self.sink_gaps = torch.zeros(max_batch, dtype=torch.int64, device=device)  # [Bmax]
        self.query_start_loc = torch.arange(max_batch + 1, dtype=torch.int64, device=device)  # [Bmax + 1]
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        if capture:
            self._capture_all()

    def can_run(self, query_lens: list[int], block_tables: list[list[int]]) -> bool:
        """Whether a step is decode-only and fits the buffers."""
        return (0 < len(query_lens) <= self.sizes[-1] and all(n == 1 for n in query_lens)
                and all(len(table) <= self.max_blocks for table in block_tables))

    def run(self, token_ids: list[int], context_lens: list[int], block_tables: list[list[int]],
            sink_lens: list[int] | None, sink_gaps: list[int] | None,
            num_evicted: list[int] | None = None) -> torch.Tensor:
        """Hidden states [B, hidden] of a decode-only step (valid until the next run)."""
        num_seqs = len(token_ids)
        size = next(s for s in self.sizes if s >= num_seqs)
        meta = AttentionMetadata.build([1] * num_seqs, context_lens, block_tables, self.block_size, "cpu",
                                       sink_lens, sink_gaps, num_evicted)
        width = meta.block_tables.shape[1]
        # Real rows from the step, padding rows reset (a previous larger step may have left data).
        self.input_ids[:num_seqs].copy_(torch.tensor(token_ids, dtype=torch.int64), non_blocking=True)
        self.positions[:num_seqs].copy_(meta.positions, non_blocking=True)
        rope_positions = meta.rope_positions if meta.rope_positions is not None else meta.positions
        self.rope_positions[:num_seqs].copy_(rope_positions, non_blocking=True)
        self.slot_mapping[:num_seqs].copy_(meta.slot_mapping, non_blocking=True)
        self.block_tables[:num_seqs, :width].copy_(meta.block_tables, non_blocking=True)
        self.block_tables[:num_seqs, width:].zero_()
        self.context_lens[:num_seqs].copy_(meta.context_lens, non_blocking=True)
        if meta.sink_lens is not None:
            self.sink_lens[:num_seqs].copy_(meta.sink_lens, non_blocking=True)
        else:
            self.sink_lens[:num_seqs].zero_()
        if meta.sink_gaps is not None:
            self.sink_gaps[:num_seqs].copy_(meta.sink_gaps, non_blocking=True)
        else:
            self.sink_gaps[:num_seqs].zero_()
        self._reset_padding(num_seqs, size)
        if size in self.graphs:
            self.graphs[size].replay()
            return self.outputs[size][:num_seqs]
        return self._forward(size)[:num_seqs]

    def _reset_padding(self, start: int, end: int) -> None:
        self.input_ids[start:end].zero_()
        self.positions[start:end].zero_()
        self.rope_positions[start:end].zero_()
        self.slot_mapping[start:end].fill_(-1)
        self.block_tables[start:end].zero_()
        self.context_lens[start:end].fill_(1)
        self.sink_lens[start:end].zero_()
        self.sink_gaps[start:end].zero_()

    def _meta(self, size: int) -> AttentionMetadata:
        return AttentionMetadata(
            positions=self.positions[:size], slot_mapping=self.slot_mapping[:size],
            block_tables=self.block_tables[:size], context_lens=self.context_lens[:size],
            query_start_loc=self.query_start_loc[:size + 1], num_decode_seqs=size, max_query_len=1,
            max_decode_context_len=self.max_model_len, max_prefill_context_len=0,
            rope_positions=self.rope_positions[:size], sink_lens=self.sink_lens[:size],
            sink_gaps=self.sink_gaps[:size], max_sink_len=self.max_model_len)

    def _forward(self, size: int) -> torch.Tensor:
        return self.model(self.input_ids[:size], self._meta(size), self.kv_caches)  # [size, hidden]

    @torch.inference_mode()
    def _capture_all(self) -> None:
        self._reset_padding(0, self.sizes[-1])
        pool = None
        # Largest first, so the smaller graphs reuse the memory pool of the larger ones.
        for size in reversed(self.sizes):
            self._forward(size)  # warm-up: compiles the kernels outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[size] = self._forward(size)
            pool = graph.pool()
            self.graphs[size] = graph
        torch.cuda.synchronize()
        logger.info("captured CUDA graphs for decode batch sizes %s", self.sizes)

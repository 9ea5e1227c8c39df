"""Turns one scheduled step into tensors, runs the model over the paged pool, and samples."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from model.layers.attention import AttentionMetadata
from model.execution.cuda_graphs import DecodeGraphs
from model.models.llama import LlamaForCausalLM
from model.execution.sampler import Sampler, SamplerOutput, SamplingRow, TokenMasks, compute_logprobs
from model.sampling_params import SamplingParams

PROBE_TOKENS = 3  # the probe's 2-token prefill, then its 1-token decode


@dataclass
class PromptLogprobRequest:
    """Logprobs of prompt tokens predicted inside one sequence's chunk.

    Chunk token j predicts `target_token_ids[j]`; only the first len(target_token_ids) tokens
    of the chunk have a prompt token to predict.
    """

    seq_index: int
    target_token_ids: list[int]
    num_top: int


@dataclass
class ModelInput:
    """One step as plain lists: each sequence's new tokens, decodes first."""

    token_ids: list[int]  # flat new tokens of every sequence
    query_lens: list[int]
    context_lens: list[int]  # cache length of each sequence after this step
    block_tables: list[list[int]]
    sample_seq_indices: list[int]  # per sampling row, the sequence whose last token it samples from
    sampling_rows: list[SamplingRow]
    banned_token_ids: list[list[int]] = field(default_factory=list)  # per sampling row (min_tokens)
    # The grammar masks of the constrained sampling rows, being filled while the forward runs
    # (scheduler/structured_output.py); None: no row has a grammar.
    token_masks: TokenMasks | None = None
    blocks_to_copy: list[tuple[int, int]] = field(default_factory=list)
    prompt_logprobs: list[PromptLogprobRequest] = field(default_factory=list)
    sink_lens: list[int] | None = None  # per sequence, for StreamingLLM eviction (attention.py)
    sink_gaps: list[int] | None = None
    num_evicted: list[int] | None = None  # per sequence: tokens evicted, absolute = cache position + this


@dataclass
class PromptLogprobs:
    token_ids: list[int]
    logprobs: list[float]
    ranks: list[int]
    top_token_ids: list[list[int]]
    top_logprobs: list[list[float]]


@dataclass
class ModelOutput:
    sampled: SamplerOutput | None
    prompt_logprobs: list[PromptLogprobs]  # in the order of ModelInput.prompt_logprobs


class ModelRunner:
    """Owns the KV pool of one model and executes steps on it.

    The pool's blocks 0..num_blocks-1 are the scheduler's; past them lie the scratch blocks
    that `probe()` writes, which no request ever uses.
    """

    def __init__(self, model: LlamaForCausalLM, num_blocks: int, block_size: int):
        self.model = model
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.device = model.model.embed_tokens.weight.device
        num_probe_blocks = -(-PROBE_TOKENS // block_size)
        self.kv_caches = model.allocate_kv_cache(num_blocks + num_probe_blocks, block_size)
        self._probe_table = list(range(num_blocks, num_blocks + num_probe_blocks))
        self.sampler = Sampler()
        self.decode_graphs: DecodeGraphs | None = None

    def use_decode_graphs(self, max_num_seqs: int, max_model_len: int, capture: bool = True) -> None:
        """Run decode-only steps through padded static buffers, captured as CUDA graphs
        (capture=False runs the padded forward eagerly). Needs the triton attention backend."""
        self.decode_graphs = DecodeGraphs(self.model, self.kv_caches, max_num_seqs, max_model_len,
                                          self.block_size, capture)

    @torch.inference_mode()
    def execute(self, inp: ModelInput) -> ModelOutput:
        if inp.blocks_to_copy:
            self._copy_blocks(inp.blocks_to_copy)
        graphs = self.decode_graphs
        if graphs is not None and not inp.prompt_logprobs and graphs.can_run(inp.query_lens, inp.block_tables):
            # Decode only: one token per sequence, so row i of hidden is sequence i's last token.
            hidden = graphs.run(inp.token_ids, inp.context_lens, inp.block_tables, inp.sink_lens,
                                inp.sink_gaps, inp.num_evicted)  # [B, hidden]
            prompt_logprobs = []
            last_token = None
        else:
            meta = AttentionMetadata.build(inp.query_lens, inp.context_lens, inp.block_tables,
                                           self.block_size, self.device, inp.sink_lens, inp.sink_gaps,
                                           inp.num_evicted)
            input_ids = torch.tensor(inp.token_ids, dtype=torch.int64, device=self.device)
            hidden = self.model(input_ids, meta, self.kv_caches)  # [T, hidden]
            prompt_logprobs = [self._prompt_logprobs(hidden, meta, req) for req in inp.prompt_logprobs]
            last_token = meta.query_start_loc[1:] - 1  # [B] flat index of each sequence's last token
        if not inp.sampling_rows:
            return ModelOutput(None, prompt_logprobs)
        rows = torch.tensor(inp.sample_seq_indices, device=self.device)
        if last_token is not None:
            rows = last_token[rows]
        logits = self.model.compute_logits(hidden[rows])  # [N, vocab]
        banned = [(row, tok) for row, toks in enumerate(inp.banned_token_ids) for tok in toks]
        if banned:
            index = torch.tensor(banned, device=self.device)
            logits[index[:, 0], index[:, 1]] = float("-inf")
        return ModelOutput(self.sampler(logits, inp.sampling_rows, inp.token_masks), prompt_logprobs)

    def probe(self, token_id: int) -> None:
        """Run a 2-token prefill of `token_id`, then a 1-token decode, on the scratch blocks: the
        two paths of a step, CUDA graphs included. Raises if either fails (a broken runner)."""
        greedy = [SamplingRow(SamplingParams(temperature=0.0))]
        for token_ids, context_len in (([token_id, token_id], 2), ([token_id], PROBE_TOKENS)):
            self.execute(ModelInput(
                token_ids=token_ids, query_lens=[len(token_ids)], context_lens=[context_len],
                block_tables=[self._probe_table], sample_seq_indices=[0], sampling_rows=greedy,
                banned_token_ids=[[]], sink_lens=[0], sink_gaps=[0], num_evicted=[0]))

    def _prompt_logprobs(self, hidden: torch.Tensor, meta: AttentionMetadata,
                         req: PromptLogprobRequest) -> PromptLogprobs:
        start = int(meta.query_start_loc[req.seq_index])
        num = len(req.target_token_ids)
        logits = self.model.compute_logits(hidden[start:start + num])  # [num, vocab]
        targets = torch.tensor(req.target_token_ids, device=self.device)
        logprobs, ranks, top_ids, top_lps = compute_logprobs(logits, targets, req.num_top)
        return PromptLogprobs(req.target_token_ids, logprobs.tolist(), ranks.tolist(),
                              top_ids.tolist(), top_lps.tolist())

    def _copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        src = torch.tensor([s for s, _ in pairs], device=self.device)
        dst = torch.tensor([d for _, d in pairs], device=self.device)
        for k_cache, v_cache in self.kv_caches:
            k_cache.index_copy_(0, dst, k_cache.index_select(0, src))
            v_cache.index_copy_(0, dst, v_cache.index_select(0, src))

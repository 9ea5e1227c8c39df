"""Turns one scheduled step (plain data, model_input.py) into tensors, runs the model over the
paged pool, and samples: `execute` runs the forward, `sample` draws the tokens, so that a
step's grammar masks can be computed between the two while the forward runs (scheduler/executor.py)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model.execution.cuda_graphs import DecodeGraphs
from model.execution.model_input import (GrammarBitmask, ModelInput, ModelOutput, PromptLogprobRequest,
                                         SamplingInput, TokenLogprobs)
from model.execution.sampler import Sampler, SamplingRow, compute_logprobs
from model.layers.attention import AttentionMetadata
from model.models.llama import LlamaForCausalLM
from model.sampling_params import SamplingParams

PROBE_TOKENS = 3  # the probe's 2-token prefill, then its 1-token decode


@dataclass
class _ExecutedStep:
    """What `execute` leaves for `sample`: the sampling rows' logits and the prompt logprobs."""

    logits: torch.Tensor | None  # [N, vocab], stop tokens of rows under min_tokens at -inf
    rows: list[SamplingRow]
    prompt_logprobs: list[TokenLogprobs]


class ModelRunner:
    """Owns the KV pool of one model and executes steps on it.

    The pool's blocks 0..num_blocks-1 are the scheduler's; past them lie the scratch blocks
    that `probe()` writes, which no request ever uses. `eos_token_ids`: what `min_tokens` bans
    besides a request's own stop tokens (none with `ignore_eos`).
    """

    def __init__(self, model: LlamaForCausalLM, num_blocks: int, block_size: int,
                 eos_token_ids: tuple[int, ...] = ()):
        self.model = model
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.eos_token_ids = eos_token_ids
        self.device = model.model.embed_tokens.weight.device
        num_probe_blocks = -(-PROBE_TOKENS // block_size)
        self.kv_caches = model.allocate_kv_cache(num_blocks + num_probe_blocks, block_size)
        self._probe_table = list(range(num_blocks, num_blocks + num_probe_blocks))
        self.sampler = Sampler()
        self.decode_graphs: DecodeGraphs | None = None
        self.generators: dict[str, torch.Generator] = {}  # per seeded request, reused every step
        self._executed: _ExecutedStep | None = None

    def use_decode_graphs(self, max_num_seqs: int, max_model_len: int, capture: bool = True) -> None:
        """Run decode-only steps through padded static buffers, captured as CUDA graphs
        (capture=False runs the padded forward eagerly). Needs the triton attention backend."""
        self.decode_graphs = DecodeGraphs(self.model, self.kv_caches, max_num_seqs, max_model_len,
                                          self.block_size, capture)

    def forget(self, request_ids: list[str]) -> None:
        """Drop the generators of requests that ended."""
        for request_id in request_ids:
            self.generators.pop(request_id, None)

    @torch.inference_mode()
    def execute(self, inp: ModelInput) -> None:
        """The forward pass of a step, up to its sampling rows' logits (kept for `sample`)."""
        self._executed = None
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
            self._executed = _ExecutedStep(None, [], prompt_logprobs)
            return
        rows = torch.tensor(inp.sample_seq_indices, device=self.device)
        if last_token is not None:
            rows = last_token[rows]
        logits = self.model.compute_logits(hidden[rows])  # [N, vocab]
        banned = [(row, token_id) for row, sampling in enumerate(inp.sampling_rows)
                  for token_id in self._banned_token_ids(sampling)]
        if banned:
            index = torch.tensor(banned, device=self.device)  # [num_banned, 2] (row, token)
            logits[index[:, 0], index[:, 1]] = float("-inf")
        self._executed = _ExecutedStep(logits, [self._sampling_row(s) for s in inp.sampling_rows], prompt_logprobs)

    @torch.inference_mode()
    def sample(self, grammar: GrammarBitmask | None = None) -> ModelOutput:
        """The tokens of the step `execute` ran, within `grammar`'s masks; plain lists."""
        executed, self._executed = self._executed, None
        if executed.logits is None:
            return ModelOutput([], None, executed.prompt_logprobs)
        sampled = self.sampler(executed.logits, executed.rows, grammar)
        logprobs = None
        token_ids = sampled.token_ids.tolist()
        if sampled.logprobs is not None:
            logprobs = TokenLogprobs(token_ids, sampled.logprobs.tolist(), sampled.ranks.tolist(),
                                     sampled.top_token_ids.tolist(), sampled.top_logprobs.tolist())
        return ModelOutput(token_ids, logprobs, executed.prompt_logprobs)

    def probe(self, token_id: int) -> None:
        """Run a 2-token prefill of `token_id`, then a 1-token decode, on the scratch blocks: the
        two paths of a step, CUDA graphs included. Raises if either fails (a broken runner)."""
        greedy = [SamplingInput("probe", SamplingParams(temperature=0.0))]
        for token_ids, context_len in (([token_id, token_id], 2), ([token_id], PROBE_TOKENS)):
            self.execute(ModelInput(
                token_ids=token_ids, query_lens=[len(token_ids)], context_lens=[context_len],
                block_tables=[self._probe_table], sample_seq_indices=[0], sampling_rows=greedy,
                sink_lens=[0], sink_gaps=[0], num_evicted=[0]))
            self.sample()

    def _sampling_row(self, sampling: SamplingInput) -> SamplingRow:
        generator = None
        if sampling.seed is not None:
            generator = self.generators.get(sampling.request_id)
            if generator is None:
                generator = torch.Generator(self.device).manual_seed(sampling.seed)
                self.generators[sampling.request_id] = generator
        return SamplingRow(sampling.params, generator, sampling.prompt_token_ids, sampling.output_token_ids)

    def _banned_token_ids(self, sampling: SamplingInput) -> list[int]:
        """Tokens that must not be sampled yet: stop tokens before min_tokens outputs."""
        params = sampling.params
        if sampling.num_output_tokens >= params.min_tokens:
            return []
        eos = () if params.ignore_eos else self.eos_token_ids
        return sorted(set(params.stop_token_ids) | set(eos))

    def _prompt_logprobs(self, hidden: torch.Tensor, meta: AttentionMetadata,
                         req: PromptLogprobRequest) -> TokenLogprobs:
        start = int(meta.query_start_loc[req.seq_index])
        num = len(req.target_token_ids)
        logits = self.model.compute_logits(hidden[start:start + num])  # [num, vocab]
        targets = torch.tensor(req.target_token_ids, device=self.device)
        logprobs, ranks, top_ids, top_lps = compute_logprobs(logits, targets, req.num_top)
        return TokenLogprobs(req.target_token_ids, logprobs.tolist(), ranks.tolist(),
                              top_ids.tolist(), top_lps.tolist())

    def _copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        src = torch.tensor([s for s, _ in pairs], device=self.device)
        dst = torch.tensor([d for _, d in pairs], device=self.device)
        for k_cache, v_cache in self.kv_caches:
            k_cache.index_copy_(0, dst, k_cache.index_select(0, src))
            v_cache.index_copy_(0, dst, v_cache.index_select(0, src))

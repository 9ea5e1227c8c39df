"""Batched token sampling for one engine step: penalties, temperature, top-k/top-p/min-p, logprobs.

Semantics follow vLLM and the OpenAI API:
- Order: logit_bias -> penalties -> grammar mask -> temperature -> top-k -> top-p -> min-p -> sample. The bias
  applies to greedy rows too (a bias of -100 bans a token at any temperature).
- repetition_penalty (vLLM/CTRL): tokens seen in the prompt or the output have positive logits
  divided by it and negative logits multiplied by it. frequency_penalty and presence_penalty
  (OpenAI) count the output tokens only: logit -= frequency * count + presence * (count > 0).
- Greedy rows (temperature below 1e-5, as in vLLM) take the argmax of the penalised logits and
  ignore the filters. top_k=None, top_p=1.0 and min_p=0.0 each switch that filter off.
- top-k keeps exactly k tokens (a tie at the boundary goes to the lower id); top-p keeps the
  smallest set of most likely tokens whose (top-k renormalised) mass reaches top_p; min-p
  drops tokens less likely than min_p times the most likely one.
- Random rows use the exponential race: argmax(probs / q) with q ~ Exp(1) per token is an exact
  draw from probs. A seeded row draws its q from its own generator, so its tokens depend only on
  its seed, its logits and the device, not on the rest of the batch.
- Logprobs are of the model's raw distribution (log_softmax before penalties and temperature,
  vLLM's default), also for rows whose grammar masked tokens out. A rank is 1 + the number of
  tokens strictly more likely than the token.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain

import torch

from model.execution.model_input import GrammarBitmask
from model.sampling_params import SamplingParams


@dataclass
class SamplingRow:
    """What the sampler needs to know about one row of logits.

    `generator` must be set (and on the logits' device) exactly when `params.seed` is set; it is
    created once per request and reused every step. Repetition penalty looks at the prompt and
    output tokens, presence and frequency penalties at the output tokens only.
    """

    params: SamplingParams
    generator: torch.Generator | None = None
    prompt_token_ids: Sequence[int] = ()
    output_token_ids: Sequence[int] = ()

    @property
    def greedy(self) -> bool:
        return self.params.greedy


@dataclass
class SamplerOutput:
    """The sampled token of each row and, when any row asked for logprobs, their logprobs.

    The logprob tensors cover every row (rows that did not ask are computed anyway and ignored);
    K is the largest `params.logprobs` in the batch.
    """

    token_ids: torch.Tensor  # [N] int64
    logprobs: torch.Tensor | None = None  # [N] float32, of the sampled token
    ranks: torch.Tensor | None = None  # [N] int64, 1-based, of the sampled token
    top_token_ids: torch.Tensor | None = None  # [N, K] int64, most likely first
    top_logprobs: torch.Tensor | None = None  # [N, K] float32


class Sampler:
    """Samples one token per row of a step's logits [N, V], all rows in one batch."""

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow],
                 grammar: GrammarBitmask | None = None) -> SamplerOutput:
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(f"expected logits [{len(rows)}, vocab], got {list(logits.shape)}")
        for row in rows:
            if (row.generator is None) != (row.params.seed is None):
                raise ValueError("a row needs a generator exactly when its params have a seed")
        raw = logits.float()
        processed = apply_penalties(apply_logit_bias(raw, rows), rows)
        if grammar is not None:
            processed = apply_token_bitmask(processed, grammar.rows, grammar.bitmask)
        token_ids = sample(processed, rows)
        requested = [row.params.logprobs for row in rows if row.params.logprobs is not None]
        if not requested:
            return SamplerOutput(token_ids)
        logprobs, ranks, top_ids, top_logprobs = compute_logprobs(raw, token_ids, max(requested))
        return SamplerOutput(token_ids, logprobs, ranks, top_ids, top_logprobs)


def sample(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    # logits [N, V] are already penalised; returns [N] int64 token ids.
    greedy = [row.greedy for row in rows]
    if all(greedy):
        return logits.argmax(dim=-1)
    device = logits.device
    # Greedy rows go through the random path with harmless settings; their result is discarded.
    temperature = _to_device([1.0 if g else r.params.temperature for g, r in zip(greedy, rows)],
                             torch.float32, device)
    scaled = logits / temperature[:, None]  # [N, V]
    vocab_size = logits.shape[-1]
    filtering = [not g and _filters(r.params, vocab_size) for g, r in zip(greedy, rows)]
    if any(filtering):
        top_k = _to_device([min(r.params.top_k or vocab_size, vocab_size) if f else vocab_size
                            for f, r in zip(filtering, rows)], torch.int64, device)
        top_p = _to_device([r.params.top_p if f else 1.0 for f, r in zip(filtering, rows)],
                           torch.float32, device)
        min_p = _to_device([r.params.min_p if f else 0.0 for f, r in zip(filtering, rows)],
                           torch.float32, device)
        scaled = apply_top_k_top_p_min_p(scaled, top_k, top_p, min_p)
    probs = torch.softmax(scaled, dim=-1)  # [N, V]
    q = torch.empty_like(probs).exponential_()
    # Each seeded row redraws its own q row from its own generator, one small kernel per seeded
    # row: one batched draw would make a row's numbers depend on its neighbours and position.
    for i, row in enumerate(rows):
        if row.generator is not None and not greedy[i]:
            q[i].exponential_(generator=row.generator)
    # A q of exactly 0 would give 0/0 = nan for filtered tokens, which argmax would pick.
    sampled = probs.div_(q.clamp_min_(torch.finfo(q.dtype).tiny)).argmax(dim=-1)  # [N]
    if not any(greedy):
        return sampled
    greedy_mask = _to_device(greedy, torch.bool, device)
    return torch.where(greedy_mask, logits.argmax(dim=-1), sampled)


def apply_logit_bias(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    # logits [N, V]; returns new logits with each row's (token, bias) pairs added (the input is
    # left as it was, for logprobs), or the input itself when no row has a bias.
    pairs = [(i, token_id, bias) for i, row in enumerate(rows) for token_id, bias in row.params.logit_bias]
    if not pairs:
        return logits
    row_ids, token_ids, biases = zip(*pairs)
    if max(token_ids) >= logits.shape[-1]:
        raise ValueError(f"logit_bias token ids must be in [0, {logits.shape[-1]})")
    index = (_to_device(row_ids, torch.int64, logits.device), _to_device(token_ids, torch.int64, logits.device))
    return logits.index_put(index, _to_device(biases, logits.dtype, logits.device), accumulate=True)


def apply_token_bitmask(logits: torch.Tensor, rows: list[int], bitmask: torch.Tensor) -> torch.Tensor:
    """New logits with the tokens a row's grammar does not allow at -inf (the input is left as
    it was, for logprobs).

    logits [N, V]; rows: the constrained rows, ascending; bitmask [len(rows), ceil(V' / 32)]
    int32 from the CPU, V' >= V (bit t of a row's word t // 32 allows token t). Each byte of the
    mask becomes 8 additive biases (0 or -inf) through a 256-entry table: one gather and one add,
    some 5x faster on a CPU than unpacking bits into a boolean mask for `where`."""
    vocab_size = logits.shape[-1]
    device = logits.device
    mask_bytes = bitmask.view(torch.uint8).flatten()  # little-endian: byte j holds tokens 8j..8j+7
    if device.type == "cuda":
        mask_bytes = mask_bytes.pin_memory()
    mask_bytes = mask_bytes.to(device, non_blocking=True).int()  # [R * W * 4]
    bias = _bit_biases(device).index_select(0, mask_bytes)  # [R * W * 4, 8]
    bias = bias.view(len(rows), -1)[:, :vocab_size]  # [R, W * 32] -> [R, V]
    if len(rows) == logits.shape[0]:  # every row constrained: rows is 0..N-1
        return logits + bias
    return logits.index_add(0, torch.tensor(rows, dtype=torch.int64, device=device), bias)


@functools.cache
def _bit_biases(device: torch.device) -> torch.Tensor:
    # [256, 8] float32: entry (b, k) is 0 when bit k of byte b is set, else -inf.
    bits = (torch.arange(256)[:, None] >> torch.arange(8)) & 1  # [256, 8]
    return torch.where(bits.bool(), 0.0, float("-inf")).to(device)


def apply_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    # logits [N, V]; returns new penalised logits (the input is left as it was, for logprobs).
    repetition = [r.params.repetition_penalty for r in rows]
    frequency = [r.params.frequency_penalty for r in rows]
    presence = [r.params.presence_penalty for r in rows]
    uses_repetition = [p != 1.0 for p in repetition]
    uses_output = [rep or f != 0.0 or p != 0.0 for rep, f, p in zip(uses_repetition, frequency, presence)]
    if not any(uses_output):
        return logits
    device = logits.device
    # Rows without penalties contribute no tokens, so a long prompt that is not penalised is free.
    output_counts = _token_counts([r.output_token_ids if u else () for u, r in zip(uses_output, rows)],
                                  logits.shape[-1], device)  # [N, V]
    if any(uses_repetition):
        prompt_counts = _token_counts([r.prompt_token_ids if u else () for u, r in zip(uses_repetition, rows)],
                                      logits.shape[-1], device)  # [N, V]
        seen = (prompt_counts > 0) | (output_counts > 0)  # [N, V]
        penalty = _to_device(repetition, torch.float32, device)[:, None]  # [N, 1]
        penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits = torch.where(seen, penalised, logits)
    if any(f != 0.0 or p != 0.0 for f, p in zip(frequency, presence)):
        frequency_t = _to_device(frequency, torch.float32, device)[:, None]  # [N, 1]
        presence_t = _to_device(presence, torch.float32, device)[:, None]  # [N, 1]
        logits = logits - frequency_t * output_counts - presence_t * (output_counts > 0)
    return logits


def apply_top_k_top_p_min_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                            min_p: torch.Tensor) -> torch.Tensor:
    # logits [N, V] temperature-scaled; top_k [N] int64 in [1, V]; top_p, min_p [N] float32.
    # Returns a copy with the filtered-out tokens at -inf. One sort serves all three filters.
    vocab_size = logits.shape[-1]
    sorted_logits, sorted_ids = logits.sort(dim=-1, descending=True, stable=True)  # [N, V] each
    positions = torch.arange(vocab_size, device=logits.device)  # [V]
    sorted_logits.masked_fill_(positions >= top_k[:, None], float("-inf"))  # fresh from sort: ours to edit
    probs = torch.softmax(sorted_logits, dim=-1)  # [N, V], renormalised over the top-k
    mass_before = probs.cumsum(dim=-1) - probs  # [N, V]; 0 for the most likely token, always kept
    # top_p == 1 is skipped outright: rounding in the cumsum could otherwise drop tail tokens.
    outside_top_p = (mass_before >= top_p[:, None]) & (top_p < 1.0)[:, None]
    sorted_logits.masked_fill_(outside_top_p, float("-inf"))
    # prob < min_p * max_prob  <=>  logit < max_logit + log(min_p); log(0) = -inf keeps all.
    threshold = sorted_logits[:, :1] + torch.log(min_p)[:, None]  # [N, 1]
    sorted_logits.masked_fill_(sorted_logits < threshold, float("-inf"))
    # sorted_ids is a permutation of each row, so the scatter writes every position.
    return torch.empty_like(logits).scatter_(1, sorted_ids, sorted_logits)


def compute_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, num_top: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # logits [N, V] raw; token_ids [N]. Returns the tokens' logprobs [N] and 1-based ranks [N],
    # and the num_top most likely tokens' ids and logprobs [N, num_top], most likely first.
    # Also serves prompt logprobs: pass one row per prompt position and the next prompt token.
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # [N, V]
    token_logprobs = logprobs.gather(1, token_ids[:, None].long()).squeeze(1)  # [N]
    ranks = (logprobs > token_logprobs[:, None]).sum(dim=-1) + 1  # [N]
    top_logprobs, top_ids = logprobs.topk(num_top, dim=-1)  # [N, num_top] each
    return token_logprobs, ranks, top_ids, top_logprobs


def _filters(params: SamplingParams, vocab_size: int) -> bool:
    top_k_filters = params.top_k is not None and params.top_k < vocab_size
    return top_k_filters or params.top_p < 1.0 or params.min_p > 0.0


def _token_counts(token_ids: list[Sequence[int]], vocab_size: int, device: torch.device) -> torch.Tensor:
    # Returns counts [N, V] float32 of each row's tokens, from one index_add over a flat index.
    # The index is built on the CPU from the Python lists and copied once.
    lengths = torch.tensor([len(ids) for ids in token_ids], dtype=torch.int64)  # [N]
    flat = torch.tensor(list(chain.from_iterable(token_ids)), dtype=torch.int64)  # [total]
    if flat.numel() and (flat.min() < 0 or flat.max() >= vocab_size):
        raise ValueError(f"token ids must be in [0, {vocab_size}) for penalties")
    # output_size spares repeat_interleave a pass to size its output (slow even on the CPU).
    rows = torch.arange(len(token_ids)).repeat_interleave(lengths, output_size=flat.numel())  # [total]
    index = _to_device(rows * vocab_size + flat, torch.int64, device)  # [total], into the flat [N * V]
    counts = torch.zeros(len(token_ids) * vocab_size, dtype=torch.float32, device=device)  # [N * V]
    counts.index_add_(0, index, torch.ones(index.shape, dtype=torch.float32, device=device))
    return counts.view(len(token_ids), vocab_size)  # [N, V]


def _to_device(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # A pinned source lets the copy queue behind the forward pass instead of waiting for it.
    host = values.to(dtype) if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)

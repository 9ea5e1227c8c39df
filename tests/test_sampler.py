"""The batched sampler against per-row reference implementations written here, one row at a time."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from model.execution.sampler import Sampler, SamplingRow, apply_penalties, apply_token_bitmask, compute_logprobs
from model.sampling_params import SamplingParams

VOCAB = 16


def rows_of(params: SamplingParams, count: int) -> list[SamplingRow]:
    return [SamplingRow(params) for _ in range(count)]


def reference_filtered_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """One row's sampling distribution [V] in float64: temperature, top-k, top-p, min-p."""
    scaled = logits.double() / params.temperature
    order = sorted(range(len(scaled)), key=lambda t: -scaled[t].item())
    kept = order[:params.top_k or len(order)]
    probs = torch.softmax(scaled[kept], dim=0).tolist()
    mass, nucleus = 0.0, []
    for token, p in zip(kept, probs):
        nucleus.append(token)
        mass += p
        if mass >= params.top_p:
            break
    nucleus_probs = torch.softmax(scaled[nucleus], dim=0)
    allowed = [t for t, p in zip(nucleus, nucleus_probs) if p >= params.min_p * nucleus_probs.max()]
    out = torch.zeros(len(scaled), dtype=torch.float64)
    out[allowed] = torch.softmax(scaled[allowed], dim=0)
    return out


def reference_penalties(logits: torch.Tensor, row: SamplingRow) -> torch.Tensor:
    out = logits.clone()
    p = row.params
    for token in set(row.prompt_token_ids) | set(row.output_token_ids):
        out[token] = out[token] / p.repetition_penalty if out[token] > 0 else out[token] * p.repetition_penalty
    for token, count in Counter(row.output_token_ids).items():
        out[token] -= p.frequency_penalty * count + p.presence_penalty
    return out


def test_greedy_is_argmax_and_leaves_logits_alone():
    logits = torch.randn(8, VOCAB, generator=torch.Generator().manual_seed(0))
    before = logits.clone()
    out = Sampler()(logits, rows_of(SamplingParams(temperature=0.0), 8))
    assert torch.equal(out.token_ids, logits.argmax(dim=-1))
    assert out.token_ids.dtype == torch.int64
    assert out.logprobs is None and out.top_token_ids is None
    assert torch.equal(logits, before)


@pytest.mark.parametrize("temperature", [1e-6, 1e-2])
def test_tiny_temperature_acts_greedy(temperature):
    torch.manual_seed(1)
    logits = torch.randn(64, VOCAB)
    logits[torch.arange(64), logits.argmax(dim=-1)] += 1.0  # a clear winner in every row
    for _ in range(5):
        out = Sampler()(logits, rows_of(SamplingParams(temperature=temperature), 64))
        assert torch.equal(out.token_ids, logits.argmax(dim=-1))


def test_top_k_one_is_greedy():
    torch.manual_seed(2)
    logits = torch.randn(256, VOCAB)
    out = Sampler()(logits, rows_of(SamplingParams(temperature=1.5, top_k=1), 256))
    assert torch.equal(out.token_ids, logits.argmax(dim=-1))


FILTERS = [
    SamplingParams(temperature=0.7),
    SamplingParams(top_k=4),
    SamplingParams(top_k=VOCAB + 10),
    SamplingParams(top_p=0.6),
    SamplingParams(temperature=1.3, min_p=0.15),
    SamplingParams(temperature=0.9, top_k=6, top_p=0.85, min_p=0.05),
]


@pytest.mark.parametrize("params", FILTERS, ids=range(len(FILTERS)))
def test_random_rows_match_filtered_softmax(params):
    # One row's logits repeated 40000 times: one call gives 40000 independent draws.
    draws = 40_000
    logits = torch.randn(VOCAB, generator=torch.Generator().manual_seed(3)) * 2
    expected = reference_filtered_probs(logits, params)
    torch.manual_seed(4)
    out = Sampler()(logits.expand(draws, VOCAB), rows_of(params, draws))
    counts = torch.bincount(out.token_ids, minlength=VOCAB).double()
    allowed = expected > 0
    assert counts[~allowed].sum() == 0, f"sampled outside the allowed set {allowed.nonzero().flatten().tolist()}"
    # Chi-square over the allowed tokens, bounded at its mean plus 6 standard deviations.
    degrees = int(allowed.sum()) - 1
    chi2 = ((counts[allowed] - draws * expected[allowed]) ** 2 / (draws * expected[allowed])).sum().item()
    assert chi2 < degrees + 6 * math.sqrt(2 * max(degrees, 1)), (counts / draws, expected)


def test_filters_in_a_mixed_batch_stay_inside_each_rows_allowed_set():
    generator = torch.Generator().manual_seed(5)
    params = [*FILTERS, SamplingParams(temperature=0.0, top_k=3), SamplingParams(top_p=0.3, seed=9)]
    logits = torch.randn(len(params), VOCAB, generator=generator) * 2
    allowed = torch.stack([reference_filtered_probs(logits[i], p) > 0 if p.temperature
                           else torch.arange(VOCAB) == logits[i].argmax() for i, p in enumerate(params)])
    # The batch repeated 500 times in one call; the seeded copies share one generator.
    seeded = torch.Generator().manual_seed(9)
    rows = [SamplingRow(p, seeded if p.seed is not None else None) for p in params] * 500
    torch.manual_seed(6)
    tokens = Sampler()(logits.repeat(500, 1), rows).token_ids.view(500, len(params))  # [500, rows]
    inside = allowed.gather(1, tokens.T)  # [rows, 500]
    assert inside.all(), [params[i] for i in range(len(params)) if not inside[i].all()]


def penalty_rows() -> list[SamplingRow]:
    prompt, output = [1, 2, 2, 5, 9], [2, 3, 3, 3, 9, 15]
    return [
        SamplingRow(SamplingParams(), None, prompt, output),
        SamplingRow(SamplingParams(repetition_penalty=1.7), None, prompt, output),
        SamplingRow(SamplingParams(repetition_penalty=0.6), None, prompt, []),
        SamplingRow(SamplingParams(frequency_penalty=0.8), None, prompt, output),
        SamplingRow(SamplingParams(presence_penalty=-1.5), None, prompt, output),
        SamplingRow(SamplingParams(repetition_penalty=1.3, frequency_penalty=-0.4, presence_penalty=1.1),
                    None, [0, 4, 4], [4, 7, 7, 0]),
        SamplingRow(SamplingParams(frequency_penalty=2.0), None, prompt, []),
    ]


def test_penalties_match_reference_per_row():
    rows = penalty_rows()
    logits = torch.randn(len(rows), VOCAB, generator=torch.Generator().manual_seed(7)) * 3
    before = logits.clone()
    actual = apply_penalties(logits, rows)
    expected = torch.stack([reference_penalties(logits[i], row) for i, row in enumerate(rows)])
    torch.testing.assert_close(actual, expected)
    assert torch.equal(logits, before)
    assert not torch.equal(actual[1], logits[1]) and torch.equal(actual[0], logits[0])


def test_greedy_takes_argmax_of_penalised_logits_and_logprobs_stay_raw():
    logits = torch.tensor([[5.0, 4.0, 1.0, -3.0]])
    row = SamplingRow(SamplingParams(temperature=0.0, repetition_penalty=2.0, logprobs=1), None, [0], [])
    out = Sampler()(logits, [row])
    assert out.token_ids.tolist() == [1]  # 5 / 2 < 4
    assert out.ranks.tolist() == [2]
    torch.testing.assert_close(out.logprobs, torch.log_softmax(logits, -1)[:, 1])
    assert out.top_token_ids.tolist() == [[0]]


def seeded_tokens(position: int, neighbours: list[SamplingParams], global_seed: int) -> list[int]:
    """20 steps of a seeded row with a frequency penalty, at `position` among `neighbours`."""
    target = SamplingParams(temperature=0.9, top_p=0.95, frequency_penalty=0.3, seed=1234)
    target_generator = torch.Generator().manual_seed(1234)
    target_logits = torch.randn(20, 64, generator=torch.Generator().manual_seed(11)) * 2
    torch.manual_seed(global_seed)
    neighbour_rows = [SamplingRow(p, torch.Generator().manual_seed(p.seed) if p.seed is not None else None,
                                  [1, 2, 3], [4, 4]) for p in neighbours]
    tokens: list[int] = []
    for step in range(20):
        rows = list(neighbour_rows)
        rows.insert(position, SamplingRow(target, target_generator, [5, 6], list(tokens)))
        logits = torch.randn(len(rows), 64) * 3
        logits[position] = target_logits[step]
        tokens.append(Sampler()(logits, rows).token_ids[position].item())
    return tokens


def test_seeded_row_does_not_depend_on_its_batch():
    alone = seeded_tokens(0, [], global_seed=0)
    seven_neighbours = [
        SamplingParams(), SamplingParams(temperature=0.0), SamplingParams(seed=1234),
        SamplingParams(top_k=3, seed=99), SamplingParams(min_p=0.1, repetition_penalty=1.2),
        SamplingParams(top_p=0.5, logprobs=4), SamplingParams(temperature=2.0, presence_penalty=1.0),
    ]
    in_batch = seeded_tokens(5, seven_neighbours, global_seed=1)
    other_batch = seeded_tokens(2, [SamplingParams(top_k=2), SamplingParams(seed=7)] * 2, global_seed=2)
    assert alone == in_batch == other_batch
    assert len(set(alone)) > 5  # it really sampled


def test_different_seeds_give_different_tokens():
    logits = torch.zeros(1, 1000)
    tokens = set()
    for seed in range(4):
        row = SamplingRow(SamplingParams(seed=seed), torch.Generator().manual_seed(seed))
        tokens.add(Sampler()(logits, [row]).token_ids.item())
    assert len(tokens) == 4


def test_logprobs_ranks_and_top_alternatives_in_a_mixed_batch():
    params = [
        SamplingParams(logprobs=5), SamplingParams(temperature=0.0, logprobs=0), SamplingParams(),
        SamplingParams(temperature=0.5, repetition_penalty=1.5, logprobs=2), SamplingParams(temperature=0.0),
        SamplingParams(top_k=3, logprobs=1, seed=3),
    ]
    rows = [SamplingRow(p, torch.Generator().manual_seed(p.seed) if p.seed is not None else None, [0, 1], [2])
            for p in params]
    logits = torch.randn(len(rows), 50, generator=torch.Generator().manual_seed(12)) * 2
    out = Sampler()(logits, rows)
    reference = torch.log_softmax(logits.double(), dim=-1)
    for i, token in enumerate(out.token_ids.tolist()):
        assert out.logprobs[i].item() == pytest.approx(reference[i, token].item(), abs=1e-5)
        assert out.ranks[i].item() == 1 + sum(1 for lp in reference[i] if lp > reference[i, token])
    assert out.top_token_ids.shape == out.top_logprobs.shape == (len(rows), 5)
    expected_top, expected_ids = torch.topk(torch.log_softmax(logits, dim=-1), 5)
    assert torch.equal(out.top_token_ids, expected_ids)
    torch.testing.assert_close(out.top_logprobs, expected_top)
    assert (out.top_logprobs[:, :-1] >= out.top_logprobs[:, 1:]).all()
    assert out.token_ids[1] == logits[1].argmax() and out.ranks[1] == 1
    assert out.token_ids[4] == logits[4].argmax()


def test_compute_logprobs_ranks_count_strictly_more_likely_tokens():
    logits = torch.tensor([[3.0, 1.0, 2.0, 2.0], [0.0, 0.0, 0.0, 0.0]])
    logprobs, ranks, top_ids, top_logprobs = compute_logprobs(logits, torch.tensor([1, 3]), 2)
    assert ranks.tolist() == [4, 1]
    assert top_ids[0].tolist() == [0, 2]
    torch.testing.assert_close(logprobs, torch.log_softmax(logits, -1)[[0, 1], [1, 3]])
    assert top_logprobs.dtype == torch.float32


def test_rejects_mismatched_rows_and_generators():
    with pytest.raises(ValueError):
        Sampler()(torch.zeros(2, VOCAB), rows_of(SamplingParams(), 3))
    with pytest.raises(ValueError):
        Sampler()(torch.zeros(1, VOCAB), [SamplingRow(SamplingParams(seed=1))])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu_reference_and_stays_on_device():
    rows = penalty_rows()
    logits = torch.randn(len(rows), VOCAB, generator=torch.Generator().manual_seed(7)) * 3
    torch.testing.assert_close(apply_penalties(logits.cuda(), rows).cpu(), apply_penalties(logits, rows))
    seeded = [SamplingRow(SamplingParams(top_p=0.9, seed=5, logprobs=2), torch.Generator("cuda").manual_seed(5))]
    first = Sampler()(logits[:1].cuda(), seeded)
    again = Sampler()(logits[:1].cuda(), [SamplingRow(seeded[0].params, torch.Generator("cuda").manual_seed(5))])
    assert first.token_ids.is_cuda and first.top_logprobs.is_cuda
    assert torch.equal(first.token_ids, again.token_ids)


class _Masks:
    def __init__(self, rows, bitmask):
        self.rows, self.bitmask = rows, bitmask

    def wait(self):
        return self.rows, self.bitmask


def _bitmask(allowed: list[set[int]], vocab_size: int) -> torch.Tensor:
    words = torch.zeros(len(allowed), -(-vocab_size // 32), dtype=torch.int64)
    for row, tokens in enumerate(allowed):
        for token in tokens:
            words[row, token // 32] |= 1 << (token % 32)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # bit 31: the sign bit


def test_the_grammar_mask_limits_only_its_rows_and_logprobs_stay_raw():
    torch.manual_seed(0)
    vocab_size = 100  # not a multiple of 32: the last word's spare bits are ignored
    logits = torch.randn(4, vocab_size)
    allowed = [{3, 31, 63, 99}, {32}]  # bits 31 and 63 are the words' sign bits
    masks = _Masks([1, 3], _bitmask(allowed, vocab_size))
    masked = apply_token_bitmask(logits, masks.rows, masks.bitmask)
    for row, tokens in zip([1, 3], allowed):
        finite = set(torch.isfinite(masked[row]).nonzero().flatten().tolist())
        assert finite == tokens
    assert torch.equal(masked[[0, 2]], logits[[0, 2]])
    every_row = [{0}, {5, 6}, set(range(vocab_size)), {98, 99}]  # all rows constrained: the plain add
    masked = apply_token_bitmask(logits, [0, 1, 2, 3], _bitmask(every_row, vocab_size))
    for row, tokens in enumerate(every_row):
        assert set(torch.isfinite(masked[row]).nonzero().flatten().tolist()) == tokens
        assert torch.equal(masked[row, sorted(tokens)], logits[row, sorted(tokens)])
    rows = [SamplingRow(SamplingParams(temperature=0, logprobs=2)) for _ in range(3)]
    rows.append(SamplingRow(SamplingParams(temperature=1.0, seed=5), torch.Generator().manual_seed(5)))
    out = Sampler()(logits, rows, masks)
    assert out.token_ids[1].item() == max(allowed[0], key=lambda t: logits[1, t].item())
    assert out.token_ids[3].item() == 32
    assert out.token_ids[0].item() == logits[0].argmax().item()
    raw = torch.log_softmax(logits, dim=-1)
    assert torch.allclose(out.logprobs, raw.gather(1, out.token_ids[:, None]).squeeze(1))

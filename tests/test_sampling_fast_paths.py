"""The sampler's shortcuts give what the full path gives: top-k candidates instead of a vocabulary sort,
no temperature or logsumexp for greedy batches, logprobs only when read."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from minikv.sampling import Sampler, SamplingBatch, SamplingParams, SamplingRow, apply_top_k_top_p, top_ids


def batch_of(params, vocab=None):
    rows = [SamplingRow(p, [1, 2], [3], seed) for seed, p in enumerate(params)]
    return SamplingBatch.from_rows(rows, vocab_size=vocab)


def tied_logits(rows, vocab, seed):
    """Logits on a coarse grid, so that many tokens tie (and both +0.0 and -0.0 occur)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randint(-6, 7, (rows, vocab), generator=g).float() / 2
    signs = torch.randint(0, 2, (rows, vocab), generator=g).bool()
    return torch.where((logits == 0) & signs, torch.tensor(-0.0), logits)


@pytest.mark.parametrize("seed", range(6))
def test_top_ids_are_the_head_of_a_stable_descending_sort(seed):
    logits = tied_logits(5, 300, seed)
    logits[0, ::7] = float("-inf")
    stable = logits.sort(dim=-1, descending=True, stable=True).indices
    for k in (1, 2, 17, 64):
        assert torch.equal(top_ids(logits, k), stable[:, :k])


@pytest.mark.parametrize("seed", range(8))
def test_top_k_candidates_keep_exactly_what_the_full_sort_keeps(seed):
    params = [SamplingParams(temperature=0.0, top_k=3, top_p=0.5), SamplingParams(top_k=5),
              SamplingParams(top_k=40, top_p=0.7), SamplingParams(top_k=1, top_p=0.3),
              SamplingParams(temperature=0.8), SamplingParams(top_k=12, top_p=0.95, temperature=1.5)]
    batch = batch_of(params)
    assert batch.top_k_bound == 40  # every filtering row has a top_k: the candidates path applies
    full = dataclasses.replace(batch, top_k_bound=0)  # the same batch forced through the sort of the vocabulary
    logits = tied_logits(len(params), 400, seed) * 3
    fast, reference = apply_top_k_top_p(logits, batch), apply_top_k_top_p(logits, full)
    sampling = ~batch.greedy
    assert torch.equal(fast[sampling], reference[sampling])
    assert torch.equal(fast.argmax(-1), reference.argmax(-1))  # greedy rows keep their (lowest-id) argmax
    assert torch.equal(fast[4], logits[4])  # the row without filters loses nothing


def test_a_row_with_top_p_but_no_top_k_needs_the_full_sort():
    assert batch_of([SamplingParams(top_k=5), SamplingParams(top_p=0.9)]).top_k_bound == 0
    assert batch_of([SamplingParams(top_k=5), SamplingParams(temperature=0.0, top_p=0.9)]).top_k_bound == 5


def test_top_k_sampling_does_not_sort_the_vocabulary(monkeypatch):
    params = [SamplingParams(top_k=20, top_p=0.9, temperature=0.7)] * 4
    batch, logits = batch_of(params), torch.randn(4, 1000, generator=torch.Generator().manual_seed(3))
    expected = Sampler()(logits, dataclasses.replace(batch, top_k_bound=0)).token_ids

    def no_sort(*args, **kwargs):
        raise AssertionError("the sampler sorted the vocabulary")

    monkeypatch.setattr(torch.Tensor, "sort", no_sort)
    assert torch.equal(Sampler()(logits, batch).token_ids, expected)


def test_a_greedy_batch_skips_temperature_and_logsumexp_until_logprobs_are_read(monkeypatch):
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(4))
    batch = batch_of([SamplingParams(temperature=0.0)] * 3)
    assert batch.all_greedy and not batch.uses_temperature
    calls = []
    for name in ("logsumexp", "log_softmax", "softmax", "__truediv__", "div"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda *a, _n=name, _f=original, **k: calls.append(_n) or _f(*a, **k))
    out = Sampler()(logits, batch)
    assert torch.equal(out.token_ids, logits.argmax(-1))
    assert calls == []  # neither the temperature division nor the logsumexp ran
    assert torch.allclose(out.logprobs, torch.log_softmax(logits, -1).amax(-1))
    assert calls == ["logsumexp"]  # computed when read, once
    out.logprobs
    assert calls == ["logsumexp"]


def test_temperature_one_everywhere_skips_the_division_and_samples_the_same():
    logits = torch.randn(6, 80, generator=torch.Generator().manual_seed(5))
    batch = batch_of([SamplingParams(temperature=1.0)] * 3 + [SamplingParams(temperature=0.0)] * 3)
    assert not batch.uses_temperature
    divided = dataclasses.replace(batch, uses_temperature=True)
    assert torch.equal(Sampler()(logits, batch).token_ids, Sampler()(logits, divided).token_ids)
    assert batch_of([SamplingParams(temperature=0.5), SamplingParams(temperature=0.0)]).uses_temperature


def test_logprobs_asked_for_are_computed_with_the_tokens():
    logits = torch.randn(2, 30, generator=torch.Generator().manual_seed(6))
    out = Sampler()(logits, batch_of([SamplingParams(temperature=0.0, logprobs=0), SamplingParams(temperature=0.0)]))
    assert "logprobs" in vars(out)  # queued with the tokens: the engine's one read gets both
    assert torch.allclose(out.logprobs, torch.log_softmax(logits, -1).amax(-1))
    assert "logprobs" not in vars(Sampler()(logits, batch_of([SamplingParams(temperature=0.0)] * 2)))

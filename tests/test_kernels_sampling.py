"""The fused Gumbel-max draw in Triton against the sampler's torch path, under the interpreter."""

import pytest
import torch

from minikv.hashing import hash_uniform
from minikv.kernels.sampling import gumbel_argmax_triton
from minikv.sampling import Sampler, SamplingBatch, SamplingParams, SamplingRow


def batch_of(seeds, steps):
    rows = [SamplingRow(SamplingParams(temperature=1.0), [], [0] * step, seed) for seed, step in zip(seeds, steps)]
    return SamplingBatch.from_rows(rows)


@pytest.mark.parametrize("vocab,block", [(1000, None), (1000, 128), (77, 32)])
def test_fused_draw_has_the_same_noise_bits_and_tokens_as_the_torch_sampler(vocab, block):
    seeds, steps = [0, 5, 2**32 - 1, 123456789], [0, 1, 7, 40]
    batch = batch_of(seeds, steps)
    logits = torch.randn(4, vocab, generator=torch.Generator().manual_seed(1)) * 3
    tokens, noise = gumbel_argmax_triton(logits, batch.seed, batch.step, block=block, return_noise=True)
    expected_noise = Sampler().gumbel_noise(batch, vocab, torch.device("cpu"))
    torch.testing.assert_close(noise, expected_noise, rtol=1e-6, atol=1e-6)
    u = hash_uniform(batch.seed[:, None], batch.step[:, None], torch.arange(vocab)[None])
    torch.testing.assert_close(noise, -torch.log(-torch.log(u)), rtol=1e-6, atol=1e-6)
    assert torch.equal(tokens, (logits + expected_noise).argmax(-1))


def test_fused_draw_ties_go_to_the_lowest_id_and_masked_tokens_never_win():
    logits = torch.full((2, 64), float("-inf"))
    logits[0, [9, 40]] = 0.0
    logits[1, 63] = -5.0
    batch = batch_of([3, 4], [0, 0])
    tokens = gumbel_argmax_triton(logits, batch.seed, batch.step, block=16)
    assert tokens[1] == 63 and tokens[0] in (9, 40)
    flat = torch.zeros(1, 64)  # every logit equal: the noise decides, the same way as torch
    one = batch_of([11], [2])
    expected = (flat + Sampler().gumbel_noise(one, 64, torch.device("cpu"))).argmax(-1)
    assert torch.equal(gumbel_argmax_triton(flat, one.seed, one.step, block=16), expected)

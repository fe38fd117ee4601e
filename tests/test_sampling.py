"""Tests for minikv.sampling and minikv.hashing.

Many tests need many independent draws from one distribution: they put the same logits in many rows
with different seeds, so one sampler call gives them all.
"""

from __future__ import annotations

import math
import struct

import pytest
import torch

from minikv.errors import InvalidRequestError
from minikv.hashing import hash_u32, hash_uniform, uniform_from_hash
from minikv.sampling import (
    Sampler,
    SamplingBatch,
    SamplingParams,
    SamplingRow,
    apply_penalties,
)


def make_batch(params, *, prompts=None, outputs=None, seeds=None, eos=(2,), vocab=None):
    n = len(params)
    prompts = prompts or [[]] * n
    outputs = outputs or [[]] * n
    seeds = seeds if seeds is not None else list(range(n))
    rows = [SamplingRow(p, prompt, out, seed, eos) for p, prompt, out, seed in zip(params, prompts, outputs, seeds)]
    return SamplingBatch.from_rows(rows, vocab_size=vocab)


def draw_many(logits_row: torch.Tensor, params: SamplingParams, n: int, first_seed: int = 0) -> torch.Tensor:
    """n samples of one distribution: n rows with the same logits, seeds first_seed.. first_seed+n-1."""
    batch = make_batch([params] * n, seeds=list(range(first_seed, first_seed + n)), vocab=logits_row.shape[-1])
    return Sampler()(logits_row.expand(n, -1).clone(), batch).token_ids


def empirical_entropy(tokens: torch.Tensor) -> float:
    _, counts = tokens.unique(return_counts=True)
    p = counts.double() / counts.sum()
    return float(-(p * p.log()).sum())


# --------------------------------------------------------------------------------------------------
# Filters
# --------------------------------------------------------------------------------------------------


def test_top_k_1_equals_greedy_including_ties():
    torch.manual_seed(0)
    logits = torch.randn(64, 100)
    logits[::4, 10] = 5.0  # ties for the maximum: greedy and top_k=1 must both take the lowest id
    logits[::4, 70] = 5.0
    greedy = Sampler()(logits, make_batch([SamplingParams(temperature=0.0)] * 64)).token_ids
    top1 = Sampler()(logits, make_batch([SamplingParams(temperature=1.5, top_k=1)] * 64)).token_ids
    expected = logits.argmax(dim=-1)
    assert torch.equal(greedy, expected)
    assert torch.equal(top1, expected)
    assert torch.all(top1[::4] == 10)


def test_top_k_never_samples_outside_the_top_k():
    torch.manual_seed(1)
    logits = torch.randn(50) * 0.5
    top5 = set(logits.topk(5).indices.tolist())
    tokens = draw_many(logits, SamplingParams(top_k=5), 2000)
    assert set(tokens.tolist()) <= top5
    assert len(set(tokens.tolist())) == 5
    # Without top_k the same distribution does leave the top 5, so the check above has teeth.
    unfiltered = draw_many(logits, SamplingParams(), 2000)
    assert not set(unfiltered.tolist()) <= top5


def test_top_p_keeps_only_the_nucleus():
    logits = torch.tensor([0.5, 0.3, 0.1, 0.05, 0.05]).log()
    tokens = draw_many(logits, SamplingParams(top_p=0.7), 3000)
    assert set(tokens.tolist()) == {0, 1}  # 0.5 < 0.7, 0.5 + 0.3 reaches it
    # Renormalised within the nucleus: P(0) = 0.5 / 0.8.
    assert abs((tokens == 0).double().mean().item() - 0.625) < 0.03
    tokens = draw_many(logits, SamplingParams(top_p=0.85), 3000)
    assert set(tokens.tolist()) == {0, 1, 2}


def test_top_k_and_top_p_apply_per_row():
    logits = torch.tensor([0.5, 0.3, 0.1, 0.05, 0.05]).log()
    n = 1500
    params = [SamplingParams(top_k=1)] * n + [SamplingParams()] * n
    tokens = Sampler()(logits.expand(2 * n, -1).clone(), make_batch(params)).token_ids
    assert set(tokens[:n].tolist()) == {0}
    assert set(tokens[n:].tolist()) == {0, 1, 2, 3, 4}


def test_min_p_removes_tokens_below_min_p_times_max_prob():
    logits = torch.tensor([0.5, 0.3, 0.1, 0.06, 0.04]).log()
    tokens = draw_many(logits, SamplingParams(min_p=0.15), 3000)  # threshold 0.075
    assert set(tokens.tolist()) == {0, 1, 2}


def test_temperature_zero_is_deterministic_and_high_temperature_spreads_out():
    torch.manual_seed(2)
    logits = torch.randn(20) * 2
    greedy = draw_many(logits, SamplingParams(temperature=0.0), 1000)
    assert set(greedy.tolist()) == {int(logits.argmax())}
    cold = empirical_entropy(draw_many(logits, SamplingParams(temperature=0.3), 2000))
    hot = empirical_entropy(draw_many(logits, SamplingParams(temperature=5.0), 2000))
    assert cold < 1.0
    assert hot > 2.5  # log(20) = 3.0 is the uniform limit
    assert hot > cold + 1.0


def test_empirical_distribution_matches_softmax_of_logits_over_temperature():
    logits = torch.tensor([1.0, 0.2, -0.5, 2.0, 0.0, -1.0, 1.5, 0.7])
    temperature, n = 0.7, 8000
    tokens = draw_many(logits, SamplingParams(temperature=temperature), n, first_seed=1000)
    observed = torch.bincount(tokens, minlength=8).double()

    def chi_square(expected_probs: torch.Tensor) -> float:
        expected = expected_probs.double() * n
        return float(((observed - expected) ** 2 / expected).sum())

    critical = 26.1  # chi-square, 7 degrees of freedom, p = 0.0005
    assert chi_square(torch.softmax(logits / temperature, dim=0)) < critical
    # The wrong temperature is rejected, so the test can tell them apart.
    assert chi_square(torch.softmax(logits, dim=0)) > critical


# --------------------------------------------------------------------------------------------------
# Seeds
# --------------------------------------------------------------------------------------------------


def test_same_seed_and_step_give_the_same_sample_different_seeds_differ():
    torch.manual_seed(3)
    logits = torch.randn(200, 64)
    first = Sampler()(logits, make_batch([SamplingParams()] * 200, seeds=[42] * 200)).token_ids
    again = Sampler()(logits, make_batch([SamplingParams()] * 200, seeds=[42] * 200)).token_ids
    other = Sampler()(logits, make_batch([SamplingParams()] * 200, seeds=[43] * 200)).token_ids
    assert torch.equal(first, again)
    assert (first != other).float().mean() > 0.5

    flat = torch.zeros(1, 64)  # uniform: the sample is decided by the noise alone
    by_seed = {int(Sampler()(flat, make_batch([SamplingParams()], seeds=[s])).token_ids) for s in range(100)}
    assert len(by_seed) > 40


def test_step_index_changes_the_noise():
    flat = torch.zeros(100, 64)
    outputs = [list(range(step)) for step in range(100)]  # step = tokens generated so far
    tokens = Sampler()(flat, make_batch([SamplingParams()] * 100, outputs=outputs, seeds=[7] * 100)).token_ids
    assert len(set(tokens.tolist())) > 40


def test_same_seed_gives_same_sample_whatever_the_batch_position_or_size():
    torch.manual_seed(4)
    vocab = 300
    target_logits = torch.randn(vocab)
    target = SamplingParams(temperature=0.9, top_p=0.95, seed=1234)
    alone = Sampler()(target_logits[None], make_batch([target], outputs=[[5, 6, 7]], seeds=[1234], vocab=vocab)).token_ids

    neighbours = [
        SamplingParams(temperature=0.0),
        SamplingParams(top_k=3, repetition_penalty=1.5),
        SamplingParams(temperature=2.0, min_p=0.1, presence_penalty=1.0),
        SamplingParams(logprobs=5, min_tokens=10),
    ]
    for size, position in [(2, 1), (17, 9), (40, 0)]:
        params = [neighbours[i % 4] for i in range(size)]
        outputs = [[i, i + 1] for i in range(size)]
        seeds = list(range(100, 100 + size))
        params[position], outputs[position], seeds[position] = target, [5, 6, 7], 1234
        logits = torch.randn(size, vocab)
        logits[position] = target_logits
        tokens = Sampler()(logits, make_batch(params, outputs=outputs, seeds=seeds, vocab=vocab)).token_ids
        assert tokens[position] == alone[0]


def test_noise_is_hash_uniform_of_seed_step_and_token():
    batch = make_batch([SamplingParams()] * 3, outputs=[[], [1], [1, 2]], seeds=[5, 5, 2**40 + 9])
    noise = Sampler().gumbel_noise(batch, 32, torch.device("cpu"))
    u = hash_uniform(batch.seed[:, None], batch.step[:, None], torch.arange(32)[None, :])
    assert torch.equal(noise, -torch.log(-torch.log(u)))
    assert batch.step.tolist() == [0, 1, 2]


# --------------------------------------------------------------------------------------------------
# min_tokens and penalties
# --------------------------------------------------------------------------------------------------


def test_min_tokens_suppresses_eos_and_stop_token_ids_until_reached():
    logits = torch.zeros(6, 16)
    logits[:, 2] = 10.0  # EOS
    logits[:, 7] = 9.0  # a stop token id
    logits[:, 11] = 8.0
    params = SamplingParams(temperature=0.0, min_tokens=4, stop_token_ids=[7])
    outputs = [[1] * n for n in (0, 1, 2, 3, 4, 5)]
    tokens = Sampler()(logits, make_batch([params] * 6, outputs=outputs, eos=(2,), vocab=16)).token_ids
    assert tokens.tolist() == [11, 11, 11, 11, 2, 2]

    sampled = SamplingParams(temperature=1.0, min_tokens=4, stop_token_ids=[7])
    many = draw_many(logits[0], sampled, 500)  # step 0 < min_tokens for every row
    assert not set(many.tolist()) & {2, 7}


def test_ignore_eos_needs_no_eos_suppression_but_stop_ids_stay_suppressed():
    logits = torch.zeros(1, 16)
    logits[0, 2], logits[0, 7] = 10.0, 12.0
    params = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[7], ignore_eos=True)
    tokens = Sampler()(logits, make_batch([params], eos=(2,), vocab=16)).token_ids
    assert tokens.tolist() == [2]  # EOS does not end an ignore_eos request, so it is not suppressed


def test_repetition_penalty_transforms_seen_logits_exactly():
    logits = torch.tensor([[2.0, -1.0, 3.0, -2.0, 0.5, 1.0]])
    params = SamplingParams(repetition_penalty=2.0)
    batch = make_batch([params], prompts=[[0, 1]], outputs=[[3, 3]], vocab=6)
    penalised = apply_penalties(logits, batch)
    expected = torch.tensor([[1.0, -2.0, 3.0, -4.0, 0.5, 1.0]])  # seen: 0, 1 (prompt), 3 (output)
    assert torch.allclose(penalised, expected)
    before, after = logits.softmax(-1)[0], penalised.softmax(-1)[0]
    assert all(after[i] < before[i] for i in (0, 1, 3))

    # The sampler uses the penalised logits: greedy switches away from a repeated winner.
    winner = torch.tensor([[3.0, 2.0, 0.0]])
    greedy = SamplingParams(temperature=0.0, repetition_penalty=2.0)
    assert Sampler()(winner, make_batch([greedy], prompts=[[0]], vocab=3)).token_ids.tolist() == [1]


def test_presence_and_frequency_penalties_transform_output_logits_exactly():
    logits = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    batch = make_batch([params], prompts=[[0, 1]], outputs=[[4, 4, 4, 5]], vocab=6)
    penalised = apply_penalties(logits, batch)
    # Token 4: three occurrences; token 5: one; prompt tokens are not penalised by these two.
    expected = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0 - 0.75 - 0.5, 1.0 - 0.25 - 0.5]])
    assert torch.allclose(penalised, expected)


def test_penalties_only_touch_rows_that_asked():
    logits = torch.randn(3, 10)
    params = [SamplingParams(), SamplingParams(repetition_penalty=1.3), SamplingParams(frequency_penalty=1.0)]
    batch = make_batch(params, prompts=[[1, 2]] * 3, outputs=[[3, 3]] * 3, vocab=10)
    penalised = apply_penalties(logits, batch)
    assert torch.equal(penalised[0], logits[0])
    assert not torch.equal(penalised[1], logits[1])
    assert not torch.equal(penalised[2], logits[2])


# --------------------------------------------------------------------------------------------------
# Logprobs and the hot path
# --------------------------------------------------------------------------------------------------


def test_logprobs_are_log_softmax_of_the_raw_logits():
    torch.manual_seed(5)
    logits = torch.randn(4, 40)
    params = [
        SamplingParams(temperature=0.5, top_k=4, logprobs=3, repetition_penalty=1.4),
        SamplingParams(temperature=0.0, logprobs=0),
        SamplingParams(temperature=1.3, top_p=0.5, logprobs=7, presence_penalty=1.0, min_tokens=5),
        SamplingParams(min_p=0.2),
    ]
    batch = make_batch(params, prompts=[[0, 1, 2]] * 4, outputs=[[3]] * 4, vocab=40)
    out = Sampler()(logits, batch)
    reference = torch.log_softmax(logits, dim=-1)
    assert torch.allclose(out.logprobs, reference.gather(1, out.token_ids[:, None]).squeeze(1), atol=1e-6)
    assert out.top_logprobs.shape == (4, 7) and out.top_token_ids.shape == (4, 7)
    expected_top, expected_ids = reference.topk(7, dim=-1)
    assert torch.allclose(out.top_logprobs, expected_top, atol=1e-6)
    assert torch.equal(out.top_token_ids, expected_ids)


def test_no_top_logprobs_when_no_row_asks_and_half_precision_logits_work():
    logits = torch.randn(2, 30).to(torch.bfloat16)
    out = Sampler()(logits, make_batch([SamplingParams(), SamplingParams(temperature=0.0)]))
    assert out.top_logprobs is None and out.top_token_ids is None
    assert out.logprobs.dtype == torch.float32
    assert out.token_ids[1] == logits.float()[1].argmax()


def test_sampler_hot_path_never_reads_tensor_values_on_the_host(monkeypatch):
    torch.manual_seed(6)
    params = [
        SamplingParams(temperature=0.0, logprobs=2),
        SamplingParams(top_k=5, top_p=0.9, min_p=0.05, repetition_penalty=1.2, presence_penalty=0.3,
                       frequency_penalty=0.2, min_tokens=3, stop_token_ids=[4]),
    ]
    batch = make_batch(params, prompts=[[1, 2], [3]], outputs=[[5], [6, 6]], vocab=50)
    logits = torch.randn(2, 50)
    expected = Sampler()(logits, batch).token_ids

    def forbidden(*args, **kwargs):
        raise AssertionError("the sampler synchronised with the host")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "numpy", "cpu"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    tokens = Sampler()(logits, batch).token_ids
    monkeypatch.undo()
    assert torch.equal(tokens, expected)


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.01}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"min_p": -0.01}, "min_p"),
        ({"min_p": 1.5}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"repetition_penalty": -1.0}, "repetition_penalty"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3.0}, "frequency_penalty"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": 11, "max_tokens": 10}, "min_tokens"),
        ({"stop": [str(i) for i in range(33)]}, "stop"),
        ({"stop": ["ok", ""]}, "stop"),
        ({"stop": ""}, "stop"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"logprobs": -1}, "logprobs"),
        ({"logprobs": 21}, "logprobs"),
        ({"seed": 1.5}, "seed"),
        ({"seed": "42"}, "seed"),
        ({"seed": True}, "seed"),
    ],
)
def test_invalid_parameters_raise_a_clear_error(kwargs, field):
    with pytest.raises(InvalidRequestError, match=rf"SamplingParams\.{field}="):
        SamplingParams(**kwargs)


def test_valid_edge_values_are_accepted_and_stop_is_normalised():
    params = SamplingParams(temperature=0.0, top_p=1.0, top_k=-1, min_p=1.0, max_tokens=1, min_tokens=1,
                            stop="###", logprobs=20, seed=2**70)
    assert params.stop == ["###"] and params.is_greedy
    assert SamplingParams().stop == [] and SamplingParams().stop_token_ids == []
    assert SamplingParams(stop=["a", "b"]).stop == ["a", "b"]
    assert len(SamplingParams(stop=["x"] * 32).stop) == 32


def test_top_k_minus_one_and_zero_both_mean_off():
    logits = torch.tensor([0.5, 0.3, 0.1, 0.05, 0.05]).log()
    for off in (0, -1):
        assert set(draw_many(logits, SamplingParams(top_k=off), 1500).tolist()) == {0, 1, 2, 3, 4}


# --------------------------------------------------------------------------------------------------
# Hashing
# --------------------------------------------------------------------------------------------------


def murmur3_x86_32(data: bytes, seed: int = 0) -> int:
    """Plain-Python MurmurHash3_x86_32, the oracle for the tensor version (whole 4-byte words only)."""
    mask = 0xFFFFFFFF
    h = seed
    for (k,) in struct.iter_unpack("<I", data):
        k = (k * 0xCC9E2D51) & mask
        k = ((k << 15) | (k >> 17)) & mask
        k = (k * 0x1B873593) & mask
        h ^= k
        h = ((h << 13) | (h >> 19)) & mask
        h = (h * 5 + 0xE6546B64) & mask
    h ^= len(data)
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & mask
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & mask
    return h ^ (h >> 16)


def test_hash_u32_is_murmur3_of_the_uint32_words():
    # Published MurmurHash3_x86_32 test vectors (seed 0) keep the oracle itself honest.
    assert murmur3_x86_32(b"") == 0
    assert murmur3_x86_32(b"\x00\x00\x00\x00") == 0x2362F9DE
    assert murmur3_x86_32(b"\xff\xff\xff\xff") == 0x76293B50
    assert int(hash_u32(0)) == 0x2362F9DE
    assert int(hash_u32(0xFFFFFFFF)) == 0x76293B50

    gen = torch.Generator().manual_seed(0)
    words = torch.randint(0, 2**32, (200, 4), generator=gen, dtype=torch.int64)
    hashed = hash_u32(words[:, 0], words[:, 1], words[:, 2], words[:, 3])
    for row, h in zip(words.tolist(), hashed.tolist()):
        assert h == murmur3_x86_32(struct.pack("<4I", *row))


def test_hash_u32_reads_inputs_as_their_low_32_bits_and_is_order_sensitive():
    assert int(hash_u32(2**32 + 5, 7)) == int(hash_u32(5, 7))
    assert int(hash_u32(-1)) == int(hash_u32(0xFFFFFFFF))
    assert int(hash_u32(1, 2)) != int(hash_u32(2, 1))


def test_uniform_from_hash_is_strictly_inside_0_1():
    extremes = uniform_from_hash(torch.tensor([0, 1, 2**31, 2**32 - 1], dtype=torch.int64))
    assert extremes.dtype == torch.float32
    assert torch.all(extremes > 0) and torch.all(extremes < 1)
    assert torch.isfinite(torch.log(extremes)).all() and torch.isfinite(torch.log1p(-extremes)).all()


def test_hash_uniform_is_reproducible_broadcasts_and_is_uniform():
    seeds = torch.arange(8)[:, None, None]
    steps = torch.arange(50)[None, :, None]
    tokens = torch.arange(500)[None, None, :]
    u = hash_uniform(seeds, steps, tokens)
    assert u.shape == (8, 50, 500)
    assert torch.equal(u, hash_uniform(seeds, steps, tokens))
    assert float(u[3, 7, 11]) == float(hash_uniform(3, 7, 11))
    assert torch.all(u > 0) and torch.all(u < 1)

    flat = u.flatten().double()
    n = flat.numel()  # 200,000
    assert abs(flat.mean() - 0.5) < 0.005
    assert abs(flat.var() - 1 / 12) < 0.002
    # Kolmogorov-Smirnov distance to U(0, 1); 1.95 / sqrt(n) is the 0.1% critical value.
    sorted_u = flat.sort().values
    ecdf_hi = torch.arange(1, n + 1, dtype=torch.float64) / n
    ks = torch.maximum(ecdf_hi - sorted_u, sorted_u - (ecdf_hi - 1 / n)).max()
    assert ks < 1.95 / math.sqrt(n)
    # Neighbouring coordinates are not correlated.
    assert abs(torch.corrcoef(torch.stack([flat[:-1], flat[1:]]))[0, 1]) < 0.01


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_hash_is_bit_identical_and_sampler_agrees_with_cpu():
    coords = torch.randint(0, 2**32, (3, 10_000), dtype=torch.int64)
    on_cpu = hash_u32(coords[0], coords[1], coords[2])
    on_gpu = hash_u32(coords[0].cuda(), coords[1].cuda(), coords[2].cuda())
    assert torch.equal(on_gpu.cpu(), on_cpu)

    logits = torch.randn(256, 1000)
    params = [SamplingParams(top_k=50, top_p=0.9, logprobs=3), SamplingParams(temperature=0.0)] * 128
    rows = [SamplingRow(p, [1, 2], [3], seed, (2,)) for seed, p in enumerate(params)]
    cpu_out = Sampler()(logits, SamplingBatch.from_rows(rows))
    gpu_out = Sampler()(logits.cuda(), SamplingBatch.from_rows(rows, device="cuda"))
    assert gpu_out.token_ids.is_cuda
    # Same noise bits; only fp32 rounding of log() may differ, so near-ties can flip rarely.
    assert (gpu_out.token_ids.cpu() == cpu_out.token_ids).float().mean() > 0.97

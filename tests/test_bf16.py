"""bf16 on CPU: minikv in bf16 against transformers in bf16 on the same weights, with fp32 as the yardstick.

fp32 tests cannot see what bf16 loses. bf16 keeps 8 significant bits, so every rounding moves a value by up
to u = 2^-8 of itself (relative). A forward pass rounds each activation a dozen times per layer (norm,
q/k/v, attention, o_proj, residual add, gate/up, SiLU*up, down, residual add), and the errors add up over
the layers. There is no exact bf16 answer to compare with: minikv and transformers round at slightly
different places (minikv rotates q/k and runs attention in fp32; transformers rotates in bf16). So the
tests measure the error transformers' own bf16 run makes against fp32, and ask minikv's bf16 run to be of
the same order, against transformers bf16 *and* against fp32. A bug such as bf16 RoPE frequencies adds an
error that grows with the distance between query and key, and shows at 8k positions, not at 96.

Errors are `max |a - b| / max |fp32 logits|`, the measure tests/test_models.py uses for fp32 (1e-4 there).
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from helpers import load_tiny, make_tiny_checkpoint, ring_logits
from test_models import VARIANTS  # the fp32 suite's tiny configs
from minikv.config import ModelConfig
from minikv.models.llama import RMSNorm, RotaryEmbedding, _scale_frequencies, apply_rope

BF16_ROUNDOFF = 2.0**-8  # unit roundoff of bf16: 8 significant bits, round to nearest
FP32_ROUNDOFF = 2.0**-24

# How far minikv bf16 may be from a reference, in units of transformers' own bf16-vs-fp32 error. Measured
# 0.6-1.2 in every test below; 2 leaves room for where the two implementations round differently, while
# bf16 RoPE frequencies at 8k positions cost 2.2 (test_bf16_frequencies_are_clearly_worse_at_8k_positions).
SAME_ORDER = 2.0


def relative_error(got: torch.Tensor, expected: torch.Tensor, scale: torch.Tensor) -> float:
    return ((got.float() - expected.float()).abs().max() / scale).item()


def confident_rows_agree(got: torch.Tensor, reference: torch.Tensor, noise: float) -> bool:
    """Top-1 agreement where it is decidable: on every row where the reference's best logit leads the
    runner-up by more than 2 * noise (noise = the max logit error), the other run must pick the same token.
    Closer rows are legitimate coin flips under bf16."""
    top2 = reference.topk(2, dim=-1).values
    confident = (top2[:, 0] - top2[:, 1]) > 2 * noise
    return bool((got.argmax(-1) == reference.argmax(-1))[confident].all())


def hf_logits(path, ids, dtype, last=None, **config_overrides):
    """transformers' logits on the same checkpoint. from_pretrained(dtype=bf16) keeps its inv_freq fp32
    (a plain `.to(torch.bfloat16)` would not: transformers has the bug minikv fixes)."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **config_overrides).eval()
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    with torch.no_grad():
        return model(torch.tensor([ids]), logits_to_keep=last or 0).logits[0].float()


def with_bf16_frequencies(model):
    """A copy of the bug minikv fixes: RoPE frequencies rounded to bf16 (what model.to(bf16) used to do)."""
    rope = model.model.rotary_emb
    rope.inv_freq = rope.inv_freq.bfloat16().float()
    return model


# --------------------------------------------------------------------------------------------------
# RoPE stays fp32
# --------------------------------------------------------------------------------------------------

SMOLLM2_ROPE = ModelConfig("LlamaForCausalLM", vocab_size=8, hidden_size=576, intermediate_size=8, num_layers=1,
                           num_heads=9, num_kv_heads=3, head_dim=64, rope_theta=1e5)
LLAMA31_ROPE = dataclasses.replace(
    SMOLLM2_ROPE, head_dim=128, rope_theta=5e5,
    rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=8192))


def exact_frequencies(config: ModelConfig) -> torch.Tensor:
    """fp64 frequencies, straight from the config."""
    dim = config.head_dim
    inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    return _scale_frequencies(inv_freq, config.rope_scaling)


CASTS = {
    "to(bfloat16)": lambda m: m.to(torch.bfloat16),
    "half()": lambda m: m.half(),
    "bfloat16()": lambda m: m.bfloat16(),
    "to(cpu, bfloat16)": lambda m: m.to("cpu", torch.bfloat16),
}


@pytest.mark.parametrize("cast", list(CASTS))
@pytest.mark.parametrize("config", [SMOLLM2_ROPE, LLAMA31_ROPE], ids=["smollm2", "llama3.1"])
def test_inv_freq_stays_fp32_and_exact_through_dtype_casts(config, cast):
    expected = exact_frequencies(config).float()
    rope = CASTS[cast](RotaryEmbedding(config))
    assert rope.inv_freq.dtype == torch.float32
    assert torch.equal(rope.inv_freq, expected)


def test_inv_freq_stays_fp32_through_the_loaders_dtype_path(tmp_path):
    from minikv.loader import load_model

    path = make_tiny_checkpoint(tmp_path, rope_theta=5e5)
    config = dataclasses.replace(SMOLLM2_ROPE, head_dim=16, rope_theta=5e5)  # the tiny model's RoPE
    for dtype in ("bfloat16", "float16"):
        loaded = load_model(path, device="cpu", dtype=dtype)
        assert next(loaded.model.parameters()).dtype == getattr(torch, dtype)
        assert torch.equal(loaded.model.model.rotary_emb.inv_freq, exact_frequencies(config).float())


@pytest.mark.parametrize("config", [SMOLLM2_ROPE, LLAMA31_ROPE], ids=["smollm2", "llama3.1"])
def test_cos_sin_at_position_8000_equal_fp64_to_fp32_rounding(config):
    """The angle pos * inv_freq is rounded twice in fp32 (the frequency, then the product), each by at most
    pos * 2^-24 radians; cos and sin add ~1e-7. So at most 8000 * 2^-23 = 9.5e-4 off the fp64 values."""
    positions = torch.tensor([0, 1, 4000, 7999, 8000])
    cos, sin = RotaryEmbedding(config).to(torch.bfloat16)(positions)
    assert cos.dtype == sin.dtype == torch.float32
    angles = positions.double()[:, None] * exact_frequencies(config)[None, :]
    bound = 8000 * 2 * FP32_ROUNDOFF
    assert (cos.double() - angles.cos()).abs().max() <= bound
    assert (sin.double() - angles.sin()).abs().max() <= bound


def test_bf16_frequencies_would_scramble_the_angles_at_4000_positions():
    """The bug the fix prevents: a bf16 frequency omega is off by up to 2^-8 relative (0.33% for the worst
    of SmolLM2's 32), so the angle between a query and a key 4,000 positions apart is off by up to
    4000 * omega * 0.0033 rad: more than 2.5 rad (modulo 2 pi) for some frequency (2.56 measured), against
    7e-5 rad in fp32."""
    exact = exact_frequencies(SMOLLM2_ROPE)
    distance = 4000.0

    def worst_angle_error(inv_freq):
        error = distance * inv_freq.double() - distance * exact
        return torch.remainder(error + math.pi, 2 * math.pi).sub(math.pi).abs().max().item()

    fixed = RotaryEmbedding(SMOLLM2_ROPE).to(torch.bfloat16).inv_freq
    assert worst_angle_error(fixed) <= distance * 2 * FP32_ROUNDOFF
    assert worst_angle_error(fixed.bfloat16()) > 2.5


def test_apply_rope_rotates_in_fp32_and_rounds_once():
    """bf16 q/k are rotated in fp32 and rounded once: within one bf16 rounding of the exact rotation of the
    same bf16 input (plus the fp32 angle error, 9.5e-4 rad at 8000, times the pair's length)."""
    torch.manual_seed(0)
    x = torch.randn(5, 3, 64).mul(8).bfloat16()
    positions = torch.tensor([0, 17, 4000, 7999, 8000])
    cos, sin = RotaryEmbedding(SMOLLM2_ROPE)(positions)
    got = apply_rope(x, cos, sin)
    assert got.dtype == torch.bfloat16

    angles = (positions.double()[:, None] * exact_frequencies(SMOLLM2_ROPE)[None, :])[:, None, :]
    x1, x2 = x.double()[..., 0::2], x.double()[..., 1::2]  # paired order: frequency f at channels 2f, 2f + 1
    exact = torch.stack([x1 * angles.cos() - x2 * angles.sin(), x2 * angles.cos() + x1 * angles.sin()], dim=-1)
    exact = exact.flatten(-2)
    pair_length = (x1**2 + x2**2).sqrt().repeat_interleave(2, dim=-1)
    bound = BF16_ROUNDOFF * exact.abs() + 8000 * 2 * FP32_ROUNDOFF * pair_length
    assert ((got.double() - exact).abs() <= bound).all()


# --------------------------------------------------------------------------------------------------
# The other places bf16 could lose precision silently
# --------------------------------------------------------------------------------------------------


def test_rms_norm_reduces_in_fp32_and_rounds_like_transformers():
    """Mean of squares over 4,096 channels in fp32; then the normalised value is rounded to bf16 and
    multiplied by the bf16 weight (two roundings), which is what Llama's reference and transformers do.
    Bit-equal to transformers' LlamaRMSNorm, and within 2u of the fp64 answer."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(0)
    x = (torch.randn(8, 4096) * 40 + 3).bfloat16()  # large values: bf16 squares would each lose 2^-8
    norm = RMSNorm(4096, 1e-5)
    hf_norm = LlamaRMSNorm(4096, 1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        hf_norm.weight.copy_(norm.weight)
        norm, hf_norm = norm.bfloat16(), hf_norm.bfloat16()
        got, hf = norm(x), hf_norm(x)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, hf)
    x64 = x.double()
    exact = norm.weight.double() * x64 / (x64.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt()
    assert ((got.double() - exact).abs() <= 2 * BF16_ROUNDOFF * exact.abs() + 1e-30).all()


def test_logits_leave_the_model_in_fp32(tmp_path):
    """The lm_head's output is rounded once to bf16 (as in transformers) and handed on as fp32, so the
    sampler's penalties, temperature, Gumbel noise and log-softmax (minikv/sampling.py) never run in bf16."""
    model, config = load_tiny(make_tiny_checkpoint(tmp_path), torch.bfloat16)
    hidden = torch.randn(3, config.hidden_size).bfloat16()
    assert model.compute_logits(hidden).dtype == torch.float32


# --------------------------------------------------------------------------------------------------
# The whole model, bf16 vs transformers bf16, on the tiny configs
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", list(VARIANTS))
def test_bf16_logits_match_transformers_bf16(variant, tmp_path):
    """96 tokens: prefill in chunks of 50 and 30, then 16 decode steps (both reference kernels), budget 128
    so nothing is evicted. Measured (max error / max |fp32 logit|): transformers bf16 vs fp32 1.2-1.5%,
    minikv bf16 vs transformers bf16 1.0-1.4%, minikv bf16 vs fp32 1.0-1.6%.
    Absolute bound 5% = ~13u: a few roundings of u per layer, over 2 layers, that partly cancel."""
    arch, overrides = VARIANTS[variant]
    path = make_tiny_checkpoint(tmp_path, arch, **overrides)
    model, config = load_tiny(path, torch.bfloat16)
    ids = torch.randint(3, config.vocab_size, (96,), generator=torch.Generator().manual_seed(1)).tolist()
    fp32, bf16 = hf_logits(path, ids, torch.float32), hf_logits(path, ids, torch.bfloat16)
    got, _, _ = ring_logits(model, config, ids, prefill=[50, 30], budget=128, policy="nexus")

    scale = fp32.abs().max()
    bf16_noise = relative_error(bf16, fp32, scale)
    assert relative_error(got, bf16, scale) <= SAME_ORDER * bf16_noise
    assert relative_error(got, fp32, scale) <= SAME_ORDER * bf16_noise
    assert relative_error(got, fp32, scale) <= 0.05
    assert confident_rows_agree(got, fp32, relative_error(got, fp32, scale) * scale.item())


# --------------------------------------------------------------------------------------------------
# Long positions: 8k tokens, where bf16 RoPE frequencies would show
# --------------------------------------------------------------------------------------------------

LONG = 8192
LAST = 256  # the rows compared: positions 7,936-8,191, the last 8 of them decoded


@pytest.fixture(scope="module")
def long_context_runs(tmp_path_factory):
    """A tiny Llama (head_dim 32, Llama 3's rope_theta 500,000) on 8,192 random tokens: prefill in chunks of
    1,024, then 8 decode steps, budget 8,192. ~10 s."""
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("long"), num_attention_heads=2, num_key_value_heads=1,
                                rope_theta=5e5)
    ids = torch.randint(3, 384, (LONG,), generator=torch.Generator().manual_seed(1)).tolist()
    prefill = [1024] * 7 + [1024 - 8]

    def minikv(bf16_frequencies=False):
        model, config = load_tiny(path, torch.bfloat16)
        if bf16_frequencies:
            model = with_bf16_frequencies(model)
        return ring_logits(model, config, ids, prefill=prefill, budget=LONG, last=LAST)[0]

    return dict(fp32=hf_logits(path, ids, torch.float32, LAST), hf_bf16=hf_logits(path, ids, torch.bfloat16, LAST),
                minikv=minikv(), bf16_frequencies=minikv(bf16_frequencies=True))


def test_bf16_logits_match_transformers_bf16_at_8k_positions(long_context_runs):
    """Measured: transformers bf16 vs fp32 1.6%, minikv bf16 vs transformers bf16 1.3%, vs fp32 1.2%."""
    runs = long_context_runs
    scale = runs["fp32"].abs().max()
    bf16_noise = relative_error(runs["hf_bf16"], runs["fp32"], scale)
    assert relative_error(runs["minikv"], runs["hf_bf16"], scale) <= SAME_ORDER * bf16_noise
    assert relative_error(runs["minikv"], runs["fp32"], scale) <= SAME_ORDER * bf16_noise
    error = relative_error(runs["minikv"], runs["fp32"], scale)
    assert confident_rows_agree(runs["minikv"], runs["fp32"], error * scale.item())


def test_bf16_frequencies_are_clearly_worse_at_8k_positions(long_context_runs):
    """The same bf16 model with its RoPE frequencies rounded to bf16 (the bug): 3.5% off fp32 instead of
    1.2%, and 2.2x transformers' own bf16 error (1.6%). The angle error grows with the query-key distance
    (test_bf16_frequencies_would_scramble_the_angles_at_4000_positions), so a short prompt hides it."""
    runs = long_context_runs
    scale = runs["fp32"].abs().max()
    fixed = relative_error(runs["minikv"], runs["fp32"], scale)
    broken = relative_error(runs["bf16_frequencies"], runs["fp32"], scale)
    bf16_noise = relative_error(runs["hf_bf16"], runs["fp32"], scale)
    assert broken > 2 * fixed
    assert broken > 1.8 * bf16_noise


# --------------------------------------------------------------------------------------------------
# SmolLM2-135M: the real weights, all 30 layers, and 8k positions
# --------------------------------------------------------------------------------------------------


def prose_ids(tokenizer, count: int) -> list[int]:
    from minikv.eval.haystack import HaystackStream

    ids = tokenizer.encode(HaystackStream("prose", 0).text(count))[:count]  # ~1.3 tokens per word
    assert len(ids) == count
    return ids


def smollm2_bf16(smollm2, num_layers: int):
    """minikv's SmolLM2 in bf16, cut to its first `num_layers` layers, from the same weights."""
    from minikv.loader import build_model, load_state_dict, weight_files

    config = dataclasses.replace(smollm2.config, num_layers=num_layers)
    return build_model(config, load_state_dict(weight_files(smollm2.path)), "cpu", torch.bfloat16), config


@pytest.mark.slow
def test_smollm2_bf16_matches_transformers_bf16_over_30_layers(smollm2):
    """All 30 layers, 512 tokens of prose (prefill 256 + 248, 8 decode steps). Measured: transformers
    bf16 vs fp32 3.5%, minikv bf16 vs transformers bf16 2.0%, vs fp32 3.5% (rms 1.2%, as transformers'
    1.3%); top-1 agreement with fp32 98.8% (transformers bf16: 97.9%), with transformers bf16 99.0%."""
    ids = prose_ids(smollm2.tokenizer, 512)
    model, config = smollm2_bf16(smollm2, smollm2.config.num_layers)
    got, _, _ = ring_logits(model, config, ids, prefill=[256, 248], budget=512)
    fp32, bf16 = hf_logits(smollm2.path, ids, torch.float32), hf_logits(smollm2.path, ids, torch.bfloat16)
    scale = fp32.abs().max()
    bf16_noise = relative_error(bf16, fp32, scale)
    assert relative_error(got, bf16, scale) <= SAME_ORDER * bf16_noise
    assert relative_error(got, fp32, scale) <= SAME_ORDER * bf16_noise
    assert confident_rows_agree(got, fp32, relative_error(got, fp32, scale) * scale.item())


@pytest.mark.slow
def test_smollm2_bf16_matches_transformers_bf16_at_8k_positions(smollm2):
    """The first 2 layers of SmolLM2 (the whole model at 8k costs minutes on CPU; depth is the test above)
    on 8,192 tokens of prose, prefill in chunks of 1,024 and 8 decode steps, the last 256 rows compared.
    Measured: transformers bf16 vs fp32 0.70%, minikv bf16 vs transformers bf16 0.64%, vs fp32 0.81%."""
    layers = 2
    ids = prose_ids(smollm2.tokenizer, LONG)
    model, config = smollm2_bf16(smollm2, layers)
    got, _, _ = ring_logits(model, config, ids, prefill=[1024] * 7 + [1024 - 8], budget=LONG, last=LAST)
    del model
    fp32 = hf_logits(smollm2.path, ids, torch.float32, LAST, num_hidden_layers=layers)
    bf16 = hf_logits(smollm2.path, ids, torch.bfloat16, LAST, num_hidden_layers=layers)
    scale = fp32.abs().max()
    bf16_noise = relative_error(bf16, fp32, scale)
    assert relative_error(got, bf16, scale) <= SAME_ORDER * bf16_noise
    assert relative_error(got, fp32, scale) <= SAME_ORDER * bf16_noise
    assert confident_rows_agree(got, fp32, relative_error(got, fp32, scale) * scale.item())

"""Llama-family decoder (Llama 2/3/3.1/3.2, SmolLM, Mistral), read top to bottom.

    tokens -> embedding -> N x [RMSNorm -> attention -> +residual -> RMSNorm -> SwiGLU MLP -> +residual]
           -> RMSNorm -> lm_head -> logits

The model sees a flat batch: `input_ids` [T] and `positions` [T] hold the tokens of every sequence in
the step side by side (decodes and prefill chunks mixed). The model itself knows nothing of sequences or
caches: attention goes through one call point, `AttentionBackend.forward(layer, q, k, v, inv_freq)`, which
the model runner sets up for the step (ring store, eviction, kernels). RoPE is applied there, not here: the
backend stores keys unrotated and rotates each one as it loads it, to the position its slot takes (the
text position, or its rank in a bounded ring), so the model hands over its frequencies instead of rotated
q / k. Module names equal the Hugging Face parameter names, so checkpoints load with a plain
`load_state_dict`, once the loader has put each head's q / k channels in RoPE's paired order
(`loader.to_paired_order`): q and k leave their projections (and Qwen3's norms) ready to be rotated as
complex pairs, and their dot products are Hugging Face's.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
from torch import nn

from .. import kernels
from ..config import ModelConfig


class AttentionBackend(Protocol):
    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                inv_freq: torch.Tensor) -> torch.Tensor:
        """q [T, Hq, D], k / v [T, Hkv, D] before RoPE (after the model's q / k norms; q and k in paired
        channel order, kernels.common.Rope), and the model's RoPE frequencies inv_freq [D/2] fp32 ->
        attention output [T, Hq, D]."""


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if kernels.fused_ops_on(x):
            return kernels.ops.rms_norm_triton(x, self.weight, self.eps)
        if x.dtype == torch.float32:  # one fused op (the same numbers as the lines below)
            return nn.functional.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # Normalise in fp32: bf16 squares lose too much precision over thousands of channels; round the
        # normalised value before the weight, as Llama's reference code and transformers do.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """RoPE's frequencies, fixed at load (with the checkpoint's scaling). The attention backend rotates q
    and k with them (kernels.common.Rope); `forward` and `apply_rope` below are the same rotation for
    whoever needs it outside attention (tests compare against them).

    Frequencies, angles, cos and sin are fp32 whatever the model's dtype. In bf16 (8 significant bits) a
    frequency is off by up to 2^-8 relative, so the angle between a query and a key 4,000 positions
    apart drifts by radians: exactly the long-context regime minikv is for.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, config.head_dim, 2, dtype=torch.float64) / config.head_dim))
        self.register_buffer("inv_freq", _scale_frequencies(inv_freq, config.rope_scaling).float(), persistent=False)

    def _apply(self, fn, recurse=True):
        # `model.to(dtype)`, `.half()`, `.bfloat16()` and `.cuda()` all reach buffers through `_apply`.
        # Let them move inv_freq to another device, but keep its fp32 values: cast once, they are lost.
        # (A buffer rather than a plain attribute, so that it still follows the model to its device.)
        exact = self.inv_freq
        super()._apply(fn, recurse)
        self.inv_freq = exact.to(self.inv_freq.device)
        return self

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = positions.float()[:, None] * self.inv_freq[None, :]  # [T, D/2], fp32
        return angles.cos(), angles.sin()


def _scale_frequencies(inv_freq: torch.Tensor, scaling: dict | None) -> torch.Tensor:
    if scaling is None:
        return inv_freq
    if scaling["rope_type"] == "longrope":  # one divisor per frequency (a Llama 3.1 GGUF's rope_freqs)
        return inv_freq / torch.tensor(scaling["long_factor"], dtype=inv_freq.dtype)
    factor = float(scaling["factor"])
    if scaling["rope_type"] == "linear":
        return inv_freq / factor
    # llama3: long wavelengths slowed by `factor`, short ones kept, a smooth ramp between (Llama 3.1 paper).
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_context = float(scaling["original_max_position_embeddings"])
    wavelength = 2 * math.pi / inv_freq
    smooth = (old_context / wavelength - low) / (high - low)
    ramp = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = torch.where(wavelength > old_context / low, inv_freq / factor, inv_freq)
    is_medium = (wavelength >= old_context / high) & (wavelength <= old_context / low)
    return torch.where(is_medium, ramp, scaled)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE in paired channel order (the order minikv holds q and k in, kernels.common.Rope) from half-width
    cos / sin [T, D/2] (RotaryEmbedding's output), x [T, H, D]: channels (2f, 2f + 1) = [a, b] ->
    [a cos - b sin, b cos + a sin] with frequency f's angle. The rotation runs in fp32 and the result is
    rounded once, back to x's dtype."""
    x32 = x.float()
    a, b = x32[..., 0::2], x32[..., 1::2]
    cos, sin = cos[:, None, :], sin[:, None, :]
    return torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1).flatten(-2).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, tp=None):
        super().__init__()
        self.layer = layer
        ranks = tp.size if tp is not None else 1  # tensor parallel: this rank's heads only (column-parallel)
        self.num_heads, self.num_kv_heads = config.num_heads // ranks, config.num_kv_heads // ranks
        self.head_dim = config.head_dim
        hidden, bias = config.hidden_size, config.qkv_bias
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = _output_linear(config.num_heads * self.head_dim, hidden, tp)
        if config.qk_norm:  # Qwen3 normalises each head's q and k before RoPE
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.qkv = FusedLinear(self.q_proj, self.k_proj, self.v_proj)

    def forward(self, x, inv_freq, backend: AttentionBackend) -> torch.Tensor:
        tokens, heads, kv_heads, dim = x.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv(x)  # [T, (Hq + 2 Hkv) D]: one matmul for the three projections
        q = qkv[:, : heads * dim].view(tokens, heads, dim)
        k = qkv[:, heads * dim: (heads + kv_heads) * dim].view(tokens, kv_heads, dim)
        v = qkv[:, (heads + kv_heads) * dim:].view(tokens, kv_heads, dim)
        if hasattr(self, "q_norm"):  # Qwen3: before RoPE, which the backend applies
            q, k = self.q_norm(q), self.k_norm(k)
        out = backend.forward(self.layer, q, k, v, inv_freq)
        return self.o_proj(out.reshape(tokens, heads * dim))


class FusedLinear(nn.Module):
    """Several projections of the same input as one matmul (q/k/v; gate/up), the way vLLM stacks them.

    The projections stay as they are (their Hugging Face names load the checkpoint); `fuse()`, called once
    the weights are real, concatenates their weights into one tensor and makes each projection's weight a
    view of its rows, so memory is shared, not doubled. A dtype or device cast copies parameters one by
    one, which breaks the sharing: `_apply` fuses again afterwards. Until `fuse()` runs, the projections
    run one by one.
    """

    def __init__(self, *projections: nn.Linear):
        super().__init__()
        self._parts = list(projections)  # a plain list: they are registered by their parent already
        self.weight: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None

    def fuse(self) -> None:
        sizes = [p.out_features for p in self._parts]
        weight = torch.cat([p.weight.detach() for p in self._parts])
        for part, rows in zip(self._parts, weight.split(sizes)):
            part.weight = nn.Parameter(rows, requires_grad=False)
        self.weight = weight
        if self._parts[0].bias is not None:
            bias = torch.cat([p.bias.detach() for p in self._parts])
            for part, rows in zip(self._parts, bias.split(sizes)):
                part.bias = nn.Parameter(rows, requires_grad=False)
            self.bias = bias

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.weight is not None and self._parts[0].weight.data_ptr() != self.weight.data_ptr():
            self.fuse()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is None:
            return torch.cat([p(x) for p in self._parts], dim=-1)
        return nn.functional.linear(x, self.weight, self.bias)


def _output_linear(in_features: int, out_features: int, tp) -> nn.Linear:
    """o_proj / down_proj: a plain Linear, or under tensor parallelism row-parallel (ends in an all-reduce)."""
    if tp is None:
        return nn.Linear(in_features, out_features, bias=False)
    from ..distributed.layers import RowParallelLinear

    return RowParallelLinear(in_features, out_features, tp)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, tp=None):
        super().__init__()
        intermediate = config.intermediate_size // (tp.size if tp is not None else 1)  # column-parallel
        self.gate_proj = nn.Linear(config.hidden_size, intermediate, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, intermediate, bias=False)
        self.down_proj = _output_linear(config.intermediate_size, config.hidden_size, tp)
        self.gate_up = FusedLinear(self.gate_proj, self.up_proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        if kernels.fused_ops_on(x):  # one pass over the intermediate instead of three
            return self.down_proj(kernels.ops.silu_mul_triton(gate, up))
        return self.down_proj(nn.functional.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, tp=None):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer, tp)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config, tp)

    def forward(self, x, inv_freq, backend):
        x = x + self.self_attn(self.input_layernorm(x), inv_freq, backend)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderModel(nn.Module):
    def __init__(self, config: ModelConfig, tp=None):
        super().__init__()
        if tp is None:
            self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        else:
            from ..distributed.layers import VocabParallelEmbedding

            self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp)
        self.layers = nn.ModuleList(DecoderLayer(config, i, tp) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)

    def forward(self, input_ids, positions, backend, hidden_states_out: list | None = None):
        """`positions` are the tokens' text positions; the positions RoPE uses come from the backend's step
        plan (they depend on the ring), so the model only passes its frequencies on."""
        x = self.embed_tokens(input_ids)
        inv_freq = self.rotary_emb.inv_freq
        for layer in self.layers:
            if hidden_states_out is not None:
                hidden_states_out.append(x)
            x = layer(x, inv_freq, backend)
        return self.norm(x)


class LlamaForCausalLM(nn.Module):
    """Also serves SmolLM and Mistral (Mistral v0.1's sliding window has no kernel: the ring bounds attention
    under the evicting policies, and under `full` the Engine caps max_model_len at the window).

    `tp` (a distributed.TPGroup) builds one rank's shard: its heads, its slice of the MLP, its token ids of
    the embedding and LM head (minikv.distributed.layers); the forward is the same code."""

    def __init__(self, config: ModelConfig, tp=None):
        super().__init__()
        self.config = config
        self.model = DecoderModel(config, tp)
        if tp is None:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        else:
            from ..distributed.layers import ParallelLMHead

            self.lm_head = ParallelLMHead(config.hidden_size, config.vocab_size, tp)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids, positions, backend: AttentionBackend, hidden_states_out: list | None = None):
        """Final hidden states [T, hidden]. `hidden_states_out`, if given, receives each layer's input
        (policies that score tokens from the residual stream, like EpiKV, read them)."""
        return self.model(input_ids, positions, backend, hidden_states_out)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def fuse_projections(self) -> "LlamaForCausalLM":
        """Run q/k/v and gate/up as one matmul each (see FusedLinear); the loader calls it once weights load."""
        for module in self.modules():
            if isinstance(module, FusedLinear):
                module.fuse()
        return self

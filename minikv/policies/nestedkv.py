"""NestedKV: key-only, multi-scale anomaly scoring (arXiv 2605.26678), as a ring policy.

From the paper (its abstract): per KV head, each key's cosine anomaly against three nested anchors, a global
mean of normalised keys, a block mean (block size clip(N/32, 128, 256)) and a trailing window mean (64);
per-scale min-max normalisation; head-adaptive mixing softmax(log(0.4, 0.4, 0.2) + 3·Δ), Δ being the spread
(top 10% minus bottom 10%) of each scale; a surprise gate σ(10·(ŝ − 0.6)) that routes toward the strongest
scale; and a per-head budget floor of 20%.

minikv's concrete choices (the paper compresses a prompt once; a ring scores every token as it is written):
- anomaly_s(j) = 1 − cos(k_j, anchor_s), every anchor the direction of a sum of L2-normalised keys that
  includes k_j itself. Blocks are aligned to absolute positions (pos // block) and N is the ring's `budget`
  (the set of tokens that compete for slots), so the block size is fixed for a sequence's whole life.
- In a prefill chunk the anchors are computed over the chunk (global: every token so far plus the whole
  chunk; block: all of the block's tokens so far and in the chunk; trailing window: the 64 tokens ending at
  the token). In decode they are running statistics per (layer, ring, head): the sum of all unit keys, the
  sum over the current block, and a circular buffer of the last 64 unit keys (64·head_dim fp32 per
  (layer, ring, head)).
- Min-max bounds are running per (layer, ring, head, scale): a chunk widens them with its own range, a
  decode token with its own value; scores use the bounds after the widening.
- Δ_s = mean of the top 10% minus mean of the bottom 10% of ŝ_s over a prefill chunk; the mixing uses the
  token-weighted mean of Δ over all prefill chunks so far (decode has no population to take deciles from;
  with no prefill at all Δ = 0 and the prior weights apply).
- The gate: m = Σ_s w_s ŝ_s, g = σ(10·(m − 0.6)), score = (1 − g)·m + g·max_s ŝ_s: an unsurprising token keeps
  the head's mix, a surprising one is scored by the scale where it stands out most.
- A token's score is fixed when it is written (SCORE_EXTERNAL); the victim is the lowest score.
- Per-head budget floor: impossible in the ring, whose every (layer, KV head) has exactly `budget` slots:
  per-head budgets cannot be moved between heads. Every head therefore gets the uniform share, which is
  above any floor (20% of it included); the paper's head-adaptive allocation is replaced by the head-adaptive
  *mixing* only. Budgets per head would need per-head ring sizes (a different store layout).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..kernels.common import SCORE_EXTERNAL, VICTIM_MIN_SCORE
from .base import Policy, PrefillCandidates

_EPS = 1e-6


def anomaly(unit_keys: torch.Tensor, anchor_sums: torch.Tensor) -> torch.Tensor:
    """1 − cos(k, anchor) over the last axis; an anchor is any sum of unit keys (only its direction counts)."""
    return 1.0 - (unit_keys * F.normalize(anchor_sums, dim=-1, eps=_EPS)).sum(-1)


def decile_spread(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """Mean of the top `fraction` minus mean of the bottom `fraction` along axis 1: [H, n, S] -> [H, S]."""
    n = scores.shape[1]
    take = max(1, math.ceil(fraction * n))
    ordered = torch.sort(scores, dim=1).values
    return ordered[:, n - take:].mean(1) - ordered[:, :take].mean(1)


def mixing_weights(delta: torch.Tensor, log_prior: torch.Tensor, gain: float) -> torch.Tensor:
    """softmax(log(prior) + gain·Δ) over the scale axis (the last)."""
    return torch.softmax(log_prior + gain * delta, dim=-1)


def gated_mix(normalised: torch.Tensor, weights: torch.Tensor, gain: float, center: float) -> torch.Tensor:
    """normalised [..., S], weights broadcastable to it -> the surprise-gated score [...]."""
    mixed = (weights * normalised).sum(-1)
    gate = torch.sigmoid(gain * (mixed - center))
    return (1 - gate) * mixed + gate * normalised.max(-1).values


@dataclass
class NestedKV(Policy):
    name: ClassVar[str] = "nestedkv"
    ring_state_axes: ClassVar[dict[str, int]] = {name: 1 for name in (
        "global_sum", "block_sum", "trail_buf", "raw_min", "raw_max", "delta_sum", "delta_tokens")}
    block: int | None = None  # None: clip(budget / 32, block_min, block_max)
    block_min: int = 128
    block_max: int = 256
    trail: int = 64  # trailing window of the third anchor
    prior: tuple[float, float, float] = (0.4, 0.4, 0.2)  # global, block, trailing window
    spread_gain: float = 3.0
    tail_fraction: float = 0.1
    gate_gain: float = 10.0
    gate_center: float = 0.6

    def __post_init__(self):
        super().__post_init__()
        self.require("trail", self.trail >= 1, ">= 1")
        self.require("block", self.block is None or self.block >= 1, ">= 1, or None for clip(budget / 32, block_min, block_max)")
        self.require("block_min", self.block_min >= 1, ">= 1")
        self.require("block_max", self.block_max >= self.block_min, f">= block_min ({self.block_min})")
        self.require("tail_fraction", 0 < self.tail_fraction <= 0.5, "in (0, 0.5]")
        self.require("prior", min(self.prior) > 0, "three positive weights (global, block, trailing window)")

    def eviction_spec(self):
        return self._spec(score_mode=SCORE_EXTERNAL, victim_mode=VICTIM_MIN_SCORE)

    # --- running state per (layer, ring, KV head) --------------------------------------------------
    def bind(self, pool, num_slots: int, max_budget: int) -> None:
        # num_slots counts every batch slot, the CUDA-graph scratch slot included
        self.allocate(pool.num_layers, num_slots, pool.num_kv_heads, pool.head_dim, max_budget, pool.k.device)

    def allocate(self, num_layers: int, num_rings: int, num_kv_heads: int, head_dim: int, budget: int,
                 device: torch.device | str = "cpu") -> None:
        """Allocate the running anchors (RingAttention does it through `bind`; tests call it directly)."""
        self.block_size = self.block or min(max(budget // 32, self.block_min), self.block_max)
        shape = (num_layers, num_rings, num_kv_heads)
        zeros = lambda *s: torch.zeros(*shape, *s, dtype=torch.float32, device=device)  # noqa: E731
        self.global_sum, self.block_sum = zeros(head_dim), zeros(head_dim)
        self.trail_buf = zeros(self.trail, head_dim)  # unit keys at index pos % trail
        self.raw_min, self.raw_max = zeros(3), zeros(3)
        self.delta_sum = zeros(3)  # Σ over prefill chunks of Δ · chunk length
        self.delta_tokens = torch.zeros(num_layers, num_rings, dtype=torch.float32, device=device)
        self.log_prior = torch.log(torch.tensor(self.prior, dtype=torch.float32, device=device))  # made once:
        # no host-to-device copy may happen inside a captured CUDA graph
        for r in range(num_rings):
            self.reset_ring(r)

    def reset_ring(self, ring: int) -> None:
        for state in (self.global_sum, self.block_sum, self.trail_buf, self.delta_sum, self.delta_tokens):
            state[:, ring] = 0
        self.raw_min[:, ring] = float("inf")
        self.raw_max[:, ring] = float("-inf")

    # --- prefill: anchors over the chunk ---------------------------------------------------------
    def prefill_scores(self, cand: PrefillCandidates):
        layer, r, f = cand.layer, cand.ring, cand.filled
        unit = F.normalize(cand.keys[:, f:].float(), dim=-1, eps=_EPS)  # [H, C, D]
        pos = cand.pos[0, f:].long()  # the chunk's positions (a device tensor: no host sync)
        raw = torch.stack([self._global_anomaly(layer, r, unit), self._block_anomaly(layer, r, unit, pos),
                           self._trail_anomaly(layer, r, unit, pos)], dim=-1)  # [H, C, 3]
        lo = torch.minimum(self.raw_min[layer, r], raw.amin(1))
        hi = torch.maximum(self.raw_max[layer, r], raw.amax(1))
        self.raw_min[layer, r], self.raw_max[layer, r] = lo, hi
        normalised = (raw - lo[:, None]) / (hi - lo + _EPS)[:, None]
        chunk = unit.shape[1]
        self.delta_sum[layer, r] += decile_spread(normalised, self.tail_fraction) * chunk
        self.delta_tokens[layer, r] += chunk
        chunk_scores = gated_mix(normalised, self._weights(layer, r)[:, None], self.gate_gain, self.gate_center)
        scores = torch.cat([cand.ring_score.float(), chunk_scores], dim=1)
        return scores, scores

    def _global_anomaly(self, layer, r, unit):
        self.global_sum[layer, r] += unit.sum(1)
        return anomaly(unit, self.global_sum[layer, r][:, None])

    def _block_anomaly(self, layer, r, unit, pos):
        """Each token against the sum of its whole block (earlier chunks' part carried in block_sum)."""
        num_heads, chunk, dim = unit.shape
        local = pos // self.block_size - pos[0] // self.block_size  # block index within the chunk
        most_blocks = chunk // self.block_size + 2  # a static bound, so no host sync sizes the tensor
        sums = torch.zeros(num_heads, most_blocks, dim, device=unit.device).index_add_(1, local, unit)
        continues = (pos[0] % self.block_size != 0).float()  # the chunk continues a block begun before it
        sums[:, 0] += continues * self.block_sum[layer, r]
        self.block_sum[layer, r] = sums[:, local[-1]]
        return anomaly(unit, sums[:, local])

    def _trail_anomaly(self, layer, r, unit, pos):
        """Each token against the sum of the `trail` tokens ending at it (causal)."""
        chunk, trail = unit.shape[1], self.trail
        earlier = (pos[0] - trail + torch.arange(trail, device=unit.device)) % trail  # oldest first
        series = torch.cat([self.trail_buf[layer, r][:, earlier], unit], dim=1)  # zeros before position 0
        csum = torch.cat([torch.zeros_like(series[:, :1]), series.cumsum(1)], dim=1)
        sums = csum[:, trail + 1:] - csum[:, 1: chunk + 1]  # positions (i - trail, i]
        last = min(chunk, trail)
        self.trail_buf[layer, r][:, pos[-last:] % trail] = unit[:, -last:]
        return anomaly(unit, sums)

    def _weights(self, layer, r) -> torch.Tensor:
        delta = self.delta_sum[layer, r] / self.delta_tokens[layer, r].clamp_min(1.0)
        return mixing_weights(delta, self.log_prior, self.spread_gain)  # [H, 3]

    # --- decode: anchors from running statistics -------------------------------------------------
    def new_token_scores(self, layer, ring_ids, new_pos, k_new):
        rings, pos = ring_ids.long(), new_pos.long()
        unit = F.normalize(k_new.float(), dim=-1, eps=_EPS)  # [N, H, D]
        global_sum = self.global_sum[layer, rings] + unit
        block_open = (pos % self.block_size != 0).float()[:, None, None]
        block_sum = self.block_sum[layer, rings] * block_open + unit
        trail_buf = self.trail_buf[layer, rings]  # [N, H, trail, D]
        heads = torch.arange(unit.shape[1], device=unit.device)
        trail_buf[torch.arange(len(rings), device=unit.device)[:, None], heads, (pos % self.trail)[:, None]] = unit
        self.global_sum[layer, rings], self.block_sum[layer, rings] = global_sum, block_sum
        self.trail_buf[layer, rings] = trail_buf
        raw = torch.stack([anomaly(unit, global_sum), anomaly(unit, block_sum), anomaly(unit, trail_buf.sum(2))], -1)
        lo = torch.minimum(self.raw_min[layer, rings], raw)
        hi = torch.maximum(self.raw_max[layer, rings], raw)
        self.raw_min[layer, rings], self.raw_max[layer, rings] = lo, hi
        normalised = (raw - lo) / (hi - lo + _EPS)
        delta = self.delta_sum[layer, rings] / self.delta_tokens[layer, rings].clamp_min(1.0)[:, None, None]
        weights = mixing_weights(delta, self.log_prior, self.spread_gain)
        return gated_mix(normalised, weights, self.gate_gain, self.gate_center)

"""The published baselines, each a ring policy: same store, same kernel, other constants."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..kernels.common import (
    SCORE_ATTN,
    SCORE_KEYDIFF,
    SCORE_NONE,
    VICTIM_MIN_SCORE,
    VICTIM_OLDEST,
)
from ..kernels.reference import keydiff_scores
from .base import Policy, PrefillCandidates


def _recency(cand: PrefillCandidates) -> torch.Tensor:
    return cand.pos.float()


@dataclass
class Full(Policy):
    """No eviction: the ring is as long as the context. The quality reference every other policy is read against."""

    name: ClassVar[str] = "full"
    evicts: ClassVar[bool] = False

    def eviction_spec(self):
        return self._spec(score_mode=SCORE_NONE, victim_mode=VICTIM_OLDEST)

    def prefill_scores(self, cand):
        return torch.zeros_like(cand.mass), _recency(cand)


@dataclass
class Streaming(Policy):
    """StreamingLLM (Xiao et al., 2023, arXiv 2309.17453): keep the attention sinks and the most recent tokens."""

    name: ClassVar[str] = "streaming"

    def eviction_spec(self):
        return self._spec(score_mode=SCORE_NONE, victim_mode=VICTIM_OLDEST)

    def prefill_scores(self, cand):
        return torch.zeros_like(cand.mass), _recency(cand)


@dataclass
class H2O(Policy):
    """Heavy-Hitter Oracle (Zhang et al., 2023, arXiv 2306.14048): a token's score is all the attention it has
    ever received; the lowest is evicted (deterministic top-K)."""

    name: ClassVar[str] = "h2o"

    def eviction_spec(self):
        return self._spec(score_mode=SCORE_ATTN, victim_mode=VICTIM_MIN_SCORE, decay=1.0)

    def prefill_scores(self, cand):
        scores = cand.mass.clone()
        scores[:, : cand.filled] += cand.ring_score
        return scores, scores


@dataclass
class TOVA(Policy):
    """Token Omission Via Attention (Oren et al., 2024, arXiv 2401.06104): evict the token the current query
    attends least; in prefill, the chunk's last row is the current query."""

    name: ClassVar[str] = "tova"
    obs_rows: ClassVar[int] = 1

    def eviction_spec(self):
        return self._spec(score_mode=SCORE_ATTN, victim_mode=VICTIM_MIN_SCORE, decay=0.0)

    def prefill_scores(self, cand):
        last = cand.obs[:, -1]
        return last, last


@dataclass
class SnapKV(Policy):
    """SnapKV (Li et al., 2024, arXiv 2404.14469): the prompt's last `obs_rows` queries (the observation window)
    vote with their attention, smoothed by 1-D max pooling so a kept token keeps its neighbours; the top-K stay.
    The paper compresses only the prompt, so during decode it behaves like StreamingLLM."""

    name: ClassVar[str] = "snapkv"
    obs_rows: ClassVar[int] = 32
    pool_kernel: int = 5

    def __post_init__(self):
        super().__post_init__()
        # An even kernel with padding kernel // 2 would return one score too many.
        self.require("pool_kernel", self.pool_kernel >= 1 and self.pool_kernel % 2 == 1, "an odd number >= 1")

    def eviction_spec(self):
        return self._spec(score_mode=SCORE_NONE, victim_mode=VICTIM_OLDEST)

    def prefill_scores(self, cand):
        votes = cand.obs.sum(dim=1)  # [H, n]
        pooled = torch.nn.functional.max_pool1d(votes[:, None], self.pool_kernel, stride=1,
                                                padding=self.pool_kernel // 2)[:, 0]
        return pooled, pooled


@dataclass
class KeyDiff(Policy):
    """KeyDiff (Park et al., 2025, arXiv 2504.15364): attention-free; keep keys that differ most from the mean
    direction of all keys: score = -cos(k, mean of normalised keys)."""

    name: ClassVar[str] = "keydiff"

    def eviction_spec(self):
        return self._spec(score_mode=SCORE_KEYDIFF, victim_mode=VICTIM_MIN_SCORE)

    def prefill_scores(self, cand):
        scores = keydiff_scores(cand.keys)
        return scores, scores

"""Nexus: attention-graph scoring with weighted reservoir sampling (minikv's default policy).

The seed paper (arXiv 2606.23961) gives the idea; the concrete method here is DESIGN 5.1:
- every token, when it is the query, records its top-m attended slots as out-edges;
- a slot's importance n = a + gamma a P + gamma^2 a P^2 walks those edges from the current attention a,
  so a *bridge token* that the query barely attends, but that the tokens it attends did attend, is seen;
- S <- decay * S + n keeps a memory of past importance;
- the victim is drawn by Efraimidis-Spirakis A-Res (weights S^(1/tau)) rather than cut at a fixed rank,
  so a token that falls just below the cut-off once is not erased with certainty.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import ConfigError
from ..kernels.common import SCORE_ATTN, VICTIM_MIN_SCORE, VICTIM_RESERVOIR
from ..kernels.reference import nexus_walk, reservoir_keys
from .base import Policy, PrefillCandidates


@dataclass
class Nexus(Policy):
    name: ClassVar[str] = "nexus"
    top_m: ClassVar[int] = 4
    decay: float = 0.99
    gamma: float = 0.5
    hops: int = 2
    tau: float = 1.0  # 0 = deterministic top-K (sampling off)

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.decay <= 1.0 or self.gamma < 0 or self.hops < 0 or self.tau < 0:
            raise ConfigError("nexus needs 0 <= decay <= 1, gamma >= 0, hops >= 0 and tau >= 0")

    @property
    def sampling(self) -> bool:
        return self.tau > 0

    def eviction_spec(self):
        return self._spec(score_mode=SCORE_ATTN, decay=self.decay, gamma=self.gamma, hops=self.hops,
                          victim_mode=VICTIM_RESERVOIR if self.sampling else VICTIM_MIN_SCORE,
                          tau=self.tau if self.sampling else 1.0)

    def prefill_scores(self, cand: PrefillCandidates):
        # The chunk counts as C decode steps: old scores decay C times, the chunk's walk adds in once.
        walked = nexus_walk(cand.mass, cand.edge_target, self._edge_pos(cand), cand.edge_w, cand.pos,
                            self.gamma, self.hops)
        scores = walked.clone()
        scores[:, : cand.filled] += cand.ring_score * self.decay**cand.chunk_len
        if not self.sampling:
            return scores, scores
        heads = torch.arange(scores.shape[0], device=scores.device)[:, None]
        keys = reservoir_keys(self.eviction_spec(), scores, heads, cand.pos, cand.layer, cand.seed)
        return scores, -keys  # the largest reservoir key is dropped first

    @staticmethod
    def _edge_pos(cand: PrefillCandidates) -> torch.Tensor:
        """Targets are candidate indices, so an edge is alive iff it exists: give it its target's position."""
        target = cand.edge_target.long().clamp(min=0)
        num_heads = target.shape[0]
        target_pos = cand.pos.gather(1, target.view(num_heads, -1)).view_as(target)
        return torch.where(cand.edge_target >= 0, target_pos, torch.full_like(target_pos, -2))

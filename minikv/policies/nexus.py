"""Nexus: attention scoring with a held novelty reserve, and optional graph walk and reservoir sampling
(minikv's default policy).

The seed paper (arXiv 2606.23961) gives the idea; the concrete method is in docs/design.md (section 3, the
score update; section 4, the prefill ranking and the novelty reserve):
- every slot's score S <- decay * S + n keeps a memory of past importance, where n is the attention the
  slot receives now;
- while a prompt streams through, a *novelty reserve* keeps the keys least like the rest (KeyDiff's rule,
  arXiv 2504.15364) whatever their attention, and (`hold`) decode never evicts what it kept: minikv's
  addition, see `_novelty_reserve` below;
- the walk (`gamma` > 0): every token, when it is the query, records its top-m attended slots as
  out-edges, and n = a + gamma a P + gamma^2 a P^2 walks them from the current attention a, so a *bridge
  token* that the query barely attends, but that the tokens it attends did attend, is seen;
- sampling (`tau` > 0): the victim is drawn by Efraimidis-Spirakis A-Res (weights S^(1/tau)) rather than
  cut at a fixed rank, so a token that falls just below the cut-off once is not erased with certainty.

The walk and the sampling are off by default (gamma=0, tau=0): on the decode-phase tasks measured neither
kept a fact that nexus without them lost, and each cost next-token fidelity (docs/quality.md, the
ablations); the reserve is what keeps a fact through a long generation. The walk also costs memory:
`top_m` edges per slot, recorded only when it is on. `nexus:gamma=0.5,tau=1` is the seed paper's full
scoring, round 1's default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..kernels.common import SCORE_ATTN, VICTIM_MIN_SCORE, VICTIM_RESERVOIR
from ..kernels.reference import keydiff_scores, nexus_walk, reservoir_keys
from .base import Policy, PrefillCandidates

# The priority the reserve lifts its picks to: above every score-based priority, below the +inf that protects
# sinks and window, and the mark by which prefill_held finds them again.
RESERVED = torch.finfo(torch.float32).max


@dataclass
class Nexus(Policy):
    name: ClassVar[str] = "nexus"
    edges_per_token: ClassVar[int] = 4  # the walk's out-edges per query token (top_m when the walk is on)
    decay: float = 0.99
    gamma: float = 0.0  # 0 = the walk is off (and no edges are recorded); the seed paper's is 0.5
    hops: int = 2
    tau: float = 0.0  # 0 = deterministic top-K (sampling off); the seed paper's is 1
    # Share of the policy-chosen prefill slots (budget - n_sink - window) kept for the most novel keys.
    reserve: float = 0.5
    # Decode never evicts the reserve's picks (PoolLayer.held); False: they become ordinary slots at decode.
    hold: bool = True

    def __post_init__(self):
        super().__post_init__()
        self.require("decay", 0.0 <= self.decay <= 1.0, "in [0, 1] (1 = never forget, 0 = current attention only)")
        self.require("gamma", self.gamma >= 0, ">= 0 (0 turns the walk off)")
        self.require("hops", self.hops >= 0, ">= 0 (0 turns the walk off)")
        self.require("tau", self.tau >= 0, ">= 0 (0 = deterministic top-K)")
        self.require("reserve", 0.0 <= self.reserve <= 1.0, "a share of the chosen slots: 0 <= reserve <= 1")

    @property
    def sampling(self) -> bool:
        return self.tau > 0

    @property
    def walks(self) -> bool:
        return self.gamma > 0 and self.hops > 0

    @property
    def top_m(self) -> int:  # type: ignore[override]  # a ClassVar elsewhere: only nexus's depends on options
        """Edges each token records: none unless the walk is on, so gamma=0 saves their pool memory."""
        return self.edges_per_token if self.walks else 0

    def eviction_spec(self):
        walk = dict(gamma=self.gamma, hops=self.hops) if self.walks else dict(gamma=0.0, hops=0)
        return self._spec(score_mode=SCORE_ATTN, decay=self.decay, **walk,
                          victim_mode=VICTIM_RESERVOIR if self.sampling else VICTIM_MIN_SCORE,
                          tau=self.tau if self.sampling else 1.0, hold=self.holds)

    @property
    def holds(self) -> bool:
        """Whether decode honours held marks: only a reserve makes any (so reserve=0 costs the kernel nothing)."""
        return self.hold and self.reserve > 0

    def prefill_scores(self, cand: PrefillCandidates):
        """A chunk of C rows counts as C decode steps, each giving the chunk's *average* attention.

        Summed column mass is biased by causality: the chunk's first token is seen by C rows, its last by
        one, and the ring's tokens by all C. Dividing by each key's exposure (rows that could see it) gives
        the attention an average query paid it; the EMA over `e` steps of a constant a is
        a * (1 - decay^e) / (1 - decay). Old tokens and fresh ones are then compared on one scale, which is
        what a decode step does. (Summing raw mass instead wipes the ring every chunk: decay^512 ~ 0.6%.)
        """
        chunk, f, device = cand.chunk_len, cand.filled, cand.mass.device
        exposure = torch.cat([torch.full((f,), float(chunk), device=device),  # made on the device: no copy
                              torch.arange(chunk, 0, -1, dtype=torch.float32, device=device)])
        mean_attention = cand.mass / exposure
        walked = mean_attention
        if self.walks:
            walked = nexus_walk(mean_attention, cand.edge_target, cand.edge_pos, cand.edge_w, cand.pos,
                                self.gamma, self.hops)
        scores = walked * self._ema_steps(exposure)
        scores[:, :f] += cand.ring_score * self.decay**chunk
        if self.sampling:
            heads = torch.arange(scores.shape[0], device=scores.device)[:, None]
            priority = -reservoir_keys(self.eviction_spec(), scores, heads, cand.pos, cand.layer, cand.seed)
        else:
            priority = scores  # the reserve below writes new tensors, so sharing is safe
        return self._novelty_reserve(cand, scores, priority)

    def _novelty_reserve(self, cand: PrefillCandidates, scores: torch.Tensor,
                         priority: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Lift the `reserve` share of the chosen slots with the most novel keys (farthest from the mean key
        direction, KeyDiff's rule) above every other priority, and store each with at least the candidates'
        mean score.

        Why: attention measures what the text read so far needed, and a prompt's facts are often what
        nothing has attended yet, because the question that needs them comes later (docs/design.md,
        section 4, "novelty reserve"; the measurements are in docs/quality.md). Sinks never compete (they
        are always kept). A mid-prompt chunk's window does not either, since the next chunk ranks it; in the
        chunk that ends the prompt it does, because no later chunk will. The reserve holds
        `reserve * (budget - n_sink - window)` candidates, or every competing one if fewer. With `hold`
        prefill_held marks the picks and decode never evicts them while an unmarked slot is left; the score
        floor keeps them from being decode's first victims when they are not held.
        """
        chosen = cand.budget - self.n_sink - self.window
        count = min(int(self.reserve * max(chosen, 0)), cand.pos.shape[1])
        if count == 0:
            return scores, priority
        excluded = cand.sinks(self.n_sink) if cand.ends_prompt else cand.protected(self.n_sink, self.window)
        novelty = keydiff_scores(cand.keys).masked_fill(excluded, float("-inf"))
        # Keys are stored before RoPE, so a repeated token's key repeats exactly and novelties tie: a stable
        # sort breaks ties by candidate index, the same way whatever the batch's shape (tensor-parallel ranks
        # hold fewer heads), where topk's choice among equals may differ.
        novel = novelty.sort(dim=-1, descending=True, stable=True).indices[:, :count]
        picked = ~excluded.gather(1, novel)  # False only where fewer than `count` candidates compete
        floor = scores.mean(dim=-1, keepdim=True).expand_as(novel)
        lifted_scores = torch.where(picked, torch.maximum(scores.gather(1, novel), floor), scores.gather(1, novel))
        priority = priority.float()
        lifted_priority = torch.where(picked, RESERVED, priority.gather(1, novel))
        return scores.scatter(1, novel, lifted_scores), priority.scatter(1, novel, lifted_priority)

    def prefill_held(self, cand: PrefillCandidates, priority: torch.Tensor) -> torch.Tensor:
        """The reserve's picks: the candidates _novelty_reserve lifted to RESERVED."""
        return priority == RESERVED

    def _ema_steps(self, steps: torch.Tensor) -> torch.Tensor:
        """sum_{k<steps} decay^k: what `steps` decode steps of constant attention 1 add to S."""
        if self.decay == 1.0:
            return steps
        return (1 - self.decay**steps) / (1 - self.decay)

"""The attention call point: every layer's attention goes through `RingAttention.forward`.

A step's flat batch holds the decode tokens first (one per decoding sequence), then the prefill chunks.
Decodes go to the fused kernel in one launch per layer (attend, score, pick a victim, write the token).
Each prefill chunk attends its ring plus itself, then `budget` of ring + chunk are kept and written back.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import kernels
from .policies import Policy, PrefillCandidates
from .ring import RingStore


@dataclass
class PrefillSegment:
    ring: int
    start: int  # offset of the chunk in the step's flat batch
    length: int
    filled: int  # ring slots filled before the chunk
    first_pos: int  # position of the chunk's first token


@dataclass
class StepPlan:
    """What one forward step attends: built by the model runner, read by every layer."""

    num_decode: int = 0
    decode_rings: torch.Tensor | None = None  # [num_decode] int32
    decode_filled: torch.Tensor | None = None  # [num_decode] int32
    decode_pos: torch.Tensor | None = None  # [num_decode] int32
    prefills: list[PrefillSegment] = field(default_factory=list)


class RingAttention:
    def __init__(self, store: RingStore, policy: Policy, *, scale: float, seed: int):
        self.store, self.policy, self.scale, self.seed = store, policy, scale, seed
        self.spec = policy.eviction_spec()
        self.plan = StepPlan()
        # Most KV slots one sequence has held at once (ring + the chunk in flight): the memory bound.
        self.peak_slots_per_seq = 0
        policy.bind(store)

    def begin_step(self, plan: StepPlan) -> None:
        """Set the step's plan; a prefill from position 0 means its ring was (re)allocated."""
        self.plan = plan
        for seg in plan.prefills:
            if seg.first_pos == 0:
                self.policy.reset_ring(seg.ring)

    def end_step(self, hidden_states: list[torch.Tensor] | None = None) -> None:
        """After the forward: policies that score from the whole forward (epikv) fix their scores here."""
        self.policy.end_step(self.store, self.plan, hidden_states)

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        plan = self.plan
        out = torch.empty_like(q)
        nd = plan.num_decode
        if nd:
            ring = self.store.layer(layer)
            new_score = self.policy.new_token_scores(layer, plan.decode_rings, plan.decode_pos, k[:nd])
            out[:nd], written = kernels.attend_score_sample(
                q[:nd], k[:nd], v[:nd], ring, plan.decode_rings, plan.decode_filled,
                plan.decode_pos, self.spec, layer=layer, seed=self.seed, scale=self.scale, new_score=new_score)
            self.policy.after_decode(layer, ring, plan.decode_rings, plan.decode_pos, written)
        for seg in plan.prefills:
            span = slice(seg.start, seg.start + seg.length)
            out[span] = self._prefill(layer, seg, q[span], k[span], v[span])
        return out

    # --- prefill: attend, then keep `budget` of ring + chunk --------------------------------------
    def _prefill(self, layer: int, seg: PrefillSegment, q, k, v) -> torch.Tensor:
        ring, r, f = self.store.layer(layer), seg.ring, seg.filled
        self.peak_slots_per_seq = max(self.peak_slots_per_seq, f + seg.length)
        if f + seg.length > self.store.budget:
            self.policy.check_budget(self.store.budget, seg.length)
        chunk_pos = torch.arange(seg.first_pos, seg.first_pos + seg.length, dtype=torch.int32, device=q.device)
        res = kernels.prefill_attention(
            q, k, v, ring.k[r, :, :f], ring.v[r, :, :f], ring.pos[r, :, :f], chunk_pos, scale=self.scale,
            n_sink=self.policy.n_sink, top_m=self.policy.top_m, obs_rows=min(self.policy.obs_rows, seg.length))
        cand = self._candidates(layer, ring, r, f, k, v, chunk_pos, res)
        scores, priority = self.policy.prefill_scores(cand)
        keep = self._keep_mask(cand, priority)
        self._write_chunk(ring, r, f, k, v, cand, scores, keep, res)
        self.policy.after_prefill_chunk(layer, ring, seg)
        return res.out

    def _candidates(self, layer, ring, r, f, k, v, chunk_pos, res) -> PrefillCandidates:
        num_kv_heads, chunk = k.shape[1], k.shape[0]
        pos = torch.cat([ring.pos[r, :, :f], chunk_pos[None].expand(num_kv_heads, -1)], dim=1)
        keys = torch.cat([ring.k[r, :, :f], k.transpose(0, 1)], dim=1)
        cand = PrefillCandidates(layer=layer, seed=self.seed, filled=f, budget=self.store.budget, pos=pos, keys=keys, mass=res.mass,
                                 ring_score=ring.score[r, :, :f], obs=res.obs, ring=r)
        if self.policy.needs_values:
            cand.values = torch.cat([ring.v[r, :, :f], v.transpose(0, 1)], dim=1)
        if self.policy.top_m:
            # Edges on the candidate axis, in the ring's own form (target, target's position when made);
            # a ring slot keeps its index there, and nexus_walk drops the edges whose target has changed.
            chunk_target = res.edge_idx.transpose(0, 1).long()
            chunk_target_pos = pos.gather(1, chunk_target.clamp(min=0).reshape(num_kv_heads, -1)).view_as(chunk_target)
            cand.edge_target = torch.cat([ring.edge_slot[r, :, :f].long(), chunk_target], dim=1)
            cand.edge_pos = torch.cat([ring.edge_pos[r, :, :f],
                                       torch.where(chunk_target >= 0, chunk_target_pos, -1)], dim=1)
            cand.edge_w = torch.cat([ring.edge_w[r, :, :f], res.edge_w.transpose(0, 1)], dim=1)
        return cand

    def _keep_mask(self, cand: PrefillCandidates, priority: torch.Tensor) -> torch.Tensor:
        """[H, n] True for the `budget` candidates that stay: sinks and window first, then by priority."""
        budget = self.store.budget
        if cand.pos.shape[1] <= budget:
            return torch.ones_like(cand.pos, dtype=torch.bool)
        last_pos = cand.pos[0, -1]
        protected = (cand.pos < self.policy.n_sink) | (cand.pos > last_pos - self.policy.window)
        ranked = priority.float().masked_fill(protected, float("inf"))
        order = torch.sort(ranked, dim=1, descending=True, stable=True).indices[:, :budget]
        return torch.zeros_like(protected).scatter_(1, order, True)

    def _write_chunk(self, ring, r, f, k, v, cand, scores, keep, res) -> None:
        """Kept chunk tokens take the dropped ring slots and the empty ones, lowest slot first."""
        budget = self.store.budget
        num_kv_heads = k.shape[1]
        ring.score[r, :, :f] = scores[:, :f]
        chunk_keep = keep[:, f:]
        free = torch.cat([~keep[:, :f], torch.ones(num_kv_heads, budget - f, dtype=torch.bool, device=k.device)], 1)
        free_slots = torch.sort((~free).to(torch.int8), dim=1, stable=True).indices  # free slots first, ascending
        rank = (chunk_keep.long().cumsum(1) - 1).clamp(min=0)
        chunk_slot = torch.where(chunk_keep, free_slots.gather(1, rank), torch.full_like(rank, -1))
        heads, idx = chunk_keep.nonzero(as_tuple=True)
        slots = chunk_slot[heads, idx]
        ring.k[r, heads, slots] = k[idx, heads].to(ring.k.dtype)
        ring.v[r, heads, slots] = v[idx, heads].to(ring.v.dtype)
        ring.pos[r, heads, slots] = cand.pos[heads, f + idx]
        ring.score[r, heads, slots] = scores[heads, f + idx].float()
        if self.policy.top_m:
            new_slot = torch.cat([torch.where(keep[:, :f], torch.arange(f, device=k.device).expand(num_kv_heads, -1),
                                              torch.full((num_kv_heads, f), -1, device=k.device)), chunk_slot], 1)
            target = res.edge_idx.transpose(0, 1).long()  # [H, C, M] candidate indices
            safe = target.clamp(min=0)
            flat = safe.reshape(num_kv_heads, -1)
            target_slot = torch.where(target >= 0, new_slot.gather(1, flat).view_as(target), -1)
            target_pos = torch.where(target_slot >= 0, cand.pos.gather(1, flat).view_as(target), -1)
            ring.edge_slot[r, heads, slots] = target_slot[heads, idx].to(torch.int32)
            ring.edge_pos[r, heads, slots] = target_pos[heads, idx].to(torch.int32)
            ring.edge_w[r, heads, slots] = res.edge_w[idx, heads]

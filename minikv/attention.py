"""The attention call point: every layer's attention goes through `RingAttention.forward`.

A step's flat batch holds the decode tokens first (one per decoding request), then the prefill chunks.
Decodes go to the fused kernel in one launch per layer (attend, score, pick a victim, write the token).
Each prefill chunk attends its ring plus itself; then, if ring + chunk exceed the request's budget, the
policy ranks them, `budget` stay, and the kept chunk tokens are written into the ring. Every read and write
of a ring goes through its block table (minikv.block_pool): ring slot j is pool row
`table[j // block_size] * block_size + j % block_size`, and the ring math never sees anything but j.

q and k arrive before RoPE and K is stored so: the kernels rotate every key as they load it, to the position
its slot takes under the request's position mode (kernels.common.Rope): its text position ("original"), or
its rank among the ring's kept tokens ("ring", where the query takes the next rank, so no distance the model
sees exceeds the ring).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import kernels
from .block_pool import KVPool
from .kernels import reference
from .kernels.common import SCORE_ATTN, SCORE_NONE, PoolLayer, physical_rows
from .policies import Policy, PrefillCandidates


@dataclass
class PrefillSegment:
    slot: int  # the request's batch slot (policies keep per-ring state by slot)
    start: int  # offset of the chunk in the step's flat batch
    length: int
    filled: int  # ring slots filled before the chunk
    first_pos: int  # position of the chunk's first token
    ring_size: int  # the request's budget: ring slots it may hold
    table: torch.Tensor  # [W] int32: the request's block table (a view of the persistent batch's row)
    ends_prompt: bool = False  # the chunk holds the prompt's last token: decode follows
    ring_positions: bool = False  # positions="ring": the chunk's RoPE positions follow the ring's ranks


@dataclass
class StepPlan:
    """What one forward step attends: built by the model runner, read by every layer."""

    num_decode: int = 0
    decode_slots: torch.Tensor | None = None  # [N] int64: batch slots of the decoding requests
    decode_tables: torch.Tensor | None = None  # [N, W] int32
    decode_filled: torch.Tensor | None = None  # [N] int32: ring slots filled before this step
    decode_budget: torch.Tensor | None = None  # [N] int32: ring size of each request
    decode_pos: torch.Tensor | None = None  # [N] int32: the new token's position
    decode_rope_pos: torch.Tensor | None = None  # [N] int32: its RoPE position (None: decode_pos)
    decode_ring: torch.Tensor | None = None  # [N] bool: rows under positions="ring" (None: none)
    prefills: list[PrefillSegment] = field(default_factory=list)


class RingAttention:
    def __init__(self, pool: KVPool, policy: Policy, *, scale: float, seed: int, num_slots: int, max_budget: int):
        self.pool, self.policy, self.scale, self.seed = pool, policy, scale, seed
        self.spec = policy.eviction_spec()
        self.plan = StepPlan()
        # On the reference path, a step's decode bookkeeping (scores, walk, victims, edges, writes) runs once
        # for all layers after the forward: no layer reads another's ring, and the per-op cost of thirty
        # small batches is what makes a CPU step slow. Policies that score per layer (hooks) opt out.
        self._deferrable = (self.spec.score_mode in (SCORE_ATTN, SCORE_NONE)
                            and type(policy).after_decode is Policy.after_decode
                            and type(policy).new_token_scores is Policy.new_token_scores)
        self._index: reference.DecodeIndex | None = None  # the step's decode rings, shared by every layer
        self._deferred: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # per layer: a(j), k, v
        self._rope: kernels.Rope | None = None  # made from the first inv_freq the model passes
        # Most KV slots one request has held at once (ring + the chunk in flight): the memory bound.
        self.peak_slots_per_seq = 0
        self.archive = None  # minikv.archive.ArchiveStore: write-through KV archive and recall (None: off)
        policy.bind(pool, num_slots=num_slots, max_budget=max_budget)

    def begin_step(self, plan: StepPlan) -> None:
        """Set the step's plan; a prefill from position 0 means its slot holds a new request."""
        self.plan = plan
        self._index, self._deferred = None, []
        for seg in plan.prefills:
            if seg.first_pos == 0:
                self.policy.reset_ring(seg.slot)

    def end_step(self, hidden_states: list[torch.Tensor] | None = None) -> None:
        """After the forward: the deferred decode bookkeeping of every layer at once, then the policies that
        score from the whole forward (epikv) fix their scores."""
        if self._deferred:
            self._update_all_layers()
        if self.archive is not None:
            self.archive.end_step(self._rope)
        self.policy.end_step(self.pool, self.plan, hidden_states)

    def _update_all_layers(self) -> None:
        attn, k_new, v_new = (torch.cat(parts) for parts in zip(*self._deferred))  # layer-major rows
        num_layers, plan = len(self._deferred), self.plan
        index = self._index.for_layers(num_layers, self.pool.num_blocks + 1, self.pool.num_kv_heads,
                                       self.pool.block_size)
        layer = torch.arange(num_layers, device=attn.device).repeat_interleave(plan.num_decode)[:, None, None]
        ring = None if plan.decode_ring is None else plan.decode_ring.repeat(num_layers)
        reference.decode_update(self.pool.all_layers(), index, attn, k_new, v_new, plan.decode_pos.repeat(num_layers),
                                self.spec, layer=layer, seed=self.seed, q_pos=self._decode_rope_pos().repeat(num_layers),
                                ring=ring)
        self._deferred = []

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                inv_freq: torch.Tensor | None = None) -> torch.Tensor:
        """q [T, Hq, D], k / v [T, Hkv, D] of the step's flat batch, before RoPE: the kernels rotate them
        with the model's frequencies `inv_freq` [D/2] (None: q and k are used as they are)."""
        plan = self.plan
        self._set_rope(inv_freq)
        if self.archive is not None:  # recall into the rings due, stage the step's K/V for the archive
            self.archive.on_layer(layer, q, k, v, plan, self)
        out = torch.empty_like(q)
        nd = plan.num_decode
        if nd and self._defers(q):
            out[:nd] = self._attend_only(layer, q[:nd], k[:nd], v[:nd])
        elif nd:
            pool = self.pool.layer(layer)
            new_score = self.policy.new_token_scores(layer, plan.decode_slots, plan.decode_pos, k[:nd])
            out[:nd], written = kernels.attend_score_sample(
                q[:nd], k[:nd], v[:nd], pool, plan.decode_tables, plan.decode_filled, plan.decode_budget,
                plan.decode_pos, self.spec, layer=layer, seed=self.seed, scale=self.scale, new_score=new_score,
                rope=self._rope, q_pos=self._decode_rope_pos(), ring=plan.decode_ring)
            self.policy.after_decode(layer, pool, plan, written)
        for seg in plan.prefills:
            span = slice(seg.start, seg.start + seg.length)
            out[span] = self._prefill(layer, seg, q[span], k[span], v[span])
        return out

    def _set_rope(self, inv_freq: torch.Tensor | None) -> None:
        if inv_freq is None:
            self._rope = None
        elif self._rope is None or self._rope.source is not inv_freq:
            self._rope = kernels.Rope(inv_freq)
            self._rope.source = inv_freq  # the model's buffer: a new one (a dtype or device cast) makes a new Rope

    def _decode_rope_pos(self) -> torch.Tensor:
        plan = self.plan
        return plan.decode_pos if plan.decode_rope_pos is None else plan.decode_rope_pos

    def _defers(self, q: torch.Tensor) -> bool:
        return self._deferrable and kernels.kernel_backend(q.device) == "reference"

    def _attend_only(self, layer: int, q, k, v) -> torch.Tensor:
        """The decode attention of one layer; its bookkeeping waits for end_step (see __init__)."""
        plan, pool = self.plan, self.pool.layer(layer)
        if self._index is None:
            self._index = reference.decode_index(plan.decode_tables, plan.decode_filled, plan.decode_budget,
                                                 pool.block_size, k.shape[1])
        out, attn, _ = reference.decode_attend(q, k, v, pool, self._index, scale=self.scale, rope=self._rope,
                                               q_pos=self._decode_rope_pos())
        if len(self._deferred) != layer:
            raise RuntimeError("deferred decode layers must run in order, each once per step")
        self._deferred.append((attn, k, v))
        return out

    # --- prefill: attend, then keep `budget` of ring + chunk --------------------------------------
    def _prefill(self, layer: int, seg: PrefillSegment, q, k, v) -> torch.Tensor:
        pool, f = self.pool.layer(layer), seg.filled
        self.peak_slots_per_seq = max(self.peak_slots_per_seq, f + seg.length)
        chunk_pos = torch.arange(seg.first_pos, seg.first_pos + seg.length, dtype=torch.int32, device=q.device)
        # under positions="ring" the ring holds ranks 0..f-1 and the chunk follows them
        rope_pos = chunk_pos - (seg.first_pos - f) if seg.ring_positions else chunk_pos
        res = kernels.prefill_attention(
            q, k, v, pool, seg.table, f, chunk_pos, scale=self.scale, n_sink=self.policy.n_sink,
            top_m=self.policy.top_m, obs_rows=min(self.policy.obs_rows, seg.length), rope=self._rope,
            rope_pos=rope_pos)
        ring_rows = physical_rows(seg.table, torch.arange(f, device=q.device), pool.block_size)  # [f]
        cand = self._candidates(layer, pool, seg, ring_rows, k, v, chunk_pos, res)
        scores, priority = self.policy.prefill_scores(cand)
        keep = self._keep_mask(cand, priority, seg.ring_size)
        held = self.policy.prefill_held(cand, priority) if self.spec.hold else None
        self._write_chunk(pool, seg, ring_rows, k, v, cand, scores, keep, res, held)
        self.policy.after_prefill_chunk(layer, pool, seg)
        return res.out

    def _candidates(self, layer, pool: PoolLayer, seg, ring_rows, k, v, chunk_pos, res) -> PrefillCandidates:
        """The ring's f slots (gathered through the block table) and the chunk's C tokens, per KV head."""
        num_kv_heads, f = k.shape[1], seg.filled
        ring = lambda name: pool.rows(name)[ring_rows].transpose(0, 1)  # noqa: E731  [H, f, ...]
        pos = torch.cat([ring("pos"), chunk_pos[None].expand(num_kv_heads, -1)], dim=1)
        keys = torch.cat([ring("k"), k.transpose(0, 1).to(pool.k.dtype)], dim=1)
        cand = PrefillCandidates(layer=layer, seed=self.seed, filled=f, budget=seg.ring_size, pos=pos, keys=keys,
                                 mass=res.mass, ring_score=ring("score"), obs=res.obs, ring=seg.slot,
                                 ends_prompt=seg.ends_prompt)
        if self.policy.needs_values:
            cand.values = torch.cat([ring("v"), v.transpose(0, 1).to(pool.v.dtype)], dim=1)
        if self.policy.top_m:
            # Edges on the candidate axis, in the ring's own form (target, target's position when made);
            # a ring slot keeps its index there, and nexus_walk drops the edges whose target has changed.
            chunk_target = res.edge_idx.transpose(0, 1).long()
            chunk_target_pos = pos.gather(1, chunk_target.clamp(min=0).reshape(num_kv_heads, -1)).view_as(chunk_target)
            cand.edge_target = torch.cat([ring("edge_slot").long(), chunk_target], dim=1)
            cand.edge_pos = torch.cat([ring("edge_pos"), torch.where(chunk_target >= 0, chunk_target_pos, -1)], dim=1)
            cand.edge_w = torch.cat([ring("edge_w"), res.edge_w.transpose(0, 1)], dim=1)
        return cand

    def _keep_mask(self, cand: PrefillCandidates, priority: torch.Tensor, budget: int) -> torch.Tensor:
        """[H, n] True for the `budget` candidates that stay: sinks and window first, then by priority."""
        if cand.pos.shape[1] <= budget:
            return torch.ones_like(cand.pos, dtype=torch.bool)
        protected = cand.protected(self.policy.n_sink, self.policy.window)
        ranked = priority.float().masked_fill(protected, float("inf"))
        # topk of budget out of budget + chunk; which equal priorities win does not matter for correctness,
        # and topk is deterministic for the same input, so a request's result never depends on its batch.
        order = ranked.topk(budget, dim=1, sorted=False).indices
        return torch.zeros_like(protected).scatter_(1, order, True)

    @staticmethod
    def _write_rope_pos(pool: PoolLayer, seg, ring_rows, rows, hs, cand, keep) -> None:
        """The kept tokens' RoPE positions: their text positions, or under positions="ring" their ranks
        among the kept (one sort per chunk; decode then keeps the ranks up to date in O(ring))."""
        f = seg.filled
        if not seg.ring_positions:
            pool.rows("rope_pos")[rows, hs] = cand.pos[:, f:]
            return
        n = cand.pos.shape[1]
        key = torch.where(keep, cand.pos.long(), torch.iinfo(torch.int64).max)  # dropped ones rank last
        order = key.argsort(dim=1, stable=True)
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(n, device=order.device).expand_as(order))
        if f:  # ring slots first: a dropped one is rewritten below by the chunk token taking it
            pool.rows("rope_pos")[ring_rows] = rank[:, :f].transpose(0, 1).to(torch.int32)
        pool.rows("rope_pos")[rows, hs] = rank[:, f:].to(torch.int32)

    def _write_chunk(self, pool: PoolLayer, seg, ring_rows, k, v, cand, scores, keep, res, held) -> None:
        """Kept chunk tokens take the dropped ring slots and the empty ones, lowest slot first. `held` [H, n]
        (EvictionSpec.hold, else None): the new marks of every candidate, the ring's own included."""
        f, budget = seg.filled, seg.ring_size
        num_kv_heads, device = k.shape[1], k.device
        if f:
            pool.rows("score")[ring_rows] = scores[:, :f].transpose(0, 1)
            if held is not None:  # a dropped slot's mark is rewritten below with the chunk token taking it
                pool.rows("held")[ring_rows] = held[:, :f].transpose(0, 1).to(torch.int8)
        chunk_keep = keep[:, f:]
        free = torch.cat([~keep[:, :f], torch.ones(num_kv_heads, budget - f, dtype=torch.bool, device=device)], 1)
        free_slots = torch.sort((~free).to(torch.int8), dim=1, stable=True).indices  # free slots first, ascending
        rank = (chunk_keep.long().cumsum(1) - 1).clamp(min=0)
        chunk_slot = torch.where(chunk_keep, free_slots.gather(1, rank), torch.full_like(rank, -1))  # [H, C]
        # Heads keep different numbers of chunk tokens, so every (head, token) pair is written, the dropped
        # ones into the pool's scratch block: static shapes, no nonzero, no host synchronisation.
        hs = torch.arange(num_kv_heads, device=device)[:, None].expand_as(chunk_slot)
        rows = torch.where(chunk_keep, physical_rows(seg.table, chunk_slot.clamp(min=0), pool.block_size),
                           self.pool.scratch_block * pool.block_size)
        pool.rows("k")[rows, hs] = k.transpose(0, 1).to(pool.k.dtype)
        pool.rows("v")[rows, hs] = v.transpose(0, 1).to(pool.v.dtype)
        pool.rows("pos")[rows, hs] = cand.pos[:, f:]
        if pool.rope_pos is not None:
            self._write_rope_pos(pool, seg, ring_rows, rows, hs, cand, keep)
        pool.rows("score")[rows, hs] = scores[:, f:].float()
        if held is not None:
            pool.rows("held")[rows, hs] = held[:, f:].to(torch.int8)
        if self.policy.top_m:
            new_slot = torch.cat([torch.where(keep[:, :f], torch.arange(f, device=device).expand(num_kv_heads, -1),
                                              torch.full((num_kv_heads, f), -1, device=device)), chunk_slot], 1)
            target_idx = res.edge_idx.transpose(0, 1).long()  # [H, C, M] candidate indices
            flat = target_idx.clamp(min=0).reshape(num_kv_heads, -1)
            target_slot = torch.where(target_idx >= 0, new_slot.gather(1, flat).view_as(target_idx), -1)
            target_pos = torch.where(target_slot >= 0, cand.pos.gather(1, flat).view_as(target_idx), -1)
            pool.rows("edge_slot")[rows, hs] = target_slot.to(torch.int32)
            pool.rows("edge_pos")[rows, hs] = target_pos.to(torch.int32)
            pool.rows("edge_w")[rows, hs] = res.edge_w.transpose(0, 1)

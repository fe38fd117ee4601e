"""The attention call point: every layer's attention goes through `RingAttention.forward`.

A step's flat batch holds the decode tokens first (one per decoding request), then the prefill chunks.
Decodes go to the fused kernel in one launch per layer (attend, score, pick a victim, write the token); on
the CPU's reference backend its bookkeeping waits for the end of the forward (kernels.reference.
DeferredDecode). Each prefill chunk attends its ring plus itself; then, for all chunks at once, the keep step
(minikv.prefill_keep) keeps `budget` of ring + chunk and writes the kept chunk tokens into the ring. Every
read and write of a ring goes through its block table (minikv.block_pool): ring slot j is pool row
`table[j // block_size] * block_size + j % block_size`, and the ring math never sees anything but j.

q and k arrive before RoPE, each head's channels in RoPE's paired order (loader.to_paired_order), and K is
stored so: the kernels rotate every key as they load it, to the position its slot takes under the request's
position mode (kernels.common.Rope): its text position ("original"), or its rank among the ring's kept
tokens ("ring", where the query takes the next rank, so no distance the model sees exceeds the ring).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import kernels
from .block_pool import KVPool
from .kernels import reference
from .policies import Policy
from .prefill_keep import KeepStep


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
    archive: object | None = None  # minikv.archive.ArchiveMessage: the other ranks' share of the archives' work


class RingAttention:
    def __init__(self, pool: KVPool, policy: Policy, *, scale: float, seed: int, num_slots: int, max_budget: int):
        self.pool, self.policy, self.scale, self.seed = pool, policy, scale, seed
        self.spec = policy.eviction_spec()
        self.plan = StepPlan()
        hooks = (type(policy).after_decode is not Policy.after_decode
                 or type(policy).new_token_scores is not Policy.new_token_scores)
        self._deferrable = reference.DeferredDecode.applies(self.spec, hooks)  # policies that score per layer opt out
        self._deferred = reference.DeferredDecode(self.spec, seed)
        self._keep = KeepStep(policy, seed, scratch_row=pool.scratch_block * pool.block_size)
        self._rope: kernels.Rope | None = None  # made from the first inv_freq the model passes
        # Most KV slots one request has held at once (ring + the chunk in flight): the memory bound.
        self.peak_slots_per_seq = 0
        self.archive = None  # minikv.archive.ArchiveStore: write-through KV archive and recall (None: off)
        policy.bind(pool, num_slots=num_slots, max_budget=max_budget)

    def begin_step(self, plan: StepPlan) -> None:
        """Set the step's plan; a prefill from position 0 means its slot holds a new request."""
        self.plan = plan
        self._deferred.begin()
        device = plan.prefills[0].table.device if plan.prefills else None
        self._keep.begin(plan.prefills, device, self.pool.block_size)
        for seg in plan.prefills:
            self.peak_slots_per_seq = max(self.peak_slots_per_seq, seg.filled + seg.length)
            if seg.first_pos == 0:
                self.policy.reset_ring(seg.slot)

    def end_step(self, hidden_states: list[torch.Tensor] | None = None) -> None:
        """After the forward: the deferred decode bookkeeping of every layer at once, then the policies that
        score from the whole forward (epikv) fix their scores."""
        self._deferred.flush(self.pool.all_layers(), self.plan, num_blocks=self.pool.num_blocks + 1,
                             q_pos=self._decode_rope_pos())
        if self.archive is not None:
            self.archive.end_step(self._rope)
        self.policy.end_step(self.pool, self.plan, hidden_states)

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                inv_freq: torch.Tensor | None = None) -> torch.Tensor:
        """q [T, Hq, D], k / v [T, Hkv, D] of the step's flat batch, before RoPE: the kernels rotate them
        with the model's frequencies `inv_freq` [D/2] (None: q and k are used as they are)."""
        plan, pool = self.plan, self.pool.layer(layer)
        self._set_rope(inv_freq)
        if self.archive is not None:  # recall into the rings due, stage the step's K/V for the archive
            self.archive.on_layer(layer, q, k, v, plan, self)
        out = torch.empty_like(q)
        nd = plan.num_decode
        if nd and self._defers(q):
            out[:nd] = self._deferred.attend(layer, q[:nd], k[:nd], v[:nd], pool, plan, scale=self.scale,
                                             rope=self._rope, q_pos=self._decode_rope_pos())
        elif nd:
            new_score = self.policy.new_token_scores(layer, plan.decode_slots, plan.decode_pos, k[:nd])
            out[:nd], written = kernels.attend_score_sample(
                q[:nd], k[:nd], v[:nd], pool, plan.decode_tables, plan.decode_filled, plan.decode_budget,
                plan.decode_pos, self.spec, layer=layer, seed=self.seed, scale=self.scale, new_score=new_score,
                rope=self._rope, q_pos=self._decode_rope_pos(), ring=plan.decode_ring)
            self.policy.after_decode(layer, pool, plan, written)
        if plan.prefills:
            results = [self._prefill_attention(pool, seg, q, k, v) for seg in plan.prefills]
            for seg, res in zip(plan.prefills, results):
                out[seg.start:seg.start + seg.length] = res.out
            self._keep.run(layer, pool, plan.prefills, k, v, results)
            for seg in plan.prefills:
                self.policy.after_prefill_chunk(layer, pool, seg)
        return out

    def _prefill_attention(self, pool, seg: PrefillSegment, q, k, v) -> reference.PrefillResult:
        """One chunk attends its ring's `filled` slots and itself (a kernel launch per segment)."""
        span = slice(seg.start, seg.start + seg.length)
        chunk_pos = torch.arange(seg.first_pos, seg.first_pos + seg.length, dtype=torch.int32, device=q.device)
        # under positions="ring" the ring holds ranks 0..f-1 and the chunk follows them
        rope_pos = chunk_pos - (seg.first_pos - seg.filled) if seg.ring_positions else chunk_pos
        return kernels.prefill_attention(
            q[span], k[span], v[span], pool, seg.table, seg.filled, chunk_pos, scale=self.scale,
            n_sink=self.policy.n_sink, top_m=self.policy.top_m, obs_rows=min(self.policy.obs_rows, seg.length),
            rope=self._rope, rope_pos=rope_pos)

    def _set_rope(self, inv_freq: torch.Tensor | None) -> None:
        if inv_freq is None:
            self._rope = None
        elif self._rope is None or self._rope.source is not inv_freq:  # a cast model has a new buffer
            self._rope = kernels.Rope(inv_freq)

    def _decode_rope_pos(self) -> torch.Tensor:
        plan = self.plan
        return plan.decode_pos if plan.decode_rope_pos is None else plan.decode_rope_pos

    def _defers(self, q: torch.Tensor) -> bool:
        return self._deferrable and kernels.kernel_backend(q.device) == "reference"

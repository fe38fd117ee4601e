"""The prefill keep step: after a chunk attends its ring, `budget` of ring + chunk stay.

For every prefill segment of a step, at every layer: the policy ranks the ring's f slots and the chunk's C
tokens (the candidates), sinks and the recent window are kept first, then the highest priorities up to
the ring's budget; kept chunk tokens are written into the dropped ring slots and the empty ones, lowest
slot first, with their positions, scores, edges, held marks and (positions="ring") ranks.

The tensor work runs once per layer for all of the step's segments (varlen): segment s's candidates lie in
row s of a padded [S, H, n_max] layout, its f_s ring slots first then its C_s chunk tokens, then padding;
the index tensors that map that layout to pool rows and to the step's flat batch depend only on the plan,
so `KeepStep.begin` builds them once per step and every layer reuses them. Only the policy's scoring runs
per segment (`prefill_scores`, `prefill_held` take one ring's `PrefillCandidates`, cut from its row).

Which candidates stay when priorities tie: the lower candidate index (ring slots before chunk tokens, then
in order), so a ring keeps the same tokens whatever batch it runs in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .kernels.common import PoolLayer, physical_rows
from .kernels.reference import PrefillResult
from .policies import Policy, PrefillCandidates


@dataclass
class _Layout:
    """Where each entry of the padded layout comes from; built once per step from the plan.

    [S, n_max] tensors index the candidate axis (column c of segment s: ring slot c if c < f_s, chunk
    token c - f_s if c < f_s + C_s, padding after); [S, C_max] ones the chunk axis (token c' of segment s).
    Padding entries point at something valid (clamped indices, the scratch row) and are masked.
    """

    filled: list[int]  # f_s
    lengths: list[int]  # C_s
    budgets: list[int]  # each segment's ring size
    obs_rows: list[int]  # observation rows of each segment: min(policy.obs_rows, C_s)
    filled_t: torch.Tensor  # [S] the same three on the device
    budget_t: torch.Tensor
    over: torch.Tensor  # [S] bool: f_s + C_s > budget, a keep decision to make
    col: torch.Tensor  # [1, n_max] candidate index
    is_ring: torch.Tensor  # [S, n_max]
    is_chunk: torch.Tensor  # [S, n_max]
    valid: torch.Tensor  # [S, n_max] is_ring | is_chunk
    ring_rows: torch.Tensor  # [S, n_max] pool row of a ring candidate; the scratch row elsewhere
    chunk_pos: torch.Tensor  # [S, n_max] int32: position of a chunk candidate
    token: torch.Tensor  # [S, n_max] flat-batch row of a chunk candidate
    token_chunk: torch.Tensor  # [S, n_max] the same candidate in the segments' chunk axes concatenated
    cand_index: torch.Tensor  # [S, n_max] the candidate in the segments' candidate axes concatenated
    obs_index: torch.Tensor  # [S, R_max, n_max] an observation entry in the segments' obs flattened
    chunk_valid: torch.Tensor  # [S, C_max] c' < C_s
    chunk_col: torch.Tensor  # [S, C_max] candidate column f_s + c' of chunk token c'
    chunk_token: torch.Tensor  # [S, C_max] its flat-batch row
    chunk_index: torch.Tensor  # [S, C_max] its row in the segments' chunk axes concatenated
    tables: torch.Tensor  # [S, W] block tables
    last_pos: torch.Tensor  # [S] position of each chunk's last token
    ring_positions: torch.Tensor  # [S] bool: positions="ring"
    scratch_row: int
    num_slots: int  # the largest budget: the slot axis of the free-slot search


class KeepStep:
    """The keep step of every prefill segment of a step, one batched pass per layer (see module doc)."""

    def __init__(self, policy: Policy, seed: int, scratch_row: int):
        self.policy, self.seed, self.scratch_row = policy, seed, scratch_row
        self.spec = policy.eviction_spec()
        self._layout: _Layout | None = None

    def begin(self, segments: list, device: torch.device, block_size: int) -> None:
        """Index the step's segments (a list of attention.PrefillSegment); none: nothing to do."""
        self._layout = (_make_layout(segments, device, block_size, self.scratch_row, self.policy.obs_rows)
                        if segments else None)

    def run(self, layer: int, pool: PoolLayer, segments: list, k: torch.Tensor, v: torch.Tensor,
            results: list[PrefillResult]) -> None:
        """Keep `budget` of ring + chunk for every segment at `layer`. k / v [T, H, D]: the step's flat
        batch; results: each segment's prefill attention (mass, edges, observation rows)."""
        lay = self._layout
        batch = self._candidates(layer, pool, lay, segments, k, v, results)
        scores, priority, held = self._score(layer, lay, segments, batch)
        keep = self._keep_mask(lay, batch, priority)
        self.archive_dropped(layer, lay, segments, batch, keep)
        self._write(pool, lay, k, v, batch, scores, keep, held)

    def archive_dropped(self, layer: int, lay: _Layout, segments: list, batch: dict, keep: torch.Tensor) -> None:
        """The one place where the dropped candidates are known, before the writes overwrite their slots:
        `~keep & lay.valid[:, None]` [S, H, n_max] marks them; batch["keys"] holds their K (unrotated, as
        the pool stores it), batch["pos"] their positions, batch["values"] their V when the policy asked
        for values (else: the pool rows lay.ring_rows for ring slots, the flat batch rows lay.token for
        chunk tokens). Row s is the ring of segments[s].slot. Nothing is kept of them today: a KV archive
        hooks in here."""

    # --- candidates: the ring's f slots and the chunk's C tokens, per segment and KV head --------------
    def _candidates(self, layer, pool: PoolLayer, lay: _Layout, segments, k, v, results) -> dict:
        """Padded [S, H, n_max(, ...)] candidate tensors, named like PrefillCandidates' fields."""
        def gather(name: str, chunk: torch.Tensor | None) -> torch.Tensor:
            """A pool field on the candidate axis: ring slots from the pool, chunk tokens from `chunk`."""
            ring = pool.rows(name)[lay.ring_rows]  # [S, n_max, H, ...]
            if chunk is not None:
                mask = lay.is_ring.view(*lay.is_ring.shape, *([1] * (ring.dim() - 2)))
                ring = torch.where(mask, ring, chunk.to(ring.dtype)[lay.token])
            return ring.transpose(1, 2)  # [S, H, n_max, ...]

        num_heads = k.shape[1]
        batch = {"pos": gather("pos", None), "keys": gather("k", k),
                 "ring_score": gather("score", None)}
        # chunk positions: first_pos + c'; written where the candidate is a chunk token
        batch["pos"] = torch.where(lay.is_chunk[:, None], lay.chunk_pos[:, None], batch["pos"])
        batch["mass"] = _pad_candidates([r.mass for r in results], lay, num_heads)
        if self.policy.needs_values:
            batch["values"] = gather("v", v)
        if results[0].obs is not None:
            batch["obs"] = _pad_obs([r.obs for r in results], lay, num_heads)
        if self.policy.top_m:
            # Edges on the candidate axis, in the ring's own form (target, target's position when made); a
            # ring slot keeps its index there, and nexus_walk drops the edges whose target has changed.
            chunk_edges = torch.cat([r.edge_idx for r in results])  # [sum C, H, M]
            chunk_w = torch.cat([r.edge_w for r in results])
            batch["chunk_edge_idx"] = chunk_edges[lay.chunk_index].transpose(1, 2).long()  # [S, H, C_max, M]
            batch["chunk_edge_w"] = chunk_w[lay.chunk_index].transpose(1, 2)
            target = chunk_edges.long()[lay.token_chunk].transpose(1, 2)  # [S, H, n_max, M]: chunk rows
            target_pos = batch["pos"].gather(2, target.clamp(min=0).reshape(*target.shape[:2], -1)).view_as(target)
            is_ring = lay.is_ring[:, None, :, None]
            batch["edge_target"] = torch.where(is_ring, gather("edge_slot", None).long(), target)
            batch["edge_pos"] = torch.where(is_ring, gather("edge_pos", None),
                                            torch.where(target >= 0, target_pos, -1).to(torch.int32))
            batch["edge_w"] = torch.where(is_ring, gather("edge_w", None), chunk_w[lay.token_chunk].transpose(1, 2))
        return batch

    def _view(self, layer: int, lay: _Layout, seg, s: int, batch: dict) -> PrefillCandidates:
        """Segment s's candidates: row s of the padded tensors, cut to its n_s = f_s + C_s candidates."""
        f, n = lay.filled[s], lay.filled[s] + lay.lengths[s]
        part = lambda name: batch[name][s, :, :n].contiguous() if name in batch else None  # noqa: E731
        obs = batch.get("obs")
        return PrefillCandidates(
            layer=layer, seed=self.seed, filled=f, budget=seg.ring_size, pos=part("pos"), keys=part("keys"),
            mass=part("mass"), ring_score=batch["ring_score"][s, :, :f].contiguous(),
            obs=None if obs is None else obs[s, :, :lay.obs_rows[s], :n].contiguous(), ring=seg.slot,
            ends_prompt=seg.ends_prompt, values=part("values"), edge_target=part("edge_target"),
            edge_pos=part("edge_pos"), edge_w=part("edge_w"))

    def _score(self, layer, lay: _Layout, segments, batch: dict):
        """The policy's scores and priorities (and held marks under EvictionSpec.hold), padded back to
        [S, H, n_max]."""
        parts = [self._score_segment(layer, lay, seg, s, batch) for s, seg in enumerate(segments)]
        num_heads = batch["pos"].shape[1]
        pad = lambda i: _pad_candidates([p[i] for p in parts], lay, num_heads)  # noqa: E731
        return pad(0), pad(1), (pad(2) if self.spec.hold else None)

    def _score_segment(self, layer, lay: _Layout, seg, s: int, batch: dict):
        """One ring's policy calls, on its own candidates (policies keep per-ring state, and their float
        reductions must see the same contiguous tensors whatever the batch)."""
        cand = self._view(layer, lay, seg, s, batch)
        scores, priority = self.policy.prefill_scores(cand)
        return scores, priority, (self.policy.prefill_held(cand, priority) if self.spec.hold else None)

    def _keep_mask(self, lay: _Layout, batch: dict, priority: torch.Tensor) -> torch.Tensor:
        """[S, H, n_max] True for the candidates that stay: all of them in a segment within its budget,
        else sinks and window first, then by priority, `budget` of them."""
        over = [f + c > b for f, c, b in zip(lay.filled, lay.lengths, lay.budgets)]
        valid = lay.valid[:, None].expand_as(priority)
        if not any(over):
            return valid.clone()
        pos = batch["pos"]
        protected = (pos < self.policy.n_sink) | (pos > lay.last_pos[:, None, None] - self.policy.window)
        ranked = priority.float().masked_fill(protected, float("inf")).masked_fill(~valid, float("-inf"))
        # One stable sort for every segment, whatever its budget: equal priorities go to the lower candidate
        # index, so what a ring keeps depends on its own candidates only, never on the batch's padding.
        order = ranked.sort(dim=2, descending=True, stable=True).indices
        take = torch.arange(order.shape[2], device=pos.device) < lay.budget_t[:, None, None]
        kept = torch.zeros_like(valid).scatter_(2, order, take.expand_as(order))
        return torch.where(lay.over[:, None, None], kept, valid)

    # --- writes: kept chunk tokens take the dropped ring slots and the empty ones, lowest slot first ---
    def _write(self, pool: PoolLayer, lay: _Layout, k, v, batch, scores, keep, held) -> None:
        """`held` [S, H, n_max] (EvictionSpec.hold, else None): the new marks of every candidate, the ring's
        own included. Writes that must go nowhere go to the pool's scratch row: static shapes, no nonzero,
        no host synchronisation."""
        num_heads = k.shape[1]
        device = k.device
        # ring slots first: a dropped one is rewritten below by the chunk token taking it
        pool.rows("score")[lay.ring_rows] = scores.transpose(1, 2)
        if held is not None:
            pool.rows("held")[lay.ring_rows] = held.transpose(1, 2).to(torch.int8)
        slot = torch.arange(lay.num_slots, device=device)
        ring_keep = keep.gather(2, slot.clamp(max=keep.shape[2] - 1).expand(*keep.shape[:2], -1))  # slot j < f_s
        filled = lay.filled_t[:, None, None]
        free = ((slot < filled) & ~ring_keep) | ((slot >= filled) & (slot < lay.budget_t[:, None, None]))
        free_slots = torch.sort((~free).to(torch.int8), dim=2, stable=True).indices  # free slots first, ascending
        chunk_keep = keep.gather(2, lay.chunk_col[:, None].expand(-1, num_heads, -1)) & lay.chunk_valid[:, None]
        rank = (chunk_keep.long().cumsum(2) - 1).clamp(min=0)
        chunk_slot = torch.where(chunk_keep, free_slots.gather(2, rank), torch.full_like(rank, -1))  # [S, H, C]
        s_count, c_max = chunk_slot.shape[0], chunk_slot.shape[2]
        table_rows = physical_rows(lay.tables, chunk_slot.clamp(min=0).reshape(s_count, -1), pool.block_size)
        rows = torch.where(chunk_keep, table_rows.view_as(chunk_slot), lay.scratch_row)  # [S, H, C]
        hs = torch.arange(num_heads, device=device)[None, :, None].expand_as(rows)
        token = lay.chunk_token[:, None].expand_as(rows)
        pool.rows("k")[rows, hs] = k.to(pool.k.dtype)[token, hs]
        pool.rows("v")[rows, hs] = v.to(pool.v.dtype)[token, hs]
        chunk_pos = batch["pos"].gather(2, lay.chunk_col[:, None].expand(-1, num_heads, -1))
        pool.rows("pos")[rows, hs] = chunk_pos
        if pool.rope_pos is not None:
            self._write_rope_pos(pool, lay, rows, hs, batch, keep, chunk_pos)
        pool.rows("score")[rows, hs] = _chunk_part(scores, lay).float()
        if held is not None:
            pool.rows("held")[rows, hs] = _chunk_part(held, lay).to(torch.int8)
        if self.policy.top_m:
            cols = lay.col.expand(s_count, -1)[:, None].expand(-1, num_heads, -1)  # [S, H, n_max]
            chunk_at = (cols - filled).clamp(0, c_max - 1)
            new_slot = torch.where(lay.is_ring[:, None], torch.where(keep, cols, -1), chunk_slot.gather(2, chunk_at))
            target_idx = batch["chunk_edge_idx"]  # [S, H, C, M] candidate indices
            flat = target_idx.clamp(min=0).reshape(s_count, num_heads, -1)
            target_slot = torch.where(target_idx >= 0, new_slot.gather(2, flat).view_as(target_idx), -1)
            target_pos = torch.where(target_slot >= 0, batch["pos"].gather(2, flat).view_as(target_idx), -1)
            pool.rows("edge_slot")[rows, hs] = target_slot.to(torch.int32)
            pool.rows("edge_pos")[rows, hs] = target_pos.to(torch.int32)
            pool.rows("edge_w")[rows, hs] = batch["chunk_edge_w"]

    @staticmethod
    def _write_rope_pos(pool: PoolLayer, lay: _Layout, rows, hs, batch, keep, chunk_pos) -> None:
        """The kept tokens' RoPE positions: their text positions, or under positions="ring" their ranks
        among the kept (one sort per chunk; decode then keeps the ranks up to date in O(ring))."""
        n_max = keep.shape[2]
        key = torch.where(keep, batch["pos"].long(), torch.iinfo(torch.int64).max)  # dropped ones rank last
        order = key.argsort(dim=2, stable=True)
        rank = torch.empty_like(order).scatter_(2, order, torch.arange(n_max, device=order.device).expand_as(order))
        ring_rows = torch.where(lay.ring_positions[:, None], lay.ring_rows, lay.scratch_row)
        pool.rows("rope_pos")[ring_rows] = rank.transpose(1, 2).to(torch.int32)
        chunk = torch.where(lay.ring_positions[:, None, None], _chunk_part(rank, lay), chunk_pos.long())
        pool.rows("rope_pos")[rows, hs] = chunk.to(torch.int32)


def _chunk_part(x: torch.Tensor, lay: _Layout) -> torch.Tensor:
    """[S, H, n_max] candidate tensor -> [S, H, C_max] chunk tokens."""
    return x.gather(2, lay.chunk_col[:, None].expand(-1, x.shape[1], -1))


def _pad_candidates(parts: list[torch.Tensor], lay: _Layout, num_heads: int) -> torch.Tensor:
    """Per-segment [H, n_s] tensors -> [S, H, n_max] (padding: the first element, masked by lay.valid)."""
    return torch.cat(parts, dim=1)[:, lay.cand_index].transpose(0, 1)


def _pad_obs(parts: list[torch.Tensor], lay: _Layout, num_heads: int) -> torch.Tensor:
    """Per-segment [H, R_s, n_s] observation rows -> [S, H, R_max, n_max]."""
    flat = torch.cat([p.reshape(num_heads, -1) for p in parts], dim=1)
    return flat[:, lay.obs_index].transpose(0, 1)


def _make_layout(segments: list, device: torch.device, block_size: int, scratch_row: int,
                 obs_rows: int) -> _Layout:
    """The step's index tensors (see _Layout), built from the segments' host-side sizes in a fixed number
    of operations whatever their count."""
    i64 = dict(dtype=torch.long, device=device)
    filled = [seg.filled for seg in segments]
    lengths = [seg.length for seg in segments]
    budgets = [seg.ring_size for seg in segments]
    n = [f + c for f, c in zip(filled, lengths)]
    rows = [min(obs_rows, c) for c in lengths]
    n_max, c_max = max(n), max(lengths)
    cand_start = [sum(n[:i]) for i in range(len(n))]
    chunk_start = [sum(lengths[:i]) for i in range(len(n))]
    obs_start = [sum(r * m for r, m in zip(rows[:i], n[:i])) for i in range(len(n))]
    info = torch.tensor([[f, c, seg.start, seg.first_pos, b, seg.ring_positions, f + c > b, m, cs, hs, r, os]
                         for f, c, seg, b, m, cs, hs, r, os
                         in zip(filled, lengths, segments, budgets, n, cand_start, chunk_start, rows, obs_start)],
                        **i64)[:, :, None]
    f_t, c_t, start, first_pos, budget_t = info[:, 0], info[:, 1], info[:, 2], info[:, 3], info[:, 4]
    n_t, cand_t, chunk_t, rows_t, obs_t = info[:, 7], info[:, 8], info[:, 9], info[:, 10], info[:, 11]
    col = torch.arange(n_max, **i64)[None]
    is_ring, is_chunk = col < f_t, (col >= f_t) & (col < n_t)
    in_chunk = (col - f_t).clamp(min=0).minimum(c_t - 1)  # a candidate's chunk offset, clamped
    tables = torch.nn.utils.rnn.pad_sequence([seg.table for seg in segments], batch_first=True)
    ring_slot = col.minimum((f_t - 1).clamp(min=0))
    c_col = torch.arange(c_max, **i64)[None]
    c_in = c_col.minimum(c_t - 1)
    r_col = torch.arange(max(rows), **i64)[None, :, None]
    return _Layout(
        filled=filled, lengths=lengths, budgets=budgets, obs_rows=rows, filled_t=f_t[:, 0],
        budget_t=budget_t[:, 0], over=info[:, 6, 0].bool(), col=col, is_ring=is_ring, is_chunk=is_chunk,
        valid=is_ring | is_chunk, ring_rows=torch.where(is_ring, physical_rows(tables, ring_slot, block_size),
                                                        scratch_row),
        chunk_pos=(first_pos + (col - f_t)).to(torch.int32), token=start + in_chunk, token_chunk=chunk_t + in_chunk,
        cand_index=cand_t + col.minimum(n_t - 1),
        obs_index=(obs_t[:, :, None] + r_col.minimum((rows_t[:, :, None] - 1).clamp(min=0)) * n_t[:, :, None]
                   + col[:, None].minimum(n_t[:, :, None] - 1)),
        chunk_valid=c_col < c_t, chunk_col=f_t + c_in, chunk_token=start + c_in, chunk_index=chunk_t + c_in,
        tables=tables, last_pos=(first_pos + c_t - 1)[:, 0], ring_positions=info[:, 5, 0].bool(),
        scratch_row=scratch_row, num_slots=max(budgets))

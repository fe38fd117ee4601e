"""The torch reference of minikv's kernels: readable, fp32, vectorised over the batch. This file is the contract.

The Triton kernels must produce the same outputs, the same scores and the same victims on the same
inputs; tests compare them. On CPU the engine runs these functions directly, so they are also the CPU
hot path: every step is a fixed, small number of batched torch ops (no Python loop over tokens or edges,
no per-sequence host reads), except the decode attention, which reads each ring in place in a short loop
over the batch's rings (cpu_decode) instead of gathering them; `decode_attend` keeps the gathered form as
the plain statement of what it computes.

The KV store is one block pool per layer (`common.PoolLayer`, docs/design.md section 2). A sequence's ring is its
block table: ring slot j lives at pool row `table[j // block_size] * block_size + j % block_size`, for
every KV head. Everything below works on ring slot indices (filled counts, victims, edges, ties); only
the gather at the start and the writes at the end go through the table.

Shapes: N sequences in a decode batch, Hq query heads, Hkv KV heads (G = Hq / Hkv query heads share one
KV head), W entries per block table, D = head_dim, C = tokens in a prefill chunk, M = edges per slot,
F = the widest ring filled in the batch (the padded width).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .common import (
    SCORE_ATTN,
    SCORE_NONE,
    SCORE_EXTERNAL,
    SCORE_KEYDIFF,
    VICTIM_MIN_SCORE,
    VICTIM_OLDEST,
    VICTIM_RESERVOIR,
    EvictionSpec,
    PoolLayer,
    Rope,
    physical_rows,
    slot_uniform,
)
from .cpu_decode import attend_in_place, ring_pieces

# ---------------------------------------------------------------------------------------------------
# Decode: attend, score, sample (docs/design.md, section 3)
# ---------------------------------------------------------------------------------------------------


def attend_score_sample(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    pool: PoolLayer,
    block_tables: torch.Tensor,
    filled: torch.Tensor,
    budget: torch.Tensor,
    new_pos: torch.Tensor,
    spec: EvictionSpec,
    *,
    layer: int,
    seed: int,
    scale: float,
    new_score: torch.Tensor | None = None,
    rope: Rope | None = None,
    q_pos: torch.Tensor | None = None,
    ring: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step of one layer for a batch of sequences, each with its own ring in the block pool.

    q [N, Hq, D], k_new / v_new [N, Hkv, D]: before RoPE when `rope` is given (the pool's keys are then
    unrotated too, and every key is rotated as it is loaded, to its slot's pool.rope_pos); rope None: q and
    every key are used as they are (already rotated, or no RoPE).
    block_tables [N, W] int32: row i is sequence i's block table (entries past what the ring needs may be
        anything, e.g. a scratch block id; they are never read).
    filled [N] int32: ring slots filled before this step; budget [N] int32: the sequence's ring size (the
        ring is full when filled == budget; budget <= W * block_size); new_pos [N] int32: the new token's
        position. When filled < budget the block holding ring slot `filled` must exist in the table.
    new_score [N, Hkv]: the new token's score under SCORE_EXTERNAL (0 when None).
    q_pos [N] int32: the RoPE position of the query and the new token (None: new_pos).
    ring [N] bool: the sequences under positions="ring" (None: none). Their slots' rope_pos are ranks: when
        a full ring evicts, the ranks above the victim's drop by one and the new token takes the last rank
        (q_pos - 1); otherwise the new token's rope_pos is q_pos.

    For each (sequence, KV head):
      1. the group's query heads attend the filled slots plus the new token;
      2. a(j): the probability each slot received, averaged over the group;
      3. the policy's score update (EvictionSpec.score_mode), written back;
      4. the ring slot for the new token: `filled` while the ring has room, else the victim among
         unprotected slots (ties -> lowest ring slot; under spec.hold a slot marked in pool.held only when
         no unmarked one is left); its K, V, pos, score and out-edges (top-m by a(j), taken before the
         write) are written there, and under spec.hold its mark is cleared.
    Pool rows outside the batch's filled slots and the new tokens' slots are never written, and pool
    content at ring slots >= filled is never trusted (it may be anything, NaN included).

    Returns the attention output [N, Hq, D] (q's dtype) and `written` [N, Hkv] int32: the ring slot index
    the new token went to.
    """
    num_kv_heads = k_new.shape[1]
    if q.shape[0] == 0:
        return torch.empty_like(q), torch.empty(0, num_kv_heads, dtype=torch.int32, device=q.device)
    index = decode_index(block_tables, filled, budget, pool.block_size, num_kv_heads)
    out, attn, keys = decode_attend(q, k_new, v_new, pool, index, scale=scale,
                                    keep_keys=spec.score_mode == SCORE_KEYDIFF, rope=rope, q_pos=q_pos)
    written = decode_update(pool, index, attn, k_new, v_new, new_pos, spec, layer=layer, seed=seed,
                            new_score=new_score, keys=keys, q_pos=q_pos, ring=ring)
    return out, written


class DecodeIndex(NamedTuple):
    """Where a decode batch's rings live in the pool, computed once per step and shared by every layer.

    width: the widest ring filled (F); ragged: some ring is narrower (only then are padding lanes masked);
    any_full: some ring is full (only then are victims drawn). cells [R, Hkv, F + 1] index the pool
    flattened to [cells, ...]; lane F is the new token's (it reads ring slot 0, whose block exists for every
    running sequence, and is never trusted), like every padding lane (slot >= filled). pieces: where each
    ring's slots lie as runs of pool rows (cpu_decode.ring_pieces), when decode_attend reads the rings in
    place instead of gathering them (None: it gathers).
    """

    width: int
    ragged: bool
    any_full: bool
    cells: torch.Tensor
    valid: torch.Tensor | None  # [R, F]: lane < filled, when ragged
    lane_ok: torch.Tensor | None  # [R, 1, F + 1]: valid plus the new token's lane, when ragged
    block_tables: torch.Tensor  # [R, W]
    filled: torch.Tensor  # [R]
    budget: torch.Tensor  # [R]
    pieces: tuple | None = None

    def for_layers(self, num_layers: int, blocks_per_layer: int, num_kv_heads: int, block_size: int) -> "DecodeIndex":
        """The same rings in every layer of a pool viewed as one layer (`KVPool.all_layers`): layer l's
        rows come l * blocks_per_layer blocks further. Rows are layer-major: [layer 0's N, layer 1's N, ...]."""
        layer = torch.arange(num_layers, device=self.cells.device)
        repeat = lambda t: None if t is None else t.repeat(num_layers, *([1] * (t.dim() - 1)))  # noqa: E731
        cells = (self.cells[None] + (layer * blocks_per_layer * block_size * num_kv_heads)[:, None, None, None])
        tables = self.block_tables[None] + (layer * blocks_per_layer)[:, None, None].to(self.block_tables.dtype)
        return DecodeIndex(self.width, self.ragged, self.any_full, cells.flatten(0, 1), repeat(self.valid),
                           repeat(self.lane_ok), tables.flatten(0, 1), repeat(self.filled), repeat(self.budget))


def decode_index(block_tables: torch.Tensor, filled: torch.Tensor, budget: torch.Tensor, block_size: int,
                 num_kv_heads: int, *, in_place: bool = True) -> DecodeIndex:
    """The rings of a decode batch as pool cells (see DecodeIndex); `in_place`: decode_attend reads the
    rings where they lie (cpu_decode) rather than gathering them."""
    # The step's one host read (three scalars at once): the padded width, whether rings are ragged and
    # whether any ring is full. On the CPU hot path this is a plain memory read; on CUDA Triton runs instead.
    width, narrowest, any_full = torch.stack([filled.max(), filled.min(), (filled >= budget).any()]).tolist()
    ragged = narrowest < width
    device = filled.device
    lanes = torch.arange(width + 1, device=device)
    valid = lanes[:width] < filled[:, None] if ragged else None  # [N, F]
    slots = torch.where(lanes < filled[:, None], lanes, 0)  # [N, F + 1]; the new token's lane too
    rows = physical_rows(block_tables, slots, block_size)  # [N, F + 1]
    cells = rows[:, None, :] * num_kv_heads + torch.arange(num_kv_heads, device=device)[None, :, None]
    lane_ok = None if valid is None else torch.cat([valid, valid.new_ones(len(filled), 1)], 1)[:, None, :]
    pieces = ring_pieces(block_tables, filled, block_size) if in_place else None
    return DecodeIndex(width, ragged, bool(any_full), cells, valid, lane_ok, block_tables, filled, budget, pieces)


def decode_attend(q, k_new, v_new, pool: PoolLayer, index: DecodeIndex, *, scale: float, keep_keys: bool = False,
                  rope: Rope | None = None, q_pos: torch.Tensor | None = None):
    """Steps 1-2 of attend_score_sample: the output [N, Hq, D] and a(j) [N, Hkv, F + 1] (lane F: the new
    token), plus the gathered keys [N, Hkv, F + 1, D], as stored (unrotated), when `keep_keys` (KeyDiff
    scores from them). `rope`, `q_pos`: see attend_score_sample (q_pos is required with rope).

    This is the plain form: gather every ring into one padded batch, attend it. With `index.pieces` the
    same results come from cpu_decode.attend_in_place, which reads the rings in place (KeyDiff's keys are
    then gathered for its scores alone)."""
    if index.pieces is not None:
        out, attn = attend_in_place(q, k_new, v_new, pool, index.pieces, index.width, scale=scale, rope=rope,
                                    q_pos=q_pos)
        keys = None
        if keep_keys:
            keys = _gather(pool.k, index.cells).float()
            keys[:, :, index.width] = k_new
        return out, attn, keys
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads, width, out_dtype = k_new.shape[1], index.width, q.dtype
    keys = _gather(pool.k, index.cells).float()  # [N, Hkv, F + 1, D]; a fresh tensor, so lane F can be set
    keys[:, :, width] = k_new
    attend_keys = keys
    if rope is not None:
        # every key's RoPE position is at most its query's: the query's bounds the table
        max_pos = int(q_pos.max())
        key_pos = _gather(pool.rope_positions, index.cells)  # [N, Hkv, F + 1]
        key_pos[:, :, width] = q_pos[:, None]
        attend_keys = rope.rotate(keys, key_pos, max_pos)
        q = rope.rotate(q, q_pos[:, None].expand(num_seqs, num_heads), max_pos)
    values = _gather(pool.v, index.cells).float()
    values[:, :, width] = v_new
    if index.lane_ok is not None:
        values.masked_fill_(~index.lane_ok[..., None], 0.0)  # padding content may be NaN: 0 * NaN is NaN
    qg = q.view(num_seqs, num_kv_heads, num_heads // num_kv_heads, head_dim).float() * scale
    logits = torch.matmul(qg, attend_keys.transpose(-1, -2))  # [N, Hkv, G, F + 1]
    if index.lane_ok is not None:
        logits.masked_fill_(~index.lane_ok[:, :, None, :], float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    out = torch.matmul(probs, values).view(q.shape).to(out_dtype)
    return out, probs.mean(dim=2), (keys if keep_keys else None)  # a(j) is exactly 0 on padding lanes


def decode_update(pool: PoolLayer, index: DecodeIndex, attn, k_new, v_new, new_pos, spec: EvictionSpec, *,
                  layer, seed: int, new_score=None, keys=None, q_pos=None, ring=None) -> torch.Tensor:
    """Steps 3-4 of attend_score_sample for rings whose a(j) is known: scores, the slot each new token takes
    (`filled`, or the victim of a full ring), the writes; returns `written` [R, Hkv] (ring slots).

    `layer` is the layer index, or (rows of several layers in one batch) a tensor of each row's layer
    broadcastable to [R, 1, 1]: a step's bookkeeping then runs once for all layers, since no layer reads
    another's ring. keys: decode_attend's keys (SCORE_KEYDIFF needs them). q_pos, ring: see
    attend_score_sample; rope_pos is written only when the pool keeps it."""
    num_rows, num_kv_heads = attn.shape[0], k_new.shape[1]
    width, filled, device = index.width, index.filled, attn.device
    heads = torch.arange(num_kv_heads, device=device)
    ring_cells = index.cells[:, :, :width]
    attn_ring = attn[:, :, :width]
    pos = _gather(pool.pos, ring_cells)  # [R, Hkv, F]

    # ---- 3: scores -------------------------------------------------------------------------------------
    needs_score = spec.score_mode == SCORE_ATTN or spec.victim_mode != VICTIM_OLDEST
    score = _gather(pool.score, ring_cells) if needs_score and spec.score_mode != SCORE_KEYDIFF else None
    updated = None  # the ring's new scores [R, Hkv, F], when the policy changes them
    if spec.score_mode == SCORE_ATTN:
        n = attn_ring
        if spec.hops > 0 and spec.gamma != 0.0 and width > 0:
            n = nexus_walk(attn_ring, _gather(pool.edge_slot, ring_cells), _gather(pool.edge_pos, ring_cells),
                           _gather(pool.edge_w, ring_cells), pos, spec.gamma, spec.hops, filled=filled[:, None, None])
        updated = n if spec.decay == 0.0 else (score if spec.decay == 1.0 else score * spec.decay) + n
        score_new = attn[:, :, width]
    elif spec.score_mode == SCORE_KEYDIFF:
        neg_cos = keydiff_scores(keys, index.lane_ok)
        updated, score_new = neg_cos[:, :, :width], neg_cos[:, :, width]
    elif spec.score_mode == SCORE_EXTERNAL and new_score is not None:
        score_new = new_score.float()
    else:
        score_new = torch.zeros(num_rows, num_kv_heads, dtype=torch.float32, device=device)
    if updated is not None:
        score = updated

    # ---- 4: the slot the new token takes ----------------------------------------------------------------
    slot = filled.long()[:, None].expand(-1, num_kv_heads)
    if index.any_full:
        protected = (pos < spec.n_sink) | (pos >= (new_pos - spec.window)[:, None, None])
        if index.valid is not None:
            protected |= ~index.valid[:, None, :]
        held = _gather(pool.held, ring_cells) != 0 if spec.hold else None
        victim = victim_slots(spec, pos, score, protected, heads[:, None], layer, seed, held=held)
        slot = torch.where((filled < index.budget)[:, None], slot, victim)
    new_cells = physical_rows(index.block_tables, slot, pool.block_size) * num_kv_heads + heads  # [R, Hkv]
    if pool.rope_pos is not None:
        _update_ranks(pool, index, ring_cells, slot, new_cells, new_pos if q_pos is None else q_pos, ring)

    # ---- writes: the ring's scores first, then the new token over its slot ----------------------------
    if updated is not None:
        # Padding lanes write into the new token's cell, which the writes below then overwrite.
        target = ring_cells if index.valid is None else torch.where(index.valid[:, None, :], ring_cells,
                                                                    new_cells[..., None])
        _scatter(pool.score, target, updated)
    if spec.top_m > 0:
        # Edges are taken before the write: an edge to the victim records the victim's old position,
        # so it is dead from the start rather than pointing at the new token.
        edge_slot, edge_pos, edge_w = top_m_edges(attn_ring, pos, spec)
        _scatter(pool.edge_slot, new_cells, edge_slot)
        _scatter(pool.edge_pos, new_cells, edge_pos)
        _scatter(pool.edge_w, new_cells, edge_w)
    _scatter(pool.k, new_cells, k_new)
    _scatter(pool.v, new_cells, v_new)
    _scatter(pool.pos, new_cells, new_pos[:, None].expand(-1, num_kv_heads))
    _scatter(pool.score, new_cells, score_new)
    if spec.hold:  # the new token is nobody's reserve pick (and may have overwritten one in the fallback)
        _scatter(pool.held, new_cells, torch.zeros_like(slot, dtype=torch.int8))
    return slot.to(torch.int32)


def _update_ranks(pool: PoolLayer, index: DecodeIndex, ring_cells, slot, new_cells, q_pos, ring) -> None:
    """RoPE positions after the step: under positions="ring" a full ring's ranks above the victim's drop by
    one (O(ring) per head, no sort) and the new token takes the last rank; otherwise it takes q_pos."""
    full = index.filled >= index.budget  # [R]
    shifts = None if ring is None else ring.bool() & full
    if shifts is not None and index.any_full and index.width > 0:
        ranks = _gather(pool.rope_pos, ring_cells)  # [R, Hkv, F]
        victim_rank = ranks.gather(-1, slot[..., None].clamp(max=index.width - 1))
        ranks = ranks - ((ranks > victim_rank) & shifts[:, None, None]).to(ranks.dtype)
        target = ring_cells if index.valid is None else torch.where(index.valid[:, None, :], ring_cells,
                                                                    new_cells[..., None])
        _scatter(pool.rope_pos, target, ranks)  # padding lanes land in the new token's cell, rewritten next
    new_rank = q_pos[:, None].expand_as(slot)
    if shifts is not None:
        new_rank = new_rank - shifts.to(new_rank.dtype)[:, None]
    _scatter(pool.rope_pos, new_cells, new_rank)


def _flat(t: torch.Tensor) -> torch.Tensor:
    """A pool tensor [blocks, block_size, Hkv, ...] as [cells, ...]: a view (writes reach the pool)."""
    return t.view(-1, *t.shape[3:])


def _gather(t: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
    """Pool tensor entries at `cells` (any shape): [*cells.shape, ...]."""
    flat = _flat(t)
    return flat.index_select(0, cells.reshape(-1)).view(*cells.shape, *flat.shape[1:])


def _scatter(t: torch.Tensor, cells: torch.Tensor, values: torch.Tensor) -> None:
    flat = _flat(t)
    flat.index_copy_(0, cells.reshape(-1), values.reshape(-1, *flat.shape[1:]).to(flat.dtype))


def nexus_walk(attn, edge_slot, edge_pos, edge_w, pos, gamma: float, hops: int,
               filled: torch.Tensor | None = None) -> torch.Tensor:
    """n = a + gamma a P + gamma^2 a P^2 + ... (docs/design.md, section 3), over the live edges.

    attn [..., n]; edge_* [..., n, M]; pos [..., n]; `filled` (broadcastable to attn, e.g. [N, 1, 1] for
    attn [N, Hkv, n]): entries at index >= filled are padding; None = all n count.
    P[i, j] is the weight of edge i -> j while slot j still holds the token the edge was made to (its
    position matches); a dead, empty or padding edge carries nothing. Each hop is one scatter_add over the
    n * M edges, never a dense n x n matrix.
    """
    n = attn.shape[-1]
    if hops == 0 or gamma == 0.0 or n == 0:
        return attn.clone()
    lead = attn.shape[:-1]
    target = edge_slot.long()
    limit = n if filled is None else filled[..., None]
    alive = (target >= 0) & (target < limit)
    if filled is not None:  # padding sources: their edges may hold anything
        alive &= (torch.arange(n, device=attn.device) < filled)[..., None]
    target = target.clamp(0, n - 1).view(*lead, -1)
    alive &= pos.gather(-1, target).view_as(edge_pos) == edge_pos
    weight = torch.where(alive, edge_w, 0.0)
    total, x = attn, attn
    for hop in range(1, hops + 1):
        flow = (x[..., None] * weight).view(*lead, -1)
        x = torch.zeros_like(attn).scatter_add_(-1, target, flow)
        total = total + gamma**hop * x
    return total


def keydiff_scores(keys: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """-cos(k_j, anchor), anchor = the normalised mean of the L2-normalised keys [..., n, D] -> [..., n]
    (KeyDiff). `valid` [..., n] (broadcastable) marks the keys that count for the anchor; None = all."""
    unit = torch.nn.functional.normalize(keys.float(), dim=-1)
    counted = unit if valid is None else torch.where(valid[..., None], unit, 0.0)
    anchor = torch.nn.functional.normalize(counted.sum(dim=-2), dim=-1)
    return -torch.matmul(unit, anchor[..., None]).squeeze(-1)


def edge_rank_keys(attn: torch.Tensor, eligible: torch.Tensor) -> torch.Tensor:
    """int64 keys [..., n] whose descending order is (attention desc, index asc) over eligible entries.

    attn >= 0 in fp32, so its bit patterns (as int32) order like its values; key = bits * 2^32 - index.
    Eligible entries (attention > 0) get keys > 0, the others keys <= 0. Keys are unique, so `topk` on
    them is exact and ties go to the lower index, the rule the Triton kernels implement with the same key.
    """
    bits = torch.where(eligible, attn, 0.0).view(torch.int32).long()
    return (bits << 32) - torch.arange(attn.shape[-1], device=attn.device)


def top_edges(attn: torch.Tensor, eligible: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The one top-m edge merge of the reference (decode and prefill): per row of attn [..., n], the m
    eligible entries with the most attention (ties -> lower index; eligible ones must have attn > 0), as
    (index [..., m] int32, -1 = none; weight [..., m] fp32 normalised to sum 1)."""
    lead = attn.shape[:-1]
    idx = torch.full((*lead, m), -1, dtype=torch.int32, device=attn.device)
    weights = torch.zeros(*lead, m, dtype=torch.float32, device=attn.device)
    take = min(m, attn.shape[-1])
    if take == 0:
        return idx, weights
    ranked, order = edge_rank_keys(attn, eligible).topk(take, dim=-1)
    found = ranked > 0
    top = torch.where(found, attn.gather(-1, order), 0.0)
    idx[..., :take] = torch.where(found, order, -1)
    weights[..., :take] = top / top.sum(-1, keepdim=True).clamp_min(1e-30)
    return idx, weights


def top_m_edges(attn: torch.Tensor, pos: torch.Tensor, spec: EvictionSpec):
    """The query's top-m attended slots, sinks excluded, with weights normalised to sum 1.

    attn, pos [..., f] -> edge_slot [..., M] int32 (-1 = none), edge_pos [..., M] int32 (the target's
    position, -1 = none), edge_w [..., M] fp32. Only slots with attention > 0 qualify (padding lanes have
    exactly 0). Ties go to the lower slot index, so both kernels agree.
    """
    slots, weights = top_edges(attn, (pos >= spec.n_sink) & (attn > 0), spec.top_m)
    if pos.shape[-1] == 0:
        return slots, slots.clone(), weights
    targets = torch.where(slots >= 0, pos.gather(-1, slots.clamp(min=0).long()), -1).to(torch.int32)
    return slots, targets, weights
    keys = edge_rank_keys(attn, (pos >= spec.n_sink) & (attn > 0))
    ranked, order = keys.topk(take, dim=-1)
    found = ranked > 0
    top = torch.where(found, attn.gather(-1, order), 0.0)
    slots[..., :take] = torch.where(found, order, -1)
    targets[..., :take] = torch.where(found, pos.gather(-1, order), -1)
    weights[..., :take] = top / top.sum(-1, keepdim=True).clamp_min(1e-30)
    return slots, targets, weights


def victim_slots(spec: EvictionSpec, pos, score, protected, heads, layer: int, seed: int,
                 held: torch.Tensor | None = None) -> torch.Tensor:
    """The victim among unprotected slots along the last axis; ties go to the lowest slot index.
    pos / score / protected [..., n] (score unused by VICTIM_OLDEST), heads broadcastable to them (the
    KV head index, for the reservoir's hash) -> [...] int64. All protected -> slot 0.

    held [..., n] (EvictionSpec.hold): marked slots rank below every unmarked unprotected slot, so one is the
    victim only in a ring with no other candidate; then the lowest marked slot goes (the fallback: a ring
    whose marks fill every unprotected slot still takes its new token)."""
    if spec.victim_mode == VICTIM_OLDEST:
        key, held_key, protected_key = -pos, torch.iinfo(torch.int32).min + 1, torch.iinfo(torch.int32).min
    elif spec.victim_mode == VICTIM_MIN_SCORE:
        key, held_key, protected_key = -score, -torch.finfo(torch.float32).max, float("-inf")
    elif spec.victim_mode == VICTIM_RESERVOIR:
        key = reservoir_keys(spec, score, heads, pos, layer, seed)
        held_key, protected_key = -torch.finfo(torch.float32).max, float("-inf")
    else:
        raise ValueError(f"unknown victim mode {spec.victim_mode}")
    if held is not None:
        key = torch.where(held, held_key, key)
    key = torch.where(protected, protected_key, key)
    return key.argmax(dim=-1)  # argmax returns the first maximum: the lowest slot on ties


def reservoir_keys(spec: EvictionSpec, score, heads, pos, layer: int, seed: int) -> torch.Tensor:
    """Efraimidis-Spirakis A-Res in log space: the largest key is the slot to drop.

    A-Res keeps the items with the largest u^(1/w); the item left out of a reservoir of all-but-one is the
    one with the smallest u^(1/w), i.e. the largest log(-ln u) - log(w). With w = (S + eps)^(1/tau):
    tau -> 0 is deterministic top-K, tau = 1 samples proportionally to S.
    """
    u = slot_uniform(seed, layer, heads, pos)
    weight_log = torch.log(score.float().clamp_min(0.0) + spec.eps)
    return torch.log(-torch.log(u)) - weight_log / spec.tau


# ---------------------------------------------------------------------------------------------------
# Prefill: causal attention of a chunk over ring + chunk, with column scores (docs/design.md, section 4)
# ---------------------------------------------------------------------------------------------------


class PrefillResult(NamedTuple):
    """out [C, Hq, D]; mass [Hkv, f + C]: attention each key got, summed over the chunk's rows and
    averaged over the group (keys 0..f-1 are ring slots, f.. the chunk's tokens); edge_idx / edge_w
    [C, Hkv, M]: each row's top-m keys (sinks and itself excluded, attention > 0, ties -> lower index) as
    indices into that same key axis, -1 = none; obs [Hkv, min(obs_rows, C), f + C]: the full
    group-averaged probability rows of the last obs_rows rows."""

    out: torch.Tensor
    mass: torch.Tensor
    edge_idx: torch.Tensor | None
    edge_w: torch.Tensor | None
    obs: torch.Tensor | None


def gather_ring(pool: PoolLayer, block_table: torch.Tensor, filled: int, name: str) -> torch.Tensor:
    """Ring slots 0..filled-1 of one sequence from pool tensor `name`, in ring order: [filled, Hkv, ...]."""
    rows = physical_rows(block_table, torch.arange(filled, device=block_table.device), pool.block_size)
    return pool.rows(name).index_select(0, rows)


def prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pool: PoolLayer,
    block_table: torch.Tensor,
    filled: int,
    chunk_pos: torch.Tensor,
    *,
    scale: float,
    n_sink: int = 4,
    top_m: int = 0,
    obs_rows: int = 0,
    rope: Rope | None = None,
    rope_pos: torch.Tensor | None = None,
) -> PrefillResult:
    """A chunk of C tokens of one sequence attends its ring's `filled` slots and itself (causal).

    q [C, Hq, D], k / v [C, Hkv, D]; block_table [W] int32 is the sequence's table, through which ring
    slots 0..filled-1 are read (every one precedes the chunk); chunk_pos [C] the chunk's positions (used
    to exclude sinks from edges). With `rope`, q, k and the pool's keys are unrotated: a ring key is rotated
    to its slot's pool.rope_pos, the chunk's queries and keys to `rope_pos` [C] (None: chunk_pos).
    Writes nothing: the caller's keep step writes the chunk into the pool.
    The probabilities are computed once (one logits matmul, one softmax) and reused for the output, the
    mass, the edges and the observation rows.
    """
    chunk, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    group = num_heads // num_kv_heads
    num_keys = filled + chunk
    out_dtype = q.dtype
    ring_k, k = gather_ring(pool, block_table, filled, "k").float(), k.float()
    if rope is not None:
        chunk_rope = chunk_pos if rope_pos is None else rope_pos
        max_pos = int(chunk_rope.max()) if chunk else 0  # a chunk's positions bound its ring's
        ring_k = rope.rotate(ring_k, gather_ring(pool, block_table, filled, "rope_pos"), max_pos)
        k = rope.rotate(k, chunk_rope[:, None].expand(chunk, num_kv_heads), max_pos)
        q = rope.rotate(q, chunk_rope[:, None].expand(chunk, num_heads), max_pos)
    keys = torch.cat([ring_k, k]).transpose(0, 1)
    values = torch.cat([gather_ring(pool, block_table, filled, "v").float(), v.float()]).transpose(0, 1)
    # [Hkv, G * C, D]: the group's heads stacked along the rows, so one batched matmul covers them
    qg = (q.float() * scale).view(chunk, num_kv_heads, group, head_dim).permute(1, 2, 0, 3)
    logits = torch.matmul(qg.reshape(num_kv_heads, group * chunk, head_dim), keys.transpose(1, 2))
    logits = logits.view(num_kv_heads, group, chunk, num_keys)
    hidden = torch.ones(chunk, num_keys, dtype=torch.bool, device=q.device).triu_(filled + 1)  # causal
    probs = torch.softmax(logits.masked_fill_(hidden, float("-inf")), dim=-1)
    out = torch.matmul(probs.view(num_kv_heads, group * chunk, num_keys), values)
    out = out.view(num_kv_heads, group, chunk, head_dim).permute(2, 0, 1, 3).reshape(q.shape).to(out_dtype)

    edge_idx = edge_w = obs = None
    obs_rows = min(obs_rows, chunk)
    if top_m > 0:
        pooled = probs.mean(dim=1)  # [Hkv, C, f + C]
        mass = pooled.sum(dim=1)
        ring_pos = gather_ring(pool, block_table, filled, "pos").transpose(0, 1)
        key_pos = torch.cat([ring_pos, chunk_pos.to(ring_pos.dtype).expand(num_kv_heads, -1)], dim=1)
        edge_idx, edge_w = _prefill_edges(pooled, key_pos, filled, n_sink, top_m)
        if obs_rows > 0:
            obs = pooled[:, chunk - obs_rows:]
    else:
        mass = probs.sum(dim=(1, 2)) / group
        if obs_rows > 0:
            obs = probs[:, :, chunk - obs_rows:].mean(dim=1)
    return PrefillResult(out, mass, edge_idx, edge_w, obs)


def _prefill_edges(pooled, key_pos, filled, n_sink, top_m):
    """Top-m edges of every chunk row: [Hkv, C, f+C] -> ([C, Hkv, M] int32, [C, Hkv, M] fp32)."""
    num_kv_heads, chunk, num_keys = pooled.shape
    rows = torch.arange(chunk, device=pooled.device)
    itself = torch.zeros(chunk, num_keys, dtype=torch.bool, device=pooled.device)
    itself[rows, filled + rows] = True  # a token's edge to itself carries nothing
    eligible = (key_pos[:, None, :] >= n_sink) & ~itself & (pooled > 0)  # keys a row cannot see: pooled == 0
    idx, w = top_edges(pooled, eligible, top_m)  # [Hkv, C, M]
    return idx.transpose(0, 1).contiguous(), w.transpose(0, 1).contiguous()


class DeferredDecode:
    """The reference backend's decode for CPU steps: each layer attends its rings (`attend`), and the
    bookkeeping of every layer (scores, walk, victims, edges, writes) runs once after the forward (`flush`).

    No layer reads another's ring, and the per-op cost of thirty small batches is what makes a CPU step
    slow, so one batch over all layers does the same work at a fraction of the cost. Only for policies
    that score from the attention (or not at all) and have no per-layer decode hooks (see `applies`).
    """

    def __init__(self, spec: EvictionSpec, seed: int):
        self.spec, self.seed = spec, seed
        self.in_place = True  # attend the rings where they lie (cpu_decode); False: gather them (the plain form)
        self._index: DecodeIndex | None = None  # the step's decode rings, shared by every layer
        self._pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # per layer: a(j), k, v

    @staticmethod
    def applies(spec: EvictionSpec, hooks_overridden: bool) -> bool:
        return spec.score_mode in (SCORE_ATTN, SCORE_NONE) and not hooks_overridden

    def begin(self) -> None:
        self._index, self._pending = None, []

    def attend(self, layer: int, q, k, v, pool: PoolLayer, plan, *, scale: float, rope: Rope | None,
               q_pos: torch.Tensor) -> torch.Tensor:
        """One layer's decode attention (plan: the step's attention.StepPlan); its bookkeeping waits."""
        if self._index is None:
            self._index = decode_index(plan.decode_tables, plan.decode_filled, plan.decode_budget,
                                       pool.block_size, k.shape[1], in_place=self.in_place)
        out, attn, _ = decode_attend(q, k, v, pool, self._index, scale=scale, rope=rope, q_pos=q_pos)
        if len(self._pending) != layer:
            raise RuntimeError("deferred decode layers must run in order, each once per step")
        self._pending.append((attn, k, v))
        return out

    def flush(self, pools: PoolLayer, plan, *, num_blocks: int, q_pos: torch.Tensor) -> None:
        """Every pending layer's bookkeeping in one batch; `pools`: the pool's all-layer view, each layer's
        `num_blocks` blocks one after another."""
        if not self._pending:
            return
        attn, k_new, v_new = (torch.cat(parts) for parts in zip(*self._pending))  # layer-major rows
        num_layers, n = len(self._pending), plan.num_decode
        index = self._index.for_layers(num_layers, num_blocks, k_new.shape[1], pools.block_size)
        layer = torch.arange(num_layers, device=attn.device).repeat_interleave(n)[:, None, None]
        ring = None if plan.decode_ring is None else plan.decode_ring.repeat(num_layers)
        decode_update(pools, index, attn, k_new, v_new, plan.decode_pos.repeat(num_layers), self.spec,
                      layer=layer, seed=self.seed, q_pos=q_pos.repeat(num_layers), ring=ring)
        self._pending = []

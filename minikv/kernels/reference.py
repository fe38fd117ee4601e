"""The torch reference of minikv's kernels: plain, readable, fp32. This file is the contract.

The Triton kernels must produce the same outputs, the same scores and the same victims on the same
inputs; tests compare them. On CPU the engine runs these functions directly.

Shapes: N sequences in a decode batch, Hq query heads, Hkv KV heads (G = Hq / Hkv query heads share one
KV head), B = budget slots per ring, D = head_dim, C = tokens in a prefill chunk, M = edges per slot.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .common import (
    SCORE_ATTN,
    SCORE_EXTERNAL,
    SCORE_KEYDIFF,
    VICTIM_MIN_SCORE,
    VICTIM_OLDEST,
    VICTIM_RESERVOIR,
    EvictionSpec,
    RingLayer,
    slot_uniform,
)

# ---------------------------------------------------------------------------------------------------
# Decode: attend, score, sample (DESIGN 4.1)
# ---------------------------------------------------------------------------------------------------


def attend_score_sample(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    ring: RingLayer,
    ring_ids: torch.Tensor,
    filled: torch.Tensor,
    new_pos: torch.Tensor,
    spec: EvictionSpec,
    *,
    layer: int,
    seed: int,
    scale: float,
    new_score: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step of one layer for a batch of sequences, each in its own ring.

    q [N, Hq, D], k_new / v_new [N, Hkv, D] (after RoPE), ring_ids / filled / new_pos [N] int32:
    the ring of each sequence, how many of its slots are filled before this step, and the new token's
    position. new_score [N, Hkv]: the new token's score under SCORE_EXTERNAL (0 when None).

    For each (sequence, KV head):
      1. the group's query heads attend the filled slots plus the new token;
      2. a(j): the probability each slot received, averaged over the group;
      3. the policy's score update (EvictionSpec.score_mode);
      4. the slot for the new token: the next empty one, or (ring full) the victim among unprotected slots;
         the new token's K, V, pos, score and out-edges are written there.
    Returns the attention output [N, Hq, D] (q's dtype) and the slot written per KV head [N, Hkv] int32.
    """
    num_seqs, num_heads, _ = q.shape
    num_kv_heads = k_new.shape[1]
    out = torch.empty_like(q)
    written = torch.empty(num_seqs, num_kv_heads, dtype=torch.int32, device=q.device)
    for i in range(num_seqs):
        out[i], written[i] = _decode_one(
            q[i], k_new[i], v_new[i], ring, int(ring_ids[i]), int(filled[i]), int(new_pos[i]), spec,
            layer=layer, seed=seed, scale=scale,
            new_score=None if new_score is None else new_score[i],
        )
    return out, written


def _decode_one(q, k_new, v_new, ring: RingLayer, r: int, f: int, t: int, spec: EvictionSpec, *,
                layer, seed, scale, new_score):
    num_kv_heads, head_dim = k_new.shape
    group = q.shape[0] // num_kv_heads
    keys = torch.cat([ring.k[r, :, :f].float(), k_new.float()[:, None]], dim=1)  # [Hkv, f+1, D]
    values = torch.cat([ring.v[r, :, :f].float(), v_new.float()[:, None]], dim=1)
    qg = q.float().view(num_kv_heads, group, head_dim)

    probs = torch.softmax(torch.einsum("hgd,hjd->hgj", qg, keys) * scale, dim=-1)  # [Hkv, G, f+1]
    out = torch.einsum("hgj,hjd->hgd", probs, values).reshape(q.shape).to(q.dtype)
    attn = probs.mean(dim=1)  # a(j), pooled over the GQA group
    attn_ring, attn_new = attn[:, :f], attn[:, f]

    pos = ring.pos[r, :, :f]
    score = ring.score[r, :, :f]
    score_new = _update_scores(spec, ring, r, f, score, attn_ring, attn_new, keys, new_score)

    slot = _choose_slot(spec, ring, r, f, t, pos, score, layer, seed)
    heads = torch.arange(num_kv_heads, device=q.device)
    if spec.top_m > 0:
        # Edges are taken before the write: an edge to the victim must record the victim's old position,
        # so that it is dead from the start rather than pointing at the new token.
        edge_slot, edge_pos, edge_w = top_m_edges(attn_ring, pos, spec)
        ring.edge_slot[r, heads, slot] = edge_slot
        ring.edge_pos[r, heads, slot] = edge_pos
        ring.edge_w[r, heads, slot] = edge_w
    ring.k[r, heads, slot] = k_new.to(ring.k.dtype)
    ring.v[r, heads, slot] = v_new.to(ring.v.dtype)
    ring.pos[r, heads, slot] = t
    ring.score[r, heads, slot] = score_new
    return out, slot.to(torch.int32)


def _update_scores(spec, ring, r, f, score, attn_ring, attn_new, keys, new_score):
    """Update the filled slots' scores in place; return the new token's first score [Hkv]."""
    if spec.score_mode == SCORE_ATTN:
        n = nexus_walk(attn_ring, ring.edge_slot[r, :, :f], ring.edge_pos[r, :, :f], ring.edge_w[r, :, :f],
                       ring.pos[r, :, :f], spec.gamma, spec.hops)
        score.mul_(spec.decay).add_(n)
        return attn_new
    if spec.score_mode == SCORE_KEYDIFF:
        neg_cos = keydiff_scores(keys)
        score.copy_(neg_cos[:, :f])
        return neg_cos[:, f]
    if spec.score_mode == SCORE_EXTERNAL and new_score is not None:
        return new_score.float()
    return torch.zeros_like(attn_new)


def nexus_walk(attn, edge_slot, edge_pos, edge_w, pos, gamma: float, hops: int) -> torch.Tensor:
    """n = a + gamma a P + gamma^2 a P^2 + ... (DESIGN 5.1), over the ring's live edges.

    attn [H, f]; edge_* [H, f, M]; pos [H, f]. P[i, j] is the weight of edge i -> j while slot j still
    holds the token the edge was made to (its position matches); a dead or empty edge carries nothing.
    Each hop is a scatter over at most f * M edges, never a dense f x f matrix.
    """
    num_heads, f = attn.shape
    if hops == 0 or gamma == 0.0 or f == 0:
        return attn.clone()
    target = edge_slot.long()
    alive = (target >= 0) & (target < f)
    target = target.clamp(0, max(f - 1, 0))
    alive &= pos.gather(1, target.view(num_heads, -1)).view_as(target) == edge_pos
    weight = torch.where(alive, edge_w, torch.zeros_like(edge_w))
    n, x = attn.clone(), attn
    for hop in range(1, hops + 1):
        flow = (x[:, :, None] * weight).view(num_heads, -1)
        x = torch.zeros_like(attn).scatter_add_(1, target.view(num_heads, -1), flow)
        n += gamma**hop * x
    return n


def keydiff_scores(keys: torch.Tensor) -> torch.Tensor:
    """-cos(k_j, anchor), anchor = mean of the L2-normalised keys [H, n, D] -> [H, n] (KeyDiff)."""
    unit = torch.nn.functional.normalize(keys.float(), dim=-1)
    anchor = torch.nn.functional.normalize(unit.mean(dim=1, keepdim=True), dim=-1)
    return -(unit * anchor).sum(-1)


def top_m_edges(attn: torch.Tensor, pos: torch.Tensor, spec: EvictionSpec):
    """The query's top-m attended slots, sinks excluded, with weights normalised to sum 1.

    attn, pos [H, f] -> edge_slot [H, M] int32 (-1 = none), edge_pos [H, M] int32 (the target's position,
    -1 = none), edge_w [H, M] fp32. Ties go to the lower slot index, so both kernels agree.
    """
    num_heads, f = attn.shape
    m = spec.top_m
    slots = torch.full((num_heads, m), -1, dtype=torch.int32, device=attn.device)
    weights = torch.zeros(num_heads, m, dtype=torch.float32, device=attn.device)
    targets = torch.full((num_heads, m), -1, dtype=torch.int32, device=attn.device)
    masked = torch.where((pos >= spec.n_sink) & (attn > 0), attn, torch.full_like(attn, -1.0))
    take = min(m, f)
    if take == 0:
        return slots, targets, weights
    # stable sort on -attn: equal attention keeps index order, i.e. lower slot first
    order = torch.sort(-masked, dim=1, stable=True).indices[:, :take]
    top = masked.gather(1, order)
    valid = top >= 0
    total = torch.where(valid, top, torch.zeros_like(top)).sum(1, keepdim=True).clamp_min(1e-30)
    slots[:, :take] = torch.where(valid, order, torch.full_like(order, -1)).to(torch.int32)
    targets[:, :take] = torch.where(valid, pos.gather(1, order), torch.full_like(order, -1)).to(torch.int32)
    weights[:, :take] = torch.where(valid, top / total, torch.zeros_like(top))
    return slots, targets, weights


def _choose_slot(spec, ring, r, f, t, pos, score, layer, seed) -> torch.Tensor:
    """[Hkv] slot index for the new token: next empty slot, or the victim of a full ring."""
    num_kv_heads = pos.shape[0]
    budget = ring.pos.shape[2]
    if f < budget:
        return torch.full((num_kv_heads,), f, dtype=torch.long, device=pos.device)
    protected = (pos < spec.n_sink) | (pos >= t - spec.window)
    heads = torch.arange(num_kv_heads, device=pos.device)[:, None]
    return victim_slots(spec, pos, score, protected, heads, layer, seed)


def victim_slots(spec: EvictionSpec, pos, score, protected, heads, layer: int, seed: int) -> torch.Tensor:
    """The victim per head among unprotected slots; ties go to the lowest slot index. [H, n] -> [H]."""
    if spec.victim_mode == VICTIM_OLDEST:
        key = -pos.double()
    elif spec.victim_mode == VICTIM_MIN_SCORE:
        key = -score.double()
    elif spec.victim_mode == VICTIM_RESERVOIR:
        key = reservoir_keys(spec, score, heads, pos, layer, seed).double()
    else:
        raise ValueError(f"unknown victim mode {spec.victim_mode}")
    key = key.masked_fill(protected, float("-inf"))
    return key.argmax(dim=1)  # argmax returns the first maximum: the lowest slot on ties


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
# Prefill: causal attention of a chunk over ring + chunk, with column scores (DESIGN 4.2)
# ---------------------------------------------------------------------------------------------------


class PrefillResult(NamedTuple):
    """out [C, Hq, D]; mass [Hkv, f + C]: attention each key got, summed over the chunk's rows and
    averaged over the group (keys 0..f-1 are ring slots, f.. the chunk's tokens); edge_idx / edge_w
    [C, Hkv, M]: each row's top-m keys (sinks and itself excluded) as indices into that same key axis;
    obs [Hkv, obs_rows, f + C]: the full group-averaged probability rows of the last obs_rows rows."""

    out: torch.Tensor
    mass: torch.Tensor
    edge_idx: torch.Tensor | None
    edge_w: torch.Tensor | None
    obs: torch.Tensor | None


def prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    ring_k: torch.Tensor,
    ring_v: torch.Tensor,
    ring_pos: torch.Tensor,
    chunk_pos: torch.Tensor,
    *,
    scale: float,
    n_sink: int = 4,
    top_m: int = 0,
    obs_rows: int = 0,
) -> PrefillResult:
    """A chunk of C tokens of one sequence attends its ring's f filled slots and itself (causal).

    q [C, Hq, D], k / v [C, Hkv, D]; ring_k / ring_v [Hkv, f, D] and ring_pos [Hkv, f] are the filled
    slots (every one precedes the chunk); chunk_pos [C] the chunk's positions (used to exclude sinks
    from edges).
    """
    chunk, num_heads, head_dim = q.shape
    num_kv_heads, f = ring_pos.shape
    group = num_heads // num_kv_heads
    keys = torch.cat([ring_k.float(), k.float().transpose(0, 1)], dim=1)  # [Hkv, f+C, D]
    values = torch.cat([ring_v.float(), v.float().transpose(0, 1)], dim=1)
    qg = q.float().view(chunk, num_kv_heads, group, head_dim).permute(1, 2, 0, 3)  # [Hkv, G, C, D]

    logits = torch.einsum("hgcd,hjd->hgcj", qg, keys) * scale
    causal = torch.ones(chunk, f + chunk, dtype=torch.bool, device=q.device).tril(diagonal=f)
    probs = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)
    out = torch.einsum("hgcj,hjd->cghd", probs, values).permute(0, 2, 1, 3).reshape(q.shape).to(q.dtype)

    pooled = probs.mean(dim=1)  # [Hkv, C, f+C]
    mass = pooled.sum(dim=1)
    edge_idx = edge_w = obs = None
    if top_m > 0:
        key_pos = torch.cat([ring_pos, chunk_pos[None].expand(num_kv_heads, -1).to(ring_pos.dtype)], dim=1)
        edge_idx, edge_w = _prefill_edges(pooled, key_pos, f, n_sink, top_m)
    if obs_rows > 0:
        obs = pooled[:, -obs_rows:]
    return PrefillResult(out, mass, edge_idx, edge_w, obs)


def _prefill_edges(pooled, key_pos, f, n_sink, top_m):
    """Top-m edges of every chunk row: [Hkv, C, f+C] -> ([C, Hkv, M] int32, [C, Hkv, M] fp32)."""
    num_kv_heads, chunk, _ = pooled.shape
    self_key = f + torch.arange(chunk, device=pooled.device)
    eligible = (key_pos[:, None, :] >= n_sink).expand(-1, chunk, -1).clone()
    eligible[:, torch.arange(chunk), self_key] = False  # a token's edge to itself carries nothing
    masked = torch.where(eligible & (pooled > 0), pooled, torch.full_like(pooled, -1.0))
    take = min(top_m, masked.shape[-1])
    order = torch.sort(-masked, dim=-1, stable=True).indices[..., :take]
    top = masked.gather(-1, order)
    valid = top >= 0
    total = torch.where(valid, top, torch.zeros_like(top)).sum(-1, keepdim=True).clamp_min(1e-30)
    idx = torch.full((num_kv_heads, chunk, top_m), -1, dtype=torch.int32, device=pooled.device)
    w = torch.zeros(num_kv_heads, chunk, top_m, dtype=torch.float32, device=pooled.device)
    idx[..., :take] = torch.where(valid, order, torch.full_like(order, -1)).to(torch.int32)
    w[..., :take] = torch.where(valid, top / total, torch.zeros_like(top))
    return idx.transpose(0, 1).contiguous(), w.transpose(0, 1).contiguous()

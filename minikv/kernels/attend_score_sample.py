"""Fused decode step in Triton: attend, score, sample, write (DESIGN 4.1).

One program per (sequence, KV head) runs the whole step of `reference.attend_score_sample`:

  pass 1  logits of the group's query heads over the ring's filled slots, kept in a scratch row, with the
          running max / sum of an online softmax (Milakov & Gimelshein 2018, "Online normalizer calculation
          for softmax"); KeyDiff also sums the unit keys here;
  pass 2  with the final normaliser known: the output, and a(j), each slot's probability averaged over
          the group, into a scratch row;
  walk    Nexus (DESIGN 5.1): `hops` scatters of a(j) along the stored out-edges with tl.atomic_add;
  score   S <- decay * S + n (or KeyDiff / external / none), written back, and in the same loop the
          running argmax of the victim key over unprotected slots (ties -> lowest slot);
  edges   the new token's top-m out-edges, one scan of a(j) per edge (ties -> lowest slot);
  write   the new K, V, pos, score and edges into the next empty slot or the victim.

Everything stays on the device: no host synchronisation, so a step is capturable in a CUDA graph. The
EvictionSpec fields are compile-time constants, so each policy compiles to its own specialised kernel.
Values are upcast to fp32 right after every load (the Triton interpreter mishandles bf16 arithmetic) and
the dots run in IEEE fp32, so the result matches the fp32 reference to rounding.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (
    SCORE_ATTN,
    SCORE_EXTERNAL,
    SCORE_KEYDIFF,
    SCORE_NONE,
    VICTIM_MIN_SCORE,
    VICTIM_OLDEST,
    VICTIM_RESERVOIR,
    EvictionSpec,
    RingLayer,
)

_MASK32 = 0xFFFFFFFF
# The same murmur3 constants as common.slot_hash_u32 (kept in sync by tests/test_kernels_decode.py).
_MIX_SEED, _MIX_LAYER = 0x9E3779B1, 0x85EBCA77


def _fmix32_int(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & _MASK32
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & _MASK32
    return x ^ (x >> 16)


def hash_base(seed: int, layer: int) -> int:
    """The (seed, layer) part of common.slot_hash_u32, folded on the host, as a signed int32 bit pattern.

    Passing it signed keeps the kernel argument an int32 whatever the seed (no recompilation per seed).
    """
    x = _fmix32_int(((seed * _MIX_SEED) & _MASK32) ^ ((layer * _MIX_LAYER) & _MASK32))
    return x - (1 << 32) if x >= (1 << 31) else x


@triton.jit
def _fmix32(x):
    # murmur3's finaliser in uint32 arithmetic: multiplications wrap modulo 2^32, shifts are logical.
    x = x ^ (x >> 16)
    x = x * 0x85EBCA6B
    x = x ^ (x >> 13)
    x = x * 0xC2B2AE35
    return x ^ (x >> 16)


@triton.jit
def _slot_uniform(base, head, pos):
    """u in (0, 1) of common.slot_uniform, bit-identical: base folds (seed, layer) on the host."""
    x = _fmix32(tl.cast(base, tl.uint32, bitcast=True) ^ (head.to(tl.uint32) * 0xC2B2AE3D))
    x = _fmix32(x ^ (pos.to(tl.uint32, bitcast=True) * 0x27D4EB2F))
    return ((x >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)


@triton.jit
def _block_argmax(key, idx, big):
    """Largest key of a block and the lowest index holding it."""
    best = tl.max(key, axis=0)
    return best, tl.min(tl.where(key == best, idx, big), axis=0)


# int32's minimum: the victim key of a protected slot under VICTIM_OLDEST (keys are -pos there).
_INT32_MIN = tl.constexpr(-2147483648)


# The hash base changes with every seed: keep it a plain runtime argument (never a specialised constant).
@triton.jit(do_not_specialize=["hash_base_i32"])
def _attend_score_sample_kernel(
    q_ptr, k_new_ptr, v_new_ptr, out_ptr,
    ring_k_ptr, ring_v_ptr, pos_ptr, score_ptr, edge_slot_ptr, edge_pos_ptr, edge_w_ptr,
    ring_ids_ptr, filled_ptr, new_pos_ptr, new_score_ptr, written_ptr,
    logits_ptr, attn_ptr, walk_ptr,
    stride_qn, stride_qh, stride_qd,
    stride_kn, stride_kh, stride_kd,
    stride_vn, stride_vh, stride_vd,
    stride_on, stride_oh, stride_od,
    stride_rk0, stride_rk1, stride_rk2, stride_rk3,
    stride_rv0, stride_rv1, stride_rv2, stride_rv3,
    num_kv_heads, budget, hash_base_i32, scale,
    GROUP: tl.constexpr, G_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    M: tl.constexpr, M_PAD: tl.constexpr, BLOCK: tl.constexpr,
    SCORE_MODE: tl.constexpr, VICTIM_MODE: tl.constexpr, DECAY: tl.constexpr, GAMMA: tl.constexpr,
    HOPS: tl.constexpr, TAU: tl.constexpr, TOP_M: tl.constexpr, N_SINK: tl.constexpr,
    WINDOW: tl.constexpr, EPS: tl.constexpr, HAS_NEW_SCORE: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    ring = tl.load(ring_ids_ptr + seq).to(tl.int64)
    filled = tl.load(filled_ptr + seq).to(tl.int32)
    new_pos = tl.load(new_pos_ptr + seq).to(tl.int32)

    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D_PAD)
    j_block = tl.arange(0, BLOCK)
    g_ok = g < GROUP
    d_ok = d < HEAD_DIM
    meta = (ring * num_kv_heads + head) * budget  # offset of this (ring, head) in pos / score / edges
    rk = ring_k_ptr + ring * stride_rk0 + head * stride_rk1
    rv = ring_v_ptr + ring * stride_rv0 + head * stride_rv1
    row = seq * num_kv_heads + head  # this program's row of the scratch buffers
    logits_row = logits_ptr + (row * GROUP + g[:, None]).to(tl.int64) * budget  # padded heads not kept
    attn_row = attn_ptr + row.to(tl.int64) * budget
    walk_row = walk_ptr + row.to(tl.int64) * (HOPS + 1) * budget

    q = tl.load(q_ptr + seq * stride_qn + (head * GROUP + g[:, None]) * stride_qh + d[None, :] * stride_qd,
                mask=g_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    k_new = tl.load(k_new_ptr + seq * stride_kn + head * stride_kh + d * stride_kd, mask=d_ok,
                    other=0.0).to(tl.float32)
    v_new = tl.load(v_new_ptr + seq * stride_vn + head * stride_vh + d * stride_vd, mask=d_ok,
                    other=0.0).to(tl.float32)

    # The walk scatters with atomics, so its buffers start from zero.
    if SCORE_MODE == 1:
        for hop in tl.static_range(HOPS):
            for start in range(0, filled, BLOCK):
                j = start + j_block
                tl.store(walk_row + hop * budget + j, tl.zeros([BLOCK], tl.float32), mask=j < filled)

    # ---- pass 1: logits into scratch, running max / sum; the new token opens the softmax -------------
    s_new = tl.sum(q * k_new[None, :], axis=1) * scale
    m_i = s_new
    l_i = tl.full([G_PAD], 1.0, tl.float32)
    unit_sum = tl.zeros([D_PAD], tl.float32)
    for start in range(0, filled, BLOCK):
        j = start + j_block
        j_ok = j < filled
        k = tl.load(rk + j[:, None] * stride_rk2 + d[None, :] * stride_rk3,
                    mask=j_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        s = tl.where(j_ok[None, :], s, float("-inf"))
        tl.store(logits_row + j[None, :], s, mask=g_ok[:, None] & j_ok[None, :])
        m_next = tl.maximum(m_i, tl.max(s, axis=1))
        l_i = l_i * tl.exp(m_i - m_next) + tl.sum(tl.exp(s - m_next[:, None]), axis=1)
        m_i = m_next
        if SCORE_MODE == 2:
            norm = tl.sqrt(tl.sum(k * k, axis=1))
            unit_sum += tl.sum(k / tl.maximum(norm, 1e-12)[:, None], axis=0)
    tl.debug_barrier()

    # ---- pass 2: output and a(j) --------------------------------------------------------------------
    inv_l = tl.where(g_ok, 1.0 / l_i, 0.0)  # padded heads weigh nothing in the group mean
    acc = tl.zeros([G_PAD, D_PAD], tl.float32)
    for start in range(0, filled, BLOCK):
        j = start + j_block
        j_ok = j < filled
        s = tl.load(logits_row + j[None, :], mask=g_ok[:, None] & j_ok[None, :], other=float("-inf"))
        p = tl.exp(s - m_i[:, None]) * inv_l[:, None]
        v = tl.load(rv + j[:, None] * stride_rv2 + d[None, :] * stride_rv3,
                    mask=j_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        acc += tl.dot(p, v, input_precision="ieee")
        tl.store(attn_row + j, tl.sum(p, axis=0) / GROUP, mask=j_ok)
    p_new = tl.exp(s_new - m_i) * inv_l
    acc += p_new[:, None] * v_new[None, :]
    attn_new = tl.sum(p_new, axis=0) / GROUP
    tl.store(out_ptr + seq * stride_on + (head * GROUP + g[:, None]) * stride_oh + d[None, :] * stride_od,
             acc.to(out_ptr.dtype.element_ty), mask=g_ok[:, None] & d_ok[None, :])
    tl.debug_barrier()

    # ---- Nexus walk: x_hop = x_{hop-1} P, scattered along the live edges ----------------------------
    if SCORE_MODE == 1:
        e = tl.arange(0, M_PAD)
        for hop in tl.static_range(HOPS):
            if hop == 0:
                src_row = attn_row
            else:
                src_row = walk_row + (hop - 1) * budget
            dst_row = walk_row + hop * budget
            for start in range(0, filled, BLOCK):
                i = start + j_block
                i_ok = i < filled
                x = tl.load(src_row + i, mask=i_ok, other=0.0, volatile=True)
                edge = (meta + i[:, None]) * M + e[None, :]
                edge_ok = i_ok[:, None] & (e[None, :] < M)
                target = tl.load(edge_slot_ptr + edge, mask=edge_ok, other=-1)
                alive = edge_ok & (target >= 0) & (target < filled)
                target_pos = tl.load(pos_ptr + meta + target, mask=alive, other=-1)
                alive &= target_pos == tl.load(edge_pos_ptr + edge, mask=edge_ok, other=-1)
                weight = tl.load(edge_w_ptr + edge, mask=edge_ok, other=0.0)
                tl.atomic_add(dst_row + target, x[:, None] * weight, mask=alive)
            tl.debug_barrier()

    # ---- KeyDiff anchor: the normalised mean of the unit keys, the new one included -----------------
    if SCORE_MODE == 2:
        k_new_unit = k_new / tl.maximum(tl.sqrt(tl.sum(k_new * k_new, axis=0)), 1e-12)
        mean_unit = (unit_sum + k_new_unit) / (filled + 1).to(tl.float32)
        anchor = mean_unit / tl.maximum(tl.sqrt(tl.sum(mean_unit * mean_unit, axis=0)), 1e-12)

    # ---- scores, and the victim among unprotected slots ---------------------------------------------
    if VICTIM_MODE == 0:
        best_key = tl.full([], _INT32_MIN, tl.int32)
    else:
        best_key = tl.full([], float("-inf"), tl.float32)
    best_slot = tl.full([], 0, tl.int32)  # all protected -> slot 0, as torch's argmax of all -inf
    for start in range(0, filled, BLOCK):
        j = start + j_block
        j_ok = j < filled
        pos = tl.load(pos_ptr + meta + j, mask=j_ok, other=0)
        score = tl.load(score_ptr + meta + j, mask=j_ok, other=0.0)
        if SCORE_MODE == 1:
            n = tl.load(attn_row + j, mask=j_ok, other=0.0)
            coef = 1.0
            for hop in tl.static_range(HOPS):
                coef = coef * GAMMA
                n += coef * tl.load(walk_row + hop * budget + j, mask=j_ok, other=0.0, volatile=True)
            score = DECAY * score + n
            tl.store(score_ptr + meta + j, score, mask=j_ok)
        if SCORE_MODE == 2:
            k = tl.load(rk + j[:, None] * stride_rk2 + d[None, :] * stride_rk3,
                        mask=j_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
            unit = k / tl.maximum(tl.sqrt(tl.sum(k * k, axis=1)), 1e-12)[:, None]
            score = -tl.sum(unit * anchor[None, :], axis=1)
            tl.store(score_ptr + meta + j, score, mask=j_ok)
        protected = (pos < N_SINK) | (pos >= new_pos - WINDOW) | (j >= filled)
        if VICTIM_MODE == 0:
            key = tl.where(protected, _INT32_MIN, -pos)
        elif VICTIM_MODE == 1:
            key = tl.where(protected, float("-inf"), -score)
        else:
            u = _slot_uniform(hash_base_i32, head, pos)
            key = tl.log(-tl.log(u)) - tl.log(tl.maximum(score, 0.0) + EPS) / TAU
            key = tl.where(protected, float("-inf"), key)
        block_key, block_slot = _block_argmax(key, j, budget)
        better = block_key > best_key  # strict: on ties the earlier block (lower slot) stays
        best_slot = tl.where(better, block_slot, best_slot)
        best_key = tl.where(better, block_key, best_key)

    if SCORE_MODE == 1:
        score_new = attn_new
    elif SCORE_MODE == 2:
        score_new = -tl.sum(k_new_unit * anchor, axis=0)
    elif HAS_NEW_SCORE:
        score_new = tl.load(new_score_ptr + seq * num_kv_heads + head).to(tl.float32)
    else:
        score_new = 0.0
    slot = tl.where(filled < budget, filled, best_slot)

    # ---- the new token's top-m out-edges, taken before the write -------------------------------------
    if TOP_M > 0:
        e = tl.arange(0, M_PAD)
        edge_slots = tl.full([M_PAD], -1, tl.int32)
        edge_poss = tl.full([M_PAD], -1, tl.int32)
        edge_ws = tl.zeros([M_PAD], tl.float32)
        prev_a = float("inf")
        prev_slot = -1
        for rank in tl.static_range(TOP_M):
            # the best slot ranked after the previous pick in (attention desc, slot asc) order
            pick_a = tl.full([], -1.0, tl.float32)
            pick_slot = tl.full([], -1, tl.int32)
            for start in range(0, filled, BLOCK):
                j = start + j_block
                j_ok = j < filled
                a = tl.load(attn_row + j, mask=j_ok, other=-1.0)
                pos = tl.load(pos_ptr + meta + j, mask=j_ok, other=0)
                after_prev = (a < prev_a) | ((a == prev_a) & (j > prev_slot))
                cand = tl.where(j_ok & (pos >= N_SINK) & (a > 0) & after_prev, a, -1.0)
                block_a, block_slot = _block_argmax(cand, j, budget)
                better = block_a > pick_a
                pick_slot = tl.where(better, block_slot, pick_slot)
                pick_a = tl.where(better, block_a, pick_a)
            found = pick_a > 0
            pick_pos = tl.load(pos_ptr + meta + pick_slot, mask=found, other=-1)
            edge_slots = tl.where(e == rank, tl.where(found, pick_slot, -1), edge_slots)
            edge_poss = tl.where(e == rank, tl.where(found, pick_pos, -1), edge_poss)
            edge_ws = tl.where(e == rank, tl.where(found, pick_a, 0.0), edge_ws)
            prev_a = pick_a
            prev_slot = pick_slot
        edge_ws = edge_ws / tl.maximum(tl.sum(edge_ws, axis=0), 1e-30)

    # ---- write the new token into its slot -----------------------------------------------------------
    tl.debug_barrier()
    tl.store(rk + slot * stride_rk2 + d * stride_rk3, k_new.to(ring_k_ptr.dtype.element_ty), mask=d_ok)
    tl.store(rv + slot * stride_rv2 + d * stride_rv3, v_new.to(ring_v_ptr.dtype.element_ty), mask=d_ok)
    tl.store(pos_ptr + meta + slot, new_pos)
    tl.store(score_ptr + meta + slot, score_new)
    if TOP_M > 0:
        edge = (meta + slot) * M + e
        tl.store(edge_slot_ptr + edge, edge_slots, mask=e < M)
        tl.store(edge_pos_ptr + edge, edge_poss, mask=e < M)
        tl.store(edge_w_ptr + edge, edge_ws, mask=e < M)
    tl.store(written_ptr + seq * num_kv_heads + head, slot)


def default_block_size(budget: int, device: torch.device) -> int:
    """Keys per block: 64 on a GPU; in the interpreter one block per ring (up to 1024), since each
    block-loop iteration costs milliseconds there."""
    if device.type == "cuda":
        return 64
    return max(16, min(1024, triton.next_power_of_2(budget)))


def _check_inputs(q, k_new, ring: RingLayer, spec: EvictionSpec) -> None:
    if q.shape[1] % k_new.shape[1] != 0:
        raise ValueError(f"query heads {q.shape[1]} are not a multiple of KV heads {k_new.shape[1]}")
    for name in ("pos", "score", "edge_slot", "edge_pos", "edge_w"):
        if not getattr(ring, name).is_contiguous():
            raise ValueError(f"ring.{name} must be contiguous")
    if spec.top_m > 0 and ring.edge_slot.shape[3] != spec.top_m:
        raise ValueError(f"spec.top_m={spec.top_m} but the ring stores {ring.edge_slot.shape[3]} edges per slot")
    if spec.score_mode not in (SCORE_NONE, SCORE_ATTN, SCORE_KEYDIFF, SCORE_EXTERNAL):
        raise ValueError(f"unknown score mode {spec.score_mode}")
    if spec.victim_mode not in (VICTIM_OLDEST, VICTIM_MIN_SCORE, VICTIM_RESERVOIR):
        raise ValueError(f"unknown victim mode {spec.victim_mode}")


def attend_score_sample_triton(
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
    block_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of `reference.attend_score_sample` (same arguments, results and in-place ring
    updates); `block_size` is the number of slots per block (default: see default_block_size)."""
    _check_inputs(q, k_new, ring, spec)
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads = k_new.shape[1]
    group = num_heads // num_kv_heads
    budget = ring.pos.shape[2]
    num_edges = ring.edge_slot.shape[3]
    hops = spec.hops if (spec.score_mode == SCORE_ATTN and spec.gamma != 0.0) else 0
    block = block_size or default_block_size(budget, q.device)
    g_pad = max(16, triton.next_power_of_2(group))  # tl.dot wants at least 16 rows

    out = torch.empty_like(q)
    written = torch.empty(num_seqs, num_kv_heads, dtype=torch.int32, device=q.device)
    logits = torch.empty(num_seqs * num_kv_heads * group * budget, dtype=torch.float32, device=q.device)
    attn = torch.empty(num_seqs * num_kv_heads * budget, dtype=torch.float32, device=q.device)
    walk = torch.empty(num_seqs * num_kv_heads * (hops + 1) * budget, dtype=torch.float32, device=q.device)
    if num_seqs == 0:
        return out, written

    _attend_score_sample_kernel[(num_seqs, num_kv_heads)](
        q, k_new, v_new, out,
        ring.k, ring.v, ring.pos, ring.score, ring.edge_slot, ring.edge_pos, ring.edge_w,
        ring_ids, filled, new_pos, new_score if new_score is not None else written, written,
        logits, attn, walk,
        *q.stride(), *k_new.stride(), *v_new.stride(), *out.stride(),
        *ring.k.stride(), *ring.v.stride(),
        num_kv_heads, budget, hash_base(seed, layer), float(scale),
        GROUP=group, G_PAD=g_pad, HEAD_DIM=head_dim, D_PAD=triton.next_power_of_2(head_dim),
        M=num_edges, M_PAD=triton.next_power_of_2(num_edges), BLOCK=block,
        SCORE_MODE=spec.score_mode, VICTIM_MODE=spec.victim_mode, DECAY=float(spec.decay),
        GAMMA=float(spec.gamma), HOPS=hops, TAU=float(spec.tau), TOP_M=spec.top_m, N_SINK=spec.n_sink,
        WINDOW=spec.window, EPS=float(spec.eps), HAS_NEW_SCORE=new_score is not None,
    )
    return out, written

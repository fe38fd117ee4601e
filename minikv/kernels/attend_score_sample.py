"""Fused decode step in Triton on paged rings: attend, score, sample, write (docs/design.md, sections 3 and 2).

One program per (sequence, KV head) runs the whole step of `reference.attend_score_sample`, looping over the
ring's filled slots in blocks of BLOCK keys:

  pass 1  logits of the group's query heads over the filled slots, kept in a scratch row, with the running
          max / sum of an online softmax (Milakov & Gimelshein 2018, "Online normalizer calculation for
          softmax"); KeyDiff also sums the unit keys here;
  pass 2  with the final normaliser known: the output, and a(j), each slot's probability averaged over the
          group, into a scratch row; in the same loop the new token's running top-m out-edges;
  walk    Nexus (docs/design.md, section 3): `hops` scatters of a(j) along the stored out-edges with tl.atomic_add;
  score   S <- decay * S + n (or KeyDiff / external / none), written back, and in the same loop the running
          argmax of the victim key over unprotected slots;
  write   the new K, V, pos, score and edges into slot `filled` or, when the ring is full, the victim;
          under positions="ring" the ranks above the victim's drop by one (one more pass, int32 only).

RoPE. Keys are stored unrotated: every key is rotated as it is loaded (kernels.common.Rope), at its slot's
rope_pos, and the query and the new key at the query's position. q and k hold each head's channels in
paired order (frequency f at channels 2f, 2f + 1; see Rope), so channel d's partner is its neighbour d ^ 1:
a key tile is loaded twice (the second load reads the same cache lines), and cos / sin are computed from
the fp32 angle on the fly (libdevice's accurate cos / sin on a GPU: the fast approximations lose digits
for the large angles of long contexts; under the interpreter numpy's).

Paging. A ring slot j lives in pool block `table[j // PAGE]` at offset `j % PAGE` (PAGE = the pool's
block_size, a compile-time constant). Every load and store looks its address up per key: BLOCK is free of
PAGE (a BLOCK of 64 keys over 16-slot pages touches 4 pool blocks, four distinct table entries), and the
scratch rows are indexed by ring slot, so the ring math never sees physical rows. Each sequence has its own
`budget` (the "full?" test); scratch rows have the table's capacity W * PAGE, a shape-only size.

Exact ties. Victims and edges go to the lowest ring slot on ties, as in the reference. Both are running
maxima of int64 composite keys `(order-preserving int32 of the key) * 2^32 - slot`: one tl.max per block
gives the best key and, on ties, the lowest slot, and merging blocks (or splits) is a plain max.

Split-K. When sequences x KV heads is small against the GPU's SM count, `num_splits` programs share each
(sequence, KV head), and the passes above become a few launches (see the split-K section below): the
victims and edges are exactly the single program's, scores and the output equal to rounding.

Everything stays on the device: no host synchronisation and scratch sized from shapes only, so a step is
capturable in a CUDA graph. The EvictionSpec fields are compile-time constants, so each policy compiles to
its own specialised kernel. Values are upcast to fp32 right after every load (the Triton interpreter
mishandles bf16 arithmetic) and the dots run in IEEE fp32, so the result matches the fp32 reference to
rounding.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from .common import (
    SCORE_ATTN,
    SCORE_EXTERNAL,
    SCORE_KEYDIFF,
    SCORE_NONE,
    VICTIM_MIN_SCORE,
    VICTIM_OLDEST,
    VICTIM_RESERVOIR,
    EvictionSpec,
    PoolLayer,
    Rope,
    hash_seed_layer,
)


def hash_base(seed: int, layer: int) -> int:
    """common.hash_seed_layer as a signed int32 bit pattern, so the kernel argument stays an int32 whatever
    the seed (no recompilation per seed)."""
    x = hash_seed_layer(seed, layer)
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
def _lookup(table, j, ok, PAGE: tl.constexpr):
    """Ring slots j -> (pool block, offset in the block), int64; lanes not ok read table entry 0."""
    blk = tl.load(table + tl.where(ok, j // PAGE, 0), mask=ok, other=0).to(tl.int64)
    return blk, (j % PAGE).to(tl.int64)


@triton.jit
def _int64_min():
    return tl.full([], -2147483648, tl.int32).to(tl.int64) << 32


@triton.jit
def _ordered(x):
    """fp32 -> int32 with the same order (no NaN); -0.0 and +0.0 map alike, as they compare equal."""
    b = tl.where(x == 0.0, 0.0, x).to(tl.int32, bitcast=True)
    return b ^ ((b >> 31) & 0x7FFFFFFF)


@triton.jit
def _rank(key32, j):
    """Composite int64 key: larger key32 first, then the lower slot j."""
    return (key32.to(tl.int64) << 32) - j.to(tl.int64)


@triton.jit
def _rank_slot(rank):
    """The slot of a composite key (the inverse of _rank's low half)."""
    return ((-rank) & 0xFFFFFFFF).to(tl.int32)


@triton.jit
def _merge_top_rows(top, cand, TOP_M: tl.constexpr, M_PAD: tl.constexpr):
    """Per row, the TOP_M largest of `top` [R, M_PAD] (sorted, -1 padded) and `cand` [R, n] (composite edge
    keys, see reference.edge_rank_keys; -1 = none), sorted descending: the one top-m merge of the decode and
    prefill kernels. Keys are unique, so each round takes the largest below the previous one."""
    e = tl.arange(0, M_PAD)
    merged = tl.full(top.shape, -1, tl.int64)
    prev = tl.full([top.shape[0]], -1, tl.int64)
    for r in tl.static_range(TOP_M):
        if r == 0:
            best = tl.maximum(tl.max(cand, axis=1), tl.max(top, axis=1))
        else:
            best = tl.maximum(tl.max(tl.where(cand < prev[:, None], cand, -1), axis=1),
                              tl.max(tl.where(top < prev[:, None], top, -1), axis=1))
        merged = tl.where(e[None, :] == r, best[:, None], merged)
        prev = best
    return merged


@triton.jit
def _merge_top(top, cand, TOP_M: tl.constexpr, M_PAD: tl.constexpr):
    """_merge_top_rows for one row: top [M_PAD], cand [n] -> [M_PAD]."""
    merged = _merge_top_rows(tl.expand_dims(top, 0), tl.expand_dims(cand, 0), TOP_M, M_PAD)
    return tl.max(merged, axis=0)


# ---- RoPE on load ----------------------------------------------------------------------------------------


@triton.jit
def _rope_channels(inv_freq_ptr, d, HEAD_DIM: tl.constexpr):
    """Per channel d [D_PAD]: its frequency, its partner in paired order (padding channels pair with padding)
    and the sign of the partner's term: channels (2f, 2f + 1) = [a, b] -> [a c - b s, b c + a s]."""
    freq = tl.load(inv_freq_ptr + d // 2, mask=d < HEAD_DIM, other=0.0)
    d_sw = d ^ 1
    sign = tl.where(d % 2 == 0, -1.0, 1.0)
    return freq, d_sw, sign


@triton.jit
def _rotate(x, x_sw, angle, sign, PRECISE: tl.constexpr):
    """x rotated by `angle` (broadcastable to x): x cos + x_partner (sign sin), as kernels.common.Rope."""
    if PRECISE:
        c = libdevice.cos(angle)
        s = libdevice.sin(angle)
    else:
        c = tl.cos(angle)
        s = tl.sin(angle)
    return x * c + x_sw * (sign * s)


@triton.jit
def _load_query(q_ptr, seq, head, stride_qn, stride_qh, stride_qd, g, g_ok, d, d_ok, d_sw, freq, sign, q_pos,
                GROUP: tl.constexpr, ROPE: tl.constexpr, PRECISE: tl.constexpr):
    """The group's query heads [G_PAD, D_PAD] in fp32, rotated to q_pos under ROPE."""
    base = q_ptr + seq * stride_qn + (head * GROUP + g[:, None]) * stride_qh
    mask = g_ok[:, None] & d_ok[None, :]
    q = tl.load(base + d[None, :] * stride_qd, mask=mask, other=0.0).to(tl.float32)
    if ROPE:
        q_sw = tl.load(base + d_sw[None, :] * stride_qd, mask=mask, other=0.0).to(tl.float32)
        q = _rotate(q, q_sw, q_pos.to(tl.float32) * freq[None, :], sign[None, :], PRECISE)
    return q


@triton.jit
def _load_new_key(k_new_ptr, seq, head, stride_kn, stride_kh, stride_kd, d, d_ok, d_sw, freq, sign, q_pos,
                  ROPE: tl.constexpr, PRECISE: tl.constexpr):
    """The new key [D_PAD] as given (stored so) and rotated to q_pos (attended so)."""
    base = k_new_ptr + seq * stride_kn + head * stride_kh
    k_new = tl.load(base + d * stride_kd, mask=d_ok, other=0.0).to(tl.float32)
    k_rot = k_new
    if ROPE:
        k_sw = tl.load(base + d_sw * stride_kd, mask=d_ok, other=0.0).to(tl.float32)
        k_rot = _rotate(k_new, k_sw, q_pos.to(tl.float32) * freq, sign, PRECISE)
    return k_new, k_rot


@triton.jit
def _update_ranks(slot, shifts, q_pos, filled, table, head, num_kv_heads, rope_ptr, j_block, PAGE: tl.constexpr,
                  BLOCK: tl.constexpr):
    """positions="ring" (`shifts`: a full ring under it): the ranks above the victim's drop by one; then the
    new token's rank, q_pos - shifts, goes to its slot. Before the slot is written."""
    blk, off = _lookup(table, slot, slot >= 0, PAGE)
    cell = (blk * PAGE + off) * num_kv_heads + head
    if shifts:
        victim_rank = tl.load(rope_ptr + cell)
        for start in range(0, filled, BLOCK):
            j = start + j_block
            j_ok = j < filled
            j_blk, j_off = _lookup(table, j, j_ok, PAGE)
            at = rope_ptr + (j_blk * PAGE + j_off) * num_kv_heads + head
            rank = tl.load(at, mask=j_ok, other=0)
            tl.store(at, rank - 1, mask=j_ok & (rank > victim_rank))
        tl.debug_barrier()
    tl.store(rope_ptr + cell, q_pos - shifts.to(tl.int32))


# ---- the passes, each over ring slots [lo, hi) (the whole ring here; a split's range under split-K) -------


@triton.jit
def _logits_pass(q, m_i, l_i, unit_sum, lo, hi, table, head, num_kv_heads, k_ptr, sk0, sk1, sk2, sk3, rope_ptr,
                 logits_row, scale, g_ok, d, d_ok, d_sw, freq, sign, j_block, PAGE: tl.constexpr,
                 BLOCK: tl.constexpr, SCORE_MODE: tl.constexpr, ROPE: tl.constexpr, PRECISE: tl.constexpr):
    for start in range(lo, hi, BLOCK):
        j = start + j_block
        j_ok = j < hi
        blk, off = _lookup(table, j, j_ok, PAGE)
        row = k_ptr + blk[:, None] * sk0 + off[:, None] * sk1 + head * sk2
        k = tl.load(row + d[None, :] * sk3, mask=j_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        k_rot = k
        if ROPE:  # KeyDiff below reads the key as stored
            k_sw = tl.load(row + d_sw[None, :] * sk3, mask=j_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
            key_pos = tl.load(rope_ptr + (blk * PAGE + off) * num_kv_heads + head, mask=j_ok, other=0)
            k_rot = _rotate(k, k_sw, key_pos.to(tl.float32)[:, None] * freq[None, :], sign[None, :], PRECISE)
        s = tl.dot(q, tl.trans(k_rot), input_precision="ieee") * scale
        s = tl.where(j_ok[None, :], s, float("-inf"))
        tl.store(logits_row + j[None, :], s, mask=g_ok[:, None] & j_ok[None, :])
        m_next = tl.maximum(m_i, tl.max(s, axis=1))
        l_i = l_i * tl.exp(m_i - m_next) + tl.sum(tl.exp(s - m_next[:, None]), axis=1)
        m_i = m_next
        if SCORE_MODE == 2:
            norm = tl.sqrt(tl.sum(k * k, axis=1))
            unit_sum += tl.sum(k / tl.maximum(norm, 1e-12)[:, None], axis=0)
    return m_i, l_i, unit_sum


@triton.jit
def _probs_pass(m_i, inv_l, top, lo, hi, table, head, num_kv_heads, v_ptr, sv0, sv1, sv2, sv3, pos_ptr,
                logits_row, attn_row, g_ok, d, d_ok, j_block, G_PAD: tl.constexpr, D_PAD: tl.constexpr,
                PAGE: tl.constexpr, BLOCK: tl.constexpr, GROUP: tl.constexpr, TOP_M: tl.constexpr,
                M_PAD: tl.constexpr, N_SINK: tl.constexpr):
    """Output partial sum and a(j) over [lo, hi), and the running top-m edge keys."""
    acc = tl.zeros([G_PAD, D_PAD], tl.float32)
    for start in range(lo, hi, BLOCK):
        j = start + j_block
        j_ok = j < hi
        blk, off = _lookup(table, j, j_ok, PAGE)
        s = tl.load(logits_row + j[None, :], mask=g_ok[:, None] & j_ok[None, :], other=float("-inf"))
        p = tl.exp(s - m_i[:, None]) * inv_l[:, None]
        v = tl.load(v_ptr + blk[:, None] * sv0 + off[:, None] * sv1 + head * sv2 + d[None, :] * sv3,
                    mask=j_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        acc += tl.dot(p, v, input_precision="ieee")
        a = tl.sum(p, axis=0) / GROUP
        tl.store(attn_row + j, a, mask=j_ok)
        if TOP_M > 0:
            pos = tl.load(pos_ptr + (blk * PAGE + off) * num_kv_heads + head, mask=j_ok, other=0)
            eligible = j_ok & (pos >= N_SINK) & (a > 0)
            cand = tl.where(eligible, _rank(a.to(tl.int32, bitcast=True), j), -1)
            top = _merge_top(top, cand, TOP_M, M_PAD)
    return acc, top


@triton.jit
def _walk_hop(lo, hi, filled, src_row, dst_row, table, head, num_kv_heads, pos_ptr, edge_slot_ptr,
              edge_pos_ptr, edge_w_ptr, j_block, M: tl.constexpr, M_PAD: tl.constexpr, PAGE: tl.constexpr,
              BLOCK: tl.constexpr):
    """dst += src P over the live edges of sources [lo, hi); targets are ring slots < filled."""
    e = tl.arange(0, M_PAD)
    for start in range(lo, hi, BLOCK):
        i = start + j_block
        i_ok = i < hi
        blk, off = _lookup(table, i, i_ok, PAGE)
        x = tl.load(src_row + i, mask=i_ok, other=0.0, volatile=True)
        edge = ((blk * PAGE + off) * num_kv_heads + head)[:, None] * M + e[None, :]
        edge_ok = i_ok[:, None] & (e[None, :] < M)
        target = tl.load(edge_slot_ptr + edge, mask=edge_ok, other=-1)
        alive = edge_ok & (target >= 0) & (target < filled)
        t_blk, t_off = _lookup(table, target, alive, PAGE)
        target_pos = tl.load(pos_ptr + (t_blk * PAGE + t_off) * num_kv_heads + head, mask=alive, other=-1)
        alive &= target_pos == tl.load(edge_pos_ptr + edge, mask=edge_ok, other=-1)
        weight = tl.load(edge_w_ptr + edge, mask=edge_ok, other=0.0)
        tl.atomic_add(dst_row + target, x[:, None] * weight, mask=alive)


@triton.jit
def _is_held(held_ptr, cell, ok):
    return tl.load(held_ptr + cell, mask=ok, other=0) != 0


@triton.jit
def _score_pass(best, lo, hi, new_pos, table, head, num_kv_heads, hash_base_i32, k_ptr, sk0, sk1, sk2, sk3,
                pos_ptr, score_ptr, held_ptr, attn_row, walk_row, row_len, anchor, d, d_ok, j_block,
                PAGE: tl.constexpr, BLOCK: tl.constexpr, SCORE_MODE: tl.constexpr, VICTIM_MODE: tl.constexpr,
                DECAY: tl.constexpr, GAMMA: tl.constexpr, HOPS: tl.constexpr, TAU: tl.constexpr,
                N_SINK: tl.constexpr, WINDOW: tl.constexpr, EPS: tl.constexpr, HOLD: tl.constexpr):
    """Score update over [lo, hi) written back, and the running best victim rank over the same slots.
    Under HOLD a marked slot's key sits between the protected key and every real key (reference.victim_slots)."""
    for start in range(lo, hi, BLOCK):
        j = start + j_block
        j_ok = j < hi
        blk, off = _lookup(table, j, j_ok, PAGE)
        cell = (blk * PAGE + off) * num_kv_heads + head
        pos = tl.load(pos_ptr + cell, mask=j_ok, other=0)
        score = tl.load(score_ptr + cell, mask=j_ok, other=0.0)
        if SCORE_MODE == 1:
            n = tl.load(attn_row + j, mask=j_ok, other=0.0)
            coef = 1.0
            for hop in tl.static_range(HOPS):
                coef = coef * GAMMA
                n += coef * tl.load(walk_row + hop * row_len + j, mask=j_ok, other=0.0, volatile=True)
            score = DECAY * score + n
            tl.store(score_ptr + cell, score, mask=j_ok)
        if SCORE_MODE == 2:
            k = tl.load(k_ptr + blk[:, None] * sk0 + off[:, None] * sk1 + head * sk2 + d[None, :] * sk3,
                        mask=j_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
            unit = k / tl.maximum(tl.sqrt(tl.sum(k * k, axis=1)), 1e-12)[:, None]
            score = -tl.sum(unit * anchor[None, :], axis=1)
            tl.store(score_ptr + cell, score, mask=j_ok)
        protected = (pos < N_SINK) | (pos >= new_pos - WINDOW)
        if VICTIM_MODE == 0:
            key = -pos  # pos >= 0, so -pos > the held key > the protected key
            if HOLD:
                key = tl.where(_is_held(held_ptr, cell, j_ok), -2147483646, key)
            key = tl.where(protected, -2147483647, key)
        else:
            if VICTIM_MODE == 1:
                key = -score
            else:
                u = _slot_uniform(hash_base_i32, head, pos)
                key = tl.log(-tl.log(u)) - tl.log(tl.maximum(score, 0.0) + EPS) / TAU
            if HOLD:
                key = tl.where(_is_held(held_ptr, cell, j_ok), -3.4028234663852886e38, key)  # lowest finite fp32
            key = _ordered(tl.where(protected, float("-inf"), key))
        rank = tl.where(j_ok, _rank(key, j), _int64_min())
        best = tl.maximum(best, tl.max(rank, axis=0))
    return best


@triton.jit
def _write_new_token(slot, score_new, top, seq, head, num_kv_heads, new_pos, table, d, d_ok, k_new, v_new,
                     k_ptr, sk0, sk1, sk2, sk3, v_ptr, sv0, sv1, sv2, sv3, pos_ptr, score_ptr, edge_slot_ptr,
                     edge_pos_ptr, edge_w_ptr, held_ptr, written_ptr, M: tl.constexpr, M_PAD: tl.constexpr,
                     PAGE: tl.constexpr, TOP_M: tl.constexpr, HOLD: tl.constexpr):
    """The new token's K, V, pos, score and out-edges (from the top-m ranks) into ring slot `slot`; under
    HOLD its mark is cleared."""
    blk, off = _lookup(table, slot, slot >= 0, PAGE)
    cell = (blk * PAGE + off) * num_kv_heads + head
    if TOP_M > 0:
        e = tl.arange(0, M_PAD)
        found = top > 0
        target = tl.where(found, _rank_slot(top), -1)
        bits = ((top + target.to(tl.int64)) >> 32).to(tl.int32)
        weight = tl.where(found, bits.to(tl.float32, bitcast=True), 0.0)
        weight = weight / tl.maximum(tl.sum(weight, axis=0), 1e-30)
        t_blk, t_off = _lookup(table, target, found, PAGE)
        target_pos = tl.load(pos_ptr + (t_blk * PAGE + t_off) * num_kv_heads + head, mask=found, other=-1)
        # the edges were read before this point: an edge to the victim keeps the victim's old position
        tl.debug_barrier()
        edge = cell * M + e
        tl.store(edge_slot_ptr + edge, target, mask=e < M)
        tl.store(edge_pos_ptr + edge, tl.where(found, target_pos, -1), mask=e < M)
        tl.store(edge_w_ptr + edge, weight, mask=e < M)
    tl.debug_barrier()
    tl.store(k_ptr + blk * sk0 + off * sk1 + head * sk2 + d * sk3, k_new.to(k_ptr.dtype.element_ty), mask=d_ok)
    tl.store(v_ptr + blk * sv0 + off * sv1 + head * sv2 + d * sv3, v_new.to(v_ptr.dtype.element_ty), mask=d_ok)
    tl.store(pos_ptr + cell, new_pos)
    tl.store(score_ptr + cell, score_new)
    if HOLD:
        tl.store(held_ptr + cell, 0)
    tl.store(written_ptr + seq * num_kv_heads + head, slot)


# The hash base changes with every seed: keep it a plain runtime argument (never a specialised constant).
@triton.jit(do_not_specialize=["hash_base_i32"])
def _attend_score_sample_kernel(
    q_ptr, k_new_ptr, v_new_ptr, out_ptr,
    k_ptr, v_ptr, pos_ptr, score_ptr, edge_slot_ptr, edge_pos_ptr, edge_w_ptr, held_ptr,
    tables_ptr, filled_ptr, budget_ptr, new_pos_ptr, new_score_ptr, written_ptr,
    logits_ptr, attn_ptr, walk_ptr, rope_ptr, inv_freq_ptr, q_pos_ptr, ring_ptr,
    stride_qn, stride_qh, stride_qd, stride_kn, stride_kh, stride_kd, stride_vn, stride_vh, stride_vd,
    stride_on, stride_oh, stride_od, sk0, sk1, sk2, sk3, sv0, sv1, sv2, sv3, stride_t,
    num_kv_heads, row_len, hash_base_i32, scale,
    GROUP: tl.constexpr, G_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    M: tl.constexpr, M_PAD: tl.constexpr, PAGE: tl.constexpr, BLOCK: tl.constexpr,
    SCORE_MODE: tl.constexpr, VICTIM_MODE: tl.constexpr, DECAY: tl.constexpr, GAMMA: tl.constexpr,
    HOPS: tl.constexpr, TAU: tl.constexpr, TOP_M: tl.constexpr, N_SINK: tl.constexpr,
    WINDOW: tl.constexpr, EPS: tl.constexpr, HAS_NEW_SCORE: tl.constexpr, HOLD: tl.constexpr,
    ROPE: tl.constexpr, RANKS: tl.constexpr, PRECISE: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    table = tables_ptr + seq.to(tl.int64) * stride_t
    filled = tl.load(filled_ptr + seq).to(tl.int32)
    budget = tl.load(budget_ptr + seq).to(tl.int32)
    new_pos = tl.load(new_pos_ptr + seq).to(tl.int32)
    q_pos = tl.load(q_pos_ptr + seq).to(tl.int32)

    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D_PAD)
    j_block = tl.arange(0, BLOCK)
    g_ok = g < GROUP
    d_ok = d < HEAD_DIM
    row = seq * num_kv_heads + head  # this program's row of the scratch buffers (indexed by ring slot)
    logits_row = logits_ptr + (row * GROUP + g[:, None]).to(tl.int64) * row_len  # padded heads not kept
    attn_row = attn_ptr + row.to(tl.int64) * row_len
    walk_row = walk_ptr + row.to(tl.int64) * HOPS * row_len

    freq, d_sw, sign = _rope_channels(inv_freq_ptr, d, HEAD_DIM)
    q = _load_query(q_ptr, seq, head, stride_qn, stride_qh, stride_qd, g, g_ok, d, d_ok, d_sw, freq, sign, q_pos,
                    GROUP, ROPE, PRECISE)
    k_new, k_new_rot = _load_new_key(k_new_ptr, seq, head, stride_kn, stride_kh, stride_kd, d, d_ok, d_sw, freq,
                                     sign, q_pos, ROPE, PRECISE)
    v_new = tl.load(v_new_ptr + seq * stride_vn + head * stride_vh + d * stride_vd, mask=d_ok,
                    other=0.0).to(tl.float32)

    # ---- pass 1: the new token opens the softmax ----------------------------------------------------
    s_new = tl.sum(q * k_new_rot[None, :], axis=1) * scale
    m_i, l_i, unit_sum = _logits_pass(q, s_new, tl.full([G_PAD], 1.0, tl.float32), tl.zeros([D_PAD], tl.float32),
                                      0, filled, table, head, num_kv_heads, k_ptr, sk0, sk1, sk2, sk3, rope_ptr,
                                      logits_row, scale, g_ok, d, d_ok, d_sw, freq, sign, j_block, PAGE, BLOCK,
                                      SCORE_MODE, ROPE, PRECISE)
    tl.debug_barrier()

    # ---- pass 2: output, a(j), top-m edge candidates --------------------------------------------------
    inv_l = tl.where(g_ok, 1.0 / l_i, 0.0)  # padded heads weigh nothing in the group mean
    acc, top = _probs_pass(m_i, inv_l, tl.full([M_PAD], -1, tl.int64), 0, filled, table, head, num_kv_heads,
                           v_ptr, sv0, sv1, sv2, sv3, pos_ptr, logits_row, attn_row, g_ok, d, d_ok, j_block,
                           G_PAD, D_PAD, PAGE, BLOCK, GROUP, TOP_M, M_PAD, N_SINK)
    p_new = tl.exp(s_new - m_i) * inv_l
    acc += p_new[:, None] * v_new[None, :]
    attn_new = tl.sum(p_new, axis=0) / GROUP
    tl.store(out_ptr + seq * stride_on + (head * GROUP + g[:, None]) * stride_oh + d[None, :] * stride_od,
             acc.to(out_ptr.dtype.element_ty), mask=g_ok[:, None] & d_ok[None, :])
    tl.debug_barrier()

    # ---- Nexus walk: x_hop = x_{hop-1} P ----------------------------------------------------------------
    if SCORE_MODE == 1:
        for hop in tl.static_range(HOPS):
            if hop == 0:
                src_row = attn_row
            else:
                src_row = walk_row + (hop - 1) * row_len
            _walk_hop(0, filled, filled, src_row, walk_row + hop * row_len, table, head, num_kv_heads, pos_ptr,
                      edge_slot_ptr, edge_pos_ptr, edge_w_ptr, j_block, M, M_PAD, PAGE, BLOCK)
            tl.debug_barrier()

    # ---- KeyDiff anchor: the normalised mean of the unit keys, the new one included -------------------
    anchor = tl.zeros([D_PAD], tl.float32)
    k_new_unit = anchor
    if SCORE_MODE == 2:
        k_new_unit = k_new / tl.maximum(tl.sqrt(tl.sum(k_new * k_new, axis=0)), 1e-12)
        mean_unit = (unit_sum + k_new_unit) / (filled + 1).to(tl.float32)
        anchor = mean_unit / tl.maximum(tl.sqrt(tl.sum(mean_unit * mean_unit, axis=0)), 1e-12)

    # ---- scores and the victim (only scanned when needed) -------------------------------------------------
    full = filled >= budget
    score_hi = tl.where(full, filled, 0)  # scores unchanged: the loop only looks for a victim
    if SCORE_MODE == 1:
        score_hi = filled
    if SCORE_MODE == 2:
        score_hi = filled
    best = _score_pass(_int64_min(), 0, score_hi, new_pos, table, head, num_kv_heads, hash_base_i32,
                       k_ptr, sk0, sk1, sk2, sk3, pos_ptr, score_ptr, held_ptr, attn_row, walk_row, row_len, anchor, d,
                       d_ok, j_block, PAGE, BLOCK, SCORE_MODE, VICTIM_MODE, DECAY, GAMMA, HOPS, TAU, N_SINK, WINDOW,
                       EPS, HOLD)
    slot = tl.where(full, _rank_slot(best), filled)

    if SCORE_MODE == 1:
        score_new = attn_new
    elif SCORE_MODE == 2:
        score_new = -tl.sum(k_new_unit * anchor, axis=0)
    elif HAS_NEW_SCORE:
        score_new = tl.load(new_score_ptr + seq * num_kv_heads + head).to(tl.float32)
    else:
        score_new = 0.0
    if RANKS:
        shifts = full & (tl.load(ring_ptr + seq) != 0)
        _update_ranks(slot, shifts, q_pos, filled, table, head, num_kv_heads, rope_ptr, j_block, PAGE, BLOCK)
    _write_new_token(slot, score_new, top, seq, head, num_kv_heads, new_pos, table, d, d_ok, k_new, v_new,
                     k_ptr, sk0, sk1, sk2, sk3, v_ptr, sv0, sv1, sv2, sv3, pos_ptr, score_ptr, edge_slot_ptr,
                     edge_pos_ptr, edge_w_ptr, held_ptr, written_ptr, M, M_PAD, PAGE, TOP_M, HOLD)


# ---- split-K (flash-decoding): several programs per (sequence, KV head) ------------------------------------
#
# When sequences x KV heads is small against the GPU's SM count, one program per (sequence, KV head) leaves
# most of the GPU idle. Split-K gives each (sequence, KV head) NUM_SPLITS programs, split s owning ring slots
# [s * per_split, (s + 1) * per_split) (per_split: ceil(filled / NUM_SPLITS) rounded up to BLOCK). The step
# has global dependencies, so it runs as a few launches, each a barrier for the next:
#
#   phase 0   per split: logits into the scratch row, the split's softmax max / sum (and KeyDiff's unit-key
#             sum) into split scratch;
#   phase 1   per split: every program merges all splits' statistics (and the new token) into the global
#             max / normaliser, so a(j) = exp(s_j - M) / L is the same as without splits; then its range's
#             output partial, a(j), top-m edge candidates; then either the score update and the victim
#             candidate of its range (when scores need nothing beyond a(j): h2o, tova, KeyDiff with the
#             merged anchor, external, none) or the Nexus walk's first hop from its sources;
#   phase 2   (hops >= 2) one launch per further hop: the walk scatters along edges into *any* slot of the
#             ring, so hop h can only start once every split has finished hop h - 1;
#   phase 3   (hops >= 1) per split: the score update (a + gamma x1 + ...) and its victim candidate;
#   finish    one program per (sequence, KV head): sums the output partials, merges the victim candidates
#             (a max of composite keys: ties -> the lowest slot, exactly as one program would) and the
#             splits' top-m lists, and writes the new token.
#
# Victims and edges are therefore exactly those of the single-program kernel; scores and the output equal
# it to rounding (the normaliser is summed in another order).


@triton.jit
def _merged_stats(stats_m_ptr, stats_l_ptr, row, s_new, g, NUM_SPLITS: tl.constexpr, G_PAD: tl.constexpr):
    """Global softmax max and normaliser [G_PAD] of the splits' (max, sum) and the new token's logit."""
    m = s_new
    for sp in tl.static_range(NUM_SPLITS):
        m = tl.maximum(m, tl.load(stats_m_ptr + (row * NUM_SPLITS + sp) * G_PAD + g))
    total = tl.exp(s_new - m)
    for sp in tl.static_range(NUM_SPLITS):
        part = (row * NUM_SPLITS + sp) * G_PAD + g
        total += tl.load(stats_l_ptr + part) * tl.exp(tl.load(stats_m_ptr + part) - m)
    return m, total


@triton.jit
def _merged_anchor(unit_ptr, row, unit_new, filled, d, NUM_SPLITS: tl.constexpr, D_PAD: tl.constexpr):
    total = unit_new
    for sp in tl.static_range(NUM_SPLITS):
        total += tl.load(unit_ptr + (row * NUM_SPLITS + sp) * D_PAD + d)
    mean_unit = total / (filled + 1).to(tl.float32)
    return mean_unit / tl.maximum(tl.sqrt(tl.sum(mean_unit * mean_unit, axis=0)), 1e-12)


@triton.jit(do_not_specialize=["hash_base_i32"])
def _split_kernel(
    q_ptr, k_new_ptr, k_ptr, v_ptr, pos_ptr, score_ptr, edge_slot_ptr, edge_pos_ptr, edge_w_ptr, held_ptr,
    tables_ptr, filled_ptr, budget_ptr, new_pos_ptr,
    logits_ptr, attn_ptr, walk_ptr, stats_m_ptr, stats_l_ptr, unit_ptr, acc_ptr, top_ptr, best_ptr,
    rope_ptr, inv_freq_ptr, q_pos_ptr,
    stride_qn, stride_qh, stride_qd, stride_kn, stride_kh, stride_kd,
    sk0, sk1, sk2, sk3, sv0, sv1, sv2, sv3, stride_t,
    num_kv_heads, row_len, hash_base_i32, scale,
    GROUP: tl.constexpr, G_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    M: tl.constexpr, M_PAD: tl.constexpr, PAGE: tl.constexpr, BLOCK: tl.constexpr,
    SCORE_MODE: tl.constexpr, VICTIM_MODE: tl.constexpr, DECAY: tl.constexpr, GAMMA: tl.constexpr,
    HOPS: tl.constexpr, TAU: tl.constexpr, TOP_M: tl.constexpr, N_SINK: tl.constexpr,
    WINDOW: tl.constexpr, EPS: tl.constexpr, NUM_SPLITS: tl.constexpr, PHASE: tl.constexpr, HOP: tl.constexpr,
    FUSE_SCORE: tl.constexpr, HOLD: tl.constexpr, ROPE: tl.constexpr, PRECISE: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    split = tl.program_id(2)
    table = tables_ptr + seq.to(tl.int64) * stride_t
    filled = tl.load(filled_ptr + seq).to(tl.int32)
    budget = tl.load(budget_ptr + seq).to(tl.int32)
    new_pos = tl.load(new_pos_ptr + seq).to(tl.int32)
    q_pos = tl.load(q_pos_ptr + seq).to(tl.int32)
    per_split = tl.cdiv(tl.cdiv(filled, NUM_SPLITS), BLOCK) * BLOCK
    lo = tl.minimum(split * per_split, filled)
    hi = tl.minimum(lo + per_split, filled)

    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D_PAD)
    e = tl.arange(0, M_PAD)
    j_block = tl.arange(0, BLOCK)
    g_ok = g < GROUP
    d_ok = d < HEAD_DIM
    row = seq * num_kv_heads + head
    part = row * NUM_SPLITS + split  # this program's entry in the split scratch
    logits_row = logits_ptr + (row * GROUP + g[:, None]).to(tl.int64) * row_len
    attn_row = attn_ptr + row.to(tl.int64) * row_len
    walk_row = walk_ptr + row.to(tl.int64) * HOPS * row_len
    freq, d_sw, sign = _rope_channels(inv_freq_ptr, d, HEAD_DIM)

    if PHASE == 0:
        q = _load_query(q_ptr, seq, head, stride_qn, stride_qh, stride_qd, g, g_ok, d, d_ok, d_sw, freq, sign,
                        q_pos, GROUP, ROPE, PRECISE)
        m_i, l_i, unit_sum = _logits_pass(q, tl.full([G_PAD], float("-inf"), tl.float32),
                                          tl.zeros([G_PAD], tl.float32), tl.zeros([D_PAD], tl.float32), lo, hi,
                                          table, head, num_kv_heads, k_ptr, sk0, sk1, sk2, sk3, rope_ptr, logits_row,
                                          scale, g_ok, d, d_ok, d_sw, freq, sign, j_block, PAGE, BLOCK, SCORE_MODE,
                                          ROPE, PRECISE)
        tl.store(stats_m_ptr + part * G_PAD + g, m_i)
        tl.store(stats_l_ptr + part * G_PAD + g, l_i)
        if SCORE_MODE == 2:
            tl.store(unit_ptr + part * D_PAD + d, unit_sum)
    elif PHASE == 1:
        q = _load_query(q_ptr, seq, head, stride_qn, stride_qh, stride_qd, g, g_ok, d, d_ok, d_sw, freq, sign,
                        q_pos, GROUP, ROPE, PRECISE)
        k_new, k_new_rot = _load_new_key(k_new_ptr, seq, head, stride_kn, stride_kh, stride_kd, d, d_ok, d_sw,
                                         freq, sign, q_pos, ROPE, PRECISE)
        s_new = tl.sum(q * k_new_rot[None, :], axis=1) * scale
        m_i, l_i = _merged_stats(stats_m_ptr, stats_l_ptr, row, s_new, g, NUM_SPLITS, G_PAD)
        inv_l = tl.where(g_ok, 1.0 / l_i, 0.0)
        acc, top = _probs_pass(m_i, inv_l, tl.full([M_PAD], -1, tl.int64), lo, hi, table, head, num_kv_heads,
                               v_ptr, sv0, sv1, sv2, sv3, pos_ptr, logits_row, attn_row, g_ok, d, d_ok, j_block,
                               G_PAD, D_PAD, PAGE, BLOCK, GROUP, TOP_M, M_PAD, N_SINK)
        tl.store(acc_ptr + (part * G_PAD + g[:, None]) * D_PAD + d[None, :], acc)
        if TOP_M > 0:
            tl.store(top_ptr + part * M_PAD + e, top)
        tl.debug_barrier()
        if FUSE_SCORE:
            anchor = tl.zeros([D_PAD], tl.float32)
            if SCORE_MODE == 2:
                unit_new = k_new / tl.maximum(tl.sqrt(tl.sum(k_new * k_new, axis=0)), 1e-12)
                anchor = _merged_anchor(unit_ptr, row, unit_new, filled, d, NUM_SPLITS, D_PAD)
            score_hi = tl.where(filled >= budget, hi, lo)  # scores unchanged: only a victim to find
            if SCORE_MODE == 1:
                score_hi = hi
            if SCORE_MODE == 2:
                score_hi = hi
            best = _score_pass(_int64_min(), lo, score_hi, new_pos, table, head, num_kv_heads, hash_base_i32,
                               k_ptr, sk0, sk1, sk2, sk3, pos_ptr, score_ptr, held_ptr, attn_row, walk_row,
                               row_len, anchor, d, d_ok, j_block, PAGE, BLOCK, SCORE_MODE, VICTIM_MODE, DECAY,
                               GAMMA, HOPS, TAU, N_SINK, WINDOW, EPS, HOLD)
            tl.store(best_ptr + part, best)
        else:
            _walk_hop(lo, hi, filled, attn_row, walk_row, table, head, num_kv_heads, pos_ptr, edge_slot_ptr,
                      edge_pos_ptr, edge_w_ptr, j_block, M, M_PAD, PAGE, BLOCK)
    elif PHASE == 2:
        _walk_hop(lo, hi, filled, walk_row + (HOP - 1) * row_len, walk_row + HOP * row_len, table, head,
                  num_kv_heads, pos_ptr, edge_slot_ptr, edge_pos_ptr, edge_w_ptr, j_block, M, M_PAD, PAGE, BLOCK)
    else:
        best = _score_pass(_int64_min(), lo, hi, new_pos, table, head, num_kv_heads, hash_base_i32,
                           k_ptr, sk0, sk1, sk2, sk3, pos_ptr, score_ptr, held_ptr, attn_row, walk_row, row_len,
                           tl.zeros([D_PAD], tl.float32), d, d_ok, j_block, PAGE, BLOCK, SCORE_MODE, VICTIM_MODE,
                           DECAY, GAMMA, HOPS, TAU, N_SINK, WINDOW, EPS, HOLD)
        tl.store(best_ptr + part, best)


@triton.jit
def _split_finish_kernel(
    q_ptr, k_new_ptr, v_new_ptr, out_ptr,
    k_ptr, v_ptr, pos_ptr, score_ptr, edge_slot_ptr, edge_pos_ptr, edge_w_ptr, held_ptr,
    tables_ptr, filled_ptr, budget_ptr, new_pos_ptr, new_score_ptr, written_ptr,
    stats_m_ptr, stats_l_ptr, unit_ptr, acc_ptr, top_ptr, best_ptr, rope_ptr, inv_freq_ptr, q_pos_ptr, ring_ptr,
    stride_qn, stride_qh, stride_qd, stride_kn, stride_kh, stride_kd, stride_vn, stride_vh, stride_vd,
    stride_on, stride_oh, stride_od, sk0, sk1, sk2, sk3, sv0, sv1, sv2, sv3, stride_t,
    num_kv_heads, scale,
    GROUP: tl.constexpr, G_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    M: tl.constexpr, M_PAD: tl.constexpr, PAGE: tl.constexpr, SCORE_MODE: tl.constexpr, TOP_M: tl.constexpr,
    HAS_NEW_SCORE: tl.constexpr, NUM_SPLITS: tl.constexpr, HOLD: tl.constexpr, BLOCK: tl.constexpr,
    ROPE: tl.constexpr, RANKS: tl.constexpr, PRECISE: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    table = tables_ptr + seq.to(tl.int64) * stride_t
    filled = tl.load(filled_ptr + seq).to(tl.int32)
    budget = tl.load(budget_ptr + seq).to(tl.int32)
    new_pos = tl.load(new_pos_ptr + seq).to(tl.int32)
    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D_PAD)
    e = tl.arange(0, M_PAD)
    g_ok = g < GROUP
    d_ok = d < HEAD_DIM
    row = seq * num_kv_heads + head
    q_pos = tl.load(q_pos_ptr + seq).to(tl.int32)

    freq, d_sw, sign = _rope_channels(inv_freq_ptr, d, HEAD_DIM)
    q = _load_query(q_ptr, seq, head, stride_qn, stride_qh, stride_qd, g, g_ok, d, d_ok, d_sw, freq, sign, q_pos,
                    GROUP, ROPE, PRECISE)
    k_new, k_new_rot = _load_new_key(k_new_ptr, seq, head, stride_kn, stride_kh, stride_kd, d, d_ok, d_sw, freq,
                                     sign, q_pos, ROPE, PRECISE)
    v_new = tl.load(v_new_ptr + seq * stride_vn + head * stride_vh + d * stride_vd, mask=d_ok,
                    other=0.0).to(tl.float32)
    s_new = tl.sum(q * k_new_rot[None, :], axis=1) * scale
    m_i, l_i = _merged_stats(stats_m_ptr, stats_l_ptr, row, s_new, g, NUM_SPLITS, G_PAD)
    inv_l = tl.where(g_ok, 1.0 / l_i, 0.0)
    p_new = tl.exp(s_new - m_i) * inv_l
    acc = p_new[:, None] * v_new[None, :]
    best = _int64_min()
    top = tl.full([M_PAD], -1, tl.int64)
    for sp in tl.static_range(NUM_SPLITS):
        part = row * NUM_SPLITS + sp
        acc += tl.load(acc_ptr + (part * G_PAD + g[:, None]) * D_PAD + d[None, :])
        best = tl.maximum(best, tl.load(best_ptr + part))
        if TOP_M > 0:
            top = _merge_top(top, tl.load(top_ptr + part * M_PAD + e), TOP_M, M_PAD)
    tl.store(out_ptr + seq * stride_on + (head * GROUP + g[:, None]) * stride_oh + d[None, :] * stride_od,
             acc.to(out_ptr.dtype.element_ty), mask=g_ok[:, None] & d_ok[None, :])

    if SCORE_MODE == 1:
        score_new = tl.sum(p_new, axis=0) / GROUP
    elif SCORE_MODE == 2:
        unit_new = k_new / tl.maximum(tl.sqrt(tl.sum(k_new * k_new, axis=0)), 1e-12)
        anchor = _merged_anchor(unit_ptr, row, unit_new, filled, d, NUM_SPLITS, D_PAD)
        score_new = -tl.sum(unit_new * anchor, axis=0)
    elif HAS_NEW_SCORE:
        score_new = tl.load(new_score_ptr + seq * num_kv_heads + head).to(tl.float32)
    else:
        score_new = 0.0
    slot = tl.where(filled >= budget, _rank_slot(best), filled)
    if RANKS:
        shifts = (filled >= budget) & (tl.load(ring_ptr + seq) != 0)
        _update_ranks(slot, shifts, q_pos, filled, table, head, num_kv_heads, rope_ptr, tl.arange(0, BLOCK), PAGE,
                      BLOCK)
    _write_new_token(slot, score_new, top, seq, head, num_kv_heads, new_pos, table, d, d_ok, k_new, v_new,
                     k_ptr, sk0, sk1, sk2, sk3, v_ptr, sv0, sv1, sv2, sv3, pos_ptr, score_ptr, edge_slot_ptr,
                     edge_pos_ptr, edge_w_ptr, held_ptr, written_ptr, M, M_PAD, PAGE, TOP_M, HOLD)


_SM_COUNT: dict[int, int] = {}


def choose_num_splits(num_seqs: int, num_kv_heads: int, row_len: int, block: int, device: torch.device) -> int:
    """Programs per (sequence, KV head): enough to fill the GPU about twice over when sequences x KV heads
    is small against its SM count, never a split shorter than 4 loop blocks, at most 16; 1 elsewhere (the
    interpreter, or a batch that already fills the GPU). Depends on shapes only (CUDA-graph safe)."""
    if device.type != "cuda":
        return 1
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    programs = num_seqs * num_kv_heads
    if programs >= _SM_COUNT[index]:
        return 1
    wanted = triton.cdiv(2 * _SM_COUNT[index], programs)
    return max(1, min(16, wanted, row_len // (4 * block)))


def precise_trig(device: torch.device) -> bool:
    """RoPE's cos / sin from libdevice (compiled kernels) or tl.cos / tl.sin (the interpreter, which has no
    libdevice; numpy's are accurate there)."""
    return device.type == "cuda"


def default_block_keys(row_len: int, device: torch.device) -> int:
    """Keys per loop iteration: 64 on a GPU; in the interpreter one block per ring (up to 1024), since each
    block-loop iteration costs milliseconds there."""
    if device.type == "cuda":
        return 64
    return max(16, min(1024, triton.next_power_of_2(row_len)))


def _check_inputs(q, k_new, pool: PoolLayer, block_tables, spec: EvictionSpec) -> None:
    if q.shape[1] % k_new.shape[1] != 0:
        raise ValueError(f"query heads {q.shape[1]} are not a multiple of KV heads {k_new.shape[1]}")
    for name in ("pos", "score", "edge_slot", "edge_pos", "edge_w", "held", "rope_positions"):
        if not getattr(pool, name).is_contiguous():
            raise ValueError(f"pool.{name} must be contiguous")
    if block_tables.dim() != 2 or block_tables.stride(1) != 1:
        raise ValueError("block_tables must be [N, W] with contiguous rows")
    if spec.top_m > 0 and pool.edge_slot.shape[3] != spec.top_m:
        raise ValueError(f"spec.top_m={spec.top_m} but the pool stores {pool.edge_slot.shape[3]} edges per slot")
    if spec.score_mode not in (SCORE_NONE, SCORE_ATTN, SCORE_KEYDIFF, SCORE_EXTERNAL):
        raise ValueError(f"unknown score mode {spec.score_mode}")
    if spec.victim_mode not in (VICTIM_OLDEST, VICTIM_MIN_SCORE, VICTIM_RESERVOIR):
        raise ValueError(f"unknown victim mode {spec.victim_mode}")


def attend_score_sample_triton(
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
    block_keys: int | None = None,
    num_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of `reference.attend_score_sample` (same arguments, results and in-place pool
    updates). `block_keys`: ring slots per loop iteration (default: see default_block_keys). `num_splits`:
    programs per (sequence, KV head), 1 = the single fused kernel, more = split-K (see above); None
    chooses by choose_num_splits (1 under the interpreter)."""
    _check_inputs(q, k_new, pool, block_tables, spec)
    num_seqs = q.shape[0]
    q_pos = (new_pos if q_pos is None else q_pos).to(torch.int32)
    ring = torch.zeros(num_seqs, dtype=torch.int32, device=q.device) if ring is None else ring.to(torch.int32)
    inv_freq = rope.inv_freq if rope is not None else torch.zeros(1, dtype=torch.float32, device=q.device)
    rope_flags = dict(ROPE=rope is not None, PRECISE=precise_trig(q.device))
    ranks = pool.rope_pos is not None
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads = k_new.shape[1]
    group = num_heads // num_kv_heads
    page = pool.block_size
    row_len = block_tables.shape[1] * page  # the table's capacity bounds every ring in the batch
    num_edges = pool.edge_slot.shape[3]
    hops = spec.hops if (spec.score_mode == SCORE_ATTN and spec.gamma != 0.0) else 0
    block = block_keys or default_block_keys(row_len, q.device)
    g_pad = max(16, triton.next_power_of_2(group))  # tl.dot wants at least 16 rows

    out = torch.empty_like(q)
    written = torch.empty(num_seqs, num_kv_heads, dtype=torch.int32, device=q.device)
    if num_seqs == 0:
        return out, written
    f32 = dict(dtype=torch.float32, device=q.device)
    logits = torch.empty(num_seqs * num_kv_heads * group * row_len, **f32)
    attn = torch.empty(num_seqs * num_kv_heads * row_len, **f32)
    walk = torch.zeros(max(1, num_seqs * num_kv_heads * hops * row_len), **f32)  # atomics add into it
    splits = num_splits or choose_num_splits(num_seqs, num_kv_heads, row_len, block, q.device)
    constants = dict(
        GROUP=group, G_PAD=g_pad, HEAD_DIM=head_dim, D_PAD=triton.next_power_of_2(head_dim),
        M=num_edges, M_PAD=triton.next_power_of_2(num_edges), PAGE=page)
    policy = dict(SCORE_MODE=spec.score_mode, TOP_M=spec.top_m, HOLD=spec.hold)
    if splits > 1:
        rows = num_seqs * num_kv_heads * splits
        g_pad_, d_pad, m_pad = g_pad, constants["D_PAD"], constants["M_PAD"]
        stats_m = torch.empty(rows * g_pad_, **f32)
        stats_l = torch.empty(rows * g_pad_, **f32)
        unit = torch.empty(rows * d_pad if spec.score_mode == SCORE_KEYDIFF else 1, **f32)
        acc = torch.empty(rows * g_pad_ * d_pad, **f32)
        top = torch.empty(rows * m_pad, dtype=torch.int64, device=q.device)
        best = torch.empty(rows, dtype=torch.int64, device=q.device)
        # without a victim to draw (nothing full) a split's candidate is never used, but it is always written
        fuse_score = spec.score_mode != SCORE_ATTN or hops == 0
        common = (q, k_new, pool.k, pool.v, pool.pos, pool.score, pool.edge_slot, pool.edge_pos, pool.edge_w,
                  pool.held, block_tables, filled, budget, new_pos, logits, attn, walk, stats_m, stats_l, unit, acc,
                  top, best, pool.rope_positions, inv_freq, q_pos,
                  *q.stride(), *k_new.stride(), *pool.k.stride(), *pool.v.stride(), block_tables.stride(0),
                  num_kv_heads, row_len, hash_base(seed, layer), float(scale))
        phase = dict(**constants, BLOCK=block, VICTIM_MODE=spec.victim_mode, DECAY=float(spec.decay),
                     GAMMA=float(spec.gamma), HOPS=hops, TAU=float(spec.tau), N_SINK=spec.n_sink,
                     WINDOW=spec.window, EPS=float(spec.eps), NUM_SPLITS=splits, FUSE_SCORE=fuse_score, **policy,
                     **rope_flags)
        grid = (num_seqs, num_kv_heads, splits)
        _split_kernel[grid](*common, PHASE=0, HOP=0, **phase)
        _split_kernel[grid](*common, PHASE=1, HOP=0, **phase)
        if not fuse_score:
            for hop in range(1, hops):
                _split_kernel[grid](*common, PHASE=2, HOP=hop, **phase)
            _split_kernel[grid](*common, PHASE=3, HOP=0, **phase)
        _split_finish_kernel[(num_seqs, num_kv_heads)](
            q, k_new, v_new, out,
            pool.k, pool.v, pool.pos, pool.score, pool.edge_slot, pool.edge_pos, pool.edge_w, pool.held,
            block_tables, filled, budget, new_pos, new_score if new_score is not None else written, written,
            stats_m, stats_l, unit, acc, top, best, pool.rope_positions, inv_freq, q_pos, ring,
            *q.stride(), *k_new.stride(), *v_new.stride(), *out.stride(), *pool.k.stride(), *pool.v.stride(),
            block_tables.stride(0), num_kv_heads, float(scale),
            **constants, **policy, HAS_NEW_SCORE=new_score is not None, NUM_SPLITS=splits, BLOCK=block,
            RANKS=ranks, **rope_flags)
        return out, written

    _attend_score_sample_kernel[(num_seqs, num_kv_heads)](
        q, k_new, v_new, out,
        pool.k, pool.v, pool.pos, pool.score, pool.edge_slot, pool.edge_pos, pool.edge_w, pool.held,
        block_tables, filled, budget, new_pos, new_score if new_score is not None else written, written,
        logits, attn, walk, pool.rope_positions, inv_freq, q_pos, ring,
        *q.stride(), *k_new.stride(), *v_new.stride(), *out.stride(), *pool.k.stride(), *pool.v.stride(),
        block_tables.stride(0),
        num_kv_heads, row_len, hash_base(seed, layer), float(scale),
        GROUP=group, G_PAD=g_pad, HEAD_DIM=head_dim, D_PAD=triton.next_power_of_2(head_dim),
        M=num_edges, M_PAD=triton.next_power_of_2(num_edges), PAGE=page, BLOCK=block,
        SCORE_MODE=spec.score_mode, VICTIM_MODE=spec.victim_mode, DECAY=float(spec.decay),
        GAMMA=float(spec.gamma), HOPS=hops, TAU=float(spec.tau), TOP_M=spec.top_m, N_SINK=spec.n_sink,
        WINDOW=spec.window, EPS=float(spec.eps), HAS_NEW_SCORE=new_score is not None, HOLD=spec.hold,
        RANKS=ranks, **rope_flags,
    )
    return out, written

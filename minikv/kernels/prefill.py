"""Chunked prefill attention with column scores in Triton, in one kernel (docs/design.md, section 4).

A chunk of C tokens of one sequence attends its ring's f filled slots and itself (causal). Keys live on one
axis of length f + C: indices < f are ring slots (read through the sequence's block table: slot j is in
pool block `table[j // PAGE]` at offset `j % PAGE`), the rest the chunk's own tokens.

One program per (query block, KV head) owns BLOCK_Q chunk rows for all G query heads of the group, stacked
as BLOCK_Q * G_PAD rows of one tile (row-major: tile row r is chunk row r // G_PAD, head r % G_PAD), so one
dot covers the group and the group mean is a reshape and a sum. It runs two loops over the same keys:

  loop 1  flash attention (Dao et al. 2022, "FlashAttention"): online softmax, output, each row's
          log-sum-exp;
  loop 2  with the log-sum-exp known, the exact probabilities again (the logits recomputed, as
          FlashAttention's backward pass does: storing them would cost O(C * (f + C)) memory), averaged over
          the group, feed three things at once: the column mass (this program's share, summed over its
          rows), each row's running top-m edges (int64 composite keys `bits(p) * 2^32 - key`: one max per
          round, ties -> the lower key, the same order as reference.edge_rank_keys), and the observation
          rows (the last obs_rows rows' full probability rows).

This replaces the former flash pass + mass pass + torch einsum for the edges and the observation rows:
the attention is computed once per chunk (one logits recomputation in loop 2, nothing in torch). The mass
is deterministic: each program writes its own partial row (no float atomics, whose order would change the
last bits from run to run and with it near-tie keep decisions), and the partials are summed in a fixed
order afterwards; every edge and observation row is owned by exactly one program.

RoPE is applied on load, as in the decode kernel (see attend_score_sample.py): a ring key at its slot's
rope_pos, a chunk key and a chunk row's query at the chunk's RoPE positions; keys are never stored rotated.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attend_score_sample import _merge_top_rows, _rope_channels, _rotate, precise_trig
from .common import PoolLayer, Rope
from .reference import PrefillResult


@triton.jit
def _load_keys(ring_ptr, chunk_ptr, table_ptr, kv_head, key, d, num_ring, chunk_len,
               stride_r0, stride_r1, stride_r2, stride_r3, stride_c0, stride_c1, stride_c2,
               HEAD_DIM: tl.constexpr, PAGE: tl.constexpr):
    """[BLOCK, D_PAD] fp32 rows of the combined key axis: ring slots first (through the block table), then
    the chunk's tokens."""
    d_ok = d[None, :] < HEAD_DIM
    in_ring = key < num_ring
    blk = tl.load(table_ptr + tl.where(in_ring, key // PAGE, 0), mask=in_ring, other=0).to(tl.int64)
    off = (key % PAGE).to(tl.int64)
    in_chunk = (key[:, None] >= num_ring) & (key[:, None] < num_ring + chunk_len)
    ring_rows = tl.load(ring_ptr + blk[:, None] * stride_r0 + off[:, None] * stride_r1 + kv_head * stride_r2
                        + d[None, :] * stride_r3, mask=in_ring[:, None] & d_ok, other=0.0).to(tl.float32)
    chunk_rows = tl.load(chunk_ptr + (key[:, None] - num_ring) * stride_c0 + kv_head * stride_c1
                         + d[None, :] * stride_c2, mask=in_chunk & d_ok, other=0.0).to(tl.float32)
    return ring_rows + chunk_rows


@triton.jit
def _load_rotated_keys(ring_ptr, chunk_ptr, table_ptr, ring_rope_ptr, chunk_rope_ptr, kv_head, key, d, d_sw, freq,
                       sign, num_ring, chunk_len, num_kv_heads, stride_r0, stride_r1, stride_r2, stride_r3, stride_c0,
                       stride_c1, stride_c2, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr, ROPE: tl.constexpr,
                       PRECISE: tl.constexpr):
    """_load_keys, each key rotated to its RoPE position under ROPE (ring: the slot's, chunk: the token's)."""
    k = _load_keys(ring_ptr, chunk_ptr, table_ptr, kv_head, key, d, num_ring, chunk_len, stride_r0, stride_r1,
                   stride_r2, stride_r3, stride_c0, stride_c1, stride_c2, HEAD_DIM, PAGE)
    if ROPE:
        k_sw = _load_keys(ring_ptr, chunk_ptr, table_ptr, kv_head, key, d_sw, num_ring, chunk_len, stride_r0,
                          stride_r1, stride_r2, stride_r3, stride_c0, stride_c1, stride_c2, HEAD_DIM, PAGE)
        in_ring = key < num_ring
        blk = tl.load(table_ptr + tl.where(in_ring, key // PAGE, 0), mask=in_ring, other=0).to(tl.int64)
        ring_pos = tl.load(ring_rope_ptr + (blk * PAGE + key % PAGE) * num_kv_heads + kv_head, mask=in_ring,
                           other=0)
        chunk_pos = tl.load(chunk_rope_ptr + key - num_ring, mask=~in_ring & (key < num_ring + chunk_len), other=0)
        key_pos = tl.where(in_ring, ring_pos, chunk_pos).to(tl.float32)
        k = _rotate(k, k_sw, key_pos[:, None] * freq[None, :], sign[None, :], PRECISE)
    return k


@triton.jit
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, ring_k_ptr, ring_v_ptr, ring_pos_ptr, table_ptr, chunk_pos_ptr,
    out_ptr, mass_ptr, edge_idx_ptr, edge_w_ptr, obs_ptr, ring_rope_ptr, chunk_rope_ptr, inv_freq_ptr,
    stride_q0, stride_q1, stride_q2, stride_k0, stride_k1, stride_k2, stride_v0, stride_v1, stride_v2,
    stride_rk0, stride_rk1, stride_rk2, stride_rk3, stride_rv0, stride_rv1, stride_rv2, stride_rv3,
    stride_o0, stride_o1, stride_o2,
    num_kv_heads, num_ring, chunk_len, first_obs, scale,
    GROUP: tl.constexpr, G_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, PAGE: tl.constexpr, N_SINK: tl.constexpr,
    TOP_M: tl.constexpr, M_PAD: tl.constexpr, OBS: tl.constexpr, ROWS: tl.constexpr, ROPE: tl.constexpr,
    PRECISE: tl.constexpr,
):
    q_block = tl.program_id(0)
    kv_head = tl.program_id(1)
    num_keys = num_ring + chunk_len
    # ROWS = BLOCK_Q * G_PAD
    r = tl.arange(0, ROWS)
    row = q_block * BLOCK_Q + r // G_PAD  # chunk row of each tile row
    g = r % G_PAD
    head = kv_head * GROUP + g
    row_ok = (row < chunk_len) & (g < GROUP)
    d = tl.arange(0, D_PAD)
    io_mask = row_ok[:, None] & (d[None, :] < HEAD_DIM)
    q_row = q_ptr + row[:, None] * stride_q0 + head[:, None] * stride_q1
    q = tl.load(q_row + d[None, :] * stride_q2, mask=io_mask, other=0.0).to(tl.float32)
    freq, d_sw, sign = _rope_channels(inv_freq_ptr, d, HEAD_DIM)
    if ROPE:
        q_sw = tl.load(q_row + d_sw[None, :] * stride_q2, mask=io_mask, other=0.0).to(tl.float32)
        q_pos = tl.load(chunk_rope_ptr + row, mask=row < chunk_len, other=0).to(tl.float32)
        q = _rotate(q, q_sw, q_pos[:, None] * freq[None, :], sign[None, :], PRECISE)

    # ---- loop 1: online softmax, output, log-sum-exp ------------------------------------------------------
    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, D_PAD], tl.float32)
    # every row sees key 0 (a ring slot or the chunk's first token), so m_i is finite after block one;
    # rows past the chunk see the keys of row chunk_len - 1 and are never stored
    last_key = num_ring + tl.minimum(chunk_len, (q_block + 1) * BLOCK_Q)
    for start in range(0, last_key, BLOCK_K):
        key = start + tl.arange(0, BLOCK_K)
        visible = (key[None, :] < num_keys) & (key[None, :] - num_ring <= row[:, None])
        k = _load_rotated_keys(ring_k_ptr, k_ptr, table_ptr, ring_rope_ptr, chunk_rope_ptr, kv_head, key, d, d_sw,
                               freq, sign, num_ring, chunk_len, num_kv_heads, stride_rk0, stride_rk1, stride_rk2,
                               stride_rk3, stride_k0, stride_k1, stride_k2, HEAD_DIM, PAGE, ROPE, PRECISE)
        s = tl.where(visible, tl.dot(q, tl.trans(k), input_precision="ieee") * scale, float("-inf"))
        m_next = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_next)
        p = tl.exp(s - m_next[:, None])
        v = _load_keys(ring_v_ptr, v_ptr, table_ptr, kv_head, key, d, num_ring, chunk_len,
                       stride_rv0, stride_rv1, stride_rv2, stride_rv3, stride_v0, stride_v1, stride_v2,
                       HEAD_DIM, PAGE)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_next
    tl.store(out_ptr + row[:, None] * stride_o0 + head[:, None] * stride_o1 + d[None, :] * stride_o2,
             (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=io_mask)
    lse = m_i + tl.log(l_i)

    # ---- loop 2: exact probabilities, group mean -> mass, edges, observation rows ---------------------------
    own = q_block * BLOCK_Q + tl.arange(0, BLOCK_Q)  # this program's chunk rows
    own_ok = own < chunk_len
    e = tl.arange(0, M_PAD)
    top = tl.full([BLOCK_Q, M_PAD], -1, tl.int64)
    head_weight = tl.where(g < GROUP, 1.0 / GROUP, 0.0)  # padded heads weigh nothing in the mean
    for start in range(0, last_key, BLOCK_K):
        key = start + tl.arange(0, BLOCK_K)
        key_ok = key < num_keys
        visible = key_ok[None, :] & (key[None, :] - num_ring <= row[:, None])
        k = _load_rotated_keys(ring_k_ptr, k_ptr, table_ptr, ring_rope_ptr, chunk_rope_ptr, kv_head, key, d, d_sw,
                               freq, sign, num_ring, chunk_len, num_kv_heads, stride_rk0, stride_rk1, stride_rk2,
                               stride_rk3, stride_k0, stride_k1, stride_k2, HEAD_DIM, PAGE, ROPE, PRECISE)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        p = tl.where(visible, tl.exp(s - lse[:, None]), 0.0) * head_weight[:, None]
        pooled = tl.sum(tl.reshape(p, [BLOCK_Q, G_PAD, BLOCK_K]), axis=1)  # [BLOCK_Q, BLOCK_K]
        pooled = tl.where(own_ok[:, None], pooled, 0.0)
        tl.store(mass_ptr + (q_block * num_kv_heads + kv_head).to(tl.int64) * num_keys + key,
                 tl.sum(pooled, axis=0), mask=key_ok)
        if OBS:
            obs_row = own - first_obs
            tl.store(obs_ptr + ((kv_head * (chunk_len - first_obs) + obs_row[:, None]).to(tl.int64) * num_keys
                                + key[None, :]), pooled, mask=(own_ok & (obs_row >= 0))[:, None] & key_ok[None, :])
        if TOP_M > 0:
            in_ring = key < num_ring
            blk = tl.load(table_ptr + tl.where(in_ring, key // PAGE, 0), mask=in_ring, other=0).to(tl.int64)
            ring_pos = tl.load(ring_pos_ptr + (blk * PAGE + key % PAGE) * num_kv_heads + kv_head, mask=in_ring,
                               other=0)
            chunk_pos = tl.load(chunk_pos_ptr + key - num_ring, mask=key_ok & ~in_ring, other=0)
            key_pos = tl.where(in_ring, ring_pos, chunk_pos)
            eligible = ((key_pos >= N_SINK)[None, :] & (key[None, :] != num_ring + own[:, None])
                        & (pooled > 0))
            cand = tl.where(eligible, (pooled.to(tl.int32, bitcast=True).to(tl.int64) << 32)
                            - key[None, :].to(tl.int64), -1)
            top = _merge_top_rows(top, cand, TOP_M, M_PAD)
    if TOP_M > 0:
        found = top > 0
        idx = tl.where(found, ((-top) & 0xFFFFFFFF).to(tl.int32), -1)
        weight = tl.where(found, ((top + idx.to(tl.int64)) >> 32).to(tl.int32).to(tl.float32, bitcast=True), 0.0)
        weight = weight / tl.maximum(tl.sum(weight, axis=1), 1e-30)[:, None]
        edge_at = (own[:, None] * num_kv_heads + kv_head).to(tl.int64) * TOP_M + e[None, :]
        edge_mask = own_ok[:, None] & (e[None, :] < TOP_M)
        tl.store(edge_idx_ptr + edge_at, idx, mask=edge_mask)
        tl.store(edge_w_ptr + edge_at, weight, mask=edge_mask)


def default_prefill_blocks(chunk_len: int, num_keys: int, group: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK_Q chunk rows, BLOCK_K keys). On a GPU a tile of about 64 stacked rows (BLOCK_Q * G_PAD) by 64
    keys; in the interpreter as few, large blocks as possible (each loop iteration costs milliseconds)."""
    g_pad = triton.next_power_of_2(group)
    if device.type == "cuda":
        return max(1, 64 // g_pad), 64
    return (max(1, min(128, triton.next_power_of_2(chunk_len), 512 // g_pad)),
            max(16, min(256, triton.next_power_of_2(num_keys))))


def prefill_attention_triton(
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
    block_q: int | None = None,
    block_k: int | None = None,
) -> PrefillResult:
    """Triton version of `reference.prefill_attention` (same arguments and results), one kernel launch
    plus a fixed-order sum of the per-query-block mass partials. `block_q` (chunk rows per program; the
    tile holds block_q * next_pow2(G) rows) and `block_k` (keys per loop iteration) are powers of two."""
    chunk_len, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"query heads {num_heads} are not a multiple of KV heads {num_kv_heads}")
    if not pool.pos.is_contiguous() or not pool.rope_positions.is_contiguous():
        raise ValueError("pool.pos and pool.rope_pos must be contiguous")
    group = num_heads // num_kv_heads
    num_keys = filled + chunk_len
    default_q, default_k = default_prefill_blocks(chunk_len, num_keys, group, q.device)
    block_q, block_k = block_q or default_q, block_k or default_k
    g_pad = triton.next_power_of_2(group)
    if block_q * g_pad < 16:  # tl.dot wants at least 16 rows
        block_q = max(1, 16 // g_pad)
    obs_rows = min(obs_rows, chunk_len)
    f32 = dict(dtype=torch.float32, device=q.device)

    out = torch.empty_like(q)
    if chunk_len == 0:
        return PrefillResult(out, torch.zeros(num_kv_heads, num_keys, **f32), None, None, None)
    num_q_blocks = triton.cdiv(chunk_len, block_q)
    # keys past a query block's causal reach are never visited by it: their partial mass stays 0
    partial_mass = torch.zeros(num_q_blocks, num_kv_heads, num_keys, **f32)
    edge_idx = torch.empty(chunk_len, num_kv_heads, top_m, dtype=torch.int32, device=q.device) if top_m else None
    edge_w = torch.empty(chunk_len, num_kv_heads, top_m, **f32) if top_m else None
    obs = torch.zeros(num_kv_heads, obs_rows, num_keys, **f32) if obs_rows else None
    _prefill_kernel[(num_q_blocks, num_kv_heads)](
        q, k, v, pool.k, pool.v, pool.pos, block_table, chunk_pos,
        out, partial_mass, edge_idx if top_m else out, edge_w if top_m else out, obs if obs_rows else out,
        pool.rope_positions, (chunk_pos if rope_pos is None else rope_pos).to(torch.int32),
        rope.inv_freq if rope is not None else partial_mass,
        *q.stride(), *k.stride(), *v.stride(), *pool.k.stride(), *pool.v.stride(), *out.stride(),
        num_kv_heads, filled, chunk_len, chunk_len - obs_rows, float(scale),
        GROUP=group, G_PAD=g_pad, HEAD_DIM=head_dim, D_PAD=triton.next_power_of_2(head_dim),
        BLOCK_Q=block_q, BLOCK_K=block_k, PAGE=pool.block_size, N_SINK=n_sink,
        TOP_M=top_m, M_PAD=triton.next_power_of_2(max(top_m, 1)), OBS=obs_rows > 0, ROWS=block_q * g_pad,
        ROPE=rope is not None, PRECISE=precise_trig(q.device),
    )
    mass = partial_mass.sum(dim=0) if num_q_blocks > 1 else partial_mass[0]
    return PrefillResult(out, mass, edge_idx, edge_w, obs)

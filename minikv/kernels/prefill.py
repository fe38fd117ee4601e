"""Chunked prefill attention with column scores in Triton (DESIGN 4.2).

A chunk of C tokens of one sequence attends its ring's f filled slots and itself (causal). Keys live on one
axis of length f + C: indices < f are ring slots, the rest the chunk's own tokens.

  kernel 1  flash attention (Dao et al. 2022, "FlashAttention") per (query block, query head): the
            output and each row's log-sum-exp;
  kernel 2  per (key block, KV head): the column sums of the group-averaged probabilities ("mass"),
            recomputed from the stored log-sum-exp by looping over the query blocks that see the keys.
            One program owns each column, so no atomics and the sums are deterministic.

The per-row top-m edges and the observation rows (`obs_rows`) are rebuilt in torch from the same
log-sum-exp, a block of rows at a time, so their memory stays O(rows_block x keys) whatever the chunk.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import PoolLayer
from .reference import PrefillResult, edge_rank_keys, gather_ring

# Elements of one block of recomputed probabilities in the torch edge/obs pass (64 MiB of fp32).
_ROWS_BLOCK_ELEMENTS = 1 << 24


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
def _causal(row, key, num_ring, chunk_len):
    """Row (chunk index) sees every ring slot and the chunk's tokens up to itself. Padding rows past the
    chunk see every key, which keeps their softmax finite; they are never stored."""
    return (key[None, :] < num_ring + chunk_len) & (key[None, :] - num_ring <= row[:, None])


@triton.jit
def _prefill_forward_kernel(
    q_ptr, k_ptr, v_ptr, ring_k_ptr, ring_v_ptr, table_ptr, out_ptr, lse_ptr,
    stride_q0, stride_q1, stride_q2, stride_k0, stride_k1, stride_k2, stride_v0, stride_v1, stride_v2,
    stride_rk0, stride_rk1, stride_rk2, stride_rk3, stride_rv0, stride_rv1, stride_rv2, stride_rv3,
    stride_o0, stride_o1, stride_o2,
    num_ring, chunk_len, scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, PAGE: tl.constexpr,
):
    q_block = tl.program_id(0)
    head = tl.program_id(1)
    kv_head = head // GROUP
    row = q_block * BLOCK_Q + tl.arange(0, BLOCK_Q)
    d = tl.arange(0, D_PAD)
    io_mask = (row[:, None] < chunk_len) & (d[None, :] < HEAD_DIM)
    q = tl.load(q_ptr + row[:, None] * stride_q0 + head * stride_q1 + d[None, :] * stride_q2,
                mask=io_mask, other=0.0).to(tl.float32)

    m_i = tl.full([BLOCK_Q], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_Q], tl.float32)
    acc = tl.zeros([BLOCK_Q, D_PAD], tl.float32)
    # every row sees key 0 (a ring slot or the chunk's first token), so m_i is finite after block one
    last_key = num_ring + tl.minimum(chunk_len, (q_block + 1) * BLOCK_Q)
    for start in range(0, last_key, BLOCK_K):
        key = start + tl.arange(0, BLOCK_K)
        k = _load_keys(ring_k_ptr, k_ptr, table_ptr, kv_head, key, d, num_ring, chunk_len,
                       stride_rk0, stride_rk1, stride_rk2, stride_rk3, stride_k0, stride_k1, stride_k2, HEAD_DIM, PAGE)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        s = tl.where(_causal(row, key, num_ring, chunk_len), s, float("-inf"))
        m_next = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_next)
        p = tl.exp(s - m_next[:, None])
        v = _load_keys(ring_v_ptr, v_ptr, table_ptr, kv_head, key, d, num_ring, chunk_len,
                       stride_rv0, stride_rv1, stride_rv2, stride_rv3, stride_v0, stride_v1, stride_v2, HEAD_DIM, PAGE)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_next
    out = acc / l_i[:, None]
    tl.store(out_ptr + row[:, None] * stride_o0 + head * stride_o1 + d[None, :] * stride_o2,
             out.to(out_ptr.dtype.element_ty), mask=io_mask)
    tl.store(lse_ptr + head * chunk_len + row, m_i + tl.log(l_i), mask=row < chunk_len)


@triton.jit
def _prefill_mass_kernel(
    q_ptr, k_ptr, ring_k_ptr, table_ptr, lse_ptr, mass_ptr,
    stride_q0, stride_q1, stride_q2, stride_k0, stride_k1, stride_k2,
    stride_rk0, stride_rk1, stride_rk2, stride_rk3,
    num_ring, chunk_len, scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, PAGE: tl.constexpr,
):
    key_block = tl.program_id(0)
    kv_head = tl.program_id(1)
    key = key_block * BLOCK_K + tl.arange(0, BLOCK_K)
    d = tl.arange(0, D_PAD)
    k = _load_keys(ring_k_ptr, k_ptr, table_ptr, kv_head, key, d, num_ring, chunk_len,
                   stride_rk0, stride_rk1, stride_rk2, stride_rk3, stride_k0, stride_k1, stride_k2, HEAD_DIM, PAGE)
    column = tl.zeros([BLOCK_K], tl.float32)
    # rows before the block's first chunk key cannot see any of it (causal)
    first_row = tl.maximum(key_block * BLOCK_K - num_ring, 0) // BLOCK_Q * BLOCK_Q
    for g in range(GROUP):
        head = kv_head * GROUP + g
        for row_start in range(first_row, chunk_len, BLOCK_Q):
            row = row_start + tl.arange(0, BLOCK_Q)
            q = tl.load(q_ptr + row[:, None] * stride_q0 + head * stride_q1 + d[None, :] * stride_q2,
                        mask=(row[:, None] < chunk_len) & (d[None, :] < HEAD_DIM), other=0.0).to(tl.float32)
            lse = tl.load(lse_ptr + head * chunk_len + row, mask=row < chunk_len, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
            visible = (row[:, None] < chunk_len) & _causal(row, key, num_ring, chunk_len)
            p = tl.where(visible, tl.exp(s - lse[:, None]), 0.0)
            column += tl.sum(p, axis=0)
    tl.store(mass_ptr + kv_head * (num_ring + chunk_len) + key, column / GROUP, mask=key < num_ring + chunk_len)


def default_prefill_blocks(chunk_len: int, num_keys: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK_Q, BLOCK_K): 64 x 64 on a GPU; in the interpreter as few, large blocks as possible."""
    if device.type == "cuda":
        return 64, 64
    return (max(16, min(128, triton.next_power_of_2(chunk_len))),
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
    block_q: int | None = None,
    block_k: int | None = None,
) -> PrefillResult:
    """Triton version of `reference.prefill_attention` (same arguments and results).

    The output and the mass come from the two Triton kernels; edges (top_m > 0) and observation rows
    (obs_rows > 0) are computed in torch from the kernels' log-sum-exp, a block of rows at a time.
    """
    chunk_len, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    num_ring = filled
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"query heads {num_heads} are not a multiple of KV heads {num_kv_heads}")
    group = num_heads // num_kv_heads
    num_keys = num_ring + chunk_len
    default_q, default_k = default_prefill_blocks(chunk_len, num_keys, q.device)
    block_q, block_k = block_q or default_q, block_k or default_k
    d_pad = triton.next_power_of_2(head_dim)

    out = torch.empty_like(q)
    lse = torch.empty(num_heads, chunk_len, dtype=torch.float32, device=q.device)
    mass = torch.empty(num_kv_heads, num_keys, dtype=torch.float32, device=q.device)
    if chunk_len == 0:
        return PrefillResult(out, mass.zero_(), None, None, None)
    _prefill_forward_kernel[(triton.cdiv(chunk_len, block_q), num_heads)](
        q, k, v, pool.k, pool.v, block_table, out, lse,
        *q.stride(), *k.stride(), *v.stride(), *pool.k.stride(), *pool.v.stride(), *out.stride(),
        num_ring, chunk_len, float(scale),
        GROUP=group, HEAD_DIM=head_dim, D_PAD=d_pad, BLOCK_Q=block_q, BLOCK_K=block_k, PAGE=pool.block_size,
    )
    _prefill_mass_kernel[(triton.cdiv(num_keys, block_k), num_kv_heads)](
        q, k, pool.k, block_table, lse, mass,
        *q.stride(), *k.stride(), *pool.k.stride(),
        num_ring, chunk_len, float(scale),
        GROUP=group, HEAD_DIM=head_dim, D_PAD=d_pad, BLOCK_Q=block_q, BLOCK_K=block_k, PAGE=pool.block_size,
    )
    edge_idx = edge_w = obs = None
    if top_m > 0 or obs_rows > 0:
        ring_k = gather_ring(pool, block_table, filled, "k").transpose(0, 1)
        ring_pos = gather_ring(pool, block_table, filled, "pos").transpose(0, 1)
        edge_idx, edge_w, obs = _edges_and_obs(q, k, ring_k, ring_pos, chunk_pos, lse, scale=scale,
                                               n_sink=n_sink, top_m=top_m, obs_rows=obs_rows)
    return PrefillResult(out, mass, edge_idx, edge_w, obs)


def _pooled_rows(q_rows, keys, lse_rows, rows, num_ring, scale):
    """Group-averaged probabilities of some chunk rows [Hkv, R, f+C], recomputed from their LSE."""
    num_kv_heads, num_keys, head_dim = keys.shape
    qg = q_rows.float().view(len(rows), num_kv_heads, -1, head_dim).permute(1, 2, 0, 3)  # [Hkv, G, R, D]
    logits = torch.einsum("hgrd,hjd->hgrj", qg, keys) * scale
    lse = lse_rows.reshape(num_kv_heads, -1, len(rows))[..., None]  # [Hkv, G, R, 1]
    visible = torch.arange(num_keys, device=keys.device)[None, :] - num_ring <= rows[:, None]
    probs = torch.where(visible, torch.exp(logits - lse), torch.zeros_like(logits))
    return probs.mean(dim=1)


def _top_m_of_rows(pooled, key_pos, self_key, n_sink, top_m):
    """Top-m keys of each row [Hkv, R, K] (sinks and the row itself excluded, attention > 0; ties -> lower
    index; weights normalised) -> ([Hkv, R, M] int32 with -1 = none, [Hkv, R, M] fp32)."""
    num_kv_heads, num_rows, num_keys = pooled.shape
    eligible = (key_pos[:, None, :] >= n_sink).expand(-1, num_rows, -1).clone()
    eligible[:, torch.arange(num_rows, device=pooled.device), self_key] = False
    take = min(top_m, num_keys)
    ranked, order = edge_rank_keys(pooled, eligible & (pooled > 0)).topk(take, dim=-1)
    found = ranked > 0
    top = torch.where(found, pooled.gather(-1, order), 0.0)
    idx = torch.full((num_kv_heads, num_rows, top_m), -1, dtype=torch.int32, device=pooled.device)
    weight = torch.zeros(num_kv_heads, num_rows, top_m, dtype=torch.float32, device=pooled.device)
    idx[..., :take] = torch.where(found, order, -1).to(torch.int32)
    weight[..., :take] = top / top.sum(-1, keepdim=True).clamp_min(1e-30)
    return idx, weight


def _edges_and_obs(q, k, ring_k, ring_pos, chunk_pos, lse, *, scale, n_sink, top_m, obs_rows):
    chunk_len, num_heads, _ = q.shape
    num_kv_heads, num_ring = ring_pos.shape
    keys = torch.cat([ring_k.float(), k.float().transpose(0, 1)], dim=1)  # [Hkv, f+C, D]
    key_pos = torch.cat([ring_pos, chunk_pos[None].expand(num_kv_heads, -1).to(ring_pos.dtype)], dim=1)
    obs_rows = min(obs_rows, chunk_len)
    first_obs = chunk_len - obs_rows
    # without edges only the observation rows are needed
    first_row = 0 if top_m > 0 else first_obs
    rows_per_block = max(1, _ROWS_BLOCK_ELEMENTS // (num_heads * keys.shape[1]))

    edge_idx = edge_w = obs = None
    if top_m > 0:
        edge_idx = torch.empty(num_kv_heads, chunk_len, top_m, dtype=torch.int32, device=q.device)
        edge_w = torch.empty(num_kv_heads, chunk_len, top_m, dtype=torch.float32, device=q.device)
    if obs_rows > 0:
        obs = torch.empty(num_kv_heads, obs_rows, keys.shape[1], dtype=torch.float32, device=q.device)
    for start in range(first_row, chunk_len, rows_per_block):
        stop = min(start + rows_per_block, chunk_len)
        rows = torch.arange(start, stop, device=q.device)
        pooled = _pooled_rows(q[start:stop], keys, lse[:, start:stop], rows, num_ring, scale)
        if top_m > 0:
            edge_idx[:, start:stop], edge_w[:, start:stop] = _top_m_of_rows(
                pooled, key_pos, num_ring + rows, n_sink, top_m)
        if obs_rows > 0 and stop > first_obs:
            lo = max(start, first_obs)
            obs[:, lo - first_obs: stop - first_obs] = pooled[:, lo - start:]
    if top_m > 0:
        edge_idx, edge_w = edge_idx.transpose(0, 1).contiguous(), edge_w.transpose(0, 1).contiguous()
    return edge_idx, edge_w, obs

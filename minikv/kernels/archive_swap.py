"""The archive's swap (minikv.archive's recall): recalled tokens overwrite ring slots, in Triton beside its torch
reference.

Recall decides, per (layer, KV head), which archive tokens come back and which ring slots they take; this
writes them, every head of one layer in one launch. Swap i puts token i (its K and V before RoPE, its text
position) into pool row rows[i], KV head heads[i], and makes the slot a new token's: `pos` and `rope_pos` its
text position (under positions="ring" the caller ranks the ring again afterwards), `score` score[i], no hold
mark, no out-edges. The slots' old tokens need no copy the other way: the archive is write-through, so it
holds them already. One program per swap copies the D channels of K and V and the slot's small fields.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import PoolLayer


def swap_reference(pool: PoolLayer, rows: torch.Tensor, heads: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   pos: torch.Tensor, score: torch.Tensor) -> None:
    """rows [N] pool rows (PoolLayer.rows), heads [N] KV heads, k / v [N, D], pos [N], score [N]: in place."""
    rows, heads = rows.long(), heads.long()
    pool.rows("k")[rows, heads] = k.to(pool.k.dtype)
    pool.rows("v")[rows, heads] = v.to(pool.v.dtype)
    pool.rows("pos")[rows, heads] = pos.to(torch.int32)
    if pool.rope_pos is not None:
        pool.rows("rope_pos")[rows, heads] = pos.to(torch.int32)
    pool.rows("score")[rows, heads] = score.to(pool.score.dtype)
    pool.rows("held")[rows, heads] = 0
    pool.rows("edge_slot")[rows, heads] = -1
    pool.rows("edge_pos")[rows, heads] = -1
    pool.rows("edge_w")[rows, heads] = 0.0


@triton.jit
def _swap_kernel(rows_ptr, heads_ptr, src_k_ptr, src_v_ptr, src_pos_ptr, src_score_ptr,
                 k_ptr, v_ptr, pos_ptr, rope_pos_ptr, score_ptr, held_ptr, edge_slot_ptr, edge_pos_ptr, edge_w_ptr,
                 num_heads, dim, num_edges,
                 HAS_ROPE_POS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    i = tl.program_id(0).to(tl.int64)
    row = tl.load(rows_ptr + i).to(tl.int64)
    head = tl.load(heads_ptr + i).to(tl.int64)
    slot = row * num_heads + head  # the (row, head) element of the [rows, H] fields
    d = tl.arange(0, BLOCK_D)
    d_ok = d < dim
    k = tl.load(src_k_ptr + i * dim + d, mask=d_ok)
    v = tl.load(src_v_ptr + i * dim + d, mask=d_ok)
    tl.store(k_ptr + slot * dim + d, k, mask=d_ok)
    tl.store(v_ptr + slot * dim + d, v, mask=d_ok)
    p = tl.load(src_pos_ptr + i)
    tl.store(pos_ptr + slot, p)
    if HAS_ROPE_POS:
        tl.store(rope_pos_ptr + slot, p)
    tl.store(score_ptr + slot, tl.load(src_score_ptr + i))
    tl.store(held_ptr + slot, tl.zeros((), tl.int8))
    m = tl.arange(0, BLOCK_M)
    m_ok = m < num_edges
    tl.store(edge_slot_ptr + slot * num_edges + m, tl.full((BLOCK_M,), -1, tl.int32), mask=m_ok)
    tl.store(edge_pos_ptr + slot * num_edges + m, tl.full((BLOCK_M,), -1, tl.int32), mask=m_ok)
    tl.store(edge_w_ptr + slot * num_edges + m, tl.zeros((BLOCK_M,), tl.float32), mask=m_ok)


def swap_triton(pool: PoolLayer, rows: torch.Tensor, heads: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                pos: torch.Tensor, score: torch.Tensor) -> None:
    """The same writes as swap_reference, one program per swap. Swaps must name distinct (row, head) pairs
    (recall's do: each head's outgoing slots are distinct)."""
    n = rows.shape[0]
    if n == 0:
        return
    fields = (pool.k, pool.v, pool.pos, pool.score, pool.held, pool.edge_slot, pool.edge_pos, pool.edge_w)
    if not all(t.is_contiguous() for t in fields) or (pool.rope_pos is not None and not pool.rope_pos.is_contiguous()):
        raise ValueError("swap_triton needs the pool layer's tensors contiguous (as KVPool.layer gives them)")
    num_heads, dim, num_edges = pool.k.shape[2], pool.k.shape[3], pool.edge_slot.shape[-1]
    src_k = k.to(pool.k.dtype).contiguous()
    src_v = v.to(pool.v.dtype).contiguous()
    rope_pos = pool.rope_pos if pool.rope_pos is not None else pool.pos  # not written without HAS_ROPE_POS
    _swap_kernel[(n,)](rows.to(torch.int64).contiguous(), heads.to(torch.int32).contiguous(), src_k, src_v,
                       pos.to(torch.int32).contiguous(), score.to(torch.float32).contiguous(),
                       pool.k, pool.v, pool.pos, rope_pos, pool.score, pool.held, pool.edge_slot, pool.edge_pos,
                       pool.edge_w, num_heads, dim, num_edges,
                       HAS_ROPE_POS=pool.rope_pos is not None, BLOCK_D=triton.next_power_of_2(dim),
                       BLOCK_M=triton.next_power_of_2(max(num_edges, 1)))

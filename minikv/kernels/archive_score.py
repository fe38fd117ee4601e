"""Archive block scoring (minikv.archive's recall): the Quest upper bound of q.k over a block of keys, from the
block's per-channel key min / max, in Triton beside its torch reference.

    bound[h, b] = max over queries r of  sum_d max(q[h, r, d] * kmin[h, b, d], q[h, r, d] * kmax[h, b, d])

For every key k in block b (kmin <= k <= kmax channel-wise), q.k <= bound: each channel's product is at
most the larger of its two corner products. One program per (KV head, block) streams the queries in tiles.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def block_bound_reference(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> torch.Tensor:
    """q [H, R, D], kmin / kmax [H, B, D] -> [H, B] fp32."""
    q, kmin, kmax = q.float(), kmin.float(), kmax.float()
    return torch.maximum(q[:, None] * kmin[:, :, None], q[:, None] * kmax[:, :, None]).sum(-1).amax(-1)


@triton.jit
def _block_bound_kernel(q_ptr, kmin_ptr, kmax_ptr, out_ptr, num_q, num_blocks, dim,
                        BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr):
    h = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < dim
    base = (h * num_blocks + b) * dim
    lo = tl.load(kmin_ptr + base + d, mask=d_ok, other=0.0)
    hi = tl.load(kmax_ptr + base + d, mask=d_ok, other=0.0)
    best = tl.full((BLOCK_Q,), float("-inf"), tl.float32)
    for start in range(0, num_q, BLOCK_Q):
        r = start + tl.arange(0, BLOCK_Q)
        r_ok = r < num_q
        q = tl.load(q_ptr + (h * num_q + r[:, None]) * dim + d[None, :], mask=r_ok[:, None] & d_ok[None, :],
                    other=0.0)
        s = tl.sum(tl.maximum(q * lo[None, :], q * hi[None, :]), axis=1)
        best = tl.maximum(best, tl.where(r_ok, s, float("-inf")))
    tl.store(out_ptr + h * num_blocks + b, tl.max(best, axis=0))


def block_bound_triton(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> torch.Tensor:
    """The same as block_bound_reference, one program per (KV head, block)."""
    q, kmin, kmax = (t.float().contiguous() for t in (q, kmin, kmax))
    num_heads, num_q, dim = q.shape
    num_blocks = kmin.shape[1]
    out = torch.empty(num_heads, num_blocks, dtype=torch.float32, device=q.device)
    if num_heads and num_blocks and num_q:
        _block_bound_kernel[(num_heads, num_blocks)](q, kmin, kmax, out, num_q, num_blocks, dim,
                                                     BLOCK_Q=16, BLOCK_D=triton.next_power_of_2(dim))
    elif num_heads and num_blocks:
        out.fill_(float("-inf"))
    return out

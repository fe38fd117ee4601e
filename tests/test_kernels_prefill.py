"""Prefill attention on paged rings: the torch reference against a dense oracle, and the Triton kernel
against the reference (under the Triton interpreter on CPU tensors).

The ring is read through a block table whose blocks are scattered over the pool in random order, with a
partly filled last block; every other pool cell holds NaN, so reading anything outside the ring shows.
"""

from __future__ import annotations

import math

import pytest
import torch

from minikv.kernels import reference
from minikv.kernels.common import PoolLayer, physical_rows

# (chunk, ring slots filled, GQA group, head_dim, dtype, top_m, obs_rows, block_size)
CASES = [
    (16, 0, 1, 64, torch.float32, 0, 0, 16),
    (24, 40, 3, 64, torch.float32, 4, 8, 16),
    (33, 20, 4, 128, torch.float16, 8, 0, 8),
    (40, 64, 8, 64, torch.float16, 0, 16, 16),
    (8, 5, 2, 64, torch.float32, 16, 100, 4),  # top_m and obs_rows larger than the keys / rows
]


def case_id(c):
    return f"C{c[0]}-f{c[1]}-G{c[2]}-D{c[3]}-{str(c[4])[6:]}-m{c[5]}-obs{c[6]}-bs{c[7]}"


def make_inputs(chunk, filled, group, head_dim, dtype, block_size, num_kv_heads=2, seed=0):
    """(q, k, v, pool, block_table, filled, chunk_pos): the ring's slots in random physical order of
    positions, all before the chunk; its blocks scattered over a pool of NaN."""
    gen = torch.Generator().manual_seed(seed)
    num_heads = num_kv_heads * group
    q = torch.randn(chunk, num_heads, head_dim, generator=gen).to(dtype)
    k = torch.randn(chunk, num_kv_heads, head_dim, generator=gen).to(dtype)
    v = torch.randn(chunk, num_kv_heads, head_dim, generator=gen).to(dtype)
    need = max(1, math.ceil(filled / block_size))
    num_blocks = need + 3
    shape = (num_blocks, block_size, num_kv_heads)
    nan = float("nan")
    pool = PoolLayer(torch.full((*shape, head_dim), nan).to(dtype), torch.full((*shape, head_dim), nan).to(dtype),
                     torch.randint(-3, 10_000, shape, generator=gen, dtype=torch.int32), torch.full(shape, nan),
                     torch.full((*shape, 1), -1, dtype=torch.int32), torch.full((*shape, 1), -1, dtype=torch.int32),
                     torch.full((*shape, 1), nan), torch.zeros(shape, dtype=torch.int8))
    order = torch.randperm(num_blocks, generator=gen).to(torch.int32)
    block_table = torch.cat([order[:need], order[-1:].expand(2)])  # two trailing scratch entries
    rows = physical_rows(block_table, torch.arange(filled), block_size)
    pool.rows("k")[rows] = torch.randn(filled, num_kv_heads, head_dim, generator=gen).to(dtype)
    pool.rows("v")[rows] = torch.randn(filled, num_kv_heads, head_dim, generator=gen).to(dtype)
    pool.rows("pos")[rows] = torch.stack([torch.randperm(filled, generator=gen) for _ in range(num_kv_heads)],
                                         1).to(torch.int32)
    chunk_pos = torch.arange(filled, filled + chunk, dtype=torch.int32)
    return q, k, v, pool, block_table, filled, chunk_pos


def dense_oracle(q, k, v, pool, block_table, filled, chunk_pos, *, scale, n_sink=4, top_m=0, obs_rows=0):
    """The plain form of the contract over dense ring tensors: stable sort for the edges."""
    rows = physical_rows(block_table, torch.arange(filled), pool.block_size)
    ring_k, ring_v = pool.rows("k")[rows].transpose(0, 1), pool.rows("v")[rows].transpose(0, 1)
    ring_pos = pool.rows("pos")[rows].transpose(0, 1)
    chunk, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    group = num_heads // num_kv_heads
    keys = torch.cat([ring_k.float(), k.float().transpose(0, 1)], dim=1)
    values = torch.cat([ring_v.float(), v.float().transpose(0, 1)], dim=1)
    qg = q.float().view(chunk, num_kv_heads, group, head_dim).permute(1, 2, 0, 3)
    logits = torch.einsum("hgcd,hjd->hgcj", qg, keys) * scale
    causal = torch.ones(chunk, filled + chunk, dtype=torch.bool).tril(diagonal=filled)
    probs = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)
    out = torch.einsum("hgcj,hjd->cghd", probs, values).permute(0, 2, 1, 3).reshape(q.shape).to(q.dtype)
    pooled = probs.mean(dim=1)
    mass = pooled.sum(dim=1)
    edge_idx = edge_w = obs = None
    if top_m > 0:
        key_pos = torch.cat([ring_pos, chunk_pos[None].expand(num_kv_heads, -1).to(ring_pos.dtype)], dim=1)
        eligible = (key_pos[:, None, :] >= n_sink).expand(-1, chunk, -1).clone()
        eligible[:, torch.arange(chunk), filled + torch.arange(chunk)] = False
        masked = torch.where(eligible & (pooled > 0), pooled, -1.0)
        take = min(top_m, masked.shape[-1])
        order = torch.sort(-masked, dim=-1, stable=True).indices[..., :take]
        top = masked.gather(-1, order)
        ok = top >= 0
        total = torch.where(ok, top, 0.0).sum(-1, keepdim=True).clamp_min(1e-30)
        edge_idx = torch.full((num_kv_heads, chunk, top_m), -1, dtype=torch.int32)
        edge_w = torch.zeros(num_kv_heads, chunk, top_m)
        edge_idx[..., :take] = torch.where(ok, order, -1).to(torch.int32)
        edge_w[..., :take] = torch.where(ok, top / total, 0.0)
        edge_idx, edge_w = edge_idx.transpose(0, 1), edge_w.transpose(0, 1)
    if obs_rows > 0:
        obs = pooled[:, -obs_rows:]
    return reference.PrefillResult(out, mass, edge_idx, edge_w, obs)


def assert_results_match(ref, got, dtype):
    atol = 1e-5 if dtype == torch.float32 else 2e-3
    assert got.out.dtype == ref.out.dtype and got.out.shape == ref.out.shape
    torch.testing.assert_close(got.out.float(), ref.out.float(), rtol=1e-3, atol=atol)
    torch.testing.assert_close(got.mass, ref.mass, rtol=1e-4, atol=1e-4)
    for name in ("edge_idx", "edge_w", "obs"):
        a, b = getattr(ref, name), getattr(got, name)
        assert (a is None) == (b is None), name
    if ref.edge_idx is not None:
        assert got.edge_idx.dtype == torch.int32 and got.edge_idx.shape == ref.edge_idx.shape
        assert torch.equal(got.edge_idx, ref.edge_idx)
        torch.testing.assert_close(got.edge_w, ref.edge_w, rtol=1e-4, atol=1e-5)
    if ref.obs is not None:
        torch.testing.assert_close(got.obs, ref.obs, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_reference_matches_dense_oracle(case):
    chunk, filled, group, head_dim, dtype, top_m, obs_rows, block_size = case
    inputs = make_inputs(chunk, filled, group, head_dim, dtype, block_size)
    kwargs = dict(scale=head_dim**-0.5, n_sink=4, top_m=top_m, obs_rows=obs_rows)
    pool_before = [None if t is None else t.clone() for t in inputs[3]]
    assert_results_match(dense_oracle(*inputs, **kwargs), reference.prefill_attention(*inputs, **kwargs), dtype)
    for before, after in zip(pool_before, inputs[3]):  # prefill writes nothing
        torch.testing.assert_close(after, before, rtol=0, atol=0, equal_nan=True)


def test_reference_edge_ties_go_to_the_lowest_key():
    """Integer-valued q and k make logits exact, and duplicated keys tie exactly."""
    q, k, v, pool, table, filled, chunk_pos = make_inputs(12, 16, 2, 64, torch.float32, 4, seed=5)
    gen = torch.Generator().manual_seed(1)
    rows = physical_rows(table, torch.arange(filled), 4)
    base = torch.randint(-1, 2, (8, 2, 64), generator=gen).float()
    pool.rows("k")[rows] = torch.cat([base, base])
    k.copy_(torch.cat([base[:6], base[:6]]))
    q.copy_(torch.randint(-1, 2, q.shape, generator=gen).float())
    kwargs = dict(scale=0.125, n_sink=2, top_m=6)
    assert_results_match(dense_oracle(q, k, v, pool, table, filled, chunk_pos, **kwargs),
                         reference.prefill_attention(q, k, v, pool, table, filled, chunk_pos, **kwargs), torch.float32)


def test_reference_mass_counts_every_row_once():
    """Each row's probabilities sum to 1, so the mass of a chunk of C rows sums to C per KV head."""
    inputs = make_inputs(20, 12, 4, 64, torch.float32, 8, seed=2)
    for top_m in (0, 4):
        result = reference.prefill_attention(*inputs, scale=0.125, top_m=top_m)
        torch.testing.assert_close(result.mass.sum(dim=1), torch.full((2,), 20.0), rtol=1e-5, atol=1e-5)


# --- the Triton kernels against the reference (interpreter) ------------------------------------------

from minikv.kernels.prefill import prefill_attention_triton  # noqa: E402


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_triton_matches_reference(case):
    chunk, filled, group, head_dim, dtype, top_m, obs_rows, block_size = case
    inputs = make_inputs(chunk, filled, group, head_dim, dtype, block_size)
    kwargs = dict(scale=head_dim**-0.5, n_sink=4, top_m=top_m, obs_rows=obs_rows)
    assert_results_match(reference.prefill_attention(*inputs, **kwargs), prefill_attention_triton(*inputs, **kwargs),
                         dtype)


def test_triton_small_blocks():
    """Several query and key blocks (causal skipping, online softmax and running top-m across blocks), key
    blocks that straddle the ring / chunk boundary and several pool blocks."""
    inputs = make_inputs(36, 24, 3, 64, torch.float32, 8, seed=1)
    kwargs = dict(scale=0.125, n_sink=4, top_m=4, obs_rows=10)
    assert_results_match(reference.prefill_attention(*inputs, **kwargs),
                         prefill_attention_triton(*inputs, **kwargs, block_q=16, block_k=16), torch.float32)
    # a group of 8 (tile rows 4 x 8), fp16, and a group of 1 whose tile is widened to 16 rows
    for group, dtype, block_q in ((8, torch.float16, 4), (1, torch.float32, 2)):
        inputs = make_inputs(21, 19, group, 64, dtype, 4, seed=3)
        assert_results_match(reference.prefill_attention(*inputs, **kwargs),
                             prefill_attention_triton(*inputs, **kwargs, block_q=block_q, block_k=16), dtype)


def test_triton_edge_ties_go_to_the_lowest_key():
    q, k, v, pool, table, filled, chunk_pos = make_inputs(12, 16, 2, 64, torch.float32, 4, seed=5)
    gen = torch.Generator().manual_seed(1)
    rows = physical_rows(table, torch.arange(filled), 4)
    base = torch.randint(-1, 2, (8, 2, 64), generator=gen).float()
    pool.rows("k")[rows] = torch.cat([base, base])
    k.copy_(torch.cat([base[:6], base[:6]]))
    q.copy_(torch.randint(-1, 2, q.shape, generator=gen).float())
    kwargs = dict(scale=0.125, n_sink=2, top_m=6)
    args = (q, k, v, pool, table, filled, chunk_pos)
    for blocks in ({}, dict(block_q=16, block_k=16)):
        assert_results_match(reference.prefill_attention(*args, **kwargs),
                             prefill_attention_triton(*args, **kwargs, **blocks), torch.float32)


def test_triton_mass_counts_every_row_once():
    inputs = make_inputs(20, 12, 4, 64, torch.float32, 8, seed=2)
    result = prefill_attention_triton(*inputs, scale=0.125)
    torch.testing.assert_close(result.mass.sum(dim=1), torch.full((2,), 20.0), rtol=1e-5, atol=1e-5)

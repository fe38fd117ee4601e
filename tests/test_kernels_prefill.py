"""The Triton prefill kernels against the torch reference, under the Triton interpreter on CPU tensors."""

from __future__ import annotations

import pytest
import torch

from minikv.kernels import prefill as prefill_module
from minikv.kernels import reference
from minikv.kernels.prefill import prefill_attention_triton

# (chunk, ring slots filled, GQA group, head_dim, dtype, top_m, obs_rows)
CASES = [
    (16, 0, 1, 64, torch.float32, 0, 0),
    (24, 40, 3, 64, torch.float32, 4, 8),
    (33, 20, 4, 128, torch.float16, 8, 0),
    (40, 64, 8, 64, torch.float16, 0, 16),
    (8, 5, 2, 64, torch.float32, 16, 100),  # top_m and obs_rows larger than the keys / rows
]


def make_inputs(chunk, filled, group, head_dim, dtype, num_kv_heads=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    num_heads = num_kv_heads * group
    q = torch.randn(chunk, num_heads, head_dim, generator=gen).to(dtype)
    k = torch.randn(chunk, num_kv_heads, head_dim, generator=gen).to(dtype)
    v = torch.randn(chunk, num_kv_heads, head_dim, generator=gen).to(dtype)
    # ring slots in any physical order, all before the chunk
    ring_pos = torch.stack([torch.randperm(filled, generator=gen) for _ in range(num_kv_heads)]).to(torch.int32)
    ring_k = torch.randn(num_kv_heads, filled, head_dim, generator=gen).to(dtype)
    ring_v = torch.randn(num_kv_heads, filled, head_dim, generator=gen).to(dtype)
    chunk_pos = torch.arange(filled, filled + chunk, dtype=torch.int32)
    return q, k, v, ring_k, ring_v, ring_pos, chunk_pos


def assert_results_match(ref, tri, dtype):
    atol = 1e-5 if dtype == torch.float32 else 2e-3
    assert tri.out.dtype == ref.out.dtype and tri.out.shape == ref.out.shape
    torch.testing.assert_close(tri.out.float(), ref.out.float(), rtol=1e-3, atol=atol)
    torch.testing.assert_close(tri.mass, ref.mass, rtol=1e-4, atol=1e-4)
    for name in ("edge_idx", "edge_w", "obs"):
        a, b = getattr(ref, name), getattr(tri, name)
        assert (a is None) == (b is None), name
    if ref.edge_idx is not None:
        assert torch.equal(tri.edge_idx, ref.edge_idx)
        torch.testing.assert_close(tri.edge_w, ref.edge_w, rtol=1e-4, atol=1e-5)
    if ref.obs is not None:
        torch.testing.assert_close(tri.obs, ref.obs, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"C{c[0]}-f{c[1]}-G{c[2]}-D{c[3]}-{str(c[4])[6:]}")
def test_prefill_matches_reference(case):
    chunk, filled, group, head_dim, dtype, top_m, obs_rows = case
    inputs = make_inputs(chunk, filled, group, head_dim, dtype)
    kwargs = dict(scale=head_dim**-0.5, n_sink=4, top_m=top_m, obs_rows=obs_rows)
    assert_results_match(reference.prefill_attention(*inputs, **kwargs),
                         prefill_attention_triton(*inputs, **kwargs), dtype)


def test_small_blocks_and_row_blocks(monkeypatch):
    """Several query and key blocks (causal skipping, online softmax across blocks) and the torch edge
    pass split into blocks of a few rows."""
    monkeypatch.setattr(prefill_module, "_ROWS_BLOCK_ELEMENTS", 4 * 6 * 60)
    inputs = make_inputs(36, 24, 3, 64, torch.float32, seed=1)
    kwargs = dict(scale=0.125, n_sink=4, top_m=4, obs_rows=10)
    assert_results_match(reference.prefill_attention(*inputs, **kwargs),
                         prefill_attention_triton(*inputs, **kwargs, block_q=16, block_k=16), torch.float32)


def test_mass_counts_every_row_once():
    """Each row's probabilities sum to 1, so the mass of a chunk of C rows sums to C per KV head."""
    inputs = make_inputs(20, 12, 4, 64, torch.float32, seed=2)
    result = prefill_attention_triton(*inputs, scale=0.125)
    torch.testing.assert_close(result.mass.sum(dim=1), torch.full((2,), 20.0), rtol=1e-5, atol=1e-5)

"""Compiled Triton kernels against the reference on a GPU, at engine-like sizes (budget 4096, batch 16, paged).

Skipped without CUDA. The interpreter tests (test_kernels_decode.py, test_kernels_prefill.py) cover the
logic; these catch what only compiled code can get wrong: layouts, barriers between phases, atomics,
uint32 wrap-around in the slot hash, int64 composite keys, bf16 loads, split-K's launches, and CUDA-graph
capture (no host synchronisation).

Run them compiled, not interpreted: `TRITON_INTERPRET=0 python -m pytest tests/test_gpu_kernels.py -m gpu`
(tests/conftest.py turns the interpreter on unless the variable is already set).
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from minikv.kernels import reference
from minikv.kernels.attend_score_sample import attend_score_sample_triton, choose_num_splits
from minikv.kernels.common import SCORE_EXTERNAL, PoolLayer, physical_rows
from minikv.kernels.prefill import prefill_attention_triton
from test_kernels_decode import (
    HELD_SPECS,
    POLICIES,
    Batch,
    advance,
    assert_pools_match,
    batch_args,
    clone_pool,
    random_batch,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                       reason="compiled kernels only: run with TRITON_INTERPRET=0"),
]

BUDGET, NUM_SEQS, NUM_KV_HEADS, GROUP, HEAD_DIM, BLOCK_SIZE = 4096, 16, 8, 4, 128, 16
# every decode policy, and Nexus with held marks (random_batch marks about half the slots)
DECODE_SPECS = {**POLICIES, "nexus-hold": HELD_SPECS["nexus"]}


def to_cuda(batch: Batch) -> Batch:
    return Batch(PoolLayer(*(None if t is None else t.cuda() for t in batch.pool)), batch.block_tables.cuda(),
                 batch.budget.cuda(),
                 batch.filled.cuda(), batch.new_pos.cuda())


def decode_batch(spec, dtype, num_seqs=NUM_SEQS, seed=0):
    """Ragged paged rings: most full (they evict), some partly filled, one empty; budgets differ."""
    gen = torch.Generator().manual_seed(seed)
    budgets = [BUDGET] * num_seqs
    filled = [BUDGET] * num_seqs
    if num_seqs >= 4:
        budgets[:4] = [BUDGET, 1000, BUDGET, 3000]
        filled[:4] = [0, 1000, BUDGET // 2 + 5, 3000]
    batch = random_batch(budgets, filled, num_kv_heads=NUM_KV_HEADS, head_dim=HEAD_DIM,
                         num_edges=max(spec.top_m, 1), dtype=dtype, block_size=BLOCK_SIZE, gen=gen)
    return to_cuda(batch), gen


def step_inputs(spec, dtype, gen, num_seqs=NUM_SEQS):
    q = torch.randn(num_seqs, NUM_KV_HEADS * GROUP, HEAD_DIM, generator=gen).to(dtype).cuda()
    k_new = torch.randn(num_seqs, NUM_KV_HEADS, HEAD_DIM, generator=gen).to(dtype).cuda()
    v_new = torch.randn(num_seqs, NUM_KV_HEADS, HEAD_DIM, generator=gen).to(dtype).cuda()
    new_score = (torch.rand(num_seqs, NUM_KV_HEADS, generator=gen).cuda()
                 if spec.score_mode == SCORE_EXTERNAL else None)
    return q, k_new, v_new, new_score


@pytest.mark.parametrize("num_splits", [1, None])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("policy", sorted(DECODE_SPECS))
def test_decode_matches_reference_at_scale(policy, dtype, num_splits):
    spec = DECODE_SPECS[policy]
    batch, gen = decode_batch(spec, dtype)
    ref = dataclasses.replace(batch, pool=clone_pool(batch.pool))
    for step in range(3):
        q, k_new, v_new, new_score = step_inputs(spec, dtype, gen)
        kwargs = dict(layer=7, seed=99 + step, scale=HEAD_DIM**-0.5, new_score=new_score)
        out_ref, written_ref = reference.attend_score_sample(q, k_new, v_new, *batch_args(ref), spec, **kwargs)
        out_tri, written_tri = attend_score_sample_triton(q, k_new, v_new, *batch_args(batch), spec,
                                                          num_splits=num_splits, **kwargs)
        torch.testing.assert_close(out_tri.float(), out_ref.float(), rtol=2e-2, atol=2e-2)
        assert torch.equal(written_tri, written_ref), f"step {step}: victims differ"
        assert_pools_match(ref.pool, batch.pool, 1e-5)
        advance(batch)
        advance(ref)


@pytest.mark.parametrize("num_splits", [1, None])
@pytest.mark.parametrize("policy", ["nexus", "streaming", "keydiff"])
def test_decode_rotating_keys_on_load_matches_reference_in_both_modes(policy, num_splits):
    """Keys stored unrotated, rotated by the compiled kernel (libdevice cos / sin) at their text positions
    (odd rows) or their ranks (even rows, positions="ring"): the reference's victims, ranks and output."""
    from test_kernels_rope import LLAMA3, make_rope, query_positions, with_rope_pos

    spec = POLICIES[policy]
    gen = torch.Generator().manual_seed(5)
    budgets, filled = [BUDGET, 1000, BUDGET, 3000, BUDGET, BUDGET], [BUDGET, 1000, 17, 3000, 0, BUDGET]
    batch = random_batch(budgets, filled, num_kv_heads=NUM_KV_HEADS, head_dim=HEAD_DIM,
                         num_edges=max(spec.top_m, 1), dtype=torch.bfloat16, block_size=BLOCK_SIZE, gen=gen)
    ring = torch.tensor([i % 2 == 0 for i in range(len(budgets))])
    batch = to_cuda(with_rope_pos(batch, ring.tolist(), gen))
    ring = ring.cuda()
    ref = dataclasses.replace(batch, pool=clone_pool(batch.pool))
    rope = make_rope(HEAD_DIM, theta=500000.0, scaling=LLAMA3)
    rope = type(rope)(rope.inv_freq.cuda())
    for step in range(3):
        q, k_new, v_new, new_score = step_inputs(spec, torch.bfloat16, gen, num_seqs=len(budgets))
        kwargs = dict(layer=7, seed=99 + step, scale=HEAD_DIM**-0.5, new_score=new_score, rope=rope,
                      q_pos=query_positions(batch, ring), ring=ring)
        out_ref, written_ref = reference.attend_score_sample(q, k_new, v_new, *batch_args(ref), spec, **kwargs)
        out_tri, written_tri = attend_score_sample_triton(q, k_new, v_new, *batch_args(batch), spec,
                                                          num_splits=num_splits, **kwargs)
        torch.testing.assert_close(out_tri.float(), out_ref.float(), rtol=2e-2, atol=2e-2)
        assert torch.equal(written_tri, written_ref), f"step {step}: victims differ"
        assert_pools_match(ref.pool, batch.pool, 1e-5)
        assert torch.equal(batch.pool.rope_pos, ref.pool.rope_pos), f"step {step}: ranks differ"
        advance(batch)
        advance(ref)


@pytest.mark.parametrize("policy", ["nexus", "h2o", "keydiff"])
def test_split_k_on_equals_off_at_batch_one(policy):
    """Batch 1 with 8 KV heads is where split-K matters (8 programs on a 100+ SM GPU): forced 8 splits
    against one program, and the automatic choice splits."""
    spec = POLICIES[policy]
    assert choose_num_splits(1, NUM_KV_HEADS, BUDGET, 64, torch.device("cuda")) > 1
    batch, gen = decode_batch(spec, torch.bfloat16, num_seqs=1)
    single = dataclasses.replace(batch, pool=clone_pool(batch.pool))
    for step in range(3):
        q, k_new, v_new, new_score = step_inputs(spec, torch.bfloat16, gen, num_seqs=1)
        kwargs = dict(layer=2, seed=step, scale=HEAD_DIM**-0.5, new_score=new_score)
        out1, written1 = attend_score_sample_triton(q, k_new, v_new, *batch_args(single), spec, num_splits=1,
                                                    **kwargs)
        out8, written8 = attend_score_sample_triton(q, k_new, v_new, *batch_args(batch), spec, num_splits=8,
                                                    **kwargs)
        torch.testing.assert_close(out8.float(), out1.float(), rtol=1e-2, atol=1e-2)
        assert torch.equal(written8, written1)
        assert_pools_match(single.pool, batch.pool, 1e-5)
        advance(batch)
        advance(single)


@pytest.mark.parametrize("num_splits", [1, None])
def test_decode_step_is_cuda_graph_capturable(num_splits):
    """A captured step replays to the same result as an eager one: no host synchronisation inside, for the
    single kernel and for split-K's launches (batch 2: the automatic choice splits)."""
    spec = POLICIES["nexus"]
    batch, gen = decode_batch(spec, torch.float16, num_seqs=2)
    q, k_new, v_new, _ = step_inputs(spec, torch.float16, gen, num_seqs=2)
    kwargs = dict(layer=0, seed=1, scale=HEAD_DIM**-0.5, num_splits=num_splits)
    pristine = clone_pool(batch.pool)
    eager = dataclasses.replace(batch, pool=clone_pool(pristine))
    out_eager, written_eager = attend_score_sample_triton(q, k_new, v_new, *batch_args(eager), spec, **kwargs)
    warm = dataclasses.replace(batch, pool=clone_pool(pristine))
    attend_score_sample_triton(q, k_new, v_new, *batch_args(warm), spec, **kwargs)  # compile outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_graph, written_graph = attend_score_sample_triton(q, k_new, v_new, *batch_args(batch), spec, **kwargs)
    for dst, src in zip(batch.pool, pristine):  # undo whatever capture wrote, then replay
        dst.copy_(src)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out_graph, out_eager)
    assert torch.equal(written_graph, written_eager)
    assert_pools_match(eager.pool, batch.pool, 1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_prefill_matches_reference_at_scale(dtype):
    gen = torch.Generator().manual_seed(1)
    chunk, filled = 512, BUDGET
    num_heads = NUM_KV_HEADS * GROUP

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(dtype).cuda()

    q, k, v = rand(chunk, num_heads, HEAD_DIM), rand(chunk, NUM_KV_HEADS, HEAD_DIM), rand(chunk, NUM_KV_HEADS, HEAD_DIM)
    num_blocks = BUDGET // BLOCK_SIZE + 5
    shape = (num_blocks, BLOCK_SIZE, NUM_KV_HEADS)
    pool = PoolLayer(rand(*shape, HEAD_DIM), rand(*shape, HEAD_DIM), torch.full(shape, -1, dtype=torch.int32).cuda(),
                     torch.zeros(shape).cuda(), torch.full((*shape, 1), -1, dtype=torch.int32).cuda(),
                     torch.full((*shape, 1), -1, dtype=torch.int32).cuda(), torch.zeros(*shape, 1).cuda(),
                     torch.zeros(shape, dtype=torch.int8).cuda())
    table = torch.randperm(num_blocks, generator=gen)[: BUDGET // BLOCK_SIZE].to(torch.int32).cuda()
    rows = physical_rows(table, torch.arange(filled, device="cuda"), BLOCK_SIZE)
    pool.rows("pos")[rows] = torch.stack([torch.randperm(filled, generator=gen) for _ in range(NUM_KV_HEADS)],
                                         1).int().cuda()
    chunk_pos = torch.arange(filled, filled + chunk, dtype=torch.int32).cuda()
    kwargs = dict(scale=HEAD_DIM**-0.5, n_sink=4, top_m=8, obs_rows=32)
    ref = reference.prefill_attention(q, k, v, pool, table, filled, chunk_pos, **kwargs)
    tri = prefill_attention_triton(q, k, v, pool, table, filled, chunk_pos, **kwargs)
    torch.testing.assert_close(tri.out.float(), ref.out.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(tri.mass, ref.mass, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(tri.obs, ref.obs, rtol=1e-3, atol=1e-5)
    # near-ties may swap an edge at this size; demand agreement on almost every row
    same_rows = (tri.edge_idx == ref.edge_idx).all(dim=-1).float().mean()
    assert same_rows > 0.99
    again = prefill_attention_triton(q, k, v, pool, table, filled, chunk_pos, **kwargs)
    assert torch.equal(again.mass, tri.mass)  # no float atomics: the mass is bit-reproducible

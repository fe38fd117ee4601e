"""RoPE applied by the kernels (keys stored unrotated) and the two position modes.

- `original`: the reference with unrotated keys equals the reference fed keys rotated beforehand (what the
  pool held before), so rotating on load changes nothing but where the rotation happens.
- `ring`: a slot's RoPE position is its rank in the ring. After any number of evictions the ranks the decode
  step keeps (O(ring) per step, no sort) equal a sort of the ring's positions, and the query sits just
  after them.
- Triton (interpreter) equals the reference in both modes, in one ragged paged batch that mixes them, with
  GQA, split-K and evictions; the pools agree exactly (victims, positions, ranks).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from minikv.kernels import reference
from minikv.kernels.common import PoolLayer, Rope, physical_rows
from minikv.models.llama import _scale_frequencies, apply_rope
from test_kernels_decode import POLICIES, SHAPES, advance, assert_pools_match, clone_pool, random_batch, step_inputs
from test_kernels_prefill import assert_results_match, make_inputs

LLAMA3 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=64)


def make_rope(head_dim: int, theta: float = 10000.0, scaling: dict | None = None) -> Rope:
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    return Rope(_scale_frequencies(inv_freq, scaling).float())


def ring_ranks(pos: torch.Tensor) -> torch.Tensor:
    """[..., f] positions -> each one's rank among them (a sort: the definition the kernels must keep)."""
    return pos.argsort(dim=-1).argsort(dim=-1).to(torch.int32)


def with_rope_pos(batch, ring_rows: list[bool], gen):
    """The batch's pool with a rope_pos tensor: ranks for ring rows, positions for the others, garbage
    elsewhere; and the rows' q_pos and ring flags."""
    pool = batch.pool
    rope_pos = torch.randint(-5, 10_000, pool.pos.shape, generator=gen, dtype=torch.int32)
    pool = pool._replace(rope_pos=rope_pos)
    for i, ring in enumerate(ring_rows):
        f = int(batch.filled[i])
        rows = physical_rows(batch.block_tables[i], torch.arange(f), pool.block_size)
        pos = pool.rows("pos")[rows]  # [f, Hkv]
        pool.rows("rope_pos")[rows] = ring_ranks(pos.T).T if ring else pos
    return dataclasses.replace(batch, pool=pool)


def query_positions(batch, ring: torch.Tensor) -> torch.Tensor:
    return torch.where(ring, batch.filled, batch.new_pos).to(torch.int32)


def check_ranks(batch, ring: torch.Tensor) -> None:
    """Every filled slot's rope_pos: its rank in the ring (ring rows) or its position (the others)."""
    for i in range(len(ring)):
        f = int(batch.filled[i])
        rows = physical_rows(batch.block_tables[i], torch.arange(f), batch.pool.block_size)
        pos, rope_pos = batch.pool.rows("pos")[rows].T, batch.pool.rows("rope_pos")[rows].T
        expected = ring_ranks(pos) if ring[i] else pos
        assert torch.equal(rope_pos, expected), f"row {i}: ranks differ from a sort of the ring's positions"


# --- original mode: rotation on load == keys rotated beforehand ----------------------------------------


@pytest.mark.parametrize("policy", ["nexus", "keydiff", "streaming"])
def test_reference_rotating_on_load_equals_prerotated_keys(policy):
    spec = POLICIES[policy]
    group, head_dim, dtype, block_size, budgets, filled = SHAPES[0]
    gen = torch.Generator().manual_seed(3)
    batch = random_batch(budgets, filled, num_kv_heads=2, head_dim=head_dim, num_edges=max(spec.top_m, 1),
                         dtype=dtype, block_size=block_size, gen=gen)
    ring = torch.zeros(len(budgets), dtype=torch.bool)
    batch = with_rope_pos(batch, [False] * len(budgets), gen)
    q, k_new, v_new, new_score = step_inputs(batch, spec, group, head_dim, dtype, gen)
    rope = make_rope(head_dim, scaling=LLAMA3)
    # the old contract: every key rotated at its position in the pool, q and the new key at new_pos
    old = clone_pool(batch.pool)._replace(rope_pos=None)
    cos, sin = (f(batch.pool.pos.float()[..., None] * rope.inv_freq) for f in (torch.cos, torch.sin))
    half = head_dim // 2
    old.k.copy_(apply_rope(old.k.reshape(-1, 1, head_dim), cos.reshape(-1, half), sin.reshape(-1, half)).view_as(old.k))
    angles = batch.new_pos.float()[:, None] * rope.inv_freq
    q_rot = apply_rope(q, angles.cos(), angles.sin())
    k_rot = apply_rope(k_new, angles.cos(), angles.sin())
    common = dict(layer=1, seed=5, scale=head_dim**-0.5, new_score=new_score)
    out_old, written_old = reference.attend_score_sample(q_rot, k_rot, v_new, old, batch.block_tables, batch.filled,
                                                         batch.budget, batch.new_pos, spec, **common)
    out, written = reference.attend_score_sample(q, k_new, v_new, batch.pool, batch.block_tables, batch.filled,
                                                 batch.budget, batch.new_pos, spec, **common, rope=rope,
                                                 q_pos=query_positions(batch, ring), ring=ring)
    assert (batch.filled == batch.budget).any()  # a ring evicted
    torch.testing.assert_close(out, out_old, rtol=1e-4, atol=1e-5)
    check_ranks(batch, ring)  # the new token's rope_pos is its position
    if policy == "keydiff":  # KeyDiff now compares the keys as stored (unrotated): other scores, by design
        return
    assert torch.equal(written, written_old)
    for name in ("pos", "edge_slot", "edge_pos", "held"):
        assert torch.equal(getattr(batch.pool, name), getattr(old, name)), name
    torch.testing.assert_close(batch.pool.score, old.score, rtol=1e-4, atol=1e-5, equal_nan=True)  # the new token's rope_pos is its position


def test_reference_prefill_rotating_on_load_equals_prerotated_keys():
    q, k, v, pool, table, filled, chunk_pos = make_inputs(24, 40, 2, 64, torch.float32, 8, seed=4)
    pool = pool._replace(rope_pos=pool.pos.clone())
    rope = make_rope(64, theta=1e6)
    kwargs = dict(scale=0.125, n_sink=4, top_m=4, obs_rows=5)
    rows = physical_rows(table, torch.arange(filled), 8)
    old = clone_pool(pool)._replace(rope_pos=None)
    ring_pos = pool.rows("pos")[rows]
    angles = ring_pos.float()[..., None] * rope.inv_freq
    old.rows("k")[rows] = apply_rope(pool.rows("k")[rows].reshape(-1, 1, 64), angles.cos().reshape(-1, 32),
                                     angles.sin().reshape(-1, 32)).view(-1, 2, 64)
    angles = chunk_pos.float()[:, None] * rope.inv_freq
    rotated = [apply_rope(x, angles.cos(), angles.sin()) for x in (q, k)]
    want = reference.prefill_attention(rotated[0], rotated[1], v, old, table, filled, chunk_pos, **kwargs)
    got = reference.prefill_attention(q, k, v, pool, table, filled, chunk_pos, **kwargs, rope=rope)
    assert_results_match(want, got, torch.float32)


# --- ring mode: ranks stay a sort of the ring's positions ---------------------------------------------


@pytest.mark.parametrize("policy", ["streaming", "h2o", "nexus"])
def test_ranks_after_random_evictions_equal_a_sort(policy):
    """Property: whatever the victims (h2o's are driven by random attention, nexus's sampled), after every
    step of a long run each ring slot's rank equals its position's rank among the ring's positions."""
    spec = POLICIES[policy]
    gen = torch.Generator().manual_seed(11)
    budgets, filled = [24, 40, 16], [24, 38, 3]
    batch = random_batch(budgets, filled, num_kv_heads=2, head_dim=32, num_edges=max(spec.top_m, 1),
                         dtype=torch.float32, block_size=8, gen=gen)
    ring = torch.tensor([True, True, False])
    batch = with_rope_pos(batch, ring.tolist(), gen)
    rope = make_rope(32)
    evicted = 0
    for step in range(60):
        q, k_new, v_new, new_score = step_inputs(batch, spec, 2, 32, torch.float32, gen)
        reference.attend_score_sample(q, k_new, v_new, batch.pool, batch.block_tables, batch.filled, batch.budget,
                                      batch.new_pos, spec, layer=0, seed=step, scale=0.2, new_score=new_score,
                                      rope=rope, q_pos=query_positions(batch, ring), ring=ring)
        evicted += int((batch.filled == batch.budget).sum())
        advance(batch)
        check_ranks(batch, ring)
    assert evicted > 60


# --- Triton (interpreter) against the reference, both modes in one batch ------------------------------


def run_modes(policy, shape, ring_rows, *, steps=3, **triton_kwargs):
    from minikv.kernels.attend_score_sample import attend_score_sample_triton

    spec = POLICIES[policy]
    group, head_dim, dtype, block_size, budgets, filled = SHAPES[shape]
    gen = torch.Generator().manual_seed(shape)
    batch = random_batch(budgets, filled, num_kv_heads=2, head_dim=head_dim, num_edges=max(spec.top_m, 1),
                         dtype=dtype, block_size=block_size, gen=gen)
    ring = torch.tensor(ring_rows[: len(budgets)])
    batch = with_rope_pos(batch, ring.tolist(), gen)
    other = dataclasses.replace(batch, pool=clone_pool(batch.pool))
    rope = make_rope(head_dim, scaling=LLAMA3 if shape % 2 else None)
    atol = 1e-5 if dtype == torch.float32 else 1e-3
    for step in range(steps):
        q, k_new, v_new, new_score = step_inputs(batch, spec, group, head_dim, dtype, gen)
        common = dict(layer=2, seed=99 + step, scale=head_dim**-0.5, new_score=new_score, rope=rope,
                      q_pos=query_positions(batch, ring), ring=ring)
        out_ref, written_ref = reference.attend_score_sample(q, k_new, v_new, other.pool, other.block_tables,
                                                             other.filled, other.budget, other.new_pos, spec, **common)
        out, written = attend_score_sample_triton(q, k_new, v_new, batch.pool, batch.block_tables, batch.filled,
                                                  batch.budget, batch.new_pos, spec, **common, **triton_kwargs)
        torch.testing.assert_close(out.float(), out_ref.float(), rtol=1e-3, atol=atol)
        assert torch.equal(written, written_ref), f"step {step}: written slots differ"
        assert_pools_match(other.pool, batch.pool, atol)
        assert torch.equal(batch.pool.rope_pos, other.pool.rope_pos), f"step {step}: rope_pos differs"
        advance(batch)
        advance(other)
        check_ranks(batch, ring)


@pytest.mark.parametrize("policy", ["streaming", "nexus", "keydiff", "h2o"])
@pytest.mark.parametrize("shape", range(len(SHAPES)))
def test_triton_matches_reference_both_modes(policy, shape):
    run_modes(policy, shape, [True, False, True])


@pytest.mark.parametrize("policy", ["nexus", "keydiff", "tova"])
def test_triton_split_k_matches_reference_both_modes(policy):
    run_modes(policy, 1, [True, False], block_keys=16, num_splits=3)
    run_modes(policy, 3, [False, True, True], block_keys=16, num_splits=2)


@pytest.mark.parametrize("ring_rank_start", [0, 17])
def test_triton_prefill_matches_reference_with_rope(ring_rank_start):
    """Ring keys at their slots' rope_pos (ranks 0..f-1, or text positions), the chunk at its own."""
    from minikv.kernels.prefill import prefill_attention_triton

    for case in [(24, 40, 2, 64, torch.float32, 8), (9, 5, 3, 128, torch.float16, 16), (33, 0, 1, 64, torch.float32, 4)]:
        chunk, filled, group, head_dim, dtype, block_size = case
        q, k, v, pool, table, filled, chunk_pos = make_inputs(chunk, filled, group, head_dim, dtype, block_size, seed=7)
        rows = physical_rows(table, torch.arange(filled), block_size)
        rope_pos = torch.randint(-5, 10_000, pool.pos.shape, dtype=torch.int32)
        pool = pool._replace(rope_pos=rope_pos)
        pool.rows("rope_pos")[rows] = ring_ranks(pool.rows("pos")[rows].T).T + ring_rank_start
        chunk_rope = torch.arange(filled, filled + chunk, dtype=torch.int32) + ring_rank_start
        kwargs = dict(scale=head_dim**-0.5, n_sink=4, top_m=4, obs_rows=3, rope=make_rope(head_dim, scaling=LLAMA3),
                      rope_pos=chunk_rope)
        want = reference.prefill_attention(q, k, v, pool, table, filled, chunk_pos, **kwargs)
        got = prefill_attention_triton(q, k, v, pool, table, filled, chunk_pos, **kwargs)
        assert_results_match(want, got, dtype)

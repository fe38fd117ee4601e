"""The decode kernel (`attend_score_sample`) on paged rings: the vectorised torch reference against a dense
per-sequence oracle, and the Triton kernel against the reference (under the Triton interpreter).

Every test builds a block pool the way a running engine leaves it: each sequence's ring is a block table of
blocks scattered over the pool in random order, with its own budget, partly filled last blocks, rings that
are full (they evict), partly filled and empty; slots past `filled` and blocks nobody owns hold garbage (NaN
in the float tensors). Both sides start from identical copies and run several steps in a row; after each
step the outputs and written slots must agree and so must the *whole* pool: the same victims, positions
and edges exactly, scores and outputs to fp tolerance, and nothing outside the rings' slots touched.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from dataclasses import dataclass

import pytest
import torch

from minikv.kernels import reference
from minikv.kernels.common import (
    SCORE_ATTN,
    SCORE_EXTERNAL,
    SCORE_KEYDIFF,
    SCORE_NONE,
    VICTIM_MIN_SCORE,
    VICTIM_OLDEST,
    VICTIM_RESERVOIR,
    EvictionSpec,
    PoolLayer,
    physical_rows,
    slot_hash_u32,
    slot_uniform,
)

POLICIES = {
    "streaming": EvictionSpec(SCORE_NONE, VICTIM_OLDEST, n_sink=4, window=8),
    "h2o": EvictionSpec(SCORE_ATTN, VICTIM_MIN_SCORE, decay=1.0, n_sink=4, window=8),
    "tova": EvictionSpec(SCORE_ATTN, VICTIM_MIN_SCORE, decay=0.0, n_sink=4, window=8),
    "nexus": EvictionSpec(SCORE_ATTN, VICTIM_RESERVOIR, decay=0.99, gamma=0.5, hops=2, top_m=4, n_sink=4,
                          window=8),
    "keydiff": EvictionSpec(SCORE_KEYDIFF, VICTIM_MIN_SCORE, n_sink=4, window=8),
    "external": EvictionSpec(SCORE_EXTERNAL, VICTIM_MIN_SCORE, n_sink=4, window=8),
}


@dataclass
class Batch:
    """A decode batch over a pool: per sequence its block table, budget and filled count."""

    pool: PoolLayer
    block_tables: torch.Tensor  # [N, W] int32
    budget: torch.Tensor  # [N] int32
    filled: torch.Tensor  # [N] int32
    new_pos: torch.Tensor  # [N] int32


# (GQA group, head_dim, dtype, block_size, budgets, filled): mixed budgets, partly filled last blocks,
# full / partly filled / empty rings in one batch
SHAPES = [
    (1, 64, torch.float32, 16, [32, 40, 24], [32, 30, 0]),
    (3, 128, torch.float16, 16, [48, 40], [47, 40]),
    (4, 64, torch.float16, 8, [36, 20, 28], [36, 20, 9]),
    (8, 64, torch.float32, 16, [64, 24, 56], [63, 24, 56]),
]


def random_batch(budgets, filled, *, num_kv_heads, head_dim, num_edges, dtype, block_size, gen,
                 spare_blocks=3, table_width=None) -> Batch:
    """A pool holding one ring per sequence, as a running engine leaves it.

    Each ring's blocks are distinct pool blocks in random order; its filled slots hold sinks at positions
    0..3 and a random subset of earlier positions in random slots (a full ring) or positions 0..f-1 (a
    ring still filling), random K/V and scores, and out-edges (ring slot targets) of which some are live
    and some dead (target overwritten since, or not filled). Every other cell holds garbage: NaN in the
    float tensors, random integers in the others. Table entries past a ring's blocks point at a block
    nobody owns (the engine's scratch block)."""
    num_seqs = len(budgets)
    need = [math.ceil(b / block_size) for b in budgets]
    num_blocks = sum(need) + spare_blocks
    shape = (num_blocks, block_size, num_kv_heads)
    nan = float("nan")
    pool = PoolLayer(
        k=torch.full((*shape, head_dim), nan).to(dtype), v=torch.full((*shape, head_dim), nan).to(dtype),
        pos=torch.randint(-5, 10_000, shape, generator=gen, dtype=torch.int32),
        score=torch.full(shape, nan),
        edge_slot=torch.randint(-1, 200, (*shape, num_edges), generator=gen, dtype=torch.int32),
        edge_pos=torch.randint(-1, 200, (*shape, num_edges), generator=gen, dtype=torch.int32),
        edge_w=torch.full((*shape, num_edges), nan),
        held=torch.randint(0, 2, shape, generator=gen, dtype=torch.int8))  # garbage unless a test sets marks
    order = torch.randperm(num_blocks, generator=gen)
    scratch = int(order[-1])
    width = table_width or max(need)
    tables = torch.full((num_seqs, width), scratch, dtype=torch.int32)
    new_pos = torch.zeros(num_seqs, dtype=torch.int32)
    taken = 0
    for i, (b, f) in enumerate(zip(budgets, filled)):
        tables[i, : need[i]] = order[taken: taken + need[i]]
        taken += need[i]
        rows = physical_rows(tables[i], torch.arange(f), block_size)
        for h in range(num_kv_heads):
            if f == b and f > 4:  # full: it has evicted, positions are a sparse subset
                kept = torch.cat([torch.arange(4), 4 + torch.randperm(3 * b, generator=gen)[: f - 4]]).sort().values
            else:
                kept = torch.arange(f)
            ring_pos = kept[torch.randperm(f, generator=gen)].to(torch.int32)
            pool.rows("pos")[rows, h] = ring_pos
            target = torch.randint(-1, b, (f, num_edges), generator=gen)
            target_pos = torch.where((target >= 0) & (target < f), ring_pos[target.clamp(0, max(f - 1, 0))]
                                     if f else target, -7)
            dead = torch.rand(target.shape, generator=gen) < 0.3
            pool.rows("edge_slot")[rows, h] = target.to(torch.int32)
            pool.rows("edge_pos")[rows, h] = torch.where(dead, target_pos + 1, target_pos).to(torch.int32)
            w = torch.rand(f, num_edges, generator=gen)
            pool.rows("edge_w")[rows, h] = w / w.sum(-1, keepdim=True)
        pool.rows("k")[rows] = torch.randn(f, num_kv_heads, head_dim, generator=gen).to(dtype)
        pool.rows("v")[rows] = torch.randn(f, num_kv_heads, head_dim, generator=gen).to(dtype)
        pool.rows("score")[rows] = torch.rand(f, num_kv_heads, generator=gen)
        new_pos[i] = int(pool.rows("pos")[rows].max()) + 1 if f else 0
    return Batch(pool, tables, torch.tensor(budgets, dtype=torch.int32), torch.tensor(filled, dtype=torch.int32),
                 new_pos)


def clone_pool(pool: PoolLayer) -> PoolLayer:
    return PoolLayer(*(None if t is None else t.clone() for t in pool))


def assert_pools_match(ref: PoolLayer, got: PoolLayer, atol: float) -> None:
    """The whole pool: K/V/pos/edges exactly (NaN garbage included), scores and edge weights to tolerance."""
    for name in ("k", "v"):
        torch.testing.assert_close(getattr(got, name), getattr(ref, name), rtol=0, atol=0, equal_nan=True,
                                   msg=lambda m, n=name: f"pool.{n}: {m}")
    for name in ("pos", "edge_slot", "edge_pos", "held"):
        assert torch.equal(getattr(got, name), getattr(ref, name)), f"pool.{name} differs"
    for name in ("score", "edge_w"):
        torch.testing.assert_close(getattr(got, name), getattr(ref, name), rtol=1e-4, atol=atol, equal_nan=True,
                                   msg=lambda m, n=name: f"pool.{n}: {m}")


def step_inputs(batch: Batch, spec, group, head_dim, dtype, gen):
    num_seqs = batch.filled.shape[0]
    num_kv_heads = batch.pool.k.shape[2]
    q = torch.randn(num_seqs, num_kv_heads * group, head_dim, generator=gen).to(dtype)
    k_new = torch.randn(num_seqs, num_kv_heads, head_dim, generator=gen).to(dtype)
    v_new = torch.randn(num_seqs, num_kv_heads, head_dim, generator=gen).to(dtype)
    new_score = torch.rand(num_seqs, num_kv_heads, generator=gen) if spec.score_mode == SCORE_EXTERNAL else None
    return q, k_new, v_new, new_score


def advance(batch: Batch) -> None:
    batch.filled = torch.minimum(batch.filled + 1, batch.budget)
    batch.new_pos = batch.new_pos + 1


# --- the dense oracle: one sequence at a time, its ring as dense [Hkv, budget, ...] tensors -------------
# Deliberately the plain form of the contract: a dense edge matrix for the walk, a stable sort for the
# edges, a Python loop over sequences. It shares nothing with the vectorised reference but the slot hash.


def dense_ring(pool: PoolLayer, table: torch.Tensor, budget: int) -> dict[str, torch.Tensor]:
    rows = physical_rows(table, torch.arange(budget), pool.block_size)
    return {name: pool.rows(name)[rows].transpose(0, 1).clone() for name in PoolLayer._fields
            if getattr(pool, name) is not None}


def store_dense_ring(pool: PoolLayer, table: torch.Tensor, ring: dict[str, torch.Tensor]) -> None:
    rows = physical_rows(table, torch.arange(ring["pos"].shape[1]), pool.block_size)
    for name, t in ring.items():
        pool.rows(name)[rows] = t.transpose(0, 1)


def oracle_step(q, k_new, v_new, ring, f, t, budget, spec, *, layer, seed, scale, new_score):
    """One decode step of one sequence (q [Hq, D], k_new / v_new [Hkv, D]); updates `ring` in place and
    returns (out [Hq, D], written [Hkv])."""
    num_kv_heads, head_dim = k_new.shape
    group = q.shape[0] // num_kv_heads
    keys = torch.cat([ring["k"][:, :f].float(), k_new.float()[:, None]], dim=1)  # [Hkv, f+1, D]
    values = torch.cat([ring["v"][:, :f].float(), v_new.float()[:, None]], dim=1)
    qg = q.float().view(num_kv_heads, group, head_dim)
    probs = torch.softmax(torch.einsum("hgd,hjd->hgj", qg, keys) * scale, dim=-1)
    out = torch.einsum("hgj,hjd->hgd", probs, values).reshape(q.shape).to(q.dtype)
    attn = probs.mean(dim=1)
    attn_ring, attn_new = attn[:, :f], attn[:, f]
    pos, score = ring["pos"][:, :f], ring["score"][:, :f]

    if spec.score_mode == SCORE_ATTN:
        n = attn_ring.clone()
        if spec.hops > 0 and spec.gamma != 0.0 and f > 0:
            P = torch.zeros(num_kv_heads, f, f)
            for h in range(num_kv_heads):
                for i in range(f):
                    for e in range(ring["edge_slot"].shape[-1]):
                        j = int(ring["edge_slot"][h, i, e])
                        if 0 <= j < f and int(pos[h, j]) == int(ring["edge_pos"][h, i, e]):
                            P[h, i, j] += ring["edge_w"][h, i, e]
            x = attn_ring
            for hop in range(1, spec.hops + 1):
                x = torch.einsum("hi,hij->hj", x, P)
                n = n + spec.gamma**hop * x
        score.copy_(score * spec.decay + n)
        score_new = attn_new
    elif spec.score_mode == SCORE_KEYDIFF:
        unit = torch.nn.functional.normalize(keys, dim=-1)
        anchor = torch.nn.functional.normalize(unit.mean(dim=1, keepdim=True), dim=-1)
        neg_cos = -(unit * anchor).sum(-1)
        score.copy_(neg_cos[:, :f])
        score_new = neg_cos[:, f]
    elif spec.score_mode == SCORE_EXTERNAL and new_score is not None:
        score_new = new_score.float()
    else:
        score_new = torch.zeros(num_kv_heads)

    heads = torch.arange(num_kv_heads)
    if f < budget:
        slot = torch.full((num_kv_heads,), f, dtype=torch.long)
    else:
        protected = (pos < spec.n_sink) | (pos >= t - spec.window)
        if spec.victim_mode == VICTIM_OLDEST:
            key = -pos.double()
        elif spec.victim_mode == VICTIM_MIN_SCORE:
            key = -score.double()
        else:
            u = slot_uniform(seed, layer, heads[:, None], pos)
            key = (torch.log(-torch.log(u)) - torch.log(score.clamp_min(0.0) + spec.eps) / spec.tau).double()
        slot = key.masked_fill(protected, float("-inf")).argmax(dim=1)
    if spec.top_m > 0:
        m = spec.top_m
        edge_slot = torch.full((num_kv_heads, m), -1, dtype=torch.int32)
        edge_pos = torch.full((num_kv_heads, m), -1, dtype=torch.int32)
        edge_w = torch.zeros(num_kv_heads, m)
        masked = torch.where((pos >= spec.n_sink) & (attn_ring > 0), attn_ring, -1.0)
        take = min(m, f)
        if take:
            order = torch.sort(-masked, dim=1, stable=True).indices[:, :take]
            top = masked.gather(1, order)
            ok = top >= 0
            total = torch.where(ok, top, 0.0).sum(1, keepdim=True).clamp_min(1e-30)
            edge_slot[:, :take] = torch.where(ok, order, -1).to(torch.int32)
            edge_pos[:, :take] = torch.where(ok, pos.gather(1, order), -1).to(torch.int32)
            edge_w[:, :take] = torch.where(ok, top / total, 0.0)
        ring["edge_slot"][heads, slot], ring["edge_pos"][heads, slot] = edge_slot, edge_pos
        ring["edge_w"][heads, slot] = edge_w
    ring["k"][heads, slot] = k_new.to(ring["k"].dtype)
    ring["v"][heads, slot] = v_new.to(ring["v"].dtype)
    ring["pos"][heads, slot] = t
    ring["score"][heads, slot] = score_new
    return out, slot.to(torch.int32)


def oracle_decode(q, k_new, v_new, batch: Batch, spec, *, layer, seed, scale, new_score):
    """The oracle over a batch: one sequence at a time, through dense copies of the rings."""
    outs, written = [], []
    for i in range(q.shape[0]):
        b = int(batch.budget[i])
        ring = dense_ring(batch.pool, batch.block_tables[i], b)
        o, w = oracle_step(q[i], k_new[i], v_new[i], ring, int(batch.filled[i]), int(batch.new_pos[i]), b, spec,
                           layer=layer, seed=seed, scale=scale, new_score=None if new_score is None else new_score[i])
        store_dense_ring(batch.pool, batch.block_tables[i], ring)
        outs.append(o)
        written.append(w)
    return torch.stack(outs), torch.stack(written)


def run_against(impl, spec, group, head_dim, dtype, block_size, budgets, filled, *, steps=3, num_kv_heads=2,
                seed=0, ref=None, **impl_kwargs):
    """Run `steps` decode steps with `impl` and with `ref` (default: the dense oracle) from the same pool and
    compare after each. Returns whether a full ring evicted."""
    gen = torch.Generator().manual_seed(seed)
    batch = random_batch(budgets, filled, num_kv_heads=num_kv_heads, head_dim=head_dim,
                         num_edges=max(spec.top_m, 1), dtype=dtype, block_size=block_size, gen=gen)
    other = dataclasses.replace(batch, pool=clone_pool(batch.pool))
    atol = 1e-5 if dtype == torch.float32 else 1e-3
    saw_eviction = False
    for step in range(steps):
        q, k_new, v_new, new_score = step_inputs(batch, spec, group, head_dim, dtype, gen)
        common = dict(layer=3, seed=1234 + step, scale=head_dim**-0.5, new_score=new_score)
        if ref is None:
            out_ref, written_ref = oracle_decode(q, k_new, v_new, other, spec, **common)
        else:
            out_ref, written_ref = ref(q, k_new, v_new, other.pool, other.block_tables, other.filled, other.budget,
                                       other.new_pos, spec, **common)
        out, written = impl(q, k_new, v_new, batch.pool, batch.block_tables, batch.filled, batch.budget,
                            batch.new_pos, spec, **common, **impl_kwargs)
        assert out.dtype == q.dtype and written.dtype == torch.int32
        torch.testing.assert_close(out.float(), out_ref.float(), rtol=1e-3, atol=atol)
        assert torch.equal(written, written_ref), f"step {step}: written slots differ"
        assert_pools_match(other.pool, batch.pool, atol)
        saw_eviction |= bool((batch.filled == batch.budget).any())
        advance(batch)
        advance(other)
    return saw_eviction


# --- the reference against the dense oracle -----------------------------------------------------------


@pytest.mark.parametrize("policy", sorted(POLICIES))
@pytest.mark.parametrize("shape", range(len(SHAPES)))
def test_reference_matches_dense_oracle(policy, shape):
    group, head_dim, dtype, block_size, budgets, filled = SHAPES[shape]
    assert run_against(reference.attend_score_sample, POLICIES[policy], group, head_dim, dtype, block_size,
                       budgets, filled)


@pytest.mark.parametrize("policy", ["nexus", "keydiff", "streaming"])
def test_reference_uniform_batch_and_all_empty(policy):
    """Equal filled counts take the unmasked path (no padding lanes); an all-empty batch has width 0."""
    spec = POLICIES[policy]
    assert run_against(reference.attend_score_sample, spec, 2, 64, torch.float32, 16, [32, 32], [32, 32])
    run_against(reference.attend_score_sample, spec, 2, 64, torch.float32, 16, [24, 32], [0, 0], steps=2)


def test_reference_walk_without_gamma_and_small_tau():
    spec = dataclasses.replace(POLICIES["nexus"], gamma=0.0, tau=0.25)
    assert run_against(reference.attend_score_sample, spec, 2, 64, torch.float32, 16, [32, 32], [32, 31])


def test_reference_all_protected_ring_takes_slot_zero():
    spec = EvictionSpec(SCORE_ATTN, VICTIM_MIN_SCORE, n_sink=4, window=1000)
    assert run_against(reference.attend_score_sample, spec, 2, 64, torch.float32, 16, [32], [32], steps=1)


def ring_order_contents(batch: Batch) -> list[dict[str, torch.Tensor]]:
    return [{name: t[:, : int(f)] for name, t in dense_ring(batch.pool, batch.block_tables[i], int(b)).items()}
            for i, (b, f) in enumerate(zip(batch.budget, batch.filled))]


def paging_invariance(impl, spec, dtype, budgets, filled, *, steps=3, **impl_kwargs):
    """block_size=16 and block_size=budget (one block per ring) from the same logical rings: the same slots
    written and the same ring contents read back in ring order, bit for bit."""
    results = []
    for block_size in (16, max(budgets)):
        gen = torch.Generator().manual_seed(11)
        src = random_batch(budgets, filled, num_kv_heads=2, head_dim=64, num_edges=max(spec.top_m, 1),
                           dtype=dtype, block_size=16, gen=gen)
        rings = ring_order_contents(src)
        batch = random_batch(budgets, [0] * len(budgets), num_kv_heads=2, head_dim=64,
                             num_edges=max(spec.top_m, 1), dtype=dtype, block_size=block_size,
                             gen=torch.Generator().manual_seed(block_size))
        for i, ring in enumerate(rings):  # the same logical rings in the other layout
            rows = physical_rows(batch.block_tables[i], torch.arange(filled[i]), block_size)
            for name, t in ring.items():
                batch.pool.rows(name)[rows] = t.transpose(0, 1)
        batch.filled, batch.new_pos = src.filled.clone(), src.new_pos.clone()
        written_all = []
        for step in range(steps):
            q, k_new, v_new, new_score = step_inputs(batch, spec, 2, 64, dtype, gen)
            _, written = impl(q, k_new, v_new, batch.pool, batch.block_tables, batch.filled, batch.budget,
                              batch.new_pos, spec, layer=0, seed=step, scale=0.125, new_score=new_score,
                              **impl_kwargs)
            written_all.append(written)
            advance(batch)
        results.append((torch.stack(written_all), ring_order_contents(batch)))
    (w16, rings16), (wb, ringsb) = results
    assert torch.equal(w16, wb)
    for a, b in zip(rings16, ringsb):
        for name in a:
            # without edges (hold) those fields are never written, and new slots keep the garbage there
            if (spec.top_m or not name.startswith("edge")) and (spec.hold or name != "held"):
                torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("policy", ["nexus", "keydiff"])
def test_reference_block_size_does_not_change_results(policy):
    paging_invariance(reference.attend_score_sample, POLICIES[policy], torch.float32, [48, 40], [48, 37])


def test_reference_ties_go_to_the_lowest_slot():
    """Duplicated keys give exactly tied attention (top-m edges) and equal scores tied victims: the lower
    ring slot wins (the oracle uses a stable sort and argmax, the reference composite topk keys)."""
    for spec in (POLICIES["nexus"], POLICIES["external"]):
        gen = torch.Generator().manual_seed(7)
        batch = tie_batch(spec, gen)
        other = dataclasses.replace(batch, pool=clone_pool(batch.pool))
        args = tie_inputs(gen)
        kwargs = dict(layer=0, seed=0, scale=0.125, new_score=torch.ones(1, 1))
        _, written = reference.attend_score_sample(*args, *batch_args(batch), spec, **kwargs)
        _, written_ref = oracle_decode(*args, other, spec, **kwargs)
        assert torch.equal(written, written_ref)
        assert_pools_match(other.pool, batch.pool, 1e-6)


def tie_batch(spec, gen, budget=32, head_dim=64, block_size=8) -> Batch:
    batch = random_batch([budget], [budget], num_kv_heads=1, head_dim=head_dim, num_edges=max(spec.top_m, 1),
                         dtype=torch.float32, block_size=block_size, gen=gen)
    rows = physical_rows(batch.block_tables[0], torch.arange(budget), block_size)
    # Entries in {-1, 0, 1} make every logit an exact integer in any summation order, so slot j and slot
    # j + 16, which share a key, tie exactly in every implementation.
    keys = torch.randint(-1, 2, (budget // 2, 1, head_dim), generator=gen).float()
    batch.pool.rows("k")[rows] = torch.cat([keys, keys])
    batch.pool.rows("score")[rows] = 0.5
    return batch


def tie_inputs(gen, head_dim=64):
    return (torch.randint(-1, 2, (1, 2, head_dim), generator=gen).float(), torch.randn(1, 1, head_dim, generator=gen),
            torch.randn(1, 1, head_dim, generator=gen))


def batch_args(batch: Batch):
    return batch.pool, batch.block_tables, batch.filled, batch.budget, batch.new_pos


def test_edge_rank_keys_order_attention_then_lowest_index():
    attn = torch.tensor([[0.2, 0.5, 0.2, 0.0, 0.5, 1e-30]])
    eligible = torch.tensor([[True, True, True, True, True, True]]) & (attn > 0)
    keys = reference.edge_rank_keys(attn, eligible)
    assert keys.topk(6).indices.tolist() == [[1, 4, 0, 2, 5, 3]]
    assert (keys[0, 3] <= 0) and (keys[0, [0, 1, 2, 4, 5]] > 0).all()


def test_slot_hash_fold_matches_the_unfolded_rounds():
    """slot_hash_u32 folds (seed, layer) on the host; the result must equal the three rounds done in full."""
    mask = 0xFFFFFFFF

    def fmix(x):
        x ^= x >> 16
        x = (x * 0x85EBCA6B) & mask
        x ^= x >> 13
        x = (x * 0xC2B2AE35) & mask
        return x ^ (x >> 16)

    for seed, layer in [(0, 0), (1234, 3), (2**40 + 7, 29)]:
        x = fmix(((seed * 0x9E3779B1) & mask) ^ ((layer * 0x85EBCA77) & mask))
        x = fmix(x ^ ((5 * 0xC2B2AE3D) & mask))
        expected = [fmix(x ^ ((p * 0x27D4EB2F) & mask)) for p in (0, 17, 100000)]
        assert slot_hash_u32(seed, layer, torch.tensor(5), torch.tensor([0, 17, 100000])).tolist() == expected


# --- the Triton kernel against the reference (interpreter) -------------------------------------------

from minikv.kernels.attend_score_sample import attend_score_sample_triton, hash_base  # noqa: E402


@pytest.mark.parametrize("policy", sorted(POLICIES))
@pytest.mark.parametrize("shape", range(len(SHAPES)))
def test_triton_matches_reference(policy, shape):
    group, head_dim, dtype, block_size, budgets, filled = SHAPES[shape]
    assert run_against(attend_score_sample_triton, POLICIES[policy], group, head_dim, dtype, block_size, budgets,
                       filled, ref=reference.attend_score_sample)


def test_triton_several_loop_blocks_per_ring():
    """BLOCK smaller than the ring and unrelated to the page size: the online softmax, the running top-m and
    the running victim cross loop blocks, and one loop block spans several pool blocks (or part of one)."""
    assert run_against(attend_score_sample_triton, POLICIES["nexus"], 4, 64, torch.float32, 8, [64, 40], [64, 40],
                       steps=2, ref=reference.attend_score_sample, block_keys=16)
    assert run_against(attend_score_sample_triton, POLICIES["keydiff"], 2, 64, torch.float32, 32, [64, 48], [64, 7],
                       steps=2, ref=reference.attend_score_sample, block_keys=16)


def test_triton_walk_without_gamma_tau_and_all_protected():
    spec = dataclasses.replace(POLICIES["nexus"], gamma=0.0, tau=0.25)
    assert run_against(attend_score_sample_triton, spec, 2, 64, torch.float32, 16, [32, 32], [32, 31],
                       ref=reference.attend_score_sample)
    spec = EvictionSpec(SCORE_ATTN, VICTIM_MIN_SCORE, n_sink=4, window=1000)
    assert run_against(attend_score_sample_triton, spec, 2, 64, torch.float32, 16, [32], [32], steps=1,
                       ref=reference.attend_score_sample)


def test_triton_empty_rings():
    for policy in ("nexus", "keydiff"):
        run_against(attend_score_sample_triton, POLICIES[policy], 2, 64, torch.float32, 16, [32, 24], [0, 0], steps=2,
                    ref=reference.attend_score_sample)


@pytest.mark.parametrize("policy", ["nexus", "keydiff"])
def test_triton_block_size_does_not_change_results(policy):
    paging_invariance(attend_score_sample_triton, POLICIES[policy], torch.float32, [48, 40], [48, 37])


@pytest.mark.parametrize("block_keys", [None, 8])
def test_triton_ties_go_to_the_lowest_slot(block_keys):
    for spec in (POLICIES["nexus"], POLICIES["external"]):
        gen = torch.Generator().manual_seed(7)
        batch = tie_batch(spec, gen)
        other = dataclasses.replace(batch, pool=clone_pool(batch.pool))
        args = tie_inputs(gen)
        kwargs = dict(layer=0, seed=0, scale=0.125, new_score=torch.ones(1, 1))
        _, written = attend_score_sample_triton(*args, *batch_args(batch), spec, block_keys=block_keys, **kwargs)
        _, written_ref = reference.attend_score_sample(*args, *batch_args(other), spec, **kwargs)
        assert torch.equal(written, written_ref)
        assert_pools_match(other.pool, batch.pool, 1e-6)


def test_kernel_hash_base_is_the_host_fold():
    mask = 0xFFFFFFFF
    from minikv.kernels.common import hash_seed_layer

    for seed, layer in [(0, 0), (1234, 3), (2**40 + 7, 29)]:
        assert hash_base(seed, layer) & mask == hash_seed_layer(seed, layer)
        assert -(2**31) <= hash_base(seed, layer) < 2**31


# --- dispatch (minikv.kernels) ------------------------------------------------------------------------


def test_dispatch_chooses_by_device_and_env(monkeypatch):
    from minikv import kernels
    from minikv.errors import ConfigError

    monkeypatch.delenv("MINIKV_KERNELS", raising=False)
    assert kernels.kernel_backend("cpu") == "reference"
    assert kernels.kernel_backend(torch.device("cuda", 0)) == "triton"
    monkeypatch.setenv("MINIKV_KERNELS", "reference")
    assert kernels.kernel_backend("cuda") == "reference"
    monkeypatch.setenv("MINIKV_KERNELS", "Triton")
    assert kernels.kernel_backend("cpu") == "triton"  # tests run with TRITON_INTERPRET=1
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ConfigError, match="TRITON_INTERPRET"):
        kernels.kernel_backend("cpu")
    monkeypatch.setenv("MINIKV_KERNELS", "cuda")
    with pytest.raises(ConfigError, match="MINIKV_KERNELS"):
        kernels.kernel_backend("cpu")


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_dispatch_runs_the_chosen_backend(monkeypatch, backend):
    """Both public entry points run under either backend and give the reference's answer."""
    from minikv import kernels

    monkeypatch.setenv("MINIKV_KERNELS", backend)
    called = []
    if backend == "triton":
        decode_module = importlib.import_module("minikv.kernels.attend_score_sample")
        prefill_module = importlib.import_module("minikv.kernels.prefill")
        for module, name in ((decode_module, "attend_score_sample_triton"), (prefill_module, "prefill_attention_triton")):
            original = getattr(module, name)
            monkeypatch.setattr(module, name, lambda *a, _f=original, _n=name, **kw: called.append(_n) or _f(*a, **kw))
    gen = torch.Generator().manual_seed(3)
    spec = POLICIES["nexus"]
    batch = random_batch([32], [32], num_kv_heads=2, head_dim=64, num_edges=4, dtype=torch.float32, block_size=16,
                         gen=gen)
    other = dataclasses.replace(batch, pool=clone_pool(batch.pool))
    args = (torch.randn(1, 4, 64, generator=gen), torch.randn(1, 2, 64, generator=gen),
            torch.randn(1, 2, 64, generator=gen))
    kwargs = dict(layer=1, seed=5, scale=0.125)
    out, written = kernels.attend_score_sample(*args, *batch_args(batch), spec, **kwargs)
    out_ref, written_ref = reference.attend_score_sample(*args, *batch_args(other), spec, **kwargs)
    torch.testing.assert_close(out, out_ref, rtol=1e-4, atol=1e-5)
    assert torch.equal(written, written_ref)
    chunk = [a.expand(8, -1, -1) for a in args]
    pre_args = (other.pool, other.block_tables[0], 16, torch.arange(100, 108))
    pre = kernels.prefill_attention(*chunk, *pre_args, scale=0.125, top_m=4)
    pre_ref = reference.prefill_attention(*chunk, *pre_args, scale=0.125, top_m=4)
    torch.testing.assert_close(pre.out, pre_ref.out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(pre.mass, pre_ref.mass, rtol=1e-4, atol=1e-5)
    assert called == (["attend_score_sample_triton", "prefill_attention_triton"] if backend == "triton" else [])


# --- split-K (several programs per (sequence, KV head)) ------------------------------------------------


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_split_k_matches_reference(policy):
    """Three splits of 16-key loop blocks over rings of 64, 40 (partly filled last block) and 0 slots: the
    statistics, scores, victims and edges merged across splits (one split of the first ring is empty)."""
    assert run_against(attend_score_sample_triton, POLICIES[policy], 4, 64, torch.float32, 8, [64, 48, 24],
                       [64, 40, 0], steps=2, ref=reference.attend_score_sample, block_keys=16, num_splits=3)


def test_split_k_fp16_gqa3_and_tau():
    spec = dataclasses.replace(POLICIES["nexus"], tau=0.5)
    assert run_against(attend_score_sample_triton, spec, 3, 128, torch.float16, 16, [48, 40], [48, 33], steps=2,
                       ref=reference.attend_score_sample, block_keys=16, num_splits=2)


@pytest.mark.parametrize("policy", ["nexus", "keydiff", "streaming"])
def test_split_k_on_equals_off(policy):
    """Split-K against the single-program kernel: the same victims and edges, scores and outputs to rounding."""

    def single(*args, **kwargs):
        return attend_score_sample_triton(*args, **kwargs, block_keys=16, num_splits=1)

    assert run_against(attend_score_sample_triton, POLICIES[policy], 2, 64, torch.float32, 16, [64, 32], [64, 17],
                       steps=2, ref=single, block_keys=16, num_splits=4)


def test_split_k_ties_and_all_protected():
    for spec in (POLICIES["nexus"], POLICIES["external"]):
        gen = torch.Generator().manual_seed(7)
        batch = tie_batch(spec, gen)
        other = dataclasses.replace(batch, pool=clone_pool(batch.pool))
        args = tie_inputs(gen)
        kwargs = dict(layer=0, seed=0, scale=0.125, new_score=torch.ones(1, 1))
        _, written = attend_score_sample_triton(*args, *batch_args(batch), spec, block_keys=8, num_splits=3,
                                                **kwargs)
        _, written_ref = reference.attend_score_sample(*args, *batch_args(other), spec, **kwargs)
        assert torch.equal(written, written_ref)
        assert_pools_match(other.pool, batch.pool, 1e-6)
    spec = EvictionSpec(SCORE_ATTN, VICTIM_MIN_SCORE, n_sink=4, window=1000)
    assert run_against(attend_score_sample_triton, spec, 2, 64, torch.float32, 16, [32], [32], steps=1,
                       ref=reference.attend_score_sample, block_keys=16, num_splits=2)


# --- held slots (EvictionSpec.hold: Nexus's novelty reserve through decode) ---------------------------

HELD_SPECS = {name: dataclasses.replace(POLICIES[name], hold=True) for name in ("streaming", "h2o", "nexus")}


def held_ring(spec, marks: list[int], budget=16, block_size=4):
    """One full ring of one KV head, slot j holding position j (sinks 0..3, window = the last 8), scores
    rising with the slot (slot 4 is the cheapest to drop, then 5, ...) and the given slots marked held."""
    gen = torch.Generator().manual_seed(3)
    batch = random_batch([budget], [budget], num_kv_heads=1, head_dim=64, num_edges=max(spec.top_m, 1),
                         dtype=torch.float32, block_size=block_size, gen=gen)
    rows = physical_rows(batch.block_tables[0], torch.arange(budget), block_size)
    batch.pool.rows("pos")[rows] = torch.arange(budget, dtype=torch.int32)[:, None]
    batch.pool.rows("score")[rows] = torch.linspace(1e-3, 1.0, budget)[:, None]
    batch.pool.rows("held")[rows] = 0
    batch.pool.rows("held")[rows[marks]] = 1
    batch.new_pos[0] = budget + 4  # window 8 protects positions 12..19: slots 4..11 are the candidates
    return batch, rows


@pytest.mark.parametrize("policy", sorted(HELD_SPECS))
def test_reference_victim_is_never_held(policy):
    """The cheapest unprotected slots (4, 5, 6) are held: the victim is the cheapest unheld one (slot 7, or
    with the reservoir some unheld candidate), and the same ring without hold drops a held slot."""
    spec, gen = HELD_SPECS[policy], torch.Generator().manual_seed(0)
    args = tie_inputs(gen)
    kwargs = dict(layer=0, seed=0, scale=0.125)
    batch, rows = held_ring(spec, marks=[4, 5, 6])
    _, written = reference.attend_score_sample(*args, *batch_args(batch), spec, **kwargs)
    victim = int(written)
    assert 7 <= victim <= 11
    if spec.victim_mode != VICTIM_RESERVOIR:
        assert victim == 7
    assert int(batch.pool.rows("held")[rows[victim], 0]) == 0  # the new token is nobody's reserve pick
    assert batch.pool.rows("held")[rows[[4, 5, 6]], 0].tolist() == [1, 1, 1]
    batch, _ = held_ring(spec, marks=[4, 5, 6])
    _, unheld = reference.attend_score_sample(*args, *batch_args(batch), dataclasses.replace(spec, hold=False),
                                              **kwargs)
    assert int(unheld) in (4, 5, 6)


@pytest.mark.parametrize("policy", sorted(HELD_SPECS))
def test_reference_held_fallback_when_every_candidate_is_held(policy):
    """Every unprotected slot held: the ring still takes the token, into the lowest held slot, never a
    sink or a window slot; the written slot's mark is cleared."""
    spec, gen = HELD_SPECS[policy], torch.Generator().manual_seed(0)
    batch, rows = held_ring(spec, marks=list(range(16)))
    _, written = reference.attend_score_sample(*tie_inputs(gen), *batch_args(batch), spec, layer=0, seed=0,
                                               scale=0.125)
    assert int(written) == 4
    assert int(batch.pool.rows("held")[rows[4], 0]) == 0


@pytest.mark.parametrize("policy", sorted(HELD_SPECS))
@pytest.mark.parametrize("shape", range(len(SHAPES)))
def test_triton_matches_reference_with_held_slots(policy, shape):
    """Random marks (about half the slots, so some rings fall back to a held victim) on ragged block tables,
    GQA groups, fp16 and fp32: the same victims, marks and pools as the reference."""
    group, head_dim, dtype, block_size, budgets, filled = SHAPES[shape]
    assert run_against(attend_score_sample_triton, HELD_SPECS[policy], group, head_dim, dtype, block_size, budgets,
                       filled, ref=reference.attend_score_sample)


def test_triton_held_fallback_and_split_k():
    for spec in HELD_SPECS.values():
        gen = torch.Generator().manual_seed(0)
        args = tie_inputs(gen)
        for marks in ([4, 5, 6], list(range(16))):
            ref, _ = held_ring(spec, marks)
            got, _ = held_ring(spec, marks)
            kwargs = dict(layer=0, seed=0, scale=0.125)
            _, expected = reference.attend_score_sample(*args, *batch_args(ref), spec, **kwargs)
            _, written = attend_score_sample_triton(*args, *batch_args(got), spec, block_keys=4, num_splits=2,
                                                    **kwargs)
            assert torch.equal(written, expected)
            assert_pools_match(ref.pool, got.pool, 1e-6)
    assert run_against(attend_score_sample_triton, HELD_SPECS["nexus"], 4, 64, torch.float32, 8, [64, 48, 24],
                       [64, 40, 0], steps=2, ref=reference.attend_score_sample, block_keys=16, num_splits=3)


@pytest.mark.parametrize("impl", [reference.attend_score_sample, attend_score_sample_triton])
def test_held_marks_do_not_depend_on_block_size(impl):
    paging_invariance(impl, HELD_SPECS["nexus"], torch.float32, [48, 40], [48, 37])

"""The Triton decode kernel against the torch reference, under the Triton interpreter on CPU tensors.

Both implementations start from identical copies of a random ring state and run several decode steps in a
row (so that full rings evict); after every step the outputs, the written slots and every ring tensor must
agree: the same victims and edges exactly, scores and outputs to fp tolerance.
"""

from __future__ import annotations

import dataclasses
import importlib

import pytest
import torch

from minikv.kernels import reference
from minikv.kernels.attend_score_sample import attend_score_sample_triton, hash_base
from minikv.kernels.common import (
    SCORE_ATTN,
    SCORE_EXTERNAL,
    SCORE_KEYDIFF,
    SCORE_NONE,
    VICTIM_MIN_SCORE,
    VICTIM_OLDEST,
    VICTIM_RESERVOIR,
    EvictionSpec,
    RingLayer,
    slot_hash_u32,
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

# (GQA group, head_dim, dtype, budget, filled per sequence)
SHAPES = [
    (1, 64, torch.float32, 32, [32, 30, 0]),
    (3, 128, torch.float16, 48, [47, 48]),
    (4, 64, torch.float16, 32, [32]),
    (8, 64, torch.float32, 64, [63, 5, 64]),
]


def random_ring(num_rings, num_kv_heads, budget, head_dim, num_edges, dtype, filled, gen) -> RingLayer:
    """A ring state as a running engine leaves it: sinks at positions 0..3, the rest a sorted random subset
    of earlier positions scattered over the slots, random scores, and out-edges of which some are live and
    some dead (target overwritten since, or pointing past the filled slots)."""
    shape = (num_rings, num_kv_heads, budget)
    k = torch.randn(*shape, head_dim, generator=gen).to(dtype)
    v = torch.randn(*shape, head_dim, generator=gen).to(dtype)
    pos = torch.full(shape, -1, dtype=torch.int32)
    for r in range(num_rings):
        for h in range(num_kv_heads):
            kept = torch.cat([torch.arange(4), 4 + torch.randperm(3 * budget, generator=gen)[: budget - 4]])
            kept = kept.sort().values.to(torch.int32)
            pos[r, h] = kept[torch.randperm(budget, generator=gen)]
    score = torch.rand(shape, generator=gen)
    edge_slot = torch.randint(-1, budget, (*shape, num_edges), generator=gen, dtype=torch.int32)
    target_pos = pos.gather(2, edge_slot.clamp_min(0).long().view(num_rings, num_kv_heads, -1)).view_as(edge_slot)
    dead = torch.rand(edge_slot.shape, generator=gen) < 0.3
    edge_pos = torch.where(dead, target_pos + 1, target_pos).to(torch.int32)
    edge_w = torch.rand(edge_slot.shape, generator=gen)
    edge_w = edge_w / edge_w.sum(-1, keepdim=True)
    return RingLayer(k, v, pos, score, edge_slot, edge_pos, edge_w)


def clone_ring(ring: RingLayer) -> RingLayer:
    return RingLayer(*(t.clone() for t in ring))


def assert_rings_match(ref: RingLayer, tri: RingLayer, atol: float) -> None:
    torch.testing.assert_close(tri.k, ref.k, rtol=0, atol=0)
    torch.testing.assert_close(tri.v, ref.v, rtol=0, atol=0)
    assert torch.equal(tri.pos, ref.pos)
    torch.testing.assert_close(tri.score, ref.score, rtol=1e-4, atol=atol)
    assert torch.equal(tri.edge_slot, ref.edge_slot)
    assert torch.equal(tri.edge_pos, ref.edge_pos)
    torch.testing.assert_close(tri.edge_w, ref.edge_w, rtol=1e-4, atol=atol)


def run_steps(spec, group, head_dim, dtype, budget, filled, *, steps=3, num_kv_heads=2, block_size=None,
              seed=0):
    """Run `steps` decode steps with both implementations from the same state and compare after each."""
    gen = torch.Generator().manual_seed(seed)
    num_seqs = len(filled)
    num_rings = num_seqs + 1
    num_edges = max(spec.top_m, 1)
    ring_ref = random_ring(num_rings, num_kv_heads, budget, head_dim, num_edges, dtype, filled, gen)
    ring_tri = clone_ring(ring_ref)
    ring_ids = torch.randperm(num_rings, generator=gen)[:num_seqs].to(torch.int32)
    filled_t = torch.tensor(filled, dtype=torch.int32)
    new_pos = ring_ref.pos[ring_ids.long()].amax(dim=(1, 2)).to(torch.int32) + 1
    atol = 1e-5 if dtype == torch.float32 else 1e-3
    saw_eviction = False
    for step in range(steps):
        q = torch.randn(num_seqs, num_kv_heads * group, head_dim, generator=gen).to(dtype)
        k_new = torch.randn(num_seqs, num_kv_heads, head_dim, generator=gen).to(dtype)
        v_new = torch.randn(num_seqs, num_kv_heads, head_dim, generator=gen).to(dtype)
        new_score = torch.rand(num_seqs, num_kv_heads, generator=gen) if spec.score_mode == SCORE_EXTERNAL else None
        common = dict(layer=3, seed=1234 + step, scale=head_dim**-0.5, new_score=new_score)
        out_ref, written_ref = reference.attend_score_sample(
            q, k_new, v_new, ring_ref, ring_ids, filled_t, new_pos, spec, **common)
        out_tri, written_tri = attend_score_sample_triton(
            q, k_new, v_new, ring_tri, ring_ids, filled_t, new_pos, spec, block_size=block_size, **common)
        assert out_tri.dtype == q.dtype and written_tri.dtype == torch.int32
        torch.testing.assert_close(out_tri.float(), out_ref.float(), rtol=1e-3, atol=atol)
        assert torch.equal(written_tri, written_ref), f"step {step}: victims differ"
        assert_rings_match(ring_ref, ring_tri, atol)
        saw_eviction |= bool((filled_t == budget).any())
        filled_t = torch.clamp(filled_t + 1, max=budget)
        new_pos = new_pos + 1
    return saw_eviction


@pytest.mark.parametrize("policy", sorted(POLICIES))
@pytest.mark.parametrize("shape", range(len(SHAPES)))
def test_policies_match_reference(policy, shape):
    group, head_dim, dtype, budget, filled = SHAPES[shape]
    assert run_steps(POLICIES[policy], group, head_dim, dtype, budget, filled)


def test_several_blocks_per_ring():
    """Blocks smaller than the ring: the online softmax, the running argmax and the top-m scan cross blocks."""
    spec = POLICIES["nexus"]
    assert run_steps(spec, 4, 64, torch.float32, 64, [64, 40], block_size=16, steps=2)
    assert run_steps(POLICIES["keydiff"], 2, 64, torch.float32, 64, [64], block_size=32, steps=2)


def test_walk_without_edges_written_and_tau():
    """hops without gamma is plain attention; a small tau sharpens the reservoir towards top-K."""
    spec = dataclasses.replace(POLICIES["nexus"], gamma=0.0, tau=0.25)
    assert run_steps(spec, 2, 64, torch.float32, 32, [32, 31])


def test_all_protected_ring_takes_slot_zero():
    """When sinks and window cover the whole ring the reference's argmax of all -inf returns slot 0."""
    spec = EvictionSpec(SCORE_ATTN, VICTIM_MIN_SCORE, n_sink=4, window=1000)
    assert run_steps(spec, 2, 64, torch.float32, 32, [32], steps=1)


def test_empty_ring_first_token():
    for policy in ("nexus", "keydiff"):
        run_steps(POLICIES[policy], 2, 64, torch.float32, 32, [0], steps=2)


def test_slot_hash_matches_common():
    """The kernel folds (seed, layer) on the host; the fold must be common.slot_hash_u32's first rounds."""
    mask = 0xFFFFFFFF

    def fmix(x):
        x ^= x >> 16
        x = (x * 0x85EBCA6B) & mask
        x ^= x >> 13
        x = (x * 0xC2B2AE35) & mask
        return x ^ (x >> 16)

    for seed, layer in [(0, 0), (1234, 3), (2**40 + 7, 29)]:
        base = hash_base(seed, layer) & mask
        expected = slot_hash_u32(seed, layer, torch.tensor(5), torch.tensor([0, 17, 100000]))
        got = [fmix(fmix(base ^ ((5 * 0xC2B2AE3D) & mask)) ^ ((p * 0x27D4EB2F) & mask)) for p in (0, 17, 100000)]
        assert got == expected.tolist()


@pytest.mark.parametrize("block_size", [None, 8])
def test_ties_go_to_the_lowest_slot(block_size):
    """Duplicated keys give exactly tied attention (top-m edges) and equal scores give tied victims: both
    implementations must break the ties towards the lower slot index."""
    gen = torch.Generator().manual_seed(7)
    budget, head_dim = 32, 64
    for spec in (POLICIES["nexus"], POLICIES["external"]):
        ring_ref = random_ring(1, 1, budget, head_dim, max(spec.top_m, 1), torch.float32, [budget], gen)
        # Entries in {-1, 0, 1} make every logit an exact integer in any summation order, so slot j and
        # slot j + 16, which share a key, tie exactly in both implementations.
        ring_ref.k.copy_(torch.randint(-1, 2, ring_ref.k.shape, generator=gen).float())
        ring_ref.k[:, :, budget // 2:] = ring_ref.k[:, :, : budget // 2]
        ring_ref.score.fill_(0.5)
        ring_tri = clone_ring(ring_ref)
        args = (torch.randint(-1, 2, (1, 2, head_dim), generator=gen).float(),
                torch.randn(1, 1, head_dim, generator=gen), torch.randn(1, 1, head_dim, generator=gen))
        meta = (torch.tensor([0], dtype=torch.int32), torch.tensor([budget], dtype=torch.int32),
                ring_ref.pos.amax().view(1) + 1)
        kwargs = dict(layer=0, seed=0, scale=0.125, new_score=torch.ones(1, 1))
        _, written_ref = reference.attend_score_sample(*args, ring_ref, *meta, spec, **kwargs)
        _, written_tri = attend_score_sample_triton(*args, ring_tri, *meta, spec, block_size=block_size, **kwargs)
        assert torch.equal(written_tri, written_ref)
        assert_rings_match(ring_ref, ring_tri, 1e-6)


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
    ring = random_ring(1, 2, 32, 64, 4, torch.float32, [32], gen)
    ring_ref = clone_ring(ring)
    args = (torch.randn(1, 4, 64, generator=gen), torch.randn(1, 2, 64, generator=gen),
            torch.randn(1, 2, 64, generator=gen))
    meta = (torch.tensor([0], dtype=torch.int32), torch.tensor([32], dtype=torch.int32), ring.pos.amax().view(1) + 1)
    kwargs = dict(layer=1, seed=5, scale=0.125)
    out, written = kernels.attend_score_sample(*args, ring, *meta, spec, **kwargs)
    out_ref, written_ref = reference.attend_score_sample(*args, ring_ref, *meta, spec, **kwargs)
    torch.testing.assert_close(out, out_ref, rtol=1e-4, atol=1e-5)
    assert torch.equal(written, written_ref)
    pre = kernels.prefill_attention(args[0].expand(8, -1, -1), args[1].expand(8, -1, -1), args[2].expand(8, -1, -1),
                                    ring.k[0], ring.v[0], ring.pos[0], torch.arange(100, 108), scale=0.125, top_m=4)
    pre_ref = reference.prefill_attention(args[0].expand(8, -1, -1), args[1].expand(8, -1, -1),
                                          args[2].expand(8, -1, -1), ring.k[0], ring.v[0], ring.pos[0],
                                          torch.arange(100, 108), scale=0.125, top_m=4)
    torch.testing.assert_close(pre.out, pre_ref.out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(pre.mass, pre_ref.mass, rtol=1e-4, atol=1e-5)
    assert called == (["attend_score_sample_triton", "prefill_attention_triton"] if backend == "triton" else [])

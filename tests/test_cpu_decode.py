"""The CPU decode attention that reads rings in place (kernels.cpu_decode) against the plain gathered form
(reference.decode_attend without pieces), which the Triton kernels and the dense oracle are checked against.

The batches are test_kernels_decode's (ragged paged rings, GQA, fp32 / fp16, full rings that evict, NaN
garbage outside the rings) with their blocks moved so that each ring is one run of consecutive pool blocks,
two runs in another order, or scattered (a ring gathered as before); both position modes in one batch and
no RoPE; tiles smaller than a ring. Then the CPU engine both ways on the tiny model.
"""

from __future__ import annotations

import dataclasses
import math
from unittest import mock

import pytest
import torch

from minikv import Engine, SamplingParams
from minikv.kernels import cpu_decode, reference
from minikv.kernels.common import PoolLayer, Rope
from test_kernels_decode import POLICIES, SHAPES, advance, assert_pools_match, clone_pool, random_batch, step_inputs
from test_kernels_rope import make_rope, query_positions, with_rope_pos

LAYOUTS = ("sequential", "split", "scattered")


def relocate(batch, layout: str):
    """The same batch with its pool blocks renumbered: each ring's blocks one run of consecutive ids in ring
    order ("sequential"), its first and second halves two runs placed in the opposite order ("split"), or
    left scattered in random order ("scattered")."""
    if layout == "scattered":
        return batch
    pool, tables = batch.pool, batch.block_tables
    num_blocks, block_size = pool.k.shape[0], pool.block_size
    need = [math.ceil(int(b) / block_size) for b in batch.budget]
    rings = [tables[i, :n].tolist() for i, n in enumerate(need)]
    if layout == "split":
        rings = [r[len(r) // 2:] for r in rings] + [r[:len(r) // 2] for r in rings]
    order = [b for ring in rings for b in ring]
    order += [b for b in range(num_blocks) if b not in order]  # spare blocks and the scratch block last
    new_id = torch.empty(num_blocks, dtype=torch.long)
    new_id[torch.tensor(order)] = torch.arange(num_blocks)
    moved = []
    for t in pool:
        if t is None:
            moved.append(None)
            continue
        out = torch.empty_like(t)
        out[new_id] = t
        moved.append(out)
    return dataclasses.replace(batch, pool=PoolLayer(*moved), block_tables=new_id[tables.long()].to(torch.int32))


def make_batch(shape: int, layout: str, *, rope_rows=None, seed=0, num_edges=4):
    group, head_dim, dtype, block_size, budgets, filled = SHAPES[shape]
    gen = torch.Generator().manual_seed(seed)
    batch = random_batch(budgets, filled, num_kv_heads=2, head_dim=head_dim, num_edges=num_edges, dtype=dtype,
                         block_size=block_size, gen=gen)
    if rope_rows is not None:
        batch = with_rope_pos(batch, rope_rows[:len(budgets)], gen)
    return relocate(batch, layout), gen


@pytest.fixture(params=[(64, 1 << 20), (1, 1 << 20), (1, 1)], ids=["default", "runs", "tiny-tiles"])
def cut(request, monkeypatch):
    """How rings are cut: the default rule, every run kept as a view however short, and tiles of 64 slots."""
    min_run, tile_bytes = request.param
    monkeypatch.setattr(cpu_decode, "MIN_RUN", min_run)
    monkeypatch.setattr(cpu_decode, "TILE_BYTES", tile_bytes)
    return request.param


def test_pieces_follow_the_block_layout():
    batch, _ = make_batch(3, "sequential")  # budgets 64, 24, 56 (block 16), filled 63, 24, 56
    pieces = reference.decode_index(batch.block_tables, batch.filled, batch.budget, 16, 2).pieces
    assert [[(s, n) for s, _, n in p] for p in pieces] == [[(0, 63)], [(0, 24)], [(0, 56)]]
    assert all(isinstance(rows, slice) for p in pieces for _, rows, _ in p)
    split, _ = make_batch(3, "split")
    with mock.patch.object(cpu_decode, "MIN_RUN", 1):
        pieces = reference.decode_index(split.block_tables, split.filled, split.budget, 16, 2).pieces
    assert [[(s, n) for s, _, n in p] for p in pieces] == [[(0, 32), (32, 31)], [(0, 16), (16, 8)],
                                                           [(0, 32), (32, 24)]]
    scattered, _ = make_batch(3, "scattered")
    pieces = reference.decode_index(scattered.block_tables, scattered.filled, scattered.budget, 16, 2).pieces
    assert all(len(p) == 1 and isinstance(p[0][1], torch.Tensor) for p in pieces)  # gathered whole


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", range(len(SHAPES)))
@pytest.mark.parametrize("rope", [False, True], ids=["no-rope", "rope"])
def test_attend_in_place_equals_gathered(layout, shape, rope, cut):
    ring = [True, False, True]
    batch, gen = make_batch(shape, layout, rope_rows=ring if rope else None)
    group, head_dim, dtype = SHAPES[shape][:3]
    q, k_new, v_new, _ = step_inputs(batch, POLICIES["h2o"], group, head_dim, dtype, gen)
    kwargs = dict(scale=head_dim**-0.5)
    if rope:
        rows = torch.tensor(ring[:len(batch.filled)])
        kwargs.update(rope=make_rope(head_dim), q_pos=query_positions(batch, rows))
    index = lambda in_place: reference.decode_index(batch.block_tables, batch.filled, batch.budget,  # noqa: E731
                                                    batch.pool.block_size, 2, in_place=in_place)
    out_ref, attn_ref, _ = reference.decode_attend(q, k_new, v_new, batch.pool, index(False), **kwargs)
    out, attn, _ = reference.decode_attend(q, k_new, v_new, batch.pool, index(True), **kwargs)
    atol = 1e-5 if dtype == torch.float32 else 1e-3
    torch.testing.assert_close(out.float(), out_ref.float(), rtol=1e-3, atol=atol)
    torch.testing.assert_close(attn, attn_ref, rtol=1e-4, atol=1e-6)
    padding = torch.arange(attn.shape[-1] - 1) >= batch.filled[:, None]
    assert torch.all(attn[:, :, :-1][padding[:, None].expand_as(attn[:, :, :-1])] == 0)


def gathered_attend_score_sample(*args, **kwargs):
    with mock.patch.object(reference, "ring_pieces", lambda *a: None):
        return reference.attend_score_sample(*args, **kwargs)


@pytest.mark.parametrize("policy", ["nexus", "h2o", "streaming", "keydiff"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [0, 1, 3])
def test_decode_steps_in_place_equal_gathered(policy, layout, shape, cut):
    """Several steps with evictions, both position modes in one batch: the same outputs, the same victims
    and the same pool (positions, ranks, edges exactly; scores to tolerance)."""
    spec = POLICIES[policy]
    ring = torch.tensor([True, False, True][:len(SHAPES[shape][4])])
    batch, gen = make_batch(shape, layout, rope_rows=ring.tolist(), num_edges=max(spec.top_m, 1))
    other = dataclasses.replace(batch, pool=clone_pool(batch.pool))
    group, head_dim, dtype = SHAPES[shape][:3]
    rope = make_rope(head_dim)
    atol = 1e-5 if dtype == torch.float32 else 1e-3
    for step in range(4):
        q, k_new, v_new, new_score = step_inputs(batch, spec, group, head_dim, dtype, gen)
        common = dict(layer=1, seed=7 + step, scale=head_dim**-0.5, new_score=new_score, rope=rope,
                      q_pos=query_positions(batch, ring), ring=ring)
        out_ref, written_ref = gathered_attend_score_sample(q, k_new, v_new, other.pool, other.block_tables,
                                                            other.filled, other.budget, other.new_pos, spec, **common)
        out, written = reference.attend_score_sample(q, k_new, v_new, batch.pool, batch.block_tables, batch.filled,
                                                     batch.budget, batch.new_pos, spec, **common)
        torch.testing.assert_close(out.float(), out_ref.float(), rtol=1e-3, atol=atol)
        assert torch.equal(written, written_ref), f"step {step}: written slots differ"
        assert_pools_match(other.pool, batch.pool, atol)
        assert torch.equal(batch.pool.rope_pos, other.pool.rope_pos)
        advance(batch)
        advance(other)


def test_rotation_is_hugging_faces_in_paired_order():
    """Rope rotates channels (2f, 2f + 1): on vectors permuted to paired order as the loader permutes q / k
    (loader.paired_rows) it gives transformers' rotate_half RoPE of the originals, permuted the same way, so
    q . k is transformers'; `turn` (the in-place path, from phases) equals `rotate`."""
    from transformers.models.llama.modeling_llama import rotate_half

    from minikv.loader import paired_rows

    gen = torch.Generator().manual_seed(3)
    rope = make_rope(32, theta=500000.0)
    q, k = torch.randn(5, 32, generator=gen), torch.randn(5, 7, 32, generator=gen)
    q_pos, k_pos = torch.randint(0, 900, (5,), generator=gen), torch.randint(0, 900, (5, 7), generator=gen)

    def hf(x, pos):
        angles = pos.float()[..., None] * rope.inv_freq
        cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
        return x * cos + rotate_half(x) * sin

    def paired(x):
        return paired_rows(x.movedim(-1, 0), 1).movedim(0, -1)

    assert not torch.equal(paired(k), k)
    torch.testing.assert_close(rope.rotate(paired(k), k_pos, 899), paired(hf(k, k_pos)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rope.rotate(paired(q), q_pos), paired(hf(q, q_pos)), rtol=1e-5, atol=1e-5)
    dots = torch.einsum("nd,njd->nj", rope.rotate(paired(q), q_pos), rope.rotate(paired(k), k_pos))
    torch.testing.assert_close(dots, torch.einsum("nd,njd->nj", hf(q, q_pos), hf(k, k_pos)), rtol=1e-5, atol=1e-5)
    turned = Rope.turn(paired(k), rope.phases(k_pos, 899))
    assert torch.equal(turned, rope.rotate(paired(k), k_pos, 899))


@pytest.mark.parametrize("positions", ["original", "ring"])
def test_engine_in_place_equals_gathered(loaded, positions):
    """The CPU engine's tokens and logprobs with the rings read in place and gathered: ragged prompts,
    decode growing rings block by block beside each other (fragmented tables), evictions."""
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, logprobs=1)
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 250, (n,), generator=gen).tolist() for n in (150, 37, 90)]

    def run(in_place: bool):
        eng = Engine(loaded, budget=96, policy="nexus", chunk=64, window=16, max_num_seqs=3, positions=positions)
        eng.attention._deferred.in_place = in_place
        ids = [eng.add_request(p, params) for p in prompts]
        done = {}
        while eng.has_unfinished_requests():
            for out in eng.step():
                if out.finished:
                    done[out.request_id] = out.outputs[0]
        return [done[i].token_ids for i in ids], [done[i].logprobs for i in ids]

    tokens, logprobs = run(True)
    tokens_ref, logprobs_ref = run(False)
    assert tokens == tokens_ref
    for got, ref in zip(logprobs, logprobs_ref):
        for a, b in zip(got, ref):
            assert {t: round(x.logprob, 3) for t, x in a.items()} == {t: round(x.logprob, 3) for t, x in b.items()}


def test_reservations_are_runs_of_consecutive_blocks():
    """Rings growing a block at a time beside each other still get consecutive blocks (their reservations
    are set aside as runs); without a long enough run blocks come one by one; accounting counts only the
    blocks rings hold, and every block comes back."""
    from minikv.block_pool import KVPool
    from test_keep_step import CONFIG

    pool = KVPool(CONFIG, 12, 4, dtype=torch.float32, device=torch.device("cpu"))
    pool.reserve(0, 4)
    pool.reserve(1, 3)
    for n in range(1, 5):  # interleaved growth
        pool.grow(0, n)
        pool.grow(1, min(n, 3))
    a, b = pool.blocks_of(0), pool.blocks_of(1)
    assert all(y == x + 1 for x, y in zip(a, a[1:])) and all(y == x + 1 for x, y in zip(b, b[1:]))
    assert pool.num_used == 7 and pool.num_reserved == 7
    pool.reserve(2, 5)  # 5 blocks are free and consecutive
    pool.grow(2, 1)
    assert pool.num_used == 8 and pool.num_unreserved == 0
    pool.release(2)  # the 4 blocks set aside and never taken are free again
    pool.release(0)
    pool.reserve(3, 6)  # free: blocks 0-3 and 7-11: no run of 6, blocks come one by one
    assert len(pool.grow(3, 6)) == 6 and pool.num_used == 9
    for owner in (1, 3):
        pool.release(owner)
    assert pool.num_used == pool.num_reserved == 0 and sorted(pool._free) == list(range(12))

"""The KV archive (minikv.archive): off is today's engine bit for bit, recall keeps each ring's best tokens,
and the accounting stays exact under a random soak of requests, aborts and a tight memory bound."""

from __future__ import annotations

import random

import pytest
import torch

from minikv.archive import BLOCK, RecallRule, demand, needed, rotated, take_back
from minikv.engine import Engine
from minikv.errors import ConfigError, InvalidRequestError
from minikv.sampling import SamplingParams

from tiny_engine import tiny_loaded


EAGER = RecallRule(threshold=0.02, min_votes=1, span=1)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return tiny_loaded(tmp_path_factory.mktemp("tiny"))


def engine(loaded, **kwargs) -> Engine:
    # a random tiny model spreads its attention thin: a low threshold and one vote make its recalls happen
    options = dict(policy="nexus", budget=32, n_sink=2, window=4, chunk=16, max_num_seqs=4, recall_interval=4,
                   recall_rule=EAGER)
    return Engine(loaded, **{**options, **kwargs})


def prompt(rng: random.Random, n: int) -> list[int]:
    return [1] + [rng.randrange(3, 259) for _ in range(n - 1)]


def params(archive_budget: int, max_tokens: int = 16) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, logprobs=2,
                          archive_budget=archive_budget)


def outputs(e: Engine, prompts, sampling) -> list[tuple[list[int], list]]:
    return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in e.generate(prompts, sampling, use_tqdm=False)]


@pytest.mark.parametrize("positions", ["original", "ring"])
def test_archive_off_is_todays_engine_bit_for_bit(loaded, positions):
    rng = random.Random(1)
    prompts = [prompt(rng, n) for n in (90, 40, 130)]
    today = engine(loaded, positions=positions)
    today.attention.archive = None  # the code path before archives existed
    assert outputs(engine(loaded, positions=positions), prompts, params(0)) == outputs(today, prompts, params(0))


@pytest.mark.parametrize("positions", ["original", "ring"])
def test_archive_changes_nothing_while_nothing_is_evicted(loaded, positions):
    rng = random.Random(2)
    prompts = [prompt(rng, 20)]
    # budget 64 >= prompt + max_tokens: the ring never evicts, so no recall has anything to bring back, and
    # (ranks being positions while nothing is evicted) both modes are the full cache's computation
    with_archive = outputs(engine(loaded, budget=64, positions=positions), prompts, params(10**4))
    assert with_archive == outputs(engine(loaded, budget=64, positions=positions), prompts, params(0))
    full = Engine(loaded, policy="full", chunk=16, max_num_seqs=4, max_model_len=64)
    assert with_archive == outputs(full, prompts, params(0))


def test_archive_request_next_to_plain_ones_leaves_them_alone(loaded):
    rng = random.Random(3)
    a, b = prompt(rng, 100), prompt(rng, 70)
    plain = outputs(engine(loaded), [a, b], [params(0), params(0)])
    mixed = outputs(engine(loaded), [a, b], [params(10**4), params(0)])
    assert mixed[1] == plain[1] and mixed[0] != plain[0]  # the archive changed its own request only


def _prefilled(loaded, n_prompt: int, positions: str = "original"):
    """An engine whose one request (archive unbounded, no decode recall) has read its prompt."""
    e = engine(loaded, recall_interval=10**6, positions=positions)
    rid = e.add_request(prompt(random.Random(4), n_prompt), params(10**4, max_tokens=8))
    req = e._requests[rid]
    while req.num_processed < len(req.prompt_ids):
        e.step()
    return e, req


def _ring(e, req, layer: int):
    from minikv.kernels.common import physical_rows

    pool, table, filled = e.pool.layer(layer), e.batch.block_table[req.slot], req.ring_size
    return pool, table, filled, physical_rows(table, torch.arange(filled), pool.block_size)


def test_demand_is_a_share_of_attention_over_ring_and_archive(loaded):
    """A query aimed at one evicted token's key gives it nearly all its attention: that head demands it; a
    query of zeros spreads its attention evenly, below any threshold over 1 / (ring + what it lacks)."""
    e, req = _prefilled(loaded, 150)
    pool, table, filled, rows = _ring(e, req, 1)
    archive, scale = req.archive, e.attention.scale
    ring_pos = pool.rows("pos")[rows]  # [f, H]
    evicted = sorted(set(archive.positions().tolist()) - set(ring_pos[:, 0].tolist()))
    target = evicted[len(evicted) // 2]
    key = torch.cat([b.k[1, 0, b.start: b.end] for b in archive.blocks])[archive.positions() == target]  # [1, D]
    q = torch.zeros(1, 4, 16)
    q[0, :2] = 40.0 * key[0] / key[0].norm() ** 2 / scale  # head 0's query heads: logit 40 on the target
    q_pos = torch.tensor([req.num_processed], dtype=torch.int32)
    # no RoPE: the logit is q.k as built (the rotation is the archive's `rotated`, tested with the kernels)
    wanted = demand(archive, 1, q, q_pos, pool, table, filled, None, scale, threshold=0.5)
    assert wanted.tolist() == [target]
    assert demand(archive, 1, torch.zeros(1, 4, 16), q_pos, pool, table, filled, None, scale,
                  threshold=1.0 / filled).numel() == 0  # each share is 1 / (ring + lacking) < 1 / ring
    every = demand(archive, 1, torch.randn(1, 4, 16), q_pos, pool, table, filled, None, scale, threshold=0.0)
    # threshold 0: every head votes for every token its ring lacks, once
    lacking = sum(len(set(archive.positions().tolist()) - set(ring_pos[:, h].tolist())) for h in range(2))
    assert every.numel() == lacking


def test_needed_takes_voted_tokens_and_their_neighbours():
    votes = torch.tensor([0, 3, 0, 0, 0, 1, 0, 0, 4, 0], dtype=torch.int32)  # positions 100..109
    assert needed(votes, 100, min_votes=3, span=1).tolist() == [100, 101, 102, 107, 108, 109]
    assert needed(votes, 100, min_votes=4, span=0).tolist() == [108]
    assert needed(votes, 100, min_votes=5, span=2) is None


@pytest.mark.parametrize("positions", ["original", "ring"])
def test_take_back_replaces_the_policys_next_victims(loaded, positions):
    """Every KV head that lacks a wanted token takes it back over its lowest-scored unprotected slot; sinks
    and the window stay; the slot holds the archive's K/V; under "ring" the slots are ranked again."""
    e, req = _prefilled(loaded, 150, positions)
    pool, table, filled, rows = _ring(e, req, 1)
    archive, n_sink, window = req.archive, e.policy.n_sink, e.policy.window
    before_pos, before_score = pool.rows("pos")[rows].clone(), pool.rows("score")[rows].clone()
    lacking = [sorted(set(archive.positions().tolist()) - set(before_pos[:, h].tolist())) for h in range(2)]
    wanted = torch.tensor(sorted(set(lacking[0][:3]) | set(lacking[1][-2:])), dtype=torch.int32)
    q_pos = req.num_processed
    swapped = take_back(archive, 1, wanted, q_pos, pool, table, filled, n_sink, window, False, False,
                        ring_positions=positions == "ring")
    after = pool.rows("pos")[rows]
    all_pos = archive.positions()
    all_k = torch.cat([b.k[1, :, b.start: b.end] for b in archive.blocks], dim=1)  # [H, A, D]
    all_v = torch.cat([b.v[1, :, b.start: b.end] for b in archive.blocks], dim=1)
    moved = 0
    for h in range(2):
        ring = before_pos[:, h]
        incoming = [p for p in wanted.tolist() if p not in set(ring.tolist())]
        open_slots = ((ring >= n_sink) & (ring < q_pos - window)).nonzero().squeeze(1)
        victims = open_slots[before_score[open_slots, h].argsort(stable=True)[: len(incoming)]]
        expected = ring.clone()
        expected[victims] = torch.tensor(incoming, dtype=ring.dtype)
        assert torch.equal(after[:, h], expected)
        for slot in victims.tolist():
            i = int((all_pos == after[slot, h]).nonzero()[0, 0])
            assert torch.equal(pool.rows("k")[rows[slot], h], all_k[h, i])
            assert torch.equal(pool.rows("v")[rows[slot], h], all_v[h, i])
            assert pool.rows("score")[rows[slot], h] == before_score[:, h].max()
        moved += len(incoming)
    assert swapped == moved > 0
    ranks = after.argsort(0).argsort(0).to(torch.int32) if positions == "ring" else after
    assert torch.equal(pool.rows("rope_pos")[rows], ranks)


def test_votes_become_the_next_steps_take_back_in_every_ring(loaded):
    """End to end on the engine: the prompt's last chunk votes (pending after its step); the next step takes
    the needed tokens back into every layer's and KV head's ring, where they outlive that step's eviction."""
    e, req = _prefilled(loaded, 150)
    assert req.archive.pending is not None and req.archive.pending.numel() > 0  # the last chunk voted
    ring = e.pool.ring("pos", req.blocks, req.ring_size)  # [L, H, f]
    lacking = set(req.archive.positions().tolist())
    for row in ring.reshape(-1, ring.shape[-1]):
        lacking -= set(row.tolist())
    fact = torch.tensor(sorted(lacking)[:3], dtype=torch.int32)  # evicted from every ring
    assert fact.numel() == 3
    req.archive.pending = fact
    e.step()  # a decode step: takes them back, attends, evicts one slot per ring
    ring = e.pool.ring("pos", req.blocks, req.ring_size)
    assert bool((ring[..., None] == fact).any(-2).all())  # every (layer, KV head) holds all three
    assert req.archive.taking is None  # taken: what that step's own votes need is the next step's


def test_block_bound_is_an_upper_bound(loaded):
    e, req = _prefilled(loaded, 150)
    rope, archive = e.attention._rope, req.archive
    q = torch.randn(2, 3, 16)  # [H, queries, D]: per KV head, already rotated
    for block in archive.blocks:
        keys = rotated(block.k[0, :, block.start: block.end], block.pos[block.start: block.end], rope)  # [H, n, D]
        exact = torch.einsum("hqd,hnd->hqn", q, keys).amax(-1)
        bound = torch.maximum(q * block.kmin[0][:, None], q * block.kmax[0][:, None]).sum(-1)
        assert (bound >= exact - 1e-4).all()


def test_recall_is_counted_and_the_archive_freed(loaded):
    e = engine(loaded)
    out = e.generate([prompt(random.Random(5), 120)], params(10**4, max_tokens=20), use_tqdm=False)[0]
    assert out.metrics.num_recalled_tokens > 0
    assert e.archive.recalled_total == out.metrics.num_recalled_tokens
    assert e.archive.tokens == 0 and not e.archive.archives


@pytest.mark.parametrize("positions", ["original", "ring", None])
def test_soak_accounting(loaded, positions):
    """None: every request picks its mode, so one batch mixes them."""
    rng = random.Random(6)
    e = engine(loaded, max_num_seqs=3, recall_interval=2)
    memory = e.archive.memory = 5 * BLOCK * e.archive.bytes_per_token  # tight: the engine bound drops old tokens
    ids = []
    for i in range(14):
        budget = rng.choice([0, 10, 40, 100, 10**4])
        sampling = params(budget, rng.randrange(1, 30))
        sampling.positions = positions or rng.choice(["original", "ring"])
        ids.append((e.add_request(prompt(rng, rng.randrange(10, 140)), sampling), budget))
    steps = 0
    while e.has_unfinished_requests():
        e.step()
        steps += 1
        if steps % 7 == 0:
            running = [r for r in e._requests.values() if not r.is_finished]
            if running:
                e.abort(rng.choice(running).request_id)
        live = [a for a in e.archive.archives]
        assert e.archive.tokens == sum(a.size for a in live)
        assert e.archive.bytes_used <= memory
        for req in e._requests.values():
            if req.archive is None or req.is_finished:
                continue
            pos = req.archive.positions()
            assert req.archive.size == pos.numel() <= req.archive.budget
            # the archive holds the request's latest tokens, oldest first, each once
            assert torch.equal(pos, torch.arange(req.num_processed - pos.numel(), req.num_processed,
                                                 dtype=torch.int32))
            filled = min(req.ring_size, req.num_processed)
            if not filled:
                continue
            ring = e.pool.ring("pos", req.blocks, filled)  # [L, H, f]
            for row in ring.reshape(-1, filled):
                assert row.unique().numel() == filled  # no token twice in a ring after swaps
            # RoPE positions: text positions, or under "ring" the order of the positions, swaps or not
            rope_pos = e.pool.ring("rope_pos", req.blocks, filled)
            ranked = req.positions == "ring"
            assert torch.equal(rope_pos, ring.argsort(-1).argsort(-1).to(torch.int32) if ranked else ring)

    assert e.archive.tokens == 0 and not e.archive.archives
    assert e.archive.recalled_total > 0


def test_bad_archive_settings(loaded):
    with pytest.raises(InvalidRequestError, match="archive_budget"):
        SamplingParams(archive_budget=-1)
    with pytest.raises(ConfigError, match="recall_interval"):
        engine(loaded, recall_interval=0)
    with pytest.raises(ConfigError, match="recall_rule"):
        engine(loaded, recall_rule=(0.1, 4, 12))
    for bad in (dict(threshold=1.5), dict(min_votes=0), dict(span=-1), dict(min_votes=True)):
        with pytest.raises(ValueError, match="RecallRule"):
            RecallRule(**bad)
    from minikv.cli import recall_rule_arg
    assert recall_rule_arg("0.2,3,5") == RecallRule(0.2, 3, 5)
    with pytest.raises(Exception, match="SHARE,VOTES,SPAN"):
        recall_rule_arg("0.2,3")
    with pytest.raises(InvalidRequestError, match="full"):
        Engine(loaded, policy="full", max_model_len=64).add_request([1, 5], SamplingParams(archive_budget=10, max_tokens=4))


def test_recalled_tokens_reach_stats_and_metrics(loaded):
    from minikv.server.metrics import _EngineStatsCollector
    from minikv.server.protocol import CompletionRequest

    e = engine(loaded)
    body = CompletionRequest(model="m", prompt="x", archive_budget=500)
    assert body.sampling_params(max_tokens=20, logprobs=None, stream=False).archive_budget == 500
    out = e.generate([prompt(random.Random(5), 120)], params(500, max_tokens=20), use_tqdm=False)[0]
    assert e.stats().recalled_tokens == out.metrics.num_recalled_tokens > 0
    families = {f.name: f for f in _EngineStatsCollector(e.stats, "m", "nexus").collect()}
    assert families["minikv:recalled_tokens"].samples[0].value == out.metrics.num_recalled_tokens


def test_engine_default_archive_budget(loaded):
    e = engine(loaded, archive_budget=300)
    plain = e.add_request([1, 5, 6], SamplingParams(max_tokens=2))
    ring = e.add_request([1, 5, 6], SamplingParams(max_tokens=2, positions="ring"))
    own = e.add_request([1, 5, 6], SamplingParams(max_tokens=2, archive_budget=0))
    assert e._requests[plain].archive.budget == 300 and e._requests[ring].archive.budget == 300
    assert e._requests[own].archive is None  # it said no
    with pytest.raises(ConfigError, match="archive_budget"):
        engine(loaded, archive_budget=-5)


@pytest.mark.parametrize("shape", [(2, 1, 16, 5), (3, 37, 64, 9), (1, 16, 24, 1)])
def test_block_bound_triton_matches_reference(shape):
    from minikv.kernels.archive_score import block_bound_reference, block_bound_triton

    heads, queries, dim, blocks = shape
    gen = torch.Generator().manual_seed(sum(shape))
    q = torch.randn(heads, queries, dim, generator=gen)
    a, b = torch.randn(2, heads, blocks, dim, generator=gen)
    kmin, kmax = torch.minimum(a, b), torch.maximum(a, b)
    torch.testing.assert_close(block_bound_triton(q, kmin, kmax), block_bound_reference(q, kmin, kmax),
                               rtol=1e-5, atol=1e-5)


def _random_pool(gen: torch.Generator, dtype: torch.dtype, blocks=5, block_size=4, heads=3, dim=24, edges=3,
                 rope_pos=True):
    from minikv.kernels.common import PoolLayer

    shape = (blocks, block_size, heads)
    ints = lambda *s: torch.randint(0, 1000, s, generator=gen, dtype=torch.int32)  # noqa: E731
    k, v = torch.randn(2, *shape, dim, generator=gen).to(dtype)
    held = torch.randint(0, 2, shape, generator=gen, dtype=torch.int8)
    return PoolLayer(k, v, ints(*shape), torch.rand(*shape, generator=gen), ints(*shape, edges), ints(*shape, edges),
                     torch.rand(*shape, edges, generator=gen), held, ints(*shape) if rope_pos else None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rope_pos,edges,dim", [(True, 3, 24), (False, 1, 64), (True, 8, 16)])
def test_swap_triton_matches_reference(dtype, rope_pos, edges, dim):
    from minikv.kernels.archive_swap import swap_reference, swap_triton

    gen = torch.Generator().manual_seed(dim + edges)
    pool = _random_pool(gen, dtype, dim=dim, edges=edges, rope_pos=rope_pos)
    twin = type(pool)(*(None if t is None else t.clone() for t in pool))
    # distinct (row, head) pairs, in no particular order, several per head (as one recall of every head makes)
    pairs = torch.randperm(pool.k.shape[0] * pool.k.shape[1] * pool.k.shape[2], generator=gen)[:17]
    rows, heads = pairs // pool.k.shape[2], (pairs % pool.k.shape[2]).to(torch.int32)
    k, v = torch.randn(2, 17, dim, generator=gen).to(dtype)
    pos = torch.randint(0, 5000, (17,), generator=gen, dtype=torch.int32)
    score = torch.randn(17, generator=gen)
    swap_reference(pool, rows, heads, k, v, pos, score)
    swap_triton(twin, rows, heads, k, v, pos, score)
    for name, a, b in zip(pool._fields, pool, twin):
        assert (a is None) == (b is None), name
        if a is not None:
            assert torch.equal(a, b), name  # copies and constants: bit for bit
    assert torch.equal(pool.rows("k")[rows, heads.long()], k)  # and the swap did write the tokens
    swap_triton(twin, rows[:0], heads[:0], k[:0], v[:0], pos[:0], score[:0])  # nothing to swap: no launch


def test_engine_with_archive_on_triton_equals_reference(loaded, monkeypatch):
    """Recall through the Triton block bounds and swap (interpreter) against the torch reference, both
    position modes in one batch: the same greedy tokens and recall counts."""
    rng = random.Random(9)
    prompts = [prompt(rng, 110), prompt(rng, 90)]
    sampling = [params(10**4, max_tokens=10), params(10**4, max_tokens=10)]
    sampling[1].positions = "ring"
    runs = {}
    for backend in ("reference", "triton"):
        monkeypatch.setenv("MINIKV_KERNELS", backend)
        e = engine(loaded)
        outs = e.generate(prompts, sampling, use_tqdm=False)
        runs[backend] = [(o.outputs[0].token_ids, o.metrics.num_recalled_tokens) for o in outs]
        assert all(n > 0 for _, n in runs[backend])
    assert runs["triton"] == runs["reference"]

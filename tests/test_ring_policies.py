"""The ring store and its policies on the reference path (docs/design.md, sections 2-4)."""

import math

import numpy as np
import pytest
import torch

from helpers import load_tiny, make_tiny_checkpoint, ring_logits
from minikv.errors import ConfigError
from minikv.kernels.common import SCORE_ATTN, VICTIM_MIN_SCORE, VICTIM_RESERVOIR, EvictionSpec, PoolLayer
from minikv.kernels.reference import attend_score_sample, nexus_walk, victim_slots
from minikv.policies import POLICIES, PrefillCandidates, make_policy
from minikv.policies.nexus import Nexus
from minikv.policies.spec import parse_policy
from minikv.block_pool import check_budget, check_ring_settings

EVICTING = [name for name, cls in POLICIES.items() if cls.evicts]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return load_tiny(make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), "LlamaForCausalLM"))


def random_ids(n, seed=0, vocab=384):
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


# --- no eviction: every policy is the full cache ---------------------------------------------------


@pytest.mark.parametrize("policy", list(POLICIES))
def test_ample_budget_reproduces_full_cache_logits(tiny, policy):
    model, config = tiny
    ids = random_ids(90)
    full, _, _ = ring_logits(model, config, ids, prefill=[40, 30], budget=128, policy="full")
    got, _, _ = ring_logits(model, config, ids, prefill=[40, 30], budget=128, policy=policy)
    torch.testing.assert_close(got, full, rtol=0, atol=1e-6)


# --- memory bound --------------------------------------------------------------------------------


def test_long_prompt_streams_through_budget_plus_chunk(tiny):
    """A 20,000-token prompt, budget 512, chunk 256: the store holds 512 slots per (layer, head) and a
    sequence never has more than budget + chunk slots live, whatever the prompt length."""
    model, config = tiny
    budget, chunk, n = 512, 256, 20_000
    ids = random_ids(n, seed=3)
    sizes = [chunk] * (n // chunk) + ([n % chunk] if n % chunk else [])
    logits, ring, attention = ring_logits(model, config, ids, prefill=sizes, budget=budget, policy="nexus")
    assert logits.shape[0] == n and torch.isfinite(logits).all()
    assert ring.k.shape == (config.num_layers, config.num_kv_heads, budget, config.head_dim)
    assert attention.pool.num_blocks == budget // 16 + 2  # the ring's blocks and two more, whatever n
    assert attention.peak_slots_per_seq <= budget + chunk
    pos = ring.pos
    assert (pos >= 0).all() and pos.max() == n - 1  # full ring of real tokens, the last one present


# --- protection ----------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", EVICTING)
@pytest.mark.parametrize("seed", [0, 1])
def test_sinks_and_window_are_never_evicted(tiny, policy, seed):
    model, config = tiny
    n_sink, window, budget = 4, 8, 24
    ids = random_ids(90, seed=seed)
    steps = []
    _, store, _ = ring_logits(model, config, ids, prefill=[16, 16, 16], budget=budget, policy=policy, seed=seed,
                           n_sink=n_sink, window=window, on_step=lambda t, s: steps.append((t, s.pos.clone())))
    assert len(steps) == 90 - 48 + 3
    for t, pos in steps:  # t = tokens in the ring's history after the step
        filled = min(t, budget)
        for layer_head in pos.reshape(-1, filled):
            held = set(layer_head.tolist())
            assert set(range(n_sink)) <= held
            assert set(range(t - window, t)) <= held
            assert len(held) == filled and -1 not in held  # no position twice, no hole


def test_streaming_keeps_exactly_sinks_and_most_recent(tiny):
    model, config = tiny
    n, budget = 80, 24
    _, store, _ = ring_logits(model, config, random_ids(n), prefill=[20, 20], budget=budget, policy="streaming",
                           n_sink=4, window=8)
    expected = set(range(4)) | set(range(n - (budget - 4), n))
    for layer_head in store.pos.reshape(-1, budget):
        assert set(layer_head.tolist()) == expected


# --- h2o and tova against a brute-force simulation ----------------------------------------------


def simulate_attention_eviction(qs, ks, budget, n_sink, window, accumulate: bool):
    """Keep-set of positions after running keys/queries [T, D] through a cache of `budget` entries,
    evicting the lowest (accumulated or current) attention among unprotected entries. One head."""
    kept, acc = [], {}
    for t in range(len(ks)):
        cand = kept + [t]
        logits = torch.stack([ks[j] for j in cand]) @ qs[t] / math.sqrt(qs.shape[1])
        probs = torch.softmax(logits.double(), 0)
        for j, p in zip(cand, probs.tolist()):
            acc[j] = acc.get(j, 0.0) + p if accumulate else p
        if len(kept) == budget:
            free = [j for j in kept if n_sink <= j < t - window]
            kept.remove(min(free, key=lambda j: (acc[j], kept.index(j))))
        kept.append(t)
    return set(kept)


@pytest.mark.parametrize("policy,accumulate", [("h2o", True), ("tova", False)])
def test_attention_policies_match_brute_force(policy, accumulate):
    torch.manual_seed(0)
    steps, budget, head_dim = 60, 16, 16
    spec = make_policy(policy, n_sink=2, window=4).eviction_spec()
    qs, ks = torch.randn(steps, head_dim), torch.randn(steps, head_dim) * 2
    ring, table = empty_ring(budget, head_dim, edges=1, block_size=4)
    for t in range(steps):
        attend_score_sample(qs[t].view(1, 1, -1), ks[t].view(1, 1, -1), torch.randn(1, 1, head_dim), ring, table,
                            torch.tensor([min(t, budget)], dtype=torch.int32), torch.tensor([budget], dtype=torch.int32),
                            torch.tensor([t], dtype=torch.int32), spec, layer=0, seed=0, scale=head_dim**-0.5)
    assert set(ring.pos[:, :, 0].flatten().tolist()) == simulate_attention_eviction(qs, ks, budget, 2, 4, accumulate)


def empty_ring(budget, head_dim, edges=4, heads=1, block_size=None):
    """A pool holding exactly one empty ring of `budget` slots, and its block table [1, W] (blocks in
    reverse order, so ring order and pool order differ)."""
    block_size = block_size or budget
    shape = (budget // block_size, block_size, heads)
    pool = PoolLayer(torch.zeros(*shape, head_dim), torch.zeros(*shape, head_dim), torch.full(shape, -1, dtype=torch.int32),
                     torch.zeros(shape), torch.full((*shape, edges), -1, dtype=torch.int32),
                     torch.full((*shape, edges), -1, dtype=torch.int32), torch.zeros(*shape, edges),
                     torch.zeros(shape, dtype=torch.int8))
    return pool, torch.arange(shape[0] - 1, -1, -1, dtype=torch.int32)[None]


# --- nexus ---------------------------------------------------------------------------------------


def bridge_graph():
    """Slots: 0 = A, 1 = B (the query attends them), 2 = X (a bridge: A and B attended it), 3 = Y (nobody did).
    X and Y get the same, small direct attention."""
    attn = torch.tensor([[0.45, 0.45, 0.05, 0.05]])
    pos = torch.tensor([[10, 11, 5, 6]], dtype=torch.int32)
    edge_slot = torch.full((1, 4, 2), -1, dtype=torch.int32)
    edge_pos = torch.full((1, 4, 2), -1, dtype=torch.int32)
    edge_w = torch.zeros(1, 4, 2)
    for src in (0, 1):
        edge_slot[0, src, 0], edge_pos[0, src, 0], edge_w[0, src, 0] = 2, 5, 1.0
    return attn, edge_slot, edge_pos, edge_w, pos


def test_nexus_walk_surfaces_bridge_tokens():
    attn, edge_slot, edge_pos, edge_w, pos = bridge_graph()
    n = nexus_walk(attn, edge_slot, edge_pos, edge_w, pos, gamma=0.5, hops=2)
    assert n[0, 2] > n[0, 3] + 0.3  # X outranks Y though their direct attention is equal
    flat = nexus_walk(attn, edge_slot, edge_pos, edge_w, pos, gamma=0.0, hops=2)
    assert flat[0, 2] == flat[0, 3]


def test_dead_edges_carry_nothing():
    attn, edge_slot, edge_pos, edge_w, pos = bridge_graph()
    pos[0, 2] = 99  # X's slot was overwritten by another token: the edges to it are dead
    n = nexus_walk(attn, edge_slot, edge_pos, edge_w, pos, gamma=0.5, hops=2)
    assert n[0, 2] == attn[0, 2]


def bridge_ring_victim(gamma: float) -> int:
    """Run one decode step over the bridge graph through the decode kernel; return the slot written."""
    attn, edge_slot, edge_pos, edge_w, pos = bridge_graph()
    spec = EvictionSpec(SCORE_ATTN, VICTIM_MIN_SCORE, decay=0.0, gamma=gamma, hops=2, top_m=2, n_sink=0, window=0)
    ring, table = empty_ring(4, 4, edges=2)  # one block: ring slot j is pool row j
    ring.pos[0, :, 0] = pos[0]
    ring.edge_slot[0, :, 0], ring.edge_pos[0, :, 0], ring.edge_w[0, :, 0] = edge_slot[0], edge_pos[0], edge_w[0]
    # Keys along e0 with q = e0 make the logits log(attn): the query attends exactly as `attn` says,
    # and the new token (key -30) takes next to nothing.
    ring.k[0, :, 0] = torch.log(attn[0])[:, None] * torch.tensor([1.0, 0, 0, 0])
    q = torch.tensor([1.0, 0, 0, 0]).view(1, 1, 4)
    k_new = torch.tensor([-30.0, 0, 0, 0]).view(1, 1, 4)
    four = torch.tensor([4], dtype=torch.int32)
    _, written = attend_score_sample(q, k_new, torch.zeros(1, 1, 4), ring, table, four, four,
                                     torch.tensor([20], dtype=torch.int32), spec, layer=0, seed=0, scale=1.0)
    return written.item()


def test_nexus_decode_evicts_the_non_bridge():
    assert bridge_ring_victim(gamma=0.5) == 3  # Y goes, the bridge X stays
    assert bridge_ring_victim(gamma=0.0) == 2  # without the walk X and Y tie, and the lower slot (X) goes


def reserve_candidates(n=40, novel=10, dim=16):
    """Prefill candidates whose keys share one direction except `novel`, which nothing attended."""
    g = torch.Generator().manual_seed(0)
    keys = torch.nn.functional.normalize(torch.ones(dim), dim=0) * 4 + 0.2 * torch.randn(n, dim, generator=g)
    keys[novel] = torch.zeros(dim)
    keys[novel, 0], keys[novel, 1] = 4.0, -4.0
    mass = 0.5 + torch.rand(n, generator=g)
    mass[novel] = 0.0
    pos = torch.arange(n, dtype=torch.int32)[None]
    return PrefillCandidates(layer=0, seed=0, filled=0, budget=20, pos=pos, keys=keys[None], mass=mass[None],
                             ring_score=torch.zeros(1, 0), edge_target=torch.full((1, n, 4), -1),
                             edge_pos=torch.full((1, n, 4), -1, dtype=torch.int32), edge_w=torch.zeros(1, n, 4))


def test_nexus_novelty_ties_break_by_index_whatever_the_number_of_heads():
    """Keys are stored before RoPE, so a repeated token repeats its key exactly and novelties tie. The reserve
    must pick among equals the same way for one head alone as beside another (a tensor-parallel rank holds
    fewer heads): the lowest candidate index first."""
    g = torch.Generator().manual_seed(1)
    n, dim = 48, 8
    pattern = torch.randn(6, dim, generator=g)
    keys = torch.stack([pattern[torch.arange(n) % 6], torch.randn(n, dim, generator=g)])  # head 0: 8 repeats of 6
    pos = torch.arange(n, dtype=torch.int32)[None].expand(2, -1)
    cand = lambda heads: PrefillCandidates(layer=0, seed=0, filled=0, budget=24, pos=pos[heads],  # noqa: E731
                                           keys=keys[heads], mass=torch.ones(len(heads), n),
                                           ring_score=torch.zeros(len(heads), 0), ends_prompt=True)
    policy = make_policy("nexus", n_sink=2, window=4, reserve=1.0)
    both = policy.prefill_held(cand([0, 1]), policy.prefill_scores(cand([0, 1]))[1])
    alone = [policy.prefill_held(cand([h]), policy.prefill_scores(cand([h]))[1]) for h in (0, 1)]
    assert torch.equal(both, torch.cat(alone))
    held = both[0].nonzero().flatten()
    # among the tied copies of a pattern, the earliest copies are the ones held
    for j in range(6):
        copies = torch.arange(j, n, 6)
        copies = copies[copies >= 2]  # sinks never compete
        taken = held[torch.isin(held, copies)]
        assert torch.equal(taken, copies[: len(taken)])


@pytest.mark.parametrize("tau", [0.0, 1.0])
def test_nexus_novelty_reserve_keeps_the_unattended_outlier_key(tau):
    cand = reserve_candidates()
    chosen = cand.budget - 2 - 4  # budget - n_sink - window
    stored, lifted = make_policy("nexus", n_sink=2, window=4, tau=tau, reserve=0.5).prefill_scores(cand)
    assert lifted[0, 10] == lifted.max()
    assert int((lifted == lifted.max()).sum()) == chosen // 2  # exactly the reserve share is lifted
    plain_stored, plain = make_policy("nexus", n_sink=2, window=4, tau=tau, reserve=0.0).prefill_scores(cand)
    assert plain[0, 10] == plain.min()  # by attention alone it is the first to go
    # Stored with the candidates' mean score, so decode does not pick it first; unreserved scores untouched.
    assert plain_stored[0, 10] == 0 and stored[0, 10] == pytest.approx(plain_stored.mean().item())
    reserved = lifted == lifted.max()
    assert torch.equal(stored[~reserved], plain_stored[~reserved])


def test_nexus_reserve_must_be_a_share():
    with pytest.raises(ConfigError, match="0 <= reserve <= 1"):
        make_policy("nexus", reserve=1.5)


def test_nexus_reserve_skips_sinks_and_window():
    """The most novel keys are a sink (0) and window tokens (37, 38): they are kept anyway, so the reserve
    takes the most novel unprotected keys (10, 20, 30) instead, and still exactly its share of them."""
    cand = reserve_candidates()
    for outlier in (0, 20, 30, 37, 38):
        cand.keys[0, outlier] = cand.keys[0, 10]
        cand.mass[0, outlier] = 0.0
    chosen = cand.budget - 2 - 4
    policy = make_policy("nexus", n_sink=2, window=4, reserve=0.5)
    _, priority = policy.prefill_scores(cand)
    held = policy.prefill_held(cand, priority)
    assert int(held.sum()) == chosen // 2
    assert held[0, [10, 20, 30]].all()
    assert not held[0, cand.protected(2, 4)[0]].any()


def test_nexus_reserve_ranks_the_window_of_the_chunk_that_ends_the_prompt():
    """At the prompt's last chunk the window's tokens will leave it during decode and no later chunk ranks
    them, so there the window competes for the reserve (the sink still does not), within the same share."""
    cand = reserve_candidates()
    for outlier in (0, 20, 37, 38):
        cand.keys[0, outlier] = cand.keys[0, 10]
        cand.mass[0, outlier] = 0.0
    cand.ends_prompt = True
    policy = make_policy("nexus", n_sink=2, window=4, reserve=0.5)
    _, priority = policy.prefill_scores(cand)
    held = policy.prefill_held(cand, priority)
    assert int(held.sum()) == (cand.budget - 2 - 4) // 2
    assert held[0, [10, 20, 37, 38]].all() and not held[0, :2].any()


def test_nexus_holds_the_prompts_last_window_through_decode(tiny):
    """A 24-token prompt in chunks of 16 and 8, reserve=1 (every competing token is reserved), then 40
    decode steps through a 48-slot ring. The first chunk's window (8..15) is not marked, the last chunk's
    (16..23) is, and every prompt token is still in every (layer, KV head) after decode evicted 16 times."""
    model, config = tiny
    marked = {}

    def after(done, ring):
        if done in (16, 24):
            held, pos = ring.held.bool(), ring.pos
            marked[done] = [sorted(pos[layer, head][held[layer, head]].tolist())
                            for layer in range(pos.shape[0]) for head in range(pos.shape[1])]

    _, ring, _ = ring_logits(model, config, random_ids(64, seed=5), prefill=[16, 8], budget=48, policy="nexus",
                             n_sink=4, window=8, reserve=1.0, on_step=after)
    assert all(m == list(range(4, 8)) for m in marked[16])  # a mid-prompt window is ranked by the next chunk
    assert all(m == list(range(4, 24)) for m in marked[24])
    pos = ring.pos
    assert all(set(range(24)) <= set(pos[layer, head].tolist())
               for layer in range(pos.shape[0]) for head in range(pos.shape[1]))


def test_nexus_reserve_with_fewer_unprotected_candidates_than_its_share():
    """A first chunk shorter than the budget: the reserve holds every unprotected candidate, no protected one."""
    cand = reserve_candidates(n=12)
    policy = make_policy("nexus", n_sink=2, window=4, reserve=1.0)
    _, priority = policy.prefill_scores(cand)
    assert policy.prefill_held(cand, priority)[0].tolist() == [False] * 2 + [True] * 6 + [False] * 4


def test_nexus_hold_option():
    assert make_policy("nexus").eviction_spec().hold
    assert not make_policy("nexus", hold=False).eviction_spec().hold
    assert not make_policy("nexus", reserve=0.0).eviction_spec().hold  # no reserve, nothing to hold
    assert make_policy("nexus", hold=False).label == "nexus:hold=False"
    assert parse_policy("nexus:hold=false").options == {"hold": False}
    with pytest.raises(ConfigError, match="hold=1 is invalid: it must be true/false"):
        make_policy("nexus", hold=1)
    for name in POLICIES:
        if name != "nexus":
            assert not make_policy(name).eviction_spec().hold


def held_positions(ring) -> list[list[set[int]]]:
    """Per (layer, KV head): the positions of the ring's held slots."""
    pos, held = ring.pos, ring.held.bool()
    return [[set(pos[l, h][held[l, h]].tolist()) for h in range(pos.shape[1])] for l in range(pos.shape[0])]


def test_nexus_hold_keeps_the_reserve_through_a_long_generation(tiny):
    """Prefill 256 tokens into a ring of 96 (reserve: 38 slots per layer and head), then decode 300 tokens:
    with hold every position the reserve held at the end of prefill is still in the ring; without it
    the decode victims take some."""
    model, config = tiny
    ids, prompt = random_ids(556, seed=5), [128, 128]
    after_prefill = {}

    def capture(done, ring):
        if done == sum(prompt):
            after_prefill["held"] = held_positions(ring)

    options = dict(n_sink=4, window=16, budget=96, prefill=prompt)
    _, ring, _ = ring_logits(model, config, ids, policy="nexus", on_step=capture, **options)
    reserved = after_prefill["held"]
    assert all(len(per_head) == int(0.5 * (96 - 4 - 16)) for per_layer in reserved for per_head in per_layer)
    final = ring.pos
    for layer, per_layer in enumerate(reserved):
        for head, positions in enumerate(per_layer):
            assert positions <= set(final[layer, head].tolist())
    assert held_positions(ring) == reserved  # decode marks nothing new and clears nothing it kept
    _, unheld, _ = ring_logits(model, config, ids, policy="nexus", hold=False, **options)
    lost = sum(len(positions - set(unheld.pos[layer, head].tolist()))
               for layer, per_layer in enumerate(reserved) for head, positions in enumerate(per_layer))
    assert lost > 0
    assert not unheld.held.any()  # without hold the marks are never written


# --- reservoir sampling --------------------------------------------------------------------------

WEIGHTS = torch.tensor([[1.0, 2.0, 3.0, 4.0, 6.0, 8.0]])


def reservoir_survivors(spec, weights, drop: int, seed: int) -> set[int]:
    """Drop `drop` slots one by one with the kernel's victim rule (fixed weights)."""
    n = weights.shape[1]
    pos = torch.arange(n, dtype=torch.int32)[None]
    gone = torch.zeros(1, n, dtype=torch.bool)
    for _ in range(drop):
        victim = victim_slots(spec, pos, weights, gone, torch.zeros(1, 1, dtype=torch.long), 0, seed)
        gone[0, victim] = True
    return set((~gone[0]).nonzero()[:, 0].tolist())


def successive_sampling_survival(weights: np.ndarray, keep: int, trials: int, rng) -> np.ndarray:
    """Independent Monte Carlo of A-Res: its survivors are the first `keep` of a weighted draw without replacement."""
    hits = np.zeros(len(weights))
    for _ in range(trials):
        order = rng.choice(len(weights), size=keep, replace=False, p=weights / weights.sum())
        hits[order] += 1
    return hits / trials


def test_reservoir_survival_matches_a_res_inclusion_probability():
    spec = EvictionSpec(SCORE_ATTN, VICTIM_RESERVOIR, tau=1.0, eps=0.0)
    trials, keep = 3000, 3
    counts = np.zeros(WEIGHTS.shape[1])
    for seed in range(trials):
        for slot in reservoir_survivors(spec, WEIGHTS, WEIGHTS.shape[1] - keep, seed):
            counts[slot] += 1
    empirical = counts / trials
    expected = successive_sampling_survival(WEIGHTS[0].numpy().astype(float), keep, 20000, np.random.default_rng(0))
    assert np.abs(empirical - expected).max() < 0.04, (empirical, expected)
    assert empirical[0] < empirical[-1]


def test_reservoir_with_tau_to_zero_is_deterministic_top_k():
    spec = EvictionSpec(SCORE_ATTN, VICTIM_RESERVOIR, tau=1e-3)
    for seed in range(50):
        assert reservoir_survivors(spec, WEIGHTS, 3, seed) == {3, 4, 5}


def test_slot_just_below_the_cut_off_survives_sometimes_under_sampling_nexus_never_under_h2o():
    weights = torch.tensor([[10.0, 10.0, 10.0, 9.5]])  # slot 3 is just below the cut-off
    nexus = make_policy("nexus", tau=1.0).eviction_spec()
    h2o = make_policy("h2o").eviction_spec()
    survived = [3 in reservoir_survivors(nexus, weights, 1, seed) for seed in range(200)]
    assert 0 < sum(survived) < 200
    assert not any(3 in reservoir_survivors(h2o, weights, 1, seed) for seed in range(20))


class _NexusRecordingEdges(Nexus):
    """Walk off, yet the pool stores and the kernels write every token's edges (as round 1's pool did)."""

    @property
    def top_m(self) -> int:
        return self.edges_per_token


def test_nexus_records_edges_only_when_it_walks():
    assert make_policy("nexus").top_m == 0 and make_policy("nexus").eviction_spec().hops == 0
    assert make_policy("nexus", gamma=0.5).top_m == Nexus.edges_per_token == 4
    assert make_policy("nexus", gamma=0.5, hops=0).top_m == 0  # no hops: nothing would read the edges
    assert make_policy("nexus", gamma=0.5).eviction_spec().hops == 2


def test_nexus_without_the_walk_evicts_exactly_as_with_unread_edges(tiny):
    model, config = tiny
    ids = random_ids(120, seed=5)
    plain = ring_logits(model, config, ids, prefill=[32, 32], budget=40, policy="nexus", window=8)
    recording = ring_logits(model, config, ids, prefill=[32, 32], budget=40, window=8,
                            policy=_NexusRecordingEdges(window=8))
    assert plain[2].pool.edge_slot.shape[-1] == 1 and recording[2].pool.edge_slot.shape[-1] == 4  # 1: unused
    assert torch.equal(plain[0], recording[0]) and torch.equal(plain[1].pos, recording[1].pos)
    walked = ring_logits(model, config, ids, prefill=[32, 32], budget=40, policy="nexus", window=8, gamma=0.5)
    assert not torch.equal(plain[1].pos, walked[1].pos)  # the walk, when on, does change what is kept


# --- seeds ---------------------------------------------------------------------------------------


def test_same_seed_same_ring_different_seed_different_victims(tiny):
    model, config = tiny
    ids = random_ids(120, seed=5)
    runs = [ring_logits(model, config, ids, prefill=[32, 32], budget=40, policy="nexus", seed=s, window=8,
                        tau=1.0)[:2] for s in (7, 7, 8)]  # sampling on: the seed draws the victims
    (l0, s0), (l1, s1), (_, s2) = runs
    assert torch.equal(l0, l1) and torch.equal(s0.pos, s1.pos)
    assert not torch.equal(s0.pos, s2.pos)
    # the default nexus does not sample: its victims are the same whatever the seed
    top_k = [ring_logits(model, config, ids, prefill=[32, 32], budget=40, policy="nexus", seed=s, window=8)[1]
             for s in (7, 8)]
    assert torch.equal(top_k[0].pos, top_k[1].pos)


# --- bad settings --------------------------------------------------------------------------------


def test_bad_settings_are_refused_with_the_reason():
    with pytest.raises(ConfigError, match="budget .* must exceed n_sink \\+ window"):
        check_ring_settings(68, 512, 4, 64)
    with pytest.raises(ConfigError, match="chunk must be a positive"):
        check_ring_settings(4096, 0, 4, 64)
    with pytest.raises(ConfigError, match="unknown policy 'lru'.*nexus.*h2o"):
        make_policy("lru")


def test_the_budget_and_chunk_rules_are_one_function_that_every_caller_uses(tmp_path):
    """block_pool.check_budget: the ring's rule, a request's range and the policy's own rule; the engine runs
    it before loading a model, and the eval before running anything."""
    from minikv.engine import Engine
    from minikv.eval.runner import RunConfig, check_configs

    nexus, epikv = make_policy("nexus", n_sink=4, window=64), make_policy("epikv", n_sink=4)
    check_budget(69, 16, nexus)  # one slot beyond the protected ones
    with pytest.raises(ConfigError, match="budget .* must exceed n_sink \\+ window"):
        check_budget(68, 16, nexus)
    with pytest.raises(ConfigError, match="chunk must be a positive"):
        check_budget(4096, 0, nexus)
    with pytest.raises(ConfigError, match="n_sink \\+ chunk"):
        check_budget(515, 512, epikv)
    with pytest.raises(ConfigError, match=r"out of range: it must be in \[69, 256\]"):
        check_budget(300, 16, nexus, most=256)
    with pytest.raises(ConfigError, match="budget \\(60\\) must exceed n_sink \\+ window"):
        Engine(str(tmp_path / "no-model-here"), budget=60, policy="nexus")  # refused before any loading
    with pytest.raises(ConfigError, match="budget \\(60\\) must exceed n_sink \\+ window"):
        check_configs([RunConfig(parse_policy("nexus"), 60, "60")], chunk=512, n_sink=4, window=64)

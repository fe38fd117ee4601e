"""EpiKV, EpiKV-lag and NestedKV: their scores on hand-built inputs, and ring properties on a tiny model."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from minikv.attention import PrefillSegment, RingAttention, StepPlan
from minikv.config import ModelConfig
from minikv.errors import ConfigError
from minikv.kernels.common import SCORE_EXTERNAL, VICTIM_MIN_SCORE
from minikv.loader import build_model, load_state_dict, read_config, weight_files
from minikv.model_runner import ModelRunner
from minikv.policies import POLICIES, PrefillCandidates, make_policy
from minikv.policies.epikv import (
    PENDING,
    EpiKV,
    causal_zscore,
    hidden_change_scores,
    lag_spread,
    layer_bands,
)
from minikv.policies.nestedkv import NestedKV, decile_spread, gated_mix, mixing_weights
from minikv.block_pool import KVPool
from minikv.input_batch import InputBatch
from minikv.request import Request
from minikv.sampling import SamplingParams
from minikv.scheduler import Scheduler

from helpers import make_tiny_checkpoint

SEED_POLICIES = ["epikv", "epikv-lag", "nestedkv"]


# --- registration --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SEED_POLICIES)
def test_registered_and_attention_free(name):
    policy = make_policy(name)
    assert POLICIES[name] is type(policy)
    spec = policy.eviction_spec()
    assert (spec.score_mode, spec.victim_mode) == (SCORE_EXTERNAL, VICTIM_MIN_SCORE)
    assert policy.obs_rows == 0 and policy.top_m == 0


def test_bad_options_raise_config_error():
    with pytest.raises(ConfigError):
        make_policy("nestedkv", prior=(0.5, 0.5))
    with pytest.raises(ConfigError):
        make_policy("epikv-lag", lag=0)
    with pytest.raises(ConfigError):
        make_policy("epikv", zscore_window=1)


def test_budget_rules():
    make_policy("epikv", n_sink=4).check_budget(budget=516, chunk=512)
    with pytest.raises(ConfigError, match="n_sink \\+ chunk"):
        make_policy("epikv", n_sink=4).check_budget(budget=515, chunk=512)


# --- EpiKV ----------------------------------------------------------------------------------------------


def test_layer_bands_split_the_middle():
    low, up = layer_bands(29, (0.25, 0.5), (0.5, 0.75))  # SmolLM2-135M
    assert list(low) == list(range(7, 14)) and list(up) == list(range(14, 21))
    low, up = layer_bands(3, (0.25, 0.5), (0.5, 0.75))  # a very shallow model still gets both bands
    assert len(low) == 1 and len(up) == 1 and low[0] < up[0]
    low, up = layer_bands(1, (0.25, 0.5), (0.5, 0.75))
    assert list(low) == [0] and len(up) == 0


def _layer_inputs(num_layers=9, tokens=12, hidden=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(tokens, hidden, generator=g)
    # every layer nudges every token by the same small relative amount
    return [base * (1 + 0.01 * i) for i in range(num_layers)]


def test_hidden_state_jump_in_lower_mid_layers_ranks_highest():
    states = _layer_inputs()
    low, _ = layer_bands(len(states) - 1, (0.25, 0.5), (0.5, 0.75))
    jump_at = low[0] + 1  # the input of the layer after the first lower-mid transition
    states = [s.clone() for s in states]
    for i in range(jump_at, len(states)):
        states[i][5] += 3.0 * states[0][5]  # token 5's state is rewritten once, then stays
    raw = hidden_change_scores(states)
    assert int(raw.argmax()) == 5
    others = torch.cat([raw[:5], raw[6:]])
    assert torch.allclose(others, others[0].expand_as(others), atol=1e-5)


def test_hidden_state_jump_in_upper_mid_layers_ranks_lowest():
    states = [s.clone() for s in _layer_inputs()]
    _, up = layer_bands(len(states) - 1, (0.25, 0.5), (0.5, 0.75))
    for i in range(up[0] + 1, len(states)):
        states[i][3] += 3.0 * states[0][3]
    assert int(hidden_change_scores(states).argmin()) == 3


def test_zscore_removes_a_linear_positional_trend():
    window = 16
    positions = torch.arange(80, dtype=torch.float64)
    trend = 0.5 * positions + 3.0
    z = causal_zscore(trend, torch.ones(80, dtype=torch.bool), window)
    settled = z[window:]  # once the window is full, every token of a pure trend gets the same z
    assert torch.allclose(settled, settled[0].expand_as(settled), atol=1e-9)
    # a spike on top of the trend stands out even though later tokens have larger raw values
    spiky = trend.clone()
    spiky[40] += 4.0
    z = causal_zscore(spiky, torch.ones(80, dtype=torch.bool), window)
    assert int(z[window:].argmax()) + window == 40
    assert spiky[79] > spiky[40]  # the raw score alone would have preferred the last token


def test_zscore_is_causal_and_chunking_does_not_change_it():
    policy = EpiKV(zscore_window=8)
    policy.history = torch.zeros(1, 8, dtype=torch.float64)
    raw = torch.randn(30, generator=torch.Generator().manual_seed(1))
    whole = causal_zscore(raw.double(), torch.ones(30, dtype=torch.bool), 8).float()
    pieces = [policy.chunk_zscores(0, 0, raw[:11]), policy.chunk_zscores(0, 11, raw[11:20])]
    for p in range(20, 30):  # then one token at a time, as decode does
        pieces.append(policy.decode_zscores(torch.tensor([0]), torch.tensor([p]), raw[p: p + 1]))
    assert torch.allclose(torch.cat(pieces), whole, atol=1e-5)
    assert whole[0] == 0  # one value has no spread yet


# --- EpiKV-lag ----------------------------------------------------------------------------------------


def test_lag_spread_ranks_an_outlier_against_the_next_chunk_highest():
    g = torch.Generator().manual_seed(2)
    feats = torch.rand(1, 20, 8, generator=g)
    feats[0, 6, 3] = 25.0  # far outside the range its next 4 tokens show in channel 3
    scores = lag_spread(feats, lag=4)
    assert scores.shape == (1, 16)
    assert int(scores.argmax()) == 6


def test_lag_spread_uses_the_next_lag_tokens_only():
    feats = torch.zeros(1, 6, 2)
    feats[0, :, 0] = torch.tensor([0.0, 1.0, 3.0, 2.0, 5.0, 9.0])
    feats[0, :, 1] = torch.tensor([1.0, 0.0, 2.0, 4.0, 4.0, 8.0])
    scores = lag_spread(feats, lag=2)
    # token 0 against tokens 1..2: channel 0 range [1, 3] -> (0-1)/2; channel 1 range [0, 2] -> 1/2
    expected = torch.tensor([-0.5, 0.5]).std(unbiased=False)
    assert math.isclose(float(scores[0, 0]), float(expected), rel_tol=1e-5)


# --- NestedKV -----------------------------------------------------------------------------------------


def _nested(heads=2, **options) -> NestedKV:
    policy = NestedKV(**options)
    policy.allocate(num_layers=1, num_rings=1, num_kv_heads=heads, head_dim=16, budget=64)
    return policy


def _cand(keys: torch.Tensor, first_pos: int = 0) -> PrefillCandidates:
    heads, n, _ = keys.shape
    pos = torch.arange(first_pos, first_pos + n, dtype=torch.int32).expand(heads, -1)
    return PrefillCandidates(layer=0, seed=0, filled=0, budget=n, pos=pos, keys=keys, mass=torch.zeros(heads, n),
                             ring_score=torch.zeros(heads, 0), ring=0)


def _clustered_keys(n=200, heads=2, dim=16, seed=3):
    g = torch.Generator().manual_seed(seed)
    direction = F.normalize(torch.randn(heads, 1, dim, generator=g), dim=-1)
    return direction * 4 + 0.3 * torch.randn(heads, n, dim, generator=g)


def test_nestedkv_key_far_from_every_anchor_ranks_highest():
    keys = _clustered_keys()
    keys[:, 137] = -keys[:, 137]  # opposite the global, block and trailing means alike
    scores, priority = _nested(block=64, trail=16).prefill_scores(_cand(keys))
    assert torch.equal(scores, priority)
    assert (scores.argmax(dim=1) == 137).all()
    assert ((scores >= 0) & (scores <= 1 + 1e-5)).all()


def test_nestedkv_local_anchors_see_a_key_typical_globally_but_odd_in_its_block():
    heads, dim, block = 1, 16, 32
    g = torch.Generator().manual_seed(4)
    a, b = F.normalize(torch.randn(2, dim, generator=g), dim=-1)
    keys = torch.stack([a if (i // block) % 2 == 0 else b for i in range(128)])[None] * 3
    keys = keys + 0.05 * torch.randn(heads, 128, dim, generator=g)
    keys[0, 40] = a * 3  # an "a" key inside a "b" block: as common as any globally, odd for its block
    unit, pos = F.normalize(keys, dim=-1), torch.arange(128)
    policy = _nested(heads=1, block=block, trail=8)
    global_anomaly = policy._global_anomaly(0, 0, unit)[0]
    block_anomaly = policy._block_anomaly(0, 0, unit, pos)[0]
    assert int(block_anomaly.argmax()) == 40
    assert global_anomaly[40] < global_anomaly.max()
    trail_anomaly = policy._trail_anomaly(0, 0, unit, pos)[0]
    # within its block (each block's first keys are odd for their trail too: the trail still holds the last block)
    assert int(trail_anomaly[33:64].argmax()) + 33 == 40


def test_nestedkv_mixing_and_gate():
    prior = torch.tensor([0.4, 0.4, 0.2])
    flat = mixing_weights(torch.zeros(3), prior.log(), 3.0)
    assert torch.allclose(flat, prior)
    spread_in_window = mixing_weights(torch.tensor([0.1, 0.1, 0.9]), prior.log(), 3.0)
    assert int(spread_in_window.argmax()) == 2  # the scale that separates tokens best gains weight
    w = torch.tensor([0.4, 0.4, 0.2])
    calm = gated_mix(torch.tensor([0.2, 0.2, 0.2]), w, 10.0, 0.6)
    assert math.isclose(float(calm), 0.2, rel_tol=1e-6)  # all scales agree: nothing to route
    surprising = gated_mix(torch.tensor([0.9, 0.5, 1.0]), w, 10.0, 0.6)
    mixed = 0.4 * 0.9 + 0.4 * 0.5 + 0.2 * 1.0
    assert mixed < float(surprising) < 1.0  # routed toward the strongest scale
    s = torch.tensor([[[0.0], [0.1], [0.5], [0.9], [1.0]]]).expand(1, 5, 1)
    assert torch.allclose(decile_spread(s, 0.1), torch.tensor([[1.0]]))


def test_nestedkv_decode_continues_the_prefill_statistics():
    """Scoring a sequence chunk by chunk then token by token: an anomalous decode key still ranks highest,
    and the running anchors equal the ones computed over the whole sequence."""
    keys = _clustered_keys(n=96)
    keys[:, 90] = -keys[:, 90]
    policy = _nested(block=32, trail=16)
    policy.prefill_scores(_cand(keys[:, :40]))
    policy.prefill_scores(_cand(keys[:, 40:70], first_pos=40))
    decode = [policy.new_token_scores(0, torch.tensor([0]), torch.tensor([p]), keys[:, p][None]) for p in range(70, 96)]
    decode = torch.cat(decode)  # [26, H]
    assert (decode.argmax(0) == 90 - 70).all()
    unit = F.normalize(keys, dim=-1)
    assert torch.allclose(policy.global_sum[0, 0], unit.sum(1), atol=1e-4)
    assert torch.allclose(policy.block_sum[0, 0], unit[:, 64:96].sum(1), atol=1e-4)
    assert torch.allclose(policy.trail_buf[0, 0].sum(1), unit[:, 80:96].sum(1), atol=1e-4)


def test_nestedkv_block_size_follows_the_budget():
    for budget, expected in ((1024, 128), (6400, 200), (65536, 256)):
        policy = NestedKV()
        policy.allocate(1, 1, 1, 4, budget)
        assert policy.block_size == expected


# --- ring properties on a tiny model -------------------------------------------------------------------

BUDGET, CHUNK, N_SINK, WINDOW = 24, 8, 2, 4
OPTIONS = {"epikv": dict(zscore_window=16), "epikv-lag": dict(lag=6), "nestedkv": dict(trail=8)}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("tiny4"), num_hidden_layers=4)
    config = read_config(path)
    return build_model(config, load_state_dict(weight_files(path)), torch.device("cpu"), torch.float32), config


BLOCK = 8  # pool block size in these tests: rings of 24 slots span 3 blocks


class Harness:
    """The engine's parts (pool, persistent batch, scheduler, runner) around a bare model, greedy argmax."""

    def __init__(self, model, config, policy, *, slots: int, seed: int = 0, budget: int = BUDGET):
        self.budget = budget
        self.pool = KVPool(config, slots * -(-budget // BLOCK), BLOCK, dtype=torch.float32, device=torch.device("cpu"),
                           edges_per_slot=policy.top_m)
        self.batch = InputBatch(slots, -(-budget // BLOCK), config.vocab_size, torch.device("cpu"),
                                empty_block=self.pool.scratch_block)
        self.scheduler = Scheduler(self.pool, self.batch, max_num_batched_tokens=CHUNK + slots, chunk=CHUNK)
        attention = RingAttention(self.pool, policy, scale=config.head_dim**-0.5, seed=seed, num_slots=slots,
                                  max_budget=budget)
        self.runner = ModelRunner(model, attention, self.batch, torch.device("cpu"))

    def add(self, request_id: str, prompt: list[int], max_tokens: int) -> Request:
        ring = min(self.budget, len(prompt) + max_tokens)
        req = Request(request_id, prompt, SamplingParams(max_tokens=max_tokens), seed=0, eos_ids=frozenset(),
                      tokenizer=None, kv_budget=self.budget, ring_size=ring, num_blocks_needed=self.pool.blocks_for(ring))
        self.scheduler.add(req)
        return req

    def step(self) -> list[Request]:
        result = self.runner.run(self.scheduler.schedule())
        tokens = result.logits.argmax(-1)
        self.batch.record_sampled(result.slot_ids, tokens)
        for req, token in zip(result.requests, tokens.tolist()):
            req.output_ids.append(token)
        return list(self.scheduler.running)

    def ring(self, name: str, req: Request) -> torch.Tensor:
        """[L, H, filled] of what the request's ring holds, in ring order."""
        return self.pool.ring(name, req.blocks, min(req.num_processed, req.ring_size))


def _drive(model, config, name, seed, *, check):
    """Three requests through two slots (the third waits for a freed one), decodes and chunks sharing steps."""
    policy = make_policy(name, n_sink=N_SINK, window=WINDOW, **OPTIONS.get(name, {}))
    harness = Harness(model, config, policy, slots=2, seed=seed)
    g = torch.Generator().manual_seed(seed)
    lengths, new_tokens = (37, 9, 30), (30, 40, 25)
    for i, n in enumerate(lengths):
        harness.add(str(i), torch.randint(3, 300, (n,), generator=g).tolist(), new_tokens[i])
    outputs = {}
    while harness.scheduler.has_unfinished():
        for req in harness.step():
            check(harness, policy, req)
            if len(req.output_ids) >= new_tokens[int(req.request_id)]:
                outputs[req.request_id] = (list(req.output_ids), harness.ring("pos", req).clone(),
                                           harness.ring("score", req).clone())
                harness.scheduler.finish(req, "length")
    assert harness.pool.num_used == harness.pool.num_reserved == 0
    return outputs


def _check_ring(harness, policy, req):
    n = req.num_processed
    filled = min(n, BUDGET)
    pos, score = harness.ring("pos", req), harness.ring("score", req)  # [L, H, filled]
    must_keep = set(range(min(N_SINK, n))) | set(range(max(0, n - WINDOW), n))
    for layer in range(pos.shape[0]):
        for head in range(pos.shape[1]):
            held = pos[layer, head].tolist()
            assert len(set(held)) == len(held) == filled <= BUDGET  # distinct tokens, never over budget
            assert all(0 <= p < n for p in held)
            assert must_keep <= set(held), f"layer {layer} head {head} lost a sink or a window token"
    assert torch.isfinite(score).all()
    if policy.name == "epikv-lag":  # scored exactly when the next lag is complete
        lag = policy.lag_in_use
        assert ((score < PENDING) == (pos < n - lag)).all()
    if policy.name == "epikv":  # fixed after the forward: a token-level score, the same in every ring
        first = score[0, 0][pos[0, 0].argsort()]
        for layer in range(pos.shape[0]):
            for head in range(pos.shape[1]):
                assert torch.equal(score[layer, head][pos[layer, head].argsort()], first)
        assert (first[pos[0, 0].sort().values >= 2] != 0).all()  # no provisional score is left


@pytest.mark.parametrize("name", SEED_POLICIES)
def test_ring_keeps_sinks_window_and_budget_and_is_deterministic(tiny, name):
    model, config = tiny
    first = _drive(model, config, name, seed=7, check=_check_ring)
    second = _drive(model, config, name, seed=7, check=lambda *a: None)
    assert first.keys() == second.keys() == {"0", "1", "2"}
    for rid in first:
        assert first[rid][0] == second[rid][0]
        assert torch.equal(first[rid][1], second[rid][1]) and torch.equal(first[rid][2], second[rid][2])
    # the policy did choose: what it kept differs from StreamingLLM's sinks + most recent
    n = int(first["0"][1].max()) + 1
    streaming = set(range(N_SINK)) | set(range(n - (BUDGET - N_SINK), n))
    kept = [set(first["0"][1][layer, head].tolist()) for layer in range(config.num_layers)
            for head in range(config.num_kv_heads)]
    assert any(k != streaming for k in kept)


def test_lag_is_capped_so_pending_tokens_fit_the_ring(tiny):
    _, config = tiny
    for lag, budget, expected in ((6, 24, 6), (128, 24, 24 - N_SINK - 1), (128, 200, 128)):
        policy = make_policy("epikv-lag", n_sink=N_SINK, window=WINDOW, lag=lag)
        pool = KVPool(config, 1, 8, dtype=torch.float32, device=torch.device("cpu"))
        RingAttention(pool, policy, scale=1.0, seed=0, num_slots=1, max_budget=budget)
        assert policy.lag_in_use == expected


def test_epikv_rejects_an_evicting_chunk_it_cannot_hold(tiny):
    model, config = tiny
    policy = make_policy("epikv", n_sink=N_SINK, window=WINDOW)
    policy.check_budget(N_SINK + CHUNK, CHUNK)  # a whole chunk fits beside the sinks
    with pytest.raises(ConfigError, match="n_sink \\+ chunk"):
        policy.check_budget(N_SINK + CHUNK - 1, CHUNK)


# --- per-ring state is reset when a ring starts a new sequence ------------------------------------------


def test_ring_reallocation_resets_policy_state():
    keys = _clustered_keys(n=40)
    fresh, _ = _nested(block=16, trail=8).prefill_scores(_cand(keys))
    config = ModelConfig(architecture="LlamaForCausalLM", vocab_size=8, hidden_size=32, intermediate_size=8,
                         num_layers=1, num_heads=2, num_kv_heads=2, head_dim=16)
    pool = KVPool(config, 8, 16, dtype=torch.float32, device=torch.device("cpu"))
    policy = NestedKV(block=16, trail=8)
    attention = RingAttention(pool, policy, scale=1.0, seed=0, num_slots=2, max_budget=64)  # binds the policy
    policy.prefill_scores(_cand(-keys.flip(1)))  # an earlier sequence in ring 0
    dirty = policy.global_sum.clone()
    table = torch.zeros(4, dtype=torch.int32)
    attention.begin_step(StepPlan(prefills=[PrefillSegment(slot=1, start=0, length=4, filled=0, first_pos=4,
                                                           ring_size=64, table=table)]))
    assert torch.equal(policy.global_sum, dirty)  # a chunk that continues a sequence keeps its state
    attention.begin_step(StepPlan(prefills=[PrefillSegment(slot=0, start=0, length=4, filled=0, first_pos=0,
                                                           ring_size=64, table=table)]))
    assert (policy.global_sum == 0).all()
    again, _ = policy.prefill_scores(_cand(keys))
    assert torch.equal(again, fresh)


def test_epikv_reset_forgets_the_previous_sequence():
    policy = EpiKV(zscore_window=8)
    policy.history = torch.zeros(1, 8, dtype=torch.float64)
    raw = torch.randn(12, generator=torch.Generator().manual_seed(5))
    fresh = policy.chunk_zscores(0, 0, raw)
    policy.chunk_zscores(0, 12, raw * 7)  # the sequence goes on ...
    policy.reset_ring(0)  # ... and a new one takes the ring
    assert torch.equal(policy.chunk_zscores(0, 0, raw), fresh)

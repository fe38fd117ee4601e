"""Paged rings (issue 11): paging is invisible to the math, memory turns into capacity, and the block
allocator never loses or shares a block."""

from __future__ import annotations

import random

import pytest
import torch

from helpers import load_tiny, make_tiny_checkpoint, ring_logits
from minikv.engine import Engine
from minikv.errors import ConfigError, InvalidRequestError
from minikv.sampling import SamplingParams
from tiny_engine import tiny_checkpoint

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


def random_prompt(rng: random.Random, lo: int, hi: int) -> list[int]:
    return [1] + [rng.randrange(3, 259) for _ in range(rng.randrange(lo, hi))]


# --- paging is invisible to the math ---------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory):
    return load_tiny(make_tiny_checkpoint(tmp_path_factory.mktemp("paged-qwen"), "Qwen3ForCausalLM"))


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("policy", ["nexus", "h2o", "keydiff"])
def test_block_size_16_and_one_block_per_ring_hold_the_same_ring(tiny_qwen, policy, backend, monkeypatch):
    """The same tokens evicted at the same points, the same scores and edges, whatever the block size."""
    monkeypatch.setenv("MINIKV_KERNELS", backend)
    model, config = tiny_qwen
    ids = torch.randint(3, config.vocab_size, (100,), generator=torch.Generator().manual_seed(4)).tolist()
    budget = 40
    runs = [ring_logits(model, config, ids, prefill=[48, 32], budget=budget, policy=policy, window=8,
                        block_size=block_size) for block_size in (16, budget)]
    (paged_logits, paged, _), (whole_logits, whole, _) = runs
    assert paged.blocks != whole.blocks and len(paged.blocks) == 3 and len(whole.blocks) == 1
    for name in ("pos", "edge_slot", "edge_pos"):
        assert torch.equal(getattr(paged, name), getattr(whole, name)), name
    for name in ("score", "edge_w", "k", "v"):
        torch.testing.assert_close(getattr(paged, name), getattr(whole, name), rtol=0, atol=0)
    torch.testing.assert_close(paged_logits, whole_logits, rtol=0, atol=0)


@pytest.mark.parametrize("policy", ["nexus", "streaming"])
def test_engine_outputs_do_not_depend_on_the_block_size(loaded, policy):
    rng = random.Random(3)
    prompts = [random_prompt(rng, 20, 120) for _ in range(5)]
    params = SamplingParams(temperature=0.8, seed=5, max_tokens=12, ignore_eos=True)
    outs = [Engine(loaded, policy=policy, budget=48, window=8, chunk=16, max_num_seqs=3, max_model_len=512,
                   block_size=block_size).generate(prompts, params, use_tqdm=False) for block_size in (16, 48, 5)]
    tokens = [[o.outputs[0].token_ids for o in run] for run in outs]
    assert tokens[0] == tokens[1] == tokens[2]
    assert any(o.metrics.num_evicted_tokens > 0 for o in outs[0])


# --- memory turns into capacity --------------------------------------------------------------------


def test_a_pool_for_8_full_rings_serves_2_long_and_30_short_requests_at_once(loaded):
    budget, block = 1024, 16
    per_ring = budget // block
    engine = Engine(loaded, policy="streaming", budget=budget, chunk=512, max_num_seqs=40, max_model_len=8192)
    bytes_for_8 = 8 * per_ring * engine.pool.bytes_per_block
    engine = Engine(loaded, policy="streaming", budget=budget, chunk=512, max_num_seqs=40, max_model_len=8192,
                    kv_memory=bytes_for_8)
    assert engine.pool.num_blocks == 8 * per_ring
    rng = random.Random(0)
    longs = [engine.add_request(random_prompt(rng, 4 * budget, 4 * budget + 100), GREEDY) for _ in range(2)]
    shorts = [engine.add_request(random_prompt(rng, 8, 64), SamplingParams(temperature=0, max_tokens=32,
                                                                            ignore_eos=True)) for _ in range(30)]
    peak_running, peak_used, done = 0, 0, set()
    while engine.has_unfinished_requests():
        done |= {o.request_id for o in engine.step() if o.finished}
        running = {r.request_id for r in engine.scheduler.running}
        if set(longs) <= running:
            peak_running = max(peak_running, len(running & set(shorts)))
        peak_used = max(peak_used, engine.pool.num_used)
        assert engine.pool.num_used <= engine.pool.num_reserved <= engine.pool.num_blocks
    assert done == set(longs) | set(shorts)
    assert peak_running == 30  # every short one ran beside both long ones
    assert peak_used <= engine.pool.num_blocks
    assert engine.pool.num_used == engine.pool.num_reserved == 0


def test_a_131072_token_model_runs_full_in_a_small_pool(tmp_path):
    """Nothing is allocated in proportion to max_model_len: not the pool, not the block tables."""
    loaded = tiny_loaded_with(tmp_path, max_position_embeddings=131072)
    engine = Engine(loaded, policy="full", kv_memory="4MiB", max_num_seqs=4)
    assert engine.max_model_len == 131072
    assert engine.pool.total_bytes <= 4 * 2**20
    assert engine.batch.block_table.numel() <= 4 * engine.pool.num_blocks
    out = engine.generate([[1, 5, 9, 13]], GREEDY, use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 8 and out.metrics.num_evicted_tokens == 0


def tiny_loaded_with(tmp_path, **config):
    import json

    from minikv.loader import load_model

    path = tiny_checkpoint(tmp_path / "tiny")
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, **config}))
    return load_model(path, device="cpu", dtype="float32")


def test_full_reserves_what_each_request_can_hold_and_evicting_policies_their_budget(loaded):
    full = Engine(loaded, policy="full", budget=256, chunk=16, max_model_len=4096)
    nexus = Engine(loaded, policy="nexus", budget=256, chunk=16, max_model_len=4096)
    assert nexus.pool.num_blocks == 8 * 256 // 16  # default: max_num_seqs rings of --budget
    assert full.pool.num_blocks == 4096 // 16  # `full` ignores --budget: at least one whole max_model_len request
    prompt = list(range(3, 103))
    full.add_request(prompt, SamplingParams(max_tokens=20))
    nexus.add_request(prompt, SamplingParams(max_tokens=400))
    nexus.add_request(prompt, SamplingParams(max_tokens=400, kv_budget=100))
    for engine in (full, nexus):
        engine.scheduler.schedule()
    assert [r.num_blocks_needed for r in full.scheduler.running] == [-(-120 // 16)]
    assert [r.num_blocks_needed for r in nexus.scheduler.running] == [256 // 16, -(-100 // 16)]


# --- the allocator under a random soak -------------------------------------------------------------


def test_random_soak_never_shares_a_block_never_overflows_and_frees_everything(loaded, monkeypatch):
    rng = random.Random(7)
    engine = Engine(loaded, policy="nexus", budget=64, window=8, chunk=32, max_num_seqs=12, max_model_len=2048,
                    kv_memory=40 * Engine(loaded, budget=64, window=8, max_num_seqs=1).pool.bytes_per_block)
    pool = engine.pool
    failing: set[str] = set()
    added: list[str] = []
    final = {}

    original = type(engine)._sample_rows

    def sample_rows_that_fail_some(self, reqs, slot_ids, logits):
        if any(r.request_id in failing and len(r.output_ids) >= 2 for r in reqs):
            raise RuntimeError("this request fails mid-run")
        return original(self, reqs, slot_ids, logits)

    monkeypatch.setattr(type(engine), "_sample_rows", sample_rows_that_fail_some)
    while len(added) < 500 or engine.has_unfinished_requests():
        for _ in range(rng.randrange(0, 5) if len(added) < 500 else 0):
            long = rng.random() < 0.1
            prompt = random_prompt(rng, 150, 300) if long else random_prompt(rng, 0, 40)
            params = SamplingParams(temperature=rng.choice([0, 0.9]), max_tokens=rng.randrange(1, 10),
                                    kv_budget=rng.choice([None, 4 + 8 + 1, 30, 64]), ignore_eos=True)
            rid = engine.add_request(prompt, params)
            added.append(rid)
            if rng.random() < 0.02:
                failing.add(rid)
        if added and rng.random() < 0.2:
            engine.abort(rng.choice(added))
        for out in engine.step():
            if out.finished:
                assert out.request_id not in final
                final[out.request_id] = out
        owners = [pool.owner_of(b) for b in range(pool.num_blocks)]
        held = [b for r in engine.scheduler.running for b in r.blocks]
        assert len(held) == len(set(held)) == pool.num_used <= pool.num_blocks  # no block owned twice
        assert all(owners[b] == r.slot for r in engine.scheduler.running for b in r.blocks)
        assert pool.num_reserved == sum(r.num_blocks_needed for r in engine.scheduler.running) <= pool.num_blocks
        assert all(len(r.blocks) <= r.num_blocks_needed for r in engine.scheduler.running)
    assert set(final) == set(added)
    reasons = {o.outputs[0].finish_reason for o in final.values()}
    assert {"abort", "length", "error"} <= reasons
    assert pool.num_used == pool.num_reserved == 0 and all(pool.owner_of(b) == -1 for b in range(pool.num_blocks))
    assert engine.batch.num_free == engine.batch.max_num_seqs


# --- bad input: a clear error, and the engine serves on -------------------------------------------


@pytest.mark.parametrize("kv_budget,message", [(10, "out of range"), (5000, "out of range"), (-3, "positive"),
                                               (12.5, "integer"), ("64", "integer")])
def test_a_bad_kv_budget_is_refused_and_the_engine_serves_on(loaded, kv_budget, message):
    engine = Engine(loaded, policy="nexus", budget=256, window=8, chunk=16, max_model_len=1024)
    with pytest.raises(InvalidRequestError, match=message) as raised:
        engine.add_request([1, 2, 3], SamplingParams(max_tokens=4, kv_budget=kv_budget))
    assert "kv_budget" in str(raised.value)
    assert engine.generate([[1, 2, 3]], GREEDY, use_tqdm=False)[0].outputs[0].finish_reason == "length"


def test_kv_budget_under_full_is_refused(loaded):
    engine = Engine(loaded, policy="full", chunk=16, max_model_len=1024)
    with pytest.raises(InvalidRequestError, match="never evicts"):
        engine.add_request([1, 2, 3], SamplingParams(kv_budget=100))


def test_a_request_that_can_never_fit_the_pool_says_what_it_needs(loaded):
    engine = Engine(loaded, policy="full", chunk=16, max_model_len=4096, kv_memory="200KiB")
    with pytest.raises(InvalidRequestError, match=r"needs \d+ blocks .* the pool has \d+"):
        engine.add_request([5] * 1000, SamplingParams(max_tokens=500))
    assert engine.generate([[1, 2, 3]], GREEDY, use_tqdm=False)[0].outputs[0].finish_reason == "length"


@pytest.mark.parametrize("kv_memory,message", [("lots", "cannot read"), ("10", "holds no KV block"), (-5, "positive"),
                                               (0.5, "fraction of free CUDA memory"), (True, "positive")])
def test_bad_kv_memory_is_a_config_error(loaded, kv_memory, message):
    with pytest.raises(ConfigError, match=message):
        Engine(loaded, kv_memory=kv_memory)


@pytest.mark.parametrize("policy", ["nexus", "h2o", "streaming"])
def test_deferring_the_decode_bookkeeping_to_one_pass_over_all_layers_changes_nothing(loaded, policy, monkeypatch):
    """The CPU path scores, evicts and writes every layer's decodes once after the forward; layer by layer
    (the kernel contract) gives the same tokens and the same rings, bit for bit."""
    from minikv.attention import RingAttention

    rng = random.Random(9)
    prompts = [random_prompt(rng, 30, 150) for _ in range(4)]
    params = SamplingParams(temperature=0.9, seed=2, max_tokens=40, ignore_eos=True)

    def run(deferred: bool):
        monkeypatch.setattr(RingAttention, "_defers", lambda self, q: deferred and self._deferrable)
        engine = Engine(loaded, policy=policy, budget=40, window=8, chunk=32, max_num_seqs=4, max_model_len=512)
        rings = {}
        original = engine.scheduler.finish

        def finish(req, reason):  # read each ring back just before its blocks go
            rings[req.request_id] = engine.pool.ring("pos", req.blocks, min(req.num_processed, req.ring_size))
            original(req, reason)

        engine.scheduler.finish = finish
        outs = engine.generate(prompts, params, use_tqdm=False)
        return [o.outputs[0].token_ids for o in outs], rings

    (tokens_deferred, rings_deferred), (tokens_per_layer, rings_per_layer) = run(True), run(False)
    assert tokens_deferred == tokens_per_layer
    assert rings_deferred.keys() == rings_per_layer.keys()
    assert all(torch.equal(rings_deferred[r], rings_per_layer[r]) for r in rings_deferred)

"""Position modes end to end: Engine(positions=...), the per-request field, and what "ring" buys.

- Before a ring first evicts, both modes are the same computation (ranks are positions).
- Under "ring" every ring slot's RoPE position is its rank after the engine's prefill keep steps and
  decode evictions, in every layer and KV head.
- One batch mixing both modes gives each request what an engine of its mode alone gives.
- Under "ring" an evicting request is not bounded by max_model_len: 20,000 tokens through a ring of 256 on a
  model trained on 512; `original` and `full` keep the refusal.
"""

from __future__ import annotations

import pytest
import torch

from minikv import Engine, SamplingParams
from minikv.errors import ConfigError, InvalidRequestError

GREEDY = dict(temperature=0.0, ignore_eos=True)


def prompt(n: int, seed: int = 0) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, 250, (n,), generator=gen).tolist()


def engine(loaded, **kwargs) -> Engine:
    options = dict(budget=96, policy="nexus", chunk=64, window=16, max_num_seqs=4)
    return Engine(loaded, **{**options, **kwargs})


def run(eng: Engine, prompts, params_list):
    ids = [eng.add_request(p, params) for p, params in zip(prompts, params_list)]
    done = {}
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out
    return [done[i].outputs[0].token_ids for i in ids]


def test_modes_agree_until_the_ring_evicts(loaded):
    params = SamplingParams(max_tokens=20, **GREEDY)
    p = [prompt(60)]  # 60 + 20 < budget 96: nothing is evicted
    assert run(engine(loaded, positions="ring"), p, [params]) == run(engine(loaded, positions="original"), p, [params])


def test_modes_differ_once_the_ring_evicts(loaded):
    params = SamplingParams(max_tokens=40, **GREEDY)
    p = [prompt(300, seed=1)]
    ring = run(engine(loaded, positions="ring"), p, [params])
    original = run(engine(loaded, positions="original"), p, [params])
    assert ring != original


@pytest.mark.parametrize("policy", ["nexus", "streaming", "h2o"])
def test_every_slot_holds_its_rank_after_prefill_and_decode(loaded, policy):
    eng = engine(loaded, positions="ring", policy=policy)
    request_id = eng.add_request(prompt(200, seed=2), SamplingParams(max_tokens=60, **GREEDY))
    checked = 0
    while eng.has_unfinished_requests():
        eng.step()
        req = eng._requests.get(request_id)
        if req is None or req.slot is None or req.num_processed < eng.budget:
            continue
        pos = eng.pool.ring("pos", req.blocks, eng.budget)  # [layers, kv_heads, budget]
        rope_pos = eng.pool.ring("rope_pos", req.blocks, eng.budget)
        assert torch.equal(rope_pos, pos.argsort(-1).argsort(-1).to(torch.int32))
        checked += 1
    assert checked > 50


def test_one_batch_of_both_modes_equals_each_mode_alone(loaded):
    prompts = [prompt(250, seed=3), prompt(180, seed=4), prompt(220, seed=5)]
    modes = ["ring", "original", "ring"]
    params = [SamplingParams(max_tokens=30, positions=m, **GREEDY) for m in modes]
    mixed = run(engine(loaded), prompts, params)
    for p, mode, got in zip(prompts, modes, mixed):
        alone = run(engine(loaded, positions=mode), [p], [SamplingParams(max_tokens=30, **GREEDY)])
        assert got == alone[0], mode


def test_bad_positions_are_refused(loaded):
    with pytest.raises(ConfigError, match="positions"):
        engine(loaded, positions="relative")
    with pytest.raises(ConfigError, match="evicting policy"):
        engine(loaded, policy="full", positions="ring")
    with pytest.raises(InvalidRequestError, match="SamplingParams.positions"):
        SamplingParams(positions="rings")
    full = engine(loaded, policy="full")
    assert full.positions == "original"
    with pytest.raises(InvalidRequestError, match="evicting policy"):
        full.add_request(prompt(10), SamplingParams(max_tokens=2, positions="ring"))


def test_ring_is_the_default_for_evicting_policies_with_or_without_an_archive(loaded):
    """The default (DEFAULT_POSITIONS) is "ring"; `full` is always "original"; a KV archive (which works in
    both modes) does not change the mode."""
    from minikv.engine import DEFAULT_POSITIONS

    assert DEFAULT_POSITIONS == "ring"
    eng = engine(loaded, max_model_len=64)
    assert eng.positions == "ring" and engine(loaded, policy="full").positions == "original"
    assert engine(loaded, archive_budget=32).positions == "ring"
    rid = eng.add_request(prompt(10), SamplingParams(max_tokens=2, archive_budget=32, **GREEDY))
    assert eng._requests[rid].positions == "ring"
    rid = eng.add_request(prompt(10), SamplingParams(max_tokens=2, archive_budget=32, positions="original",
                                                     **GREEDY))
    assert eng._requests[rid].positions == "original"
    # a default request is not bounded by max_model_len: 100 + 20 tokens through a ring of 96, max_model_len 64
    rid = eng.add_request(prompt(100), SamplingParams(max_tokens=20, **GREEDY))
    assert eng._requests[rid].positions == "ring"
    while eng.has_unfinished_requests():
        eng.step()
    with pytest.raises(InvalidRequestError, match="exceeds max_model_len"):
        eng.add_request(prompt(100), SamplingParams(max_tokens=20, positions="original"))


def test_a_session_continues_in_the_mode_it_was_written_with(loaded):
    """A session's ring holds one mode's positions: a later request that does not say runs in it, one that
    asks for the other mode is refused."""
    eng = engine(loaded)
    first = eng.generate([prompt(40)], SamplingParams(max_tokens=4, positions="original", **GREEDY),
                         session_id="s", use_tqdm=False)[0]
    rid = eng.add_request(first.outputs[0].token_ids[-1:] + [7, 8], SamplingParams(max_tokens=2, **GREEDY),
                          session_id="s", append=True)
    assert eng._requests[rid].positions == "original"
    while eng.has_unfinished_requests():
        eng.step()
    with pytest.raises(InvalidRequestError, match="session 's' was written with positions='original'"):
        eng.add_request([9, 10], SamplingParams(max_tokens=2, positions="ring"), session_id="s", append=True)


def test_server_body_carries_positions():
    from minikv.server.protocol import CompletionRequest

    params, _ = CompletionRequest(model="m", prompt="hi", positions="ring").to_sampling_params(100)
    assert params.positions == "ring"


@pytest.fixture(scope="module")
def short_context_model(tmp_path_factory, one_torch_thread):
    """The tiny Llama with a trained context of 512 positions."""
    from helpers import make_tiny_checkpoint
    from tokenizers import AddedToken, Tokenizer

    from minikv.loader import load_model

    path = make_tiny_checkpoint(tmp_path_factory.mktemp("ctx512"), max_position_embeddings=512)
    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    tokenizer.add_tokens([AddedToken(f"<w{i}>", special=False) for i in range(tokenizer.get_vocab_size(), 384)])
    tokenizer.save(str(path / "tokenizer.json"))
    return load_model(path, device="cpu", dtype="float32")


def test_ring_runs_a_request_forty_times_the_trained_context(short_context_model):
    """20,000 tokens (prompt + output) through a ring of 256 on a model trained on 512 positions: it runs,
    every distance RoPE sees stays inside the ring plus a chunk, and `original` still refuses it."""
    ids = prompt(19_980, seed=6)
    params = SamplingParams(max_tokens=20, **GREEDY)
    original = Engine(short_context_model, budget=256, chunk=1024, window=32, max_num_seqs=1, positions="original")
    with pytest.raises(InvalidRequestError, match="max_model_len"):
        original.add_request(ids, params)
    full = Engine(short_context_model, policy="full", chunk=1024, max_num_seqs=1)
    with pytest.raises(InvalidRequestError, match="max_model_len"):
        full.add_request(ids, params)

    eng = Engine(short_context_model, budget=256, chunk=1024, window=32, max_num_seqs=1, positions="ring")
    assert eng.max_model_len == 512
    request_id = eng.add_request(ids, params)
    highest = 0
    while eng.has_unfinished_requests():
        outputs = eng.step()
        req = eng._requests.get(request_id)
        if req is not None and req.blocks:
            highest = max(highest, int(eng.pool.ring("rope_pos", req.blocks, min(req.num_processed, 256)).max()))
    (out,) = [o for o in outputs if o.request_id == request_id]
    assert out.finished and len(out.outputs[0].token_ids) == 20
    assert highest == 255  # ranks 0..255: the ring's, never the text's (~20,000)


def test_triton_engine_equals_reference_engine_under_ring(loaded, monkeypatch):
    """The whole engine under positions="ring" (prefill re-ranking, decode evictions and rank shifts) on
    the Triton kernels (interpreter) and on the torch reference: the same greedy tokens."""
    p, params = [prompt(150, seed=7)], [SamplingParams(max_tokens=12, **GREEDY)]
    runs = {}
    for backend in ("reference", "triton"):
        monkeypatch.setenv("MINIKV_KERNELS", backend)
        runs[backend] = run(engine(loaded, positions="ring", budget=64, chunk=48, window=8), p, params)
    assert runs["triton"] == runs["reference"]

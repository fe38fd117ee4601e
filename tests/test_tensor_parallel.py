"""Tensor parallelism on CPU (gloo): N ranks must give what one process gives.

Greedy tokens and their logprobs at N=2 and N=3 equal N=1's (the all-reduces add partial sums in another
order, so logprobs match to float rounding), under `full` and under `nexus` with eviction in prefill and
decode; the rings hold the same positions head by head (rank r's KV heads are heads r*Hkv/N.. of N=1's);
streaming works; a rank killed mid-generation fails the requests in flight and nothing hangs.

The tiny models have 12 query heads, 6 KV heads and an intermediate size of 192 (all divisible by 2 and 3),
and a vocabulary of 385, which divides by neither: the last rank's vocabulary shard is padded.
"""

from __future__ import annotations

import operator
import time

import pytest
import torch
from helpers import make_tiny_checkpoint

from minikv import Engine, SamplingParams
from minikv.archive import RecallRule
from minikv.config import ModelConfig
from minikv.distributed import DistributedError, check_tensor_parallel
from minikv.errors import ConfigError, InvalidRequestError

SHAPE = dict(num_attention_heads=12, num_key_value_heads=6, hidden_size=96, intermediate_size=192, vocab_size=385)
SETTINGS = dict(budget=64, chunk=32, n_sink=4, window=16, max_num_seqs=4, device="cpu", seed=0)
PROMPTS = [[3 + (7 * i) % 250 for i in range(150)], [9 + (5 * i) % 240 for i in range(70)], [40, 41, 42]]
GREEDY = SamplingParams(max_tokens=12, temperature=0, logprobs=1, ignore_eos=True)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, one_torch_thread):
    root = tmp_path_factory.mktemp("tp")
    return {arch: make_tiny_checkpoint(root / arch, arch, **SHAPE, **({"head_dim": 16} if "Qwen3" in arch else {}))
            for arch in ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")}


def run(engine: Engine, prompts=PROMPTS, params=GREEDY):
    """Every request's tokens and chosen-token logprobs, and each request's ring positions after every step
    ([layers, kv_heads, n] per step it was running)."""
    ids = [engine.add_request(p, params) for p in prompts]
    rings = {rid: [] for rid in ids}
    outputs = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = out
        for rid in ids:
            try:
                rings[rid].append(engine.kv_positions(rid))
            except InvalidRequestError:  # waiting, or finished
                pass
    results = []
    for rid in ids:
        c = outputs[rid].outputs[0]
        results.append((c.token_ids, [lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids)]))
    return results, [rings[rid] for rid in ids]


def assert_same(reference, other):
    (ref_out, ref_rings), (out, rings) = reference, other
    for (ref_tokens, ref_lp), (tokens, lp) in zip(ref_out, out):
        assert tokens == ref_tokens
        assert torch.allclose(torch.tensor(lp), torch.tensor(ref_lp), atol=1e-4, rtol=0)
    for ref_steps, steps in zip(ref_rings, rings):
        assert len(steps) == len(ref_steps) > 0
        for ref_pos, pos in zip(ref_steps, steps):
            assert torch.equal(pos, ref_pos)  # [layers, kv_heads, n]: every head's positions, slot by slot


@pytest.mark.parametrize("policy", ["full", "nexus"])
def test_llama_at_two_and_three_ranks_equals_one(checkpoints, policy):
    path = checkpoints["LlamaForCausalLM"]
    with Engine(path, policy=policy, **SETTINGS) as engine:
        reference = run(engine)
    if policy == "nexus":  # the budget must bite, or this compares no eviction at all
        assert max(r.shape[-1] for r in reference[1][0]) == SETTINGS["budget"]
    for n in (2, 3):
        with Engine(path, policy=policy, tensor_parallel_size=n, **SETTINGS) as engine:
            assert_same(reference, run(engine))


@pytest.mark.parametrize("arch,n", [("Qwen2ForCausalLM", 2), ("Qwen3ForCausalLM", 3)])
def test_qwen_with_eviction_equals_one_rank(checkpoints, arch, n):
    with Engine(checkpoints[arch], policy="nexus", **SETTINGS) as engine:
        reference = run(engine)
    with Engine(checkpoints[arch], policy="nexus", tensor_parallel_size=n, **SETTINGS) as engine:
        assert_same(reference, run(engine))


def test_streaming_and_prompt_logprobs_at_two_ranks(checkpoints):
    """Streaming deltas, prompt logprobs (an extra LM-head call the other ranks must follow) and a second
    batch on the same engine."""
    from minikv.loader import load_model

    path = checkpoints["LlamaForCausalLM"]
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, prompt_logprobs=2)
    with Engine(path, policy="nexus", **SETTINGS) as engine:
        text = "".join(engine.stream(PROMPTS[0], params))
        prompt_lp = engine.generate([PROMPTS[1]], params, use_tqdm=False)[0].prompt_logprobs
    loaded = load_model(path, device="cpu")  # an already loaded model: the ranks read its files
    with Engine(loaded, policy="nexus", tensor_parallel_size=2, **SETTINGS) as engine:
        with engine.stream(PROMPTS[0], params) as stream:
            assert "".join(stream) == text
        out = engine.generate([PROMPTS[1]], params, use_tqdm=False)[0]
    assert len(out.prompt_logprobs) == len(prompt_lp) == len(PROMPTS[1])
    for mine, theirs in zip(out.prompt_logprobs[1:], prompt_lp[1:]):
        assert mine.keys() == theirs.keys()
        assert all(abs(mine[t].logprob - theirs[t].logprob) < 1e-4 for t in mine)


def test_a_session_at_two_ranks_continues_its_ring_as_at_one(checkpoints, tmp_path):
    """A parked ring's blocks are the same ids on every rank, so a session's next turn continues it at N=2 as
    at N=1 (nexus keeps no per-ring state). Session files would hold rank 0's heads only: refused clearly."""
    from minikv import SessionFileError

    path = checkpoints["LlamaForCausalLM"]
    turns = [PROMPTS[0][:90], PROMPTS[1][:40]]

    def conversation(engine):
        history, outputs = [], []
        for new in turns:
            out = engine.generate([history + new], GREEDY, session_id="chat", use_tqdm=False)[0]
            outputs.append((out.outputs[0].token_ids, out.num_cached_tokens))
            history = engine.session("chat").token_ids
        return outputs

    with Engine(path, policy="nexus", **SETTINGS) as engine:
        reference = conversation(engine)
        assert engine.sessions.rollback_window == engine.policy.window
    with Engine(path, policy="nexus", tensor_parallel_size=2, **SETTINGS) as engine:
        assert conversation(engine) == reference and reference[1][1] > 0  # the second turn reused the ring
        # A rollback after eviction moves slots in this rank's pool only: under tensor parallelism a
        # divergence in an evicted ring starts over instead.
        assert engine.sessions.rollback_window == 0
        with pytest.raises(SessionFileError, match="tensor parallelism"):
            engine.save_session("chat", tmp_path)


def test_killed_rank_fails_requests_in_flight_without_hanging(checkpoints):
    timeout = 20.0
    engine = Engine(checkpoints["LlamaForCausalLM"], policy="nexus", tensor_parallel_size=3,
                    distributed_timeout=timeout, **SETTINGS)
    try:
        ids = [engine.add_request(p, SamplingParams(max_tokens=200, ignore_eos=True)) for p in PROMPTS[:2]]
        for _ in range(3):
            engine.step()
        victim, survivor = engine.workers.processes
        victim.kill()
        start = time.monotonic()
        finished = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    finished[out.request_id] = out
            assert time.monotonic() - start < timeout + 10
        assert set(finished) == set(ids)
        for out in finished.values():
            assert out.outputs[0].finish_reason == "error"
            assert "DistributedError" in out.error and "rank" in out.error
        survivor.join(10)
        assert not survivor.is_alive()  # the third rank is gone too
        with pytest.raises(DistributedError, match="stopped"):
            engine.add_request("more", SamplingParams(max_tokens=2))
    finally:
        engine.close()


def test_stuck_rank_times_out_instead_of_hanging(checkpoints):
    """A rank that stops answering (SIGSTOP: alive, sockets open) is caught by the collective timeout."""
    import os
    import signal

    timeout = 4.0
    engine = Engine(checkpoints["LlamaForCausalLM"], policy="nexus", tensor_parallel_size=2,
                    distributed_timeout=timeout, **SETTINGS)
    try:
        rid = engine.add_request(PROMPTS[2], SamplingParams(max_tokens=50, ignore_eos=True))
        engine.step()
        (stuck,) = engine.workers.processes
        os.kill(stuck.pid, signal.SIGSTOP)
        start = time.monotonic()
        outs = engine.step()
        waited = time.monotonic() - start
        assert [(o.request_id, o.outputs[0].finish_reason) for o in outs] == [(rid, "error")]
        assert timeout - 0.5 < waited < timeout + 10  # the timeout, then 2 s for the rank to exit
        stuck.join(5)
        assert not stuck.is_alive()  # rank 0 ended it (a stopped process cannot exit by itself)
    finally:
        engine.close()


def test_settings_that_cannot_split_name_the_field(checkpoints):
    config = ModelConfig("LlamaForCausalLM", vocab_size=385, hidden_size=96, intermediate_size=200, num_layers=2,
                         num_heads=12, num_kv_heads=6, head_dim=8)
    check_tensor_parallel(config, 2)  # 385 does not divide: the vocabulary is padded, not refused
    with pytest.raises(ConfigError, match="num_attention_heads"):
        check_tensor_parallel(config, 5)
    with pytest.raises(ConfigError, match="num_key_value_heads"):
        check_tensor_parallel(config, 4)
    with pytest.raises(ConfigError, match="intermediate_size"):
        check_tensor_parallel(config, 3)
    path = checkpoints["LlamaForCausalLM"]
    for bad in (0, -1, 1.5, "2", True):
        with pytest.raises(ConfigError, match="tensor_parallel_size"):
            Engine(path, tensor_parallel_size=bad, **SETTINGS)
    with pytest.raises(ConfigError, match="num_key_value_heads"):
        Engine(path, tensor_parallel_size=4, **SETTINGS)


def test_too_few_devices_are_refused(monkeypatch):
    from minikv.distributed.group import rank_devices

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert rank_devices(torch.device("cuda"), 2) == [torch.device("cuda", 0), torch.device("cuda", 1)]
    with pytest.raises(ConfigError, match="needs 4 CUDA devices.*has 2"):
        rank_devices(torch.device("cuda"), 4)
    with pytest.raises(ConfigError, match="needs 2 CUDA devices from cuda:1"):
        rank_devices(torch.device("cuda:1"), 2)


@pytest.mark.slow
def test_command_line_under_torchrun_equals_one_rank(tmp_path):
    """`minikv run --tensor-parallel-size 2` as torchrun starts it: two processes of the same command, rank 1
    serving rank 0 and exiting with it. Its answer is the one-process answer."""
    import os
    import socket
    import subprocess
    import sys

    from tiny_engine import tiny_checkpoint

    model = tiny_checkpoint(tmp_path / "tiny")
    command = ["-m", "minikv", "run", str(model), "Tell me a story.", "--temperature", "0", "--max-tokens", "12",
               "--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = subprocess.run([sys.executable, *command], capture_output=True, text=True, env=env, timeout=300)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                          "127.0.0.1", "--master-port", str(port), *command, "--tensor-parallel-size", "2"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert one.returncode == two.returncode == 0, two.stderr[-2000:]
    assert one.stdout.strip() and two.stdout == one.stdout


@pytest.mark.slow
def test_smollm2_at_three_ranks_equals_one(smollm2, one_torch_thread):
    """The real model: 9 query heads and 3 KV heads, so each of 3 ranks holds one KV head's rings."""
    text = ("The lighthouse keeper wrote in his log every evening. The storm came from the west, and the "
            "ships stayed in the harbour for three days. On the fourth day the sea was calm again. ") * 4
    prompt = smollm2.tokenizer.encode(text)
    settings = dict(SETTINGS, budget=96, chunk=64, window=16)
    params = SamplingParams(max_tokens=8, temperature=0, logprobs=1, ignore_eos=True)
    with Engine(smollm2, policy="nexus", **settings) as engine:
        reference = run(engine, [prompt], params)
    assert reference[1][0][-1].shape == (30, 3, 96)  # the budget bites: eviction in prefill and decode
    with Engine(None, policy="nexus", tensor_parallel_size=3, dtype="float32", **settings) as engine:
        assert_same(reference, run(engine, [prompt], params))


def test_kv_archive_at_two_ranks_equals_one(checkpoints):
    """Each rank archives and recalls its own KV heads (recall decides per KV head); rank 0's record of
    opens, closes and budgets travels in the step message. Tokens, logprobs, every head's ring after every
    step and the recall counts (summed over the ranks) equal N=1's, under both position modes at once."""
    path = checkpoints["LlamaForCausalLM"]
    # share 0: every ring that lacks a token votes for it, so no decision sits on a rounding-close share (the
    # ranks sum o_proj in another order than one process); 3 votes of the 4 (layer, KV head) pairs, where a
    # rank has 2: only the votes summed over the ranks decide
    settings = {**SETTINGS, "recall_interval": 4, "recall_rule": RecallRule(threshold=0.0, min_votes=3, span=0)}
    modes = ["original", "ring", "original"]

    def archived(engine):
        params = [SamplingParams(max_tokens=12, temperature=0, logprobs=1, ignore_eos=True, positions=m,
                                 archive_budget=b) for m, b in zip(modes, (400, 400, 100))]
        ids = [engine.add_request(p, sp) for p, sp in zip(PROMPTS, params)]
        rings, outputs = [], {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    outputs[out.request_id] = out
            rings.append([engine.kv_positions(r) for r in ids if r not in outputs and r in engine._requests
                          and engine._requests[r].slot is not None])
        outs = [outputs[r] for r in ids]
        left = engine.archive.tokens
        # a session parks its archive with its ring, the next turn continues it with a smaller budget (rank
        # 0's record: truncate, budget), a third turn without an archive frees it (close)
        history = []
        for new, budget in ((PROMPTS[0][:90], 300), (PROMPTS[1][:40], 120), (PROMPTS[2], 0)):
            sp = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, archive_budget=budget)
            out = engine.generate([history + new], sp, session_id="chat", use_tqdm=False)[0]
            outs.append(out)
            history = engine.session("chat").token_ids
        return outs, rings, engine.stats().recalled_tokens, left

    with Engine(path, policy="nexus", **settings) as engine:
        ref_outs, ref_rings, ref_recalled, ref_left = archived(engine)
    assert ref_recalled > 0 and ref_left == 0
    with Engine(path, policy="nexus", tensor_parallel_size=2, **settings) as engine:
        outs, rings, recalled, left = archived(engine)
        # every rank's archives are freed with their requests (the other ranks at the next step: run one)
        engine.generate([[5, 6, 7]], SamplingParams(max_tokens=1, archive_budget=0), use_tqdm=False)
        tokens = operator.attrgetter("attention.archive.tokens")
        assert engine.workers.call(tokens, (), engine.archive.tokens) == [0, 0]
    assert recalled == ref_recalled and left == 0
    assert len(outs) == len(ref_outs) == 6 and outs[4].num_cached_tokens > 0
    assert ref_outs[4].metrics.num_recalled_tokens > 0 and ref_outs[5].metrics.num_recalled_tokens == 0
    for ref, out in zip(ref_outs, outs):
        assert out.outputs[0].token_ids == ref.outputs[0].token_ids
        assert out.metrics.num_recalled_tokens == ref.metrics.num_recalled_tokens
        if ref.outputs[0].logprobs is None:
            continue
        ref_lp = [lp[t].logprob for lp, t in zip(ref.outputs[0].logprobs, ref.outputs[0].token_ids)]
        lp = [lp[t].logprob for lp, t in zip(out.outputs[0].logprobs, out.outputs[0].token_ids)]
        assert torch.allclose(torch.tensor(lp), torch.tensor(ref_lp), atol=1e-4, rtol=0)
    assert len(rings) == len(ref_rings)
    for ref_step, step in zip(ref_rings, rings):
        assert len(step) == len(ref_step)
        for ref_pos, pos in zip(ref_step, step):
            assert torch.equal(pos, ref_pos)

"""Engine defects found by trying it as users do: huge engine seeds, a sampling retry, `full` pools."""

from __future__ import annotations

from minikv.engine import Engine
from minikv.sampling import SamplingParams


def test_an_engine_seed_past_int64_leaves_unseeded_requests_working(loaded):
    for seed in (2**63, 2**64 + 5, -(2**70)):
        engine = Engine(loaded, budget=64, policy="nexus", n_sink=4, window=16, chunk=32, seed=seed)
        out = engine.generate(["a b c"], SamplingParams(max_tokens=3, ignore_eos=True), use_tqdm=False)[0]
        assert len(out.outputs[0].token_ids) == 3
    # Seeds within 32 bits derive the same request seeds as before (the low 32 bits are what is hashed).
    a = Engine(loaded, budget=64, policy="nexus", n_sink=4, window=16, chunk=32, seed=7)
    b = Engine(loaded, budget=64, policy="nexus", n_sink=4, window=16, chunk=32, seed=7 + 2**64)
    params = SamplingParams(max_tokens=6, temperature=1.0, ignore_eos=True)
    assert (a.generate(["x y"], params, use_tqdm=False)[0].outputs[0].token_ids
            == b.generate(["x y"], params, use_tqdm=False)[0].outputs[0].token_ids)


def test_a_sampling_retry_counts_each_token_once(loaded, monkeypatch):
    engine = Engine(loaded, budget=64, policy="nexus", n_sink=4, window=16, chunk=32, max_num_seqs=2)
    ids = [engine.add_request(f"prompt {i}", SamplingParams(max_tokens=4, logprobs=2, ignore_eos=True))
           for i in range(2)]
    real, calls = engine._token_text, []

    def fails_once(token_id):
        calls.append(token_id)
        if len(calls) == 1:
            raise RuntimeError("injected: the batch's logprobs failed once")
        return real(token_id)

    monkeypatch.setattr(engine, "_token_text", fails_once)
    engine.step()  # both prompts prefill and sample together; the batch fails, the rows are retried alone
    for rid in ids:
        req = engine._requests[rid]
        assert not req.is_finished and len(req.output_ids) == 1
        assert int(engine.batch.num_generated[req.slot]) == 1  # the failed attempt recorded nothing
    while engine.has_unfinished_requests():
        engine.step()


def test_full_sizes_its_default_pool_for_a_whole_request(loaded):
    engine = Engine(loaded, budget=64, policy="full", chunk=32, max_num_seqs=1, max_model_len=512)
    prompt = [3 + i % 300 for i in range(400)]  # 400 tokens: far past --budget, which `full` ignores
    out = engine.generate([prompt], SamplingParams(max_tokens=100, ignore_eos=True), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 100 and out.metrics.num_evicted_tokens == 0
    assert engine.pool.num_blocks * engine.block_size >= 512


def test_minikv_run_full_answers_a_prompt_longer_than_budget(tmp_path, capsys):
    from helpers import make_tiny_checkpoint

    from minikv.cli import main

    model = make_tiny_checkpoint(tmp_path / "tiny", "LlamaForCausalLM")
    prompt = "a long prompt, far longer than the budget that full ignores. " * 10  # ~600 byte tokens
    code = main(["run", str(model), prompt, "--policy", "full", "--budget", "64", "--max-tokens", "4",
                 "--temperature", "0", "--max-model-len", "1024", "--threads", "1"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "lower kv_budget" not in err

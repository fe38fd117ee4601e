"""Decode-phase tasks of `minikv eval`: metrics on hand-made distributions, bootstrap intervals, sample
generation, scoring, the reference cache, and runs through the Engine on the tiny random model."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

from minikv.errors import ConfigError
from minikv.eval import cli as eval_cli
from minikv.eval import decode, runner, stats
from minikv.eval.runner import EvalSettings
from tiny_engine import tiny_checkpoint, tiny_loaded

TASKS = list(decode.DECODE_TASKS)
PROMPT, GEN = 256, 96  # the tiny model's tokenizer is byte-level: the instructions alone take ~220 tokens


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_loaded(tmp_path_factory.mktemp("tiny"))


def _settings(**overrides) -> EvalSettings:
    return EvalSettings(**{**dict(model="tiny", length=4096, tasks=TASKS, samples=3, perplexity=False, chunk=64,
                                  n_sink=4, window=16, decode_prompt=PROMPT, decode_gen=GEN), **overrides})


# --- metrics on hand-made distributions ----------------------------------------------------------------


def _log(probs) -> torch.Tensor:
    return torch.tensor(probs, dtype=torch.float64).log()


def test_kl_of_identical_distributions_is_zero():
    p = _log([[0.5, 0.3, 0.1], [0.9, 0.05, 0.01]])  # the tails (0.1, 0.04) are equal too
    assert decode.step_kl(p, p).tolist() == [0.0, 0.0]


def test_kl_of_a_two_token_distribution_has_its_closed_form():
    kl = decode.step_kl(_log([[0.5, 0.5]]), _log([[0.9, 0.1]]))
    assert kl.item() == pytest.approx(0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1), rel=1e-9)


def test_kl_lumps_the_tail_into_one_outcome_and_never_exceeds_the_exact_kl():
    p, q = [0.4, 0.3, 0.2, 0.1], [0.2, 0.3, 0.25, 0.25]  # a 4-token vocabulary, top-2 watched
    estimate = decode.step_kl(_log([p[:2]]), _log([q[:2]])).item()
    lumped = 0.4 * math.log(0.4 / 0.2) + 0.3 * math.log(0.3 / 0.3) + 0.3 * math.log(0.3 / 0.5)
    exact = sum(a * math.log(a / b) for a, b in zip(p, q))
    assert estimate == pytest.approx(lumped, rel=1e-9)
    assert 0 < estimate < exact
    # the same head with different tails: only the lumped tail can tell them apart, and it does not
    assert decode.step_kl(_log([[0.4, 0.3]]), _log([[0.4, 0.3]])).item() == 0.0


def test_fidelity_metrics_agreement_and_nll():
    ref_ids = torch.tensor([[5, 1], [7, 2]])  # reference argmax 5, then 7
    ref_logprobs = _log([[0.6, 0.4], [0.7, 0.3]])
    metrics = decode.fidelity_metrics(ref_ids, ref_logprobs, ref_logprobs, torch.tensor([5, 2]),
                                      torch.tensor([-1.0, -3.0]))
    assert metrics == {"kl": 0.0, "top1": 0.5, "nll": 2.0}


def test_exact_match_needs_the_whole_number():
    assert decode.exact_match(["1234567"], "The special magic number is 1234567.") == 1.0
    assert decode.exact_match(["1234567"], "It is 12345678") == 0.0
    assert decode.exact_match(["1234567"], "It is 7654321, I think") == 0.0
    with pytest.raises(ConfigError, match="without answers"):
        decode.exact_match([], "1234567")


def test_no_repeat_ngram_bans_what_would_repeat_a_4gram_and_the_banned_ids():
    ban = decode.NoRepeatNgram([1, 2, 3, 4, 9, 1, 2], banned_ids=(0,))
    logits = ban([3], torch.zeros(10))  # text ends 1 2 3: 4 would repeat "1 2 3 4"
    assert torch.isinf(logits[[0, 4]]).all() and torch.isfinite(logits[[1, 2, 3, 5, 9]]).all()
    assert torch.isfinite(ban([3, 5], torch.zeros(10))[4])  # "2 3 5" was never followed: 4 is allowed again


# --- bootstrap -------------------------------------------------------------------------------------------


def test_bootstrap_interval_contains_the_mean_shrinks_with_n_and_is_reproducible():
    values = [float(i % 7) for i in range(20)]
    low, high = stats.bootstrap_ci(values)
    assert low < stats.mean(values) < high
    wide = stats.bootstrap_ci(values[:5])
    narrow = stats.bootstrap_ci(values * 10)
    assert narrow[1] - narrow[0] < (high - low) < wide[1] - wide[0]
    assert stats.bootstrap_ci(values) == (low, high)
    assert stats.bootstrap_ci([3.0]) == (3.0, 3.0)


def test_paired_difference_removes_the_spread_shared_by_both_configs():
    base = [0.0, 10.0, 20.0, 30.0, 40.0]
    paired = stats.paired_difference([b + 1 for b in base], base)
    assert paired == {"mean": 1.0, "ci": [1.0, 1.0]}
    with pytest.raises(ValueError, match="same samples"):
        stats.paired_difference([1.0], base)


# --- samples -----------------------------------------------------------------------------------------


def test_samples_are_deterministic_and_differ_by_seed(tiny):
    for task in TASKS:
        first = decode.generate_decode_sample(task, tiny.tokenizer, PROMPT, GEN, 0)
        assert first == decode.generate_decode_sample(task, tiny.tokenizer, PROMPT, GEN, 0)
        assert first.prompt_ids != decode.generate_decode_sample(task, tiny.tokenizer, PROMPT, GEN, 1).prompt_ids
        assert abs(len(first.prompt_ids) - PROMPT) <= 0.05 * PROMPT


def test_the_fact_is_in_the_prompt_and_the_question_ends_the_forced_part(tiny):
    tok = tiny.tokenizer
    for task in ("needle_after_gen", "multiturn"):
        sample = decode.generate_decode_sample(task, tok, PROMPT, GEN, 3)
        (value,) = sample.answers
        prompt, forced = tok.decode(sample.prompt_ids), tok.decode(sample.forced_ids)
        assert value in prompt and value not in forced
        assert forced.rstrip().endswith("The special magic number for " + prompt.split("numbers for ")[1].split(" ")[0]
                                        + " is")
        assert len(sample.forced_ids) >= GEN


def test_a_prompt_too_short_for_the_instructions_is_refused(tiny):
    with pytest.raises(ConfigError, match="--decode-prompt 100 is too short"):
        decode.generate_decode_sample("needle_after_gen", tiny.tokenizer, 100, GEN, 0)


# --- through the Engine ---------------------------------------------------------------------------------


def _work(tiny, settings, tmp_path):
    work = runner.build_workload(settings, tiny.tokenizer)
    runner.add_reference(tiny, settings, work, tmp_path / "r.json")
    return work


def _config(policy: str, budget: float, settings: EvalSettings):
    return runner.plan_configs(runner.parse_policies(policy), [budget], settings.budget_context,
                               protected=settings.n_sink + settings.window)[0]


def test_the_forced_tokens_run_through_decode_steps(tiny, tmp_path):
    from minikv.engine import Engine

    settings = _settings(tasks=["needle_after_gen", "multiturn"], samples=2)
    work = _work(tiny, settings, tmp_path)
    engine = Engine(tiny, budget=128, policy="streaming", chunk=64, n_sink=4, window=16, max_num_seqs=4)
    requests = decode.add_decode_requests(engine, work.decode_samples, None)
    finished = runner._drain(engine, set(requests), lambda: None)
    stats_ = engine.stats()
    samples = [r.sample for r in requests.values()]
    assert stats_.prompt_tokens == sum(len(s.prompt_ids) for s in samples)  # only the prompts were prefilled
    assert stats_.generation_tokens >= sum(len(s.forced_ids) for s in samples)
    for rid, request in requests.items():
        assert finished[rid].outputs[0].token_ids[:len(request.sample.forced_ids)] == request.sample.forced_ids


def test_full_matches_its_own_reference_and_eviction_moves_away_from_it(tiny, tmp_path):
    settings = _settings(tasks=["decode_fidelity"], samples=3)
    work = _work(tiny, settings, tmp_path)
    (full,) = runner.run_config(tiny, settings, _config("full", 0.5, settings), work)
    (tight,) = runner.run_config(tiny, settings, _config("streaming", 0.2, settings), work)
    assert full["kl"]["mean"] == pytest.approx(0.0, abs=1e-6) and full["top1"]["mean"] == 1.0
    assert full["nll"]["mean"] == pytest.approx(full["reference_nll"]["mean"], rel=1e-5)
    assert tight["kl"]["mean"] > 1e-3 and tight["top1"]["mean"] < 1.0
    for metric in ("kl", "top1", "nll"):
        low, high = tight[metric]["ci"]
        assert low <= tight[metric]["mean"] <= high and len(tight["per_sample"][metric]) == 3


def test_full_runs_every_sample_at_once(tiny, tmp_path):
    """A `full` ring is its whole request (prompt + forced + answer, beyond the budget label's context):
    the config's pool must hold all of them, or the samples would run in waves."""
    settings = _settings(tasks=["needle_after_gen", "multiturn"], samples=3)
    work = runner.build_workload(settings, tiny.tokenizer)
    engine = runner._engine(tiny, settings, _config("full", 0.5, settings), work)
    requests = decode.add_decode_requests(engine, work.decode_samples, None)
    engine.step()
    assert engine.stats().num_running == len(requests) and engine.stats().num_waiting == 0


def test_a_config_scores_the_same_twice(tiny, tmp_path):
    settings = _settings(samples=2)
    work = _work(tiny, settings, tmp_path)
    config = _config("streaming", 0.5, settings)
    first, second = (runner.run_config(tiny, settings, config, work) for _ in range(2))
    strip = lambda records: [{k: v for k, v in r.items() if k != "config_seconds"} for r in records]  # noqa: E731
    assert strip(first) == strip(second)
    assert [r["task"] for r in first] == TASKS
    assert all(len(r["scores"]) == 2 for r in first[1:])


def test_the_reference_is_computed_once_and_reused_while_its_key_holds(tmp_path):
    path, calls = tmp_path / "ref.pt", []

    def compute():
        calls.append(1)
        return decode.FidelityReference({"seed": 0}, [[1, 2]], torch.zeros(1, 2, 3, dtype=torch.int32),
                                        torch.zeros(1, 2, 3), torch.zeros(1, 2))

    first = decode.load_or_compute_reference(path, {"seed": 0}, compute)
    again = decode.load_or_compute_reference(path, {"seed": 0}, compute)
    assert calls == [1] and again.continuations == first.continuations
    decode.load_or_compute_reference(path, {"seed": 1}, compute)
    assert calls == [1, 1]


# --- the command line --------------------------------------------------------------------------------------


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    eval_cli.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_cli_plans_decode_tasks_with_budgets_of_prompt_plus_generation():
    settings, configs = eval_cli.plan_from_args(_args("--tasks", ",".join(TASKS), "--policies", "nexus,full",
                                                      "--budgets", "0.25,300", "--decode-prompt", "256",
                                                      "--decode-gen", "1024"))
    assert settings.is_decode and not settings.perplexity  # decode runs have NLL instead of perplexity
    assert (settings.decode_prompt, settings.decode_gen) == (256, 1024)
    assert [(c.key, c.budget) for c in configs] == [("nexus@0.25", 320), ("nexus@300", 300), ("full@full", 1280)]


@pytest.mark.parametrize("argv, message", [
    (["--tasks", "decode_fidelity,niah_single"], "mixes decode-phase tasks"),
    (["--tasks", "multiturn", "--decode-gen", "8"], "--decode-gen 8 is too short"),
    (["--tasks", "multiturn", "--decode-prompt", "10"], "--decode-prompt 10 is too short"),
    (["--tasks", "multiturn", "--budgets", "2000"], "not below --length 1280"),
])
def test_cli_refuses_bad_decode_arguments(argv, message):
    with pytest.raises(ConfigError, match=message):
        eval_cli.plan_from_args(_args(*argv))


def test_prefill_settings_are_unchanged_by_the_decode_fields():
    settings, _ = eval_cli.plan_from_args(_args("--tasks", "niah_single"))
    assert settings.decode_prompt is None and settings.decode_gen is None and settings.perplexity


def test_cli_runs_and_resumes_a_decode_grid(tmp_path, monkeypatch):
    model = tiny_checkpoint(tmp_path / "model")
    out = tmp_path / "decode.json"
    common = ["--model", str(model), "--tasks", ",".join(TASKS), "--samples", "2", "--budgets", "0.3",
              "--decode-prompt", str(PROMPT), "--decode-gen", "64", "--chunk", "64", "--window", "16",
              "--threads", "1", "--no-plot", "--no-progress", "--output", str(out)]
    assert eval_cli.run(_args(*common, "--policies", "full,streaming")) == 0
    first = json.loads(out.read_text())["runs"]
    assert [(r["key"], r["task"]) for r in first] == [(k, t) for k in ("full@full", "streaming@0.3") for t in TASKS]
    assert decode.reference_path(out).exists()

    def no_second_reference(*args, **kwargs):
        raise AssertionError("the reference was computed again")

    monkeypatch.setattr(decode, "compute_reference", no_second_reference)
    assert eval_cli.run(_args(*common, "--policies", "full,streaming,h2o")) == 0
    second = json.loads(out.read_text())["runs"]
    assert second[:len(first)] == first  # done configs were skipped, not rerun
    assert {r["key"] for r in second[len(first):]} == {"h2o@0.3"}
    table = out.with_suffix(".md").read_text().splitlines()
    assert table[0].startswith("| policy | budget | KL(full‖policy) | top-1 agree % | NLL | needle_after_gen % |")
    assert table[2].startswith("| full | full | 0.0000 [0.0000, 0.0000] | 100.0 [100.0, 100.0] |")
    assert "ΔNLL vs full (paired)" in table[0]


def test_plot_draws_decode_panels_with_error_bars(tmp_path):
    from minikv.eval import plot

    config = runner.RunConfig(runner.parse_policy("nexus"), 128, "0.1")
    record = {**runner._base_record(config, "decode_fidelity", 1.0), "kl": {"mean": 0.2, "ci": [0.1, 0.3]},
              "top1": {"mean": 0.8, "ci": [0.7, 0.9]}, "nll": {"mean": 3.0, "ci": [2.9, 3.2]}}
    needle = {**runner._base_record(config, "needle_after_gen", 1.0), "accuracy": 0.5, "accuracy_ci": [0.25, 0.75]}
    data = {"settings": vars(_settings(tasks=["decode_fidelity", "needle_after_gen"])), "runs": [record, needle]}
    x = 128 / (PROMPT + GEN)  # a budget is a fraction of prompt + forced tokens
    assert plot.decode_series(data, "kl")["nexus"] == [(x, 0.2, 0.1, 0.3)]
    assert plot.decode_series(data, "top1")["nexus"] == [(x, 80.0, 70.0, 90.0)]
    assert plot.decode_series(data, "needle_after_gen")["nexus"] == [(x, 50.0, 25.0, 75.0)]
    pytest.importorskip("matplotlib")
    png = plot.plot_results(data, tmp_path / "p.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_smollm2_fidelity_at_tiny_sizes_and_chat_samples_through_its_template(smollm2, tmp_path):
    """The real model: full reproduces its own reference and a tight ring departs from it; the chat tasks'
    samples are built with SmolLM2's template (system prompt, <|im_start|> turns)."""
    settings = _settings(model="smollm2", tasks=["decode_fidelity"], samples=2, chunk=64, decode_prompt=64,
                         decode_gen=32)
    work = _work(smollm2, settings, tmp_path)
    (full,) = runner.run_config(smollm2, settings, _config("full", 0.5, settings), work)
    (tight,) = runner.run_config(smollm2, settings, _config("streaming", 40, settings), work)
    assert full["kl"]["mean"] < 1e-4 and full["top1"]["mean"] == 1.0
    assert tight["kl"]["mean"] > full["kl"]["mean"]
    for task in ("needle_after_gen", "multiturn"):
        sample = decode.generate_decode_sample(task, smollm2.tokenizer, 256, 1024, 0)
        forced = smollm2.tokenizer.decode(sample.forced_ids, skip_special_tokens=False)
        assert abs(len(sample.prompt_ids) - 256) <= 8 and 1024 <= len(sample.forced_ids) <= 1200
        assert forced.endswith(" is<|im_end|>\n<|im_start|>assistant\n")

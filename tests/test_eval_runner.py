"""`minikv eval`: argument parsing and errors, the results file (resume), the table, the plot, and runs
through the Engine on a tiny random model and (slow) on SmolLM2."""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys

import pytest

from minikv.errors import ConfigError
from minikv.eval import cli as eval_cli
from minikv.eval import runner
from minikv.eval.runner import EvalSettings, PolicySpec, RunConfig


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- parsing and errors (no model) -------------------------------------------------------------------


def test_policy_variants_parse_into_options():
    specs = runner.parse_policies("nexus,h2o,nexus:gamma=0,nexus:tau=0,nexus:gamma=0.25,tau=0,full")
    assert [s.label for s in specs] == ["nexus", "h2o", "nexus:gamma=0", "nexus:tau=0", "nexus:gamma=0.25,tau=0", "full"]
    assert specs[2] == PolicySpec("nexus:gamma=0", "nexus", {"gamma": 0})
    assert specs[4].options == {"gamma": 0.25, "tau": 0}
    assert specs[1].options == {}


@pytest.mark.parametrize("text, message", [
    ("nexsu", "unknown policy 'nexsu'"),
    ("nexus:gama=0", "bad option for policy"),
    ("nexus:gamma", "key=value"),
    ("nexus:window=8", "--n-sink/--window"),
    ("nexus,nexus", "twice"),
    ("", "empty"),
])
def test_bad_policies_are_config_errors(text, message):
    with pytest.raises(ConfigError, match=message):
        runner.parse_policies(text)


def test_budgets_are_fractions_up_to_one_and_tokens_above():
    assert runner.parse_budgets("0.1, 0.5,1,512") == [0.1, 0.5, 1.0, 512.0]
    assert runner.resolve_budget(0.1, 4096, protected=68) == 410
    assert runner.resolve_budget(512, 4096, protected=68) == 512


@pytest.mark.parametrize("budgets, message", [
    ("abc", "not a number"), ("-0.1", "positive"), ("1.5", "whole number"), ("", "empty"),
])
def test_bad_budget_values(budgets, message):
    with pytest.raises(ConfigError, match=message):
        runner.parse_budgets(budgets)


@pytest.mark.parametrize("value, message", [(4096, "not below --length"), (8000, "not below --length"),
                                            (1.0, "not below --length"), (0.01, "sinks and the recent window")])
def test_budgets_that_cannot_evict_meaningfully(value, message):
    with pytest.raises(ConfigError, match=message):
        runner.resolve_budget(value, 4096, protected=68)


def test_full_runs_once_and_other_policies_at_every_budget():
    configs = runner.plan_configs(runner.parse_policies("nexus,full,h2o"), [0.1, 0.5], 1000, protected=68)
    assert [c.key for c in configs] == ["nexus@0.1", "nexus@0.5", "full@full", "h2o@0.1", "h2o@0.5"]
    assert [c.budget for c in configs] == [100, 500, 1000, 100, 500]


def test_length_beyond_the_model_context_is_refused():
    runner.check_context(4096, 8192, ["niah_single"])
    with pytest.raises(ConfigError, match="beyond the model's context"):
        runner.check_context(8192, 8192, ["niah_single"])


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    eval_cli.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_unknown_task_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown task 'needle'"):
        eval_cli.plan_from_args(_args("--tasks", "niah_single,needle"))


def test_a_policy_refuses_its_budget_before_the_model_loads():
    with pytest.raises(ConfigError, match="epikv"):
        eval_cli.plan_from_args(_args("--policies", "epikv", "--budgets", "0.1", "--length", "1024"))
    eval_cli.plan_from_args(_args("--policies", "epikv", "--budgets", "0.1", "--length", "1024", "--chunk", "64"))


def test_cli_reports_bad_arguments_without_a_traceback():
    result = subprocess.run([sys.executable, "-m", "minikv", "eval", "--budgets", "5000", "--length", "4096"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "minikv: error: budget 5000 is 5000 tokens, not below --length 4096" in result.stderr
    assert "Traceback" not in result.stderr


def test_help_documents_every_flag():
    parser = argparse.ArgumentParser()
    eval_cli.add_arguments(parser)
    flags = {flag for action in parser._actions for flag in action.option_strings if flag.startswith("--")}
    assert {"--policies", "--budgets", "--length", "--tasks", "--samples", "--output", "--plot", "--no-plot",
            "--no-perplexity", "--max-num-seqs", "--model", "--chunk", "--seed"} <= flags
    assert "--budget" not in flags and "--policy" not in flags  # replaced by the list flags
    undocumented = [a.option_strings for a in parser._actions if a.option_strings and not a.help]
    assert not undocumented
    help_text = " ".join(parser.format_help().split())  # undo line wrapping
    assert "nexus:gamma=0" in help_text and "fraction of --length" in help_text


# --- results file, table and plot (synthetic results) ------------------------------------------------


def _settings(**overrides) -> EvalSettings:
    return EvalSettings(**{**dict(model="tiny", length=1000, tasks=["niah_single", "vt"], samples=2), **overrides})


def _fake_runs() -> list[dict]:
    runs = []
    for policy, budget, label, acc, ppl in [("nexus", 100, "0.1", (0.5, 0.25), 9.0),
                                            ("nexus", 500, "0.5", (1.0, 0.5), 7.0),
                                            ("nexus:tau=0", 100, "0.1", (0.0, 0.0), 11.0),
                                            ("full", 1000, "full", (1.0, 0.75), 6.0)]:
        config = RunConfig(runner.parse_policy(policy), budget, label)
        for task, a in zip(["niah_single", "vt"], acc):
            runs.append({**runner._base_record(config, task, 1.0), "accuracy": a})
        runs.append({**runner._base_record(config, runner.PERPLEXITY_TASK, 1.0), "perplexity": ppl})
    return runs


def test_results_resume_only_with_the_same_settings(tmp_path):
    path = tmp_path / "r.json"
    data = runner.load_results(path, _settings())
    assert data["runs"] == []
    data["runs"] = _fake_runs()
    runner.save_results(path, data)
    again = runner.load_results(path, _settings())
    assert runner.done_keys(again) == {"nexus@0.1", "nexus@0.5", "nexus:tau=0@0.1", "full@full"}
    with pytest.raises(ConfigError, match=r"other settings \(length, samples\)"):
        runner.load_results(path, _settings(length=2000, samples=3))


def test_markdown_table_rows_and_means():
    table = runner.markdown_table({"settings": {}, "runs": _fake_runs()}).splitlines()
    assert table[0] == "| policy | budget | niah_single | vt | mean | perplexity |"
    assert table[2] == "| nexus | 0.1 (100) | 50 | 25 | 38 | 9.00 |"
    assert table[4] == "| nexus:tau=0 | 0.1 (100) | 0 | 0 | 0 | 11.00 |"
    assert table[5] == "| full | full | 100 | 75 | 88 | 6.00 |"


def test_markdown_table_gives_a_bootstrap_interval_over_the_samples_scores():
    runs = _fake_runs()
    runs[0]["scores"] = [1.0, 0.0, 1.0, 0.0]  # nexus@0.1 niah_single: 50%, resampled it ranges 0..100%
    runs[3]["scores"] = [1.0, 1.0, 1.0]  # nexus@0.5: every resample is 100%
    table = runner.markdown_table({"settings": {}, "runs": runs}).splitlines()
    cell = table[2].split(" | ")[2]
    low, high = (int(x) for x in cell.removeprefix("50 [").removesuffix("]").split(", "))
    assert 0 <= low < 50 < high <= 100
    assert table[3].startswith("| nexus | 0.5 (500) | 100 [100, 100] | 50 |")


def test_plot_series_and_png(tmp_path):
    data = {"settings": _settings().__dict__, "runs": _fake_runs()}
    from minikv.eval import plot

    assert plot.series(data, "niah_single")["nexus"] == [(0.1, 50.0), (0.5, 100.0)]
    assert plot.series(data, "mean")["full"] == [(1.0, 87.5)]
    assert plot.series(data, "perplexity")["nexus:tau=0"] == [(0.1, 11.0)]
    pytest.importorskip("matplotlib")
    png = plot.plot_results(data, tmp_path / "p.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_prefill_plot_points_carry_the_tables_bootstrap_interval(tmp_path):
    from minikv.eval import plot
    from minikv.eval.stats import bootstrap_ci

    runs = _fake_runs()
    runs[0]["scores"] = [1.0, 0.0, 1.0, 0.0]  # nexus@0.1 niah_single: 50%, an interval around it
    data = {"settings": _settings().__dict__, "runs": runs}
    low, high = bootstrap_ci(runs[0]["scores"])
    (x, y, bar_low, bar_high), unscored = plot.series(data, "niah_single")["nexus"]
    assert (x, y) == (0.1, 50.0) and (bar_low, bar_high) == (100 * low, 100 * high) and bar_low < y < bar_high
    assert unscored == (0.5, 100.0)  # a cell without per-sample scores has no bar
    assert plot.series(data, "mean")["nexus"][0] == (0.1, 37.5)  # the mean panel stays bare
    pytest.importorskip("matplotlib")
    assert plot.plot_results(data, tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_legend_of_an_ablation_grid_fits_inside_the_figure(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from minikv.eval import plot

    base = _fake_runs()[0]
    names = [f"nexus:gamma=0.5,tau=1,reserve={i / 16:g}" for i in range(16)]
    runs = [dict(base, key=f"{name}@0.1", policy=name) for name in names]
    kept = []
    monkeypatch.setattr(plt, "close", kept.append)  # keep the figure plot_results would close
    plot.plot_results({"settings": _settings().__dict__, "runs": runs}, tmp_path / "many.png")
    plot.plot_results({"settings": _settings().__dict__, "runs": runs[:2]}, tmp_path / "two.png")
    many, two = kept
    many.canvas.draw()
    legend, figure = many.legends[0].get_window_extent(), many.bbox
    assert len(many.legends[0].get_texts()) == 16
    assert figure.x0 <= legend.x0 and legend.x1 <= figure.x1 and figure.y0 <= legend.y0
    panel = many.axes[0].get_tightbbox()
    assert legend.y1 <= panel.y0  # under the panel and its axis label, not over them
    assert many.get_figheight() > two.get_figheight()  # the figure grows by the legend's rows
    monkeypatch.undo()
    for fig in (many, two):
        plt.close(fig)


def test_plot_without_matplotlib_says_how_to_install(monkeypatch):
    from minikv.eval import plot

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    with pytest.raises(ConfigError, match="pip install matplotlib"):
        plot._pyplot()


# --- through the Engine --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from helpers import make_tiny_checkpoint

    from minikv.loader import load_model

    return load_model(make_tiny_checkpoint(tmp_path_factory.mktemp("tiny")), device="cpu", dtype="float32")


def test_run_config_on_a_tiny_model_scores_and_measures_perplexity(tiny_model):
    settings = _settings(length=600, tasks=["niah_single"], samples=2, chunk=64, window=16, max_num_seqs=2)
    work = runner.build_workload(settings, tiny_model.tokenizer)
    done = []
    for policy in ("nexus", "full"):
        config = runner.plan_configs([runner.parse_policy(policy)], [0.5], settings.length, protected=20)[0]
        records = runner.run_config(tiny_model, settings, config, work, on_request_done=lambda: done.append(1))
        task, ppl = records
        assert task["task"] == "niah_single" and len(task["scores"]) == 2 and len(task["outputs"]) == 2
        assert task["accuracy"] == sum(task["scores"]) / 2  # a random model: any score, but consistent
        # every prompt token after the first is predicted once, through the ring
        assert ppl["tokens"] == len(work.perplexity_ids) - 1
        assert math.isclose(ppl["perplexity"], math.exp(ppl["nll"]))
        assert ppl["perplexity"] > 1
    assert len(done) == 2 * 3


def test_eviction_changes_the_streamed_loss(tiny_model):
    """The perplexity signal sees the ring: a tight budget reads the text differently from full attention."""
    settings = _settings(length=300, tasks=[], samples=1, chunk=32, window=8, n_sink=2)
    work = runner.build_workload(settings, tiny_model.tokenizer)
    nll = {}
    for policy, budget in (("full", 0.5), ("streaming", 0.1)):
        config = runner.plan_configs([runner.parse_policy(policy)], [budget], settings.length, protected=10)[0]
        nll[policy] = runner.run_config(tiny_model, settings, config, work)[0]["nll"]
    assert nll["full"] != pytest.approx(nll["streaming"], rel=1e-4)


@pytest.mark.slow
def test_full_cache_smollm2_finds_the_single_needle_at_1k(tmp_path):
    """The acceptance check: SmolLM2-135M-Instruct with no eviction scores >= 90% on niah_single at 1k."""
    out = tmp_path / "r.json"
    code = eval_cli.run(_args("--policies", "full", "--tasks", "niah_single", "--samples", "5", "--length", "1024",
                              "--no-perplexity", "--no-plot", "--no-progress", "--output", str(out)))
    assert code == 0
    (record,) = json.loads(out.read_text())["runs"]
    assert record["policy"] == "full" and len(record["scores"]) == 5
    assert record["accuracy"] >= 0.9, record["outputs"]

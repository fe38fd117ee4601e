"""Accuracy vs budget, one line per policy, from the JSON that ``minikv eval`` writes.

Every point measured over several samples carries its 95% bootstrap interval as an error bar: a prefill
task's accuracy (from the per-sample scores), and a decode-phase run's own panels (KL, top-1 agreement, NLL,
and the answer tasks' accuracy). The mean-over-tasks and perplexity panels are drawn without bars.

matplotlib is an optional extra (``pip install matplotlib`` or ``pip install minikv[plot]``); without it
``plot_results`` raises a ConfigError that says so, and the rest of the evaluation is unaffected.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from minikv.errors import ConfigError
from minikv.eval import decode
from minikv.eval.runner import PERPLEXITY_TASK, decode_metric
from minikv.eval.stats import bootstrap_ci

MEAN_PANEL = "mean"
# A decode run's panels: decode_fidelity's three metrics, then the answer tasks; (task, metric, y label, scale)
DECODE_PANELS = {"kl": ("decode_fidelity", "kl", "KL(full ‖ policy) per step (lower is better)", 1),
                 "top1": ("decode_fidelity", "top1", "top-1 agreement with full (%)", 100),
                 "nll": ("decode_fidelity", "nll", "NLL of the reference token (lower is better)", 1),
                 "needle_after_gen": ("needle_after_gen", "accuracy", "accuracy (%)", 100),
                 "multiturn": ("multiturn", "accuracy", "accuracy (%)", 100)}
DODGE = 1.012  # per policy, a factor on the (log-scaled) budget axis, so error bars at one budget sit apart


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("plotting needs matplotlib, which is not installed: `pip install matplotlib` "
                          "(or pass --no-plot); the JSON and Markdown results do not need it") from None
    matplotlib.use("Agg")  # files only: no display on a server
    import matplotlib.pyplot as plt

    return plt


def series(data: dict[str, Any], task: str) -> dict[str, list[tuple[float, ...]]]:
    """Per policy, the points of one panel sorted by budget: (budget fraction, value), or (budget fraction,
    value, low, high) for a task whose cells hold several per-sample scores.

    ``task`` is a task name, ``"mean"`` (mean accuracy over the tasks a config has all of) or
    ``"perplexity"``. Accuracies are in %. The `full` policy is one point at budget 1.0.
    """
    length = data["settings"]["length"]
    tasks = [t for t in data["settings"]["tasks"]]
    by_config: dict[str, dict[str, dict[str, Any]]] = {}
    for run in data.get("runs", []):
        by_config.setdefault(run["key"], {})[run["task"]] = run
    points: dict[str, list[tuple[float, ...]]] = {}
    for rows in by_config.values():
        first = next(iter(rows.values()))
        x = 1.0 if first["budget_label"] == "full" else first["budget"] / length
        value = _panel_value(rows, task, tasks)
        if value is not None:
            points.setdefault(first["policy"], []).append((x, *value))
    return {policy: sorted(p) for policy, p in points.items()}


def decode_series(data: dict[str, Any], panel: str) -> dict[str, list[tuple[float, float, float, float]]]:
    """Per policy, the (budget fraction, mean, low, high) points of a decode panel (DECODE_PANELS), sorted by
    budget; the fraction is of prompt + forced tokens, and `full` is one point at 1.0."""
    task, metric, _, scale = DECODE_PANELS[panel]
    settings = data["settings"]
    context = decode.context_tokens(settings["decode_prompt"], settings["decode_gen"])
    points: dict[str, list[tuple[float, float, float, float]]] = {}
    for run in data.get("runs", []):
        if run["task"] == task:
            x = 1.0 if run["budget_label"] == "full" else run["budget"] / context
            points.setdefault(run["policy"], []).append((x, *(scale * v for v in decode_metric(run, metric))))
    return {policy: sorted(p) for policy, p in points.items()}


def _panel_value(rows: dict[str, dict[str, Any]], task: str, tasks: list[str]) -> tuple[float, ...] | None:
    if task == PERPLEXITY_TASK:
        return (rows[task]["perplexity"],) if task in rows else None
    if task == MEAN_PANEL:
        if not tasks or any(t not in rows for t in tasks):
            return None
        return (100 * sum(rows[t]["accuracy"] for t in tasks) / len(tasks),)
    if task not in rows:
        return None
    run = rows[task]
    scores = run.get("scores", [])
    if len(scores) < 2:
        return (100 * run["accuracy"],)
    low, high = bootstrap_ci(scores)  # the interval the Markdown table prints beside this accuracy
    return 100 * run["accuracy"], 100 * low, 100 * high


def plot_results(data: dict[str, Any], path: Path, title: str | None = None) -> Path:
    """Write a PNG: one panel per task, the mean accuracy, and perplexity (log scale) if measured."""
    plt = _pyplot()
    tasks = list(data["settings"]["tasks"])
    decode_run = any(decode.is_decode_task(task) for task in tasks)
    if decode_run:
        panels = [name for name, (task, *_) in DECODE_PANELS.items() if task in tasks]
    else:
        panels = tasks + ([MEAN_PANEL] if len(tasks) > 1 else [])
    if any(r["task"] == PERPLEXITY_TASK for r in data.get("runs", [])):
        panels.append(PERPLEXITY_TASK)
    columns = min(3, len(panels))
    rows = -(-len(panels) // columns)
    # a one-panel figure still needs the width of its title and legend
    width, panels_height = max(5 * columns, 9), 3.8 * rows + 0.6
    fig, axes = plt.subplots(rows, columns, figsize=(width, panels_height), squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        if decode_run:
            task, metric, ylabel, _ = DECODE_PANELS[panel]
            _draw_panel(ax, decode_series(data, panel), panel, ylabel=ylabel,
                        title=f"{task}: {metric}" if metric != "accuracy" else task)
        else:
            _draw_panel(ax, series(data, panel), panel)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    # The legend goes under the panels, as many columns as its longest label allows, and the figure grows
    # by its rows: an ablation grid has 15 policies or more, and a fixed strip would cut them off.
    longest = max((len(label) for label in labels), default=1)
    ncol = max(1, min(len(labels), int(width / (0.075 * longest + 0.5))))
    legend_height = 0.2 * -(-len(labels) // ncol) + 0.15
    height = panels_height + legend_height
    fig.set_size_inches(width, height)
    fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    settings = data["settings"]
    length = (f"{settings['decode_prompt']} prompt + {settings['decode_gen']} decoded tokens"
              if decode_run else f"{settings['length']} tokens")
    if settings["samples"] > 1:
        length += ", 95% bootstrap bars"
    fig.suptitle(title or f"{Path(settings['model']).name}: {length}, {settings['samples']} samples per task",
                 fontsize=10)
    fig.tight_layout(rect=(0, legend_height / height, 1, 1 - 0.35 / height))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _draw_panel(ax, points: dict[str, list[tuple[float, ...]]], panel: str, ylabel: str | None = None,
                title: str | None = None) -> None:
    """One line per policy; points of four values (x, y, low, high) get error bars from low to high."""
    import matplotlib

    # The default cycle repeats after 10 policies; tab20 has 10 hues in dark/light pairs: the dark ones first.
    palette = matplotlib.colormaps["tab20"].colors
    for index, (policy, xy) in enumerate(points.items()):
        xs, ys = [p[0] for p in xy], [p[1] for p in xy]
        bars = None
        if any(len(p) == 4 for p in xy):  # a point without an interval (one sample) gets a zero-length bar
            lows, highs = [p[2] if len(p) == 4 else p[1] for p in xy], [p[3] if len(p) == 4 else p[1] for p in xy]
            bars = [[y - low for y, low in zip(ys, lows)], [high - y for y, high in zip(ys, highs)]]
        if policy == "full" or len(xs) == 1 and xs[0] == 1.0:
            ax.axhline(ys[0], color="black", linestyle="--", linewidth=1, label=policy)
            if len(xy[0]) == 4:
                ax.axhspan(xy[0][2], xy[0][3], color="black", alpha=0.08)
            continue
        style = ":" if ":" in policy else "-"  # ablations dotted
        if bars:  # dodge: policies measured at one budget would stack their bars on one vertical line
            xs = [x * DODGE ** (index - (len(points) - 1) / 2) for x in xs]
        ax.errorbar(xs, ys, yerr=bars, marker="o", linestyle=style, label=policy, capsize=3,
                    color=palette[(2 * index) % 20 + index // 10 % 2])
    ax.set_xscale("log")
    ax.set_xlabel("budget (fraction of the context)")
    budgets = sorted({p[0] for xy in points.values() for p in xy})
    if budgets:
        ax.set_xticks(budgets, [f"{x:.2g}" for x in budgets])
        ax.minorticks_off()
    if ylabel:
        ax.set_ylabel(ylabel)
        if "%" in ylabel:
            ax.set_ylim(-5, 105)
    elif panel == PERPLEXITY_TASK:
        ax.set_ylabel("perplexity (lower is better)")
    else:
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(-5, 105)
    ax.set_title(title or panel)
    ax.grid(True, alpha=0.3)

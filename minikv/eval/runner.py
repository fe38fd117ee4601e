"""Run the long-context tasks through the Engine for every policy and budget, and record the scores.

One *config* is a policy (with its options) at one budget. For each config the runner builds an Engine on
the already loaded model, sends every task sample as a user chat message (greedy), scores the answers, and
measures the perplexity of a long prose text read through the same bounded ring: the next-token loss of
the prompt while it streams in chunk by chunk and the policy evicts (``SamplingParams(prompt_logprobs=0)``).

Results go to a JSON file after every config, so a long run can stop at any time and resume where it
stopped: configs already in the file are skipped. RULER (Hsieh et al., 2024, arXiv 2404.06654) is the
model for the tasks and their exact-match scoring.

The decode-phase tasks (minikv.eval.decode) run in a run of their own: their budgets are fractions of the
prompt + forced tokens (--decode-prompt + --decode-gen), not of --length, and every sample of a config runs
in one batch. decode_fidelity's reference (the `full` cache's continuations and distributions) is computed
once and kept in a file next to the results (decode.reference_path), so a resumed run reuses it.
"""

from __future__ import annotations

import gc
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from minikv.errors import ConfigError
from minikv.eval import decode
from minikv.eval.stats import bootstrap_ci, paired_difference
from minikv.eval.tasks import Sample, generate, get_task, perplexity_text, score
from minikv.policies.spec import PolicySpec, parse_policy

# Tokens to generate per task: enough for the answer, small enough to keep CPU decoding cheap.
MAX_TOKENS = {"niah_single": 32, "niah_multikey": 32, "niah_multivalue": 64, "niah_multiquery": 64,
              "vt": 64, "cwe": 96}
# Tokens the chat template adds around the user message (ChatML: about a dozen); checked against the model.
TEMPLATE_MARGIN = 64
PERPLEXITY_TASK = "perplexity"
RESULTS_VERSION = 1


# --- what to run -----------------------------------------------------------------------------------


def parse_policies(text: str) -> list[PolicySpec]:
    """Policies separated by spaces or by commas outside a ``name:options`` group.

    ``nexus,h2o,nexus:gamma=0,full`` splits into nexus, h2o, nexus:gamma=0, full: a comma starts a new
    policy when the text after it is a policy name rather than ``key=value``.
    """
    specs, current = [], ""
    for piece in text.replace(" ", ",").split(","):
        if not piece:
            continue
        if current and "=" in piece and ":" not in piece:
            current += "," + piece  # another option of the current policy
        else:
            if current:
                specs.append(parse_policy(current))
            current = piece
    if current:
        specs.append(parse_policy(current))
    if not specs:
        raise ConfigError("--policies is empty; give at least one policy, e.g. --policies nexus,full")
    labels = [spec.label for spec in specs]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"--policies names a policy twice: {', '.join(labels)}")
    return specs


def parse_budgets(text: str) -> list[float]:
    """Comma-separated budgets: a value <= 1 is a fraction of --length, a value > 1 a number of tokens."""
    values = []
    for piece in filter(None, (p.strip() for p in text.split(","))):
        try:
            value = float(piece)
        except ValueError:
            raise ConfigError(f"budget {piece!r} is not a number; use fractions like 0.1 or tokens like 512") from None
        if value <= 0:
            raise ConfigError(f"budget {piece} must be positive (a fraction in (0, 1] or a number of tokens)")
        if value > 1 and value != int(value):
            raise ConfigError(f"budget {piece} is above 1, so it counts tokens and must be a whole number; "
                              "fractions of the length go in (0, 1]")
        values.append(value)
    if not values:
        raise ConfigError("--budgets is empty; give e.g. --budgets 0.1,0.2,0.5")
    return values


def resolve_budget(value: float, length: int, protected: int) -> int:
    """Budget in tokens for a value of --budgets: fraction of ``length`` when <= 1, tokens otherwise."""
    tokens = round(value * length) if value <= 1 else int(value)
    if tokens >= length:
        raise ConfigError(f"budget {value:g} is {tokens} tokens, not below --length {length}: nothing would be "
                          "evicted. Use a smaller budget; the `full` policy is the no-eviction reference")
    if tokens <= protected:
        raise ConfigError(f"budget {value:g} is {tokens} tokens, but the sinks and the recent window already "
                          f"take {protected}: raise the budget or lower --n-sink/--window")
    return tokens


@dataclass(frozen=True)
class RunConfig:
    """One policy at one budget: the unit that is run, stored and skipped on resume."""

    policy: PolicySpec
    budget: int  # tokens; for `full` the whole context
    budget_label: str  # "0.1", "512" or "full"

    @property
    def key(self) -> str:
        return f"{self.policy.label}@{self.budget_label}"


def plan_configs(policies: list[PolicySpec], budgets: list[float], length: int, protected: int) -> list[RunConfig]:
    """Every policy at every budget; a policy that never evicts (`full`) runs once."""
    from minikv.policies import POLICIES

    configs = []
    for spec in policies:
        if not POLICIES[spec.name].evicts:
            configs.append(RunConfig(spec, length, "full"))
            continue
        for value in budgets:
            configs.append(RunConfig(spec, resolve_budget(value, length, protected), f"{value:g}"))
    return configs


def check_configs(configs: list[RunConfig], chunk: int, n_sink: int, window: int) -> None:
    """Refuse a budget before any model is loaded, by the engine's own rules (minikv.block_pool.check_budget:
    budget > n_sink + window, and each policy's own, e.g. epikv needs budget >= n_sink + chunk)."""
    from minikv.block_pool import check_budget
    from minikv.policies import make_policy

    for config in configs:
        policy = make_policy(config.policy.name, n_sink=n_sink, window=window, **config.policy.options)
        if policy.evicts:
            check_budget(config.budget, chunk, policy)


@dataclass
class EvalSettings:
    """Everything that fixes the numbers of a run (stored in the JSON; resume requires them equal)."""

    model: str
    length: int
    tasks: list[str]
    samples: int
    seed: int = 0
    haystack: str = "prose"
    perplexity: bool = True
    chunk: int = 512
    n_sink: int = 4
    window: int = 64
    max_num_seqs: int = 4
    dtype: str | None = None
    max_model_len: int | None = None  # --max-model-len; None: the model's trained context
    positions: str | None = None  # --positions of the evicting configs; None: the engine's default
    # Decode-phase runs only (None otherwise, so that files of prefill runs keep their settings)
    decode_prompt: int | None = None  # --decode-prompt: tokens prefilled
    decode_gen: int | None = None  # --decode-gen: tokens forced through decode
    tensor_parallel_size: int = 1  # --tensor-parallel-size: the same numbers up to float rounding
    archive: float = 0.0  # --archive: evicting configs keep a KV archive of this many times their budget
    recall_interval: int = 16  # --recall-interval: decode steps between recalls from the archive
    recall_rule: list | None = None  # --recall-rule: [share, votes, span] (None: RecallRule's defaults)

    @property
    def is_decode(self) -> bool:
        """A run of decode-phase tasks (they do not mix with the prefill tasks, see the module doc)."""
        return bool(self.tasks) and decode.is_decode_task(self.tasks[0])

    @property
    def budget_context(self) -> int:
        """What a budget fraction is a fraction of: --length, or prompt + forced tokens of a decode run."""
        return decode.context_tokens(self.decode_prompt, self.decode_gen) if self.is_decode else self.length

    def check(self) -> None:
        kinds = {decode.is_decode_task(task) for task in self.tasks}
        if len(kinds) > 1:
            raise ConfigError(f"--tasks mixes decode-phase tasks ({', '.join(decode.DECODE_TASKS)}) with prefill "
                              "tasks: their budgets are fractions of different contexts, so run them in two runs "
                              "with two --output files")
        for task in self.tasks:
            if not decode.is_decode_task(task):
                get_task(task)  # unknown task -> ConfigError listing the known ones
        if self.is_decode:
            decode.check_lengths(self.decode_prompt, self.decode_gen)
            if self.perplexity:
                raise ConfigError("perplexity is a prefill measure; a decode-phase run has none (its decode "
                                  "counterpart is decode_fidelity's NLL): set perplexity=False")
        if not self.tasks and not self.perplexity:
            raise ConfigError("nothing to measure: give at least one task or leave perplexity on")
        if self.samples < 1:
            raise ConfigError(f"--samples must be at least 1, got {self.samples}")
        if self.max_num_seqs < 1:
            raise ConfigError(f"--max-num-seqs must be at least 1, got {self.max_num_seqs}")


def check_context(length: int, max_context: int, tasks: list[str]) -> None:
    """The prompt, its chat template and the answer must fit the model's context window."""
    needed = length + TEMPLATE_MARGIN + max((MAX_TOKENS.get(t, 64) for t in tasks), default=1)
    if needed > max_context:
        raise ConfigError(f"--length {length} is beyond the model's context: prompt + chat template + answer "
                          f"need about {needed} tokens, the model has {max_context}. Use --length "
                          f"{max_context - (needed - length)} or less")


# --- running ---------------------------------------------------------------------------------------


@dataclass
class Workload:
    """The prompts of one run, generated once and reused for every config."""

    samples: dict[str, list[Sample]]
    perplexity_ids: list[int] | None
    decode_samples: dict[str, list[decode.DecodeSample]] | None = None
    reference: decode.FidelityReference | None = None

    @property
    def longest_decode_request(self) -> int:
        """Prompt + forced + answer tokens of the longest decode sample: what a `full` ring must hold."""
        return max(len(s.prompt_ids) + len(s.forced_ids) + s.answer_tokens
                   for samples in self.decode_samples.values() for s in samples)


def build_workload(settings: EvalSettings, tokenizer) -> Workload:
    """The prompts of a prefill run, or the samples of a decode run (decode_fidelity's still without their
    forced continuation: ``add_reference`` brings it)."""
    if settings.is_decode:
        return Workload({}, None, {task: [decode.generate_decode_sample(task, tokenizer, settings.decode_prompt,
                                                                         settings.decode_gen, settings.seed + i)
                                          for i in range(settings.samples)] for task in settings.tasks})
    samples = {task: [generate(task, tokenizer, settings.length, settings.seed + i, settings.haystack)
                      for i in range(settings.samples)] for task in settings.tasks}
    ppl_ids = None
    if settings.perplexity:
        text = perplexity_text(tokenizer, settings.length, settings.seed)
        ppl_ids = tokenizer.encode(text, add_special_tokens=False)
    return Workload(samples, ppl_ids)


def add_reference(loaded, settings: EvalSettings, work: Workload, results_path: Path) -> None:
    """decode_fidelity's reference: read from its file next to ``results_path`` when it was made with these
    settings, computed with the `full` policy (all samples in one batch) and saved there otherwise."""
    if "decode_fidelity" not in (work.decode_samples or {}):
        return
    from minikv.engine import Engine

    samples = work.decode_samples["decode_fidelity"]
    key = {name: getattr(settings, name) for name in ("model", "seed", "samples", "dtype", "decode_prompt",
                                                      "decode_gen", "chunk")}
    key.update(top_k=decode.REFERENCE_TOP_K, no_repeat_ngram=decode.NO_REPEAT_NGRAM)

    def compute() -> decode.FidelityReference:
        engine = Engine(loaded, policy="full", chunk=settings.chunk, max_num_seqs=len(samples),
                        max_model_len=min(context_limit(loaded, settings), settings.decode_prompt + settings.decode_gen),
                        seed=settings.seed, tensor_parallel_size=settings.tensor_parallel_size)
        return decode.compute_reference(engine, samples, settings.decode_gen, key=key)

    work.reference = decode.load_or_compute_reference(decode.reference_path(results_path), key, compute)
    work.decode_samples["decode_fidelity"] = decode.with_reference(samples, work.reference)


def _engine(loaded, settings: EvalSettings, config: RunConfig, work: Workload):
    from minikv.archive import RecallRule
    from minikv.engine import Engine

    if settings.tensor_parallel_size > 1:
        gc.collect()  # the last config's engine, if unreachable, ends its ranks before this one starts its own

    max_num_seqs = settings.max_num_seqs
    if settings.is_decode:  # every sample of the config in one batch: batching is what makes decode affordable
        max_num_seqs = max(max_num_seqs, sum(len(s) for s in work.decode_samples.values()))
    max_model_len = _max_model_len(loaded, settings, work)
    # The default pool holds max_num_seqs rings of `budget` slots; a `full` ring is its whole request, so
    # give full a budget of whole requests, or the samples would run in waves.
    budget = config.budget if config.budget_label != "full" else max(config.budget, max_model_len)
    return Engine(loaded, budget=budget, policy=config.policy.name, chunk=settings.chunk,
                  n_sink=settings.n_sink, window=settings.window, max_num_seqs=max_num_seqs,
                  max_model_len=max_model_len, seed=settings.seed, policy_options=dict(config.policy.options),
                  positions=None if config.policy.name == "full" else settings.positions,
                  tensor_parallel_size=settings.tensor_parallel_size,
                  archive_budget=0 if config.policy.name == "full" else round(settings.archive * config.budget),
                  recall_interval=settings.recall_interval,
                  recall_rule=None if settings.recall_rule is None else RecallRule(*settings.recall_rule))


def run_config(loaded, settings: EvalSettings, config: RunConfig, work: Workload,
               on_request_done: Callable[[], None] = lambda: None) -> list[dict[str, Any]]:
    """Run one config; returns one record per task (accuracy, or decode_fidelity's metrics) and one for
    perplexity."""
    from minikv.sampling import SamplingParams

    started = time.perf_counter()
    engine = _engine(loaded, settings, config, work)
    if settings.is_decode:
        return _run_decode_config(engine, config, work, on_request_done, started)
    requests: dict[str, tuple[str, Sample | None]] = {}
    for task, samples in work.samples.items():
        params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS.get(task, 64))
        for i, sample in enumerate(samples):
            rid = engine.add_request([{"role": "user", "content": sample.prompt}], params, request_id=f"{task}/{i}")
            requests[rid] = (task, sample)
    if work.perplexity_ids is not None:
        engine.add_request(work.perplexity_ids, SamplingParams(max_tokens=1, ignore_eos=True, prompt_logprobs=0),
                           request_id=PERPLEXITY_TASK)
        requests[PERPLEXITY_TASK] = (PERPLEXITY_TASK, None)
    finished = _drain(engine, set(requests), on_request_done)
    seconds = time.perf_counter() - started
    records = [_task_record(config, task, [(requests[f"{task}/{i}"][1], finished[f"{task}/{i}"])
                                           for i in range(len(samples))], seconds)
               for task, samples in work.samples.items()]
    if PERPLEXITY_TASK in finished:
        records.append(_perplexity_record(config, finished[PERPLEXITY_TASK], seconds))
    return records


def context_limit(loaded, settings: EvalSettings) -> int:
    """The longest context the run may use: --max-model-len, else the model's trained context."""
    return settings.max_model_len or loaded.config.max_position_embeddings


def _max_model_len(loaded, settings: EvalSettings, work: Workload) -> int:
    """Only as much context as the run needs: `full` rings are allocated at this size."""
    if settings.is_decode:
        needed = work.longest_decode_request
    else:
        needed = int(settings.length * 1.05) + TEMPLATE_MARGIN + max(MAX_TOKENS.values())
    return min(context_limit(loaded, settings), needed)


def check_decode_context(work: Workload, max_context: int) -> None:
    """Every decode sample (prompt, forced tokens and answer) must fit the model's context window."""
    needed = work.longest_decode_request
    if needed > max_context:
        raise ConfigError(f"--decode-prompt + --decode-gen are beyond the model's context: the longest sample "
                          f"needs {needed} tokens (chat template and answer included), the model has "
                          f"{max_context}; lower --decode-gen or --decode-prompt")


def _run_decode_config(engine, config: RunConfig, work: Workload, on_request_done, started: float):
    requests = decode.add_decode_requests(engine, work.decode_samples, work.reference)
    finished = _drain(engine, set(requests), on_request_done)
    seconds = time.perf_counter() - started
    records = decode.decode_records(requests, finished, work.reference, engine.tokenizer)
    return [{**_base_record(config, task, seconds), **records[task]} for task in work.decode_samples]


def _drain(engine, request_ids: set[str], on_request_done: Callable[[], None]) -> dict[str, Any]:
    finished: dict[str, Any] = {}
    while len(finished) < len(request_ids) and engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished and out.request_id in request_ids and out.request_id not in finished:
                finished[out.request_id] = out
                on_request_done()
    return finished


def _base_record(config: RunConfig, task: str, seconds: float) -> dict[str, Any]:
    return {"key": config.key, "policy": config.policy.label, "policy_name": config.policy.name,
            "policy_options": config.policy.options, "budget": config.budget, "budget_label": config.budget_label,
            "task": task, "config_seconds": round(seconds, 1)}


def _task_record(config: RunConfig, task: str, pairs: list, seconds: float) -> dict[str, Any]:
    texts = [out.outputs[0].text for _, out in pairs]
    scores = [score(sample, text) for (sample, _), text in zip(pairs, texts)]
    return {**_base_record(config, task, seconds), "accuracy": sum(scores) / len(scores), "scores": scores,
            "outputs": texts, "answers": [sample.answers for sample, _ in pairs]}


def _perplexity_record(config: RunConfig, out, seconds: float) -> dict[str, Any]:
    # prompt_logprobs[0] is None (the first token has no context); each later entry holds the token's own.
    logprobs = [entry[token].logprob for token, entry in zip(out.prompt_token_ids, out.prompt_logprobs or [])
                if entry is not None]
    nll = -sum(logprobs) / max(1, len(logprobs))
    return {**_base_record(config, PERPLEXITY_TASK, seconds), "nll": nll, "perplexity": math.exp(nll),
            "tokens": len(logprobs)}


# --- the results file ------------------------------------------------------------------------------


def load_results(path: Path, settings: EvalSettings) -> dict[str, Any]:
    """The results so far in ``path`` (empty if absent); a file made with other settings is refused."""
    fresh = {"version": RESULTS_VERSION, "settings": asdict(settings), "runs": []}
    if not path.exists():
        return fresh
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"cannot read results file {path} ({err}); move it away or pass another --output") from None
    stored = data.get("settings", {})
    # files written before these fields existed ran with these values
    defaults = {"tensor_parallel_size": 1, "archive": 0.0, "recall_interval": 16, "recall_rule": None}
    differing = sorted(k for k, v in asdict(settings).items() if stored.get(k, defaults.get(k)) != v)
    if differing:
        raise ConfigError(f"{path} holds results of a run with other settings ({', '.join(differing)}); "
                          "pass another --output, or --overwrite to start it again")
    return data


def save_results(path: Path, data: dict[str, Any]) -> None:
    """Write atomically, so an interrupted run never leaves a truncated file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def done_keys(data: dict[str, Any]) -> set[str]:
    return {run["key"] for run in data.get("runs", [])}


# --- reporting -------------------------------------------------------------------------------------


def markdown_table(data: dict[str, Any]) -> str:
    """One row per config: accuracy per task (in %, with its bootstrap interval over samples), their mean,
    and the perplexity; for a decode run, the decode metrics with their intervals (``decode_table``)."""
    runs = data.get("runs", [])
    if any(decode.is_decode_task(run["task"]) for run in runs):
        return decode_table(data)
    tasks = list(dict.fromkeys(r["task"] for r in runs if r["task"] != PERPLEXITY_TASK))
    has_ppl = any(r["task"] == PERPLEXITY_TASK for r in runs)
    header = ["policy", "budget"] + tasks + (["mean"] if tasks else []) + (["perplexity"] if has_ppl else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key, rows in _group_by_key(runs).items():
        first = next(iter(rows.values()))
        budget = "full" if first["budget_label"] == "full" else f"{first['budget_label']} ({first['budget']})"
        cells = [first["policy"], budget]
        accuracies = [rows[t]["accuracy"] for t in tasks if t in rows]
        cells += [_accuracy_cell(rows[t]) if t in rows else "–" for t in tasks]
        if tasks:
            cells.append(f"{100 * sum(accuracies) / len(accuracies):.0f}" if len(accuracies) == len(tasks) else "–")
        if has_ppl:
            cells.append(f"{rows[PERPLEXITY_TASK]['perplexity']:.2f}" if PERPLEXITY_TASK in rows else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _accuracy_cell(run: dict[str, Any]) -> str:
    """Accuracy in %, with the 95% bootstrap interval over the samples' scores when there are several."""
    cell = f"{100 * run['accuracy']:.0f}"
    scores = run.get("scores", [])
    if len(scores) > 1:
        low, high = bootstrap_ci(scores)
        cell += f" [{100 * low:.0f}, {100 * high:.0f}]"
    return cell


def _group_by_key(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    grouped: dict[str, dict[str, dict[str, Any]]] = {}
    for run in runs:
        grouped.setdefault(run["key"], {})[run["task"]] = run
    return grouped


# Decode-run columns: (header, task, metric, scale, decimals); decode_fidelity's metrics, then accuracies.
DECODE_COLUMNS = (("KL(full‖policy)", "decode_fidelity", "kl", 1, 4), ("top-1 agree %", "decode_fidelity", "top1", 100, 1),
                  ("NLL", "decode_fidelity", "nll", 1, 3), ("needle_after_gen %", "needle_after_gen", "accuracy", 100, 0),
                  ("multiturn %", "multiturn", "accuracy", 100, 0))


def decode_metric(run: dict[str, Any], metric: str) -> tuple[float, float, float]:
    """(mean, low, high) of one metric of a decode record: decode_fidelity keeps {"mean", "ci"} per metric,
    the answer tasks "accuracy" and "accuracy_ci"."""
    if metric == "accuracy":
        return run["accuracy"], *run["accuracy_ci"]
    return run[metric]["mean"], *run[metric]["ci"]


def decode_table(data: dict[str, Any], baseline: str = "full") -> str:
    """One row per config: each decode metric as ``mean [low, high]`` (95% bootstrap interval over samples),
    and, when the ``baseline`` policy ran, decode_fidelity's NLL increase over it, paired by sample."""
    runs = data.get("runs", [])
    grouped = _group_by_key(runs)
    present = {run["task"] for run in runs}
    columns = [c for c in DECODE_COLUMNS if c[1] in present]
    base = next((rows for rows in grouped.values() if next(iter(rows.values()))["policy"] == baseline), None)
    paired = base is not None and "decode_fidelity" in base
    header = ["policy", "budget"] + [c[0] for c in columns] + ([f"ΔNLL vs {baseline} (paired)"] if paired else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for rows in grouped.values():
        first = next(iter(rows.values()))
        budget = "full" if first["budget_label"] == "full" else f"{first['budget_label']} ({first['budget']})"
        cells = [first["policy"], budget]
        for _, task, metric, scale, decimals in columns:
            if task not in rows:
                cells.append("–")
                continue
            value, low, high = (scale * x for x in decode_metric(rows[task], metric))
            cells.append(f"{value:.{decimals}f} [{low:.{decimals}f}, {high:.{decimals}f}]")
        if paired:
            cells.append(_paired_nll(rows.get("decode_fidelity"), base["decode_fidelity"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _paired_nll(run: dict[str, Any] | None, base: dict[str, Any]) -> str:
    if run is None:
        return "–"
    difference = paired_difference(run["per_sample"]["nll"], base["per_sample"]["nll"])
    low, high = difference["ci"]
    return f"{difference['mean']:+.4f} [{low:+.4f}, {high:+.4f}]"

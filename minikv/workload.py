"""The synthetic load that `minikv bench` runs in-process and `minikv bench --url` sends to a server.

Requests are random token ids with lengths drawn from ranges and arrival times from a Poisson process; each
generates exactly its drawn number of tokens, so two runs of the same load do the same work. Percentiles
are computed the same way for both.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from .errors import ConfigError

PERCENTILES = (50, 90, 99)


@dataclass
class SyntheticRequest:
    prompt_ids: list[int]
    max_tokens: int
    arrival_s: float  # seconds after the start of the run


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


def percentile(values: list[float], p: float) -> float:
    """Linear-interpolated percentile (numpy's default); 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


# --- what `minikv bench` and its chat preset (minikv.bench_chat) share --------------------------------


class UnsetInt(int):
    """The default of a shared engine flag (--budget, --max-num-seqs), told apart from a value the user gave,
    so that a preset replaces the first and never the second. Prints as the plain number in --help."""


def model_of(args) -> str | None:
    """MODEL as a positional argument or as --model (the flag `minikv run` and `eval` take)."""
    if args.model and args.model_flag and args.model != args.model_flag:
        raise ConfigError(f"two models given ({args.model!r} and --model {args.model_flag!r}); give one")
    return args.model or args.model_flag


def warm_up(engine) -> None:
    """One short request first, so that one-time costs (kernel compilation, allocator) stay out of the numbers."""
    from .sampling import SamplingParams

    engine.generate([[1] * 8], SamplingParams(max_tokens=2, ignore_eos=True), use_tqdm=False)

"""SamplingParams: how one request chooses its tokens and when it stops (vLLM's names and meanings).

The parameters are checked when they are built, so a bad value fails at the caller with an
InvalidRequestError naming the field, never inside an engine step. How they are applied to logits is
minikv.sampling's job.
"""

from __future__ import annotations

import enum
import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from minikv.errors import InvalidRequestError

# Temperatures below this are greedy (vLLM uses the same threshold): dividing by them would overflow.
GREEDY_TEMPERATURE_EPS = 1e-5
MAX_STOP_STRINGS = 32
MAX_LOGPROBS = 20
# OpenAI's and vLLM's range for presence and frequency penalties.
MAX_ABS_PRESENCE_FREQUENCY_PENALTY = 2.0


class RequestOutputKind(enum.Enum):
    """How much each RequestOutput of a request carries (vLLM's names)."""

    CUMULATIVE = 0  # all text and tokens so far, every time
    DELTA = 1  # only what is new since the request's previous output (streams, servers)
    FINAL_ONLY = 2  # one output, when the request finishes


@dataclass
class SamplingParams:
    """How one request chooses its tokens and when it stops (vLLM's names and meanings).

    temperature: 0 means greedy (argmax); higher flattens the distribution.
    top_k: keep the k most likely tokens; 0 or -1 turns it off.
    top_p: keep the smallest set of most likely tokens whose probability reaches top_p (nucleus
        sampling, Holtzman et al. 2020); 1 turns it off.
    min_p: drop tokens whose probability is below min_p times the most likely one's (Nguyen et al.
        2024, "Turning up the heat: min-p sampling"); 0 turns it off.
    repetition_penalty: > 1 discourages tokens already in the prompt or output (Keskar et al. 2019,
        CTRL): positive logits are divided by it, negative ones multiplied.
    presence_penalty / frequency_penalty: subtracted from the logit of each token already in the output,
        once / once per occurrence (OpenAI's definition); in [-2, 2].
    stop: strings that end the output when generated (normalised to a list); at most 32, none empty.
    stop_token_ids: token ids that end the output.
    include_stop_str_in_output: keep the matched stop string in the returned text.
    max_tokens: most tokens to generate (>= 1).
    min_tokens: EOS and stop_token_ids cannot be sampled before this many tokens are generated.
    seed: makes this request's samples reproducible; with None the engine picks one.
    ignore_eos: keep generating after EOS (EOS is then an ordinary token).
    logprobs: return this many top logprobs per generated token, plus the chosen token's (0 to 20).
    prompt_logprobs: the same for every prompt token after the first (0 to 20; 0 = the token's own only).
    skip_special_tokens: leave special tokens out of the decoded text.
    output_kind: what each RequestOutput carries: everything so far (CUMULATIVE), what is new (DELTA), or
        one output at the end (FINAL_ONLY).
    kv_budget: minikv's own: the most KV slots per layer and KV head this request may hold (None = the
        engine's budget); the engine refuses values outside [n_sink + window + 1, its budget].
    positions: minikv's own: the positions RoPE gives the ring's tokens (None: the session's mode, else the
        engine's, "ring" by default for evicting policies). "original":
        each token's position in the text. "ring": the ring's kept tokens take consecutive positions in
        their order and the query the next one, so no distance exceeds the ring, and a request may run
        past max_model_len (the ring's memory is the bound). Only an evicting policy takes "ring".
    archive_budget: minikv's own: keep the request's last this-many tokens' K/V in a host-memory archive and
        recall from it the evicted tokens its queries need (minikv.archive); 0 = off, None = the engine's
        (Engine archive_budget, default 0). Needs an evicting policy (any position mode, any number of ranks).
    logits_processors: functions `fn(output_token_ids: list[int], logits: Tensor[vocab]) -> Tensor[vocab]`
        applied in order to this request's fp32 logits at every step, before penalties, temperature and the
        filters (vLLM's per-request logits processors). They see the raw logits, so they can record the
        model's distribution, and may constrain it (e.g. force a token: -inf everywhere else). They cost a
        Python call per step for the requests that have them; logprobs stay those of the raw logits.
    forced_token_ids: teacher forcing through the decode path. The first len(forced_token_ids) output
        tokens are these ids, whatever the model would have picked; after them the request samples as
        usual. Every forced token is one decode step: the model computes its logits, logits processors see
        them (processors run first; forcing replaces the sampled token last), and logprobs are those of the
        raw distribution at the forced token, so `logprobs=0` gives each forced token's log-likelihood.
        Forced tokens count towards max_tokens (which must be at least their number) and cannot end the
        request: EOS, stop_token_ids and stop strings inside the forced part are ignored (as under
        min_tokens), and the first sampled token is checked as usual. Use it to measure a cache on a known
        continuation, or to replay a conversation's earlier turns token by token.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    max_tokens: int = 256
    min_tokens: int = 0
    seed: int | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    kv_budget: int | None = None
    positions: str | None = None
    archive_budget: int | None = None
    logits_processors: list[Callable[[list[int], torch.Tensor], torch.Tensor]] | None = None
    forced_token_ids: list[int] | None = None

    def __post_init__(self) -> None:
        self.logits_processors = _normalise_processors(self.logits_processors)
        self.forced_token_ids = _normalise_token_ids("forced_token_ids", self.forced_token_ids)
        self.stop = _normalise_stop(self.stop)
        self.stop_token_ids = _normalise_token_ids("stop_token_ids", self.stop_token_ids)
        self._validate_numbers()

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE_EPS

    def _validate_numbers(self) -> None:
        for name in ("temperature", "top_p", "min_p", "repetition_penalty",
                     "presence_penalty", "frequency_penalty"):
            _require_real(name, getattr(self, name))
        for name in ("top_k", "max_tokens", "min_tokens"):
            _require_int(name, getattr(self, name))
        for name in ("include_stop_str_in_output", "ignore_eos", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):  # "false" would be truthy
                _bad(name, getattr(self, name), "must be True or False")

        if not self.temperature >= 0:
            _bad("temperature", self.temperature, "must be >= 0 (use 0 for greedy decoding)")
        if not 0 < self.top_p <= 1:
            _bad("top_p", self.top_p, "must be in (0, 1] (use 1 to turn nucleus sampling off)")
        if self.top_k < -1:
            _bad("top_k", self.top_k, "must be >= 1, or 0 or -1 to turn top-k off")
        if not 0 <= self.min_p <= 1:
            _bad("min_p", self.min_p, "must be in [0, 1] (use 0 to turn min-p off)")
        if not self.repetition_penalty > 0:
            _bad("repetition_penalty", self.repetition_penalty, "must be > 0 (1 means no penalty)")
        for name in ("presence_penalty", "frequency_penalty"):
            if not abs(getattr(self, name)) <= MAX_ABS_PRESENCE_FREQUENCY_PENALTY:
                _bad(name, getattr(self, name), "must be in [-2, 2] (0 means no penalty)")
        if self.max_tokens < 1:
            _bad("max_tokens", self.max_tokens, "must be >= 1")
        if not 0 <= self.min_tokens <= self.max_tokens:
            _bad("min_tokens", self.min_tokens, f"must be in [0, max_tokens={self.max_tokens}]")
        if len(self.forced_token_ids) > self.max_tokens:
            _bad("forced_token_ids", f"<{len(self.forced_token_ids)} ids>",
                 f"must hold at most max_tokens={self.max_tokens} ids (forced tokens count towards max_tokens)")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None:
                _require_int(name, value)
                if not 0 <= value <= MAX_LOGPROBS:
                    _bad(name, value, f"must be in [0, {MAX_LOGPROBS}], or None for no logprobs")
        if not isinstance(self.output_kind, RequestOutputKind):
            _bad("output_kind", self.output_kind, "must be a RequestOutputKind (CUMULATIVE, DELTA or FINAL_ONLY)")
        if self.kv_budget is not None:
            _require_int("kv_budget", self.kv_budget)
            if self.kv_budget < 1:
                _bad("kv_budget", self.kv_budget, "must be a positive number of KV slots, or None for the engine's")
            self.kv_budget = int(self.kv_budget)
        if self.positions is not None and self.positions not in ("original", "ring"):
            _bad("positions", self.positions, "must be 'original', 'ring', or None for the engine's")
        if self.archive_budget is not None:
            _require_int("archive_budget", self.archive_budget)
            if self.archive_budget < 0:
                _bad("archive_budget", self.archive_budget, "must be a number of tokens >= 0 (0 = no archive)")
            self.archive_budget = int(self.archive_budget)
        if self.seed is not None:
            _require_int("seed", self.seed)
            self.seed = int(self.seed)


def _bad(name: str, value: object, rule: str) -> None:
    raise InvalidRequestError(f"SamplingParams.{name}={value!r} is invalid: it {rule}.")


def _require_real(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value):
        _bad(name, value, "must be a number")


def _require_int(name: str, value: object) -> None:
    # bool is an int subclass, but seed=True is surely a mistake.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        _bad(name, value, "must be an integer")


def _normalise_processors(processors) -> list:
    if processors is None:
        return []
    processors = [processors] if callable(processors) else list(processors)
    for fn in processors:
        if not callable(fn):
            _bad("logits_processors", processors, "must hold callables fn(output_token_ids, logits) -> logits")
    return processors


def _normalise_stop(stop: str | Sequence[str] | None) -> list[str]:
    if stop is None:
        return []
    if not isinstance(stop, (str, list, tuple)):
        _bad("stop", stop, "must be a string or a list of strings")
    stops = [stop] if isinstance(stop, str) else list(stop)
    if len(stops) > MAX_STOP_STRINGS:
        _bad("stop", f"<{len(stops)} strings>", f"must hold at most {MAX_STOP_STRINGS} stop strings")
    for s in stops:
        if not isinstance(s, str) or not s:
            _bad("stop", stop, "must hold non-empty strings only")
    return stops


def _normalise_token_ids(name: str, ids: Sequence[int] | None) -> list[int]:
    if ids is None:
        return []
    if not isinstance(ids, (list, tuple)):
        _bad(name, ids, "must be a list of token ids")
    ids = list(ids)
    for token_id in ids:
        if isinstance(token_id, bool) or not isinstance(token_id, numbers.Integral) or token_id < 0:
            _bad(name, ids[:8], "must hold non-negative integer token ids")
    return [int(t) for t in ids]

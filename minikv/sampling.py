"""Sampling: per-request parameters and a batched sampler that turns logits into next tokens.

Users describe how a request samples with `SamplingParams` (the names and meanings of vLLM's). Each
engine step, the engine gathers its running requests into one `SamplingBatch` (a few small tensors built
from Python lists once per step) and calls `Sampler` on the logits of the whole batch. The sampler then
runs on the device end to end: no per-request loop, no `.item()`, no host synchronisation.

Order of operations (as in vLLM):

    raw logits ──► logprobs (log_softmax of the raw logits, see below)
        │
        ├─ min_tokens: stop tokens get -inf until the request has min_tokens outputs
        ├─ repetition penalty (prompt and output tokens)
        ├─ presence and frequency penalties (output tokens)
        ├─ temperature
        ├─ top_k, then top_p, then min_p
        ├─ sample: argmax for greedy rows, Gumbel-max with counter-based noise for the others
        └─ forced tokens: rows still in their forced_token_ids emit the forced id instead

Logprobs are those of the model's own distribution, log_softmax of the raw logits, before penalties,
temperature and filters. This is vLLM's default (`logprobs_mode="raw_logprobs"`): the numbers then mean
"how likely the model found this token", comparable across sampling settings.

Randomness is counter-based (see minikv.hashing): the uniform number for vocabulary id v of a request at
step t is hash_uniform(seed, t, v). A request's sample therefore depends only on its seed, its step and
its logits, never on which other requests share the batch or where it sits in it.
"""

from __future__ import annotations

import enum
import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from minikv.errors import InvalidRequestError
from minikv.hashing import MASK32, absorb, absorb_mixed, finalize, mix_word, uniform_from_hash

# Temperatures below this are greedy (vLLM uses the same threshold): dividing by them would overflow.
GREEDY_TEMPERATURE_EPS = 1e-5
MAX_STOP_STRINGS = 32
MAX_LOGPROBS = 20
# OpenAI's and vLLM's range for presence and frequency penalties.
MAX_ABS_PRESENCE_FREQUENCY_PENALTY = 2.0


# --------------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------------


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
    positions: minikv's own: the positions RoPE gives the ring's tokens (None = the engine's). "original":
        each token's position in the text. "ring": the ring's kept tokens take consecutive positions in
        their order and the query the next one, so no distance exceeds the ring, and a request may run
        past max_model_len (the ring's memory is the bound). Only an evicting policy takes "ring".
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


# --------------------------------------------------------------------------------------------------
# The batch the sampler sees
# --------------------------------------------------------------------------------------------------


TokenIds = Sequence[int] | torch.Tensor


@dataclass(frozen=True)
class SamplingRow:
    """What the sampler needs to know about one request (one row of the logits) at this step.

    seed: the request's effective seed, fixed for its whole life: params.seed if set, otherwise one
        the engine drew when it admitted the request. Any Python int (folded to 32 bits).
    eos_token_ids: the model's end-of-sequence ids, suppressed while output is shorter than
        min_tokens (unless ignore_eos, when EOS does not end the output and needs no suppressing).
    The step index is len(output_token_ids): the number of tokens generated so far.
    """

    params: SamplingParams
    prompt_token_ids: TokenIds
    output_token_ids: TokenIds
    seed: int
    eos_token_ids: Sequence[int] = ()

    @property
    def step(self) -> int:
        return len(self.output_token_ids)


@dataclass(frozen=True)
class SamplingBatch:
    """Per-row sampling parameters of one step as device tensors of shape [N], the rows' token history as
    [N, vocab] tensors where a stage needs it, and host-side flags.

    The engine builds it from its persistent batch (`InputBatch.sampling_batch`: a gather of the running
    requests' rows, with token counts kept up to date incrementally); `SamplingBatch.from_rows` builds the
    same thing from Python lists (tests, one-off use). The boolean `uses_*` flags are known on the host from
    the Python parameters, so the sampler skips unused stages without looking at tensor values.
    """

    temperature: torch.Tensor  # fp32; 1.0 on greedy rows so that dividing by it is harmless
    greedy: torch.Tensor  # bool
    top_k: torch.Tensor  # int64; 0 = off
    top_p: torch.Tensor  # fp32; 1.0 = off
    min_p: torch.Tensor  # fp32; 0.0 = off
    repetition_penalty: torch.Tensor  # fp32
    presence_penalty: torch.Tensor  # fp32
    frequency_penalty: torch.Tensor  # fp32
    seed: torch.Tensor  # int64 in [0, 2^32)
    step: torch.Tensor  # int64: tokens generated so far
    suppressed: torch.Tensor | None  # [N, V] bool: stop tokens of rows still under min_tokens (None: no row)
    prompt_mask: torch.Tensor | None  # [N, V] bool: prompt tokens (None: no row has a repetition penalty)
    output_counts: torch.Tensor | None  # [N, V] int32: output token counts (None: no row has a penalty)
    all_greedy: bool
    uses_top_k: bool
    uses_top_p: bool
    uses_min_p: bool
    max_logprobs: int  # the most top logprobs any row asked for; 0 = none
    num_rows: int
    # (row, its logits processors, its output token ids so far) for the rows that have processors
    processors: tuple[tuple[int, tuple, TokenIds], ...] = ()
    # [N] int64: the token each row must emit this step (SamplingParams.forced_token_ids), -1 where the row
    # samples; None when no row is forced this step
    forced: torch.Tensor | None = None

    @classmethod
    def from_rows(cls, rows: Sequence[SamplingRow], device: torch.device | str = "cpu",
                  vocab_size: int | None = None) -> SamplingBatch:
        """Gather the rows' parameters into device tensors. `vocab_size` is needed only when a row has a
        penalty or min_tokens (the [N, V] history tensors); the sampler checks it against the logits."""
        if not rows:
            raise ValueError("SamplingBatch.from_rows needs at least one row")
        params = [row.params for row in rows]
        scalars = row_scalars(params, [fold_seed(row.seed) for row in rows], [row.step for row in rows], device)
        history = {}
        if needs_history(params, [row.step for row in rows]):
            if vocab_size is None:
                raise ValueError("SamplingBatch.from_rows needs vocab_size for rows with penalties or min_tokens")
            history = _history_from_lists(rows, vocab_size, device)
        return cls(**scalars, suppressed=history.get("suppressed"), prompt_mask=history.get("prompt_mask"),
                   output_counts=history.get("output_counts"), **row_flags(params),
                   processors=tuple((i, tuple(row.params.logits_processors), row.output_token_ids)
                                    for i, row in enumerate(rows) if row.params.logits_processors),
                   forced=forced_tokens(params, [row.step for row in rows], device))


def row_scalars(params: Sequence[SamplingParams], seeds: Sequence[int], steps: Sequence[int],
                device: torch.device | str) -> dict[str, torch.Tensor]:
    """The [N] parameter tensors of a batch, in two host-to-device copies."""
    greedy = [p.is_greedy for p in params]
    reals = torch.tensor([[1.0 if g else p.temperature for p, g in zip(params, greedy)],
                          [p.top_p for p in params], [p.min_p for p in params],
                          [p.repetition_penalty for p in params], [p.presence_penalty for p in params],
                          [p.frequency_penalty for p in params]], dtype=torch.float32, device=device)
    ints = torch.tensor([[max(p.top_k, 0) for p in params], list(seeds), list(steps), greedy],
                        dtype=torch.int64, device=device)
    temperature, top_p, min_p, repetition, presence, frequency = reals.unbind(0)
    top_k, seed, step, greedy_flags = ints.unbind(0)
    return dict(temperature=temperature, greedy=greedy_flags.bool(), top_k=top_k, top_p=top_p, min_p=min_p,
                repetition_penalty=repetition, presence_penalty=presence, frequency_penalty=frequency,
                seed=seed, step=step)


def row_flags(params: Sequence[SamplingParams]) -> dict:
    """What the batch uses, known on the host without reading a tensor."""
    greedy = [p.is_greedy for p in params]
    return dict(all_greedy=all(greedy),
                uses_top_k=any(p.top_k > 0 and not g for p, g in zip(params, greedy)),
                uses_top_p=any(p.top_p < 1 and not g for p, g in zip(params, greedy)),
                uses_min_p=any(p.min_p > 0 and not g for p, g in zip(params, greedy)),
                max_logprobs=max(p.logprobs or 0 for p in params), num_rows=len(params))


def forced_tokens(params: Sequence[SamplingParams], steps: Sequence[int],
                  device: torch.device | str) -> torch.Tensor | None:
    """[N] int64: each row's forced token at its step (-1 where it samples), or None if no row is forced."""
    if not any(step < len(p.forced_token_ids) for p, step in zip(params, steps)):
        return None
    return torch.tensor([p.forced_token_ids[step] if step < len(p.forced_token_ids) else -1
                         for p, step in zip(params, steps)], dtype=torch.int64, device=device)


def uses_penalties(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0


def needs_history(params: Sequence[SamplingParams], steps: Sequence[int]) -> bool:
    """Whether any row needs the [N, V] token history this step (penalties, or min_tokens not yet reached)."""
    return any(uses_penalties(p) or step < p.min_tokens for p, step in zip(params, steps))


def suppressed_ids(params: SamplingParams, eos_token_ids: Sequence[int]) -> list[int]:
    """The tokens min_tokens holds back: stop_token_ids, and EOS unless ignore_eos."""
    return list(params.stop_token_ids) + ([] if params.ignore_eos else list(eos_token_ids))


def _history_from_lists(rows: Sequence[SamplingRow], vocab_size: int, device) -> dict[str, torch.Tensor]:
    n = len(rows)
    suppressed = torch.zeros(n, vocab_size, dtype=torch.bool, device=device)
    prompt_mask = torch.zeros(n, vocab_size, dtype=torch.bool, device=device)
    counts = torch.zeros(n, vocab_size, dtype=torch.int32, device=device)
    for i, row in enumerate(rows):
        if row.step < row.params.min_tokens:
            suppressed[i, torch.as_tensor(suppressed_ids(row.params, row.eos_token_ids), dtype=torch.long)] = True
        prompt_mask[i, torch.as_tensor(list(row.prompt_token_ids), dtype=torch.long)] = True
        out = torch.as_tensor(list(row.output_token_ids), dtype=torch.long, device=device)
        counts[i].index_add_(0, out, torch.ones_like(out, dtype=torch.int32))
    return dict(suppressed=suppressed, prompt_mask=prompt_mask, output_counts=counts)


def fold_seed(seed: int) -> int:
    """Fold any Python int into 32 bits (xor of the two halves of its 64-bit two's complement)."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise InvalidRequestError(f"seed={seed!r} is invalid: it must be an integer.")
    as_u64 = int(seed) % (1 << 64)
    return (as_u64 ^ (as_u64 >> 32)) & MASK32


# --------------------------------------------------------------------------------------------------
# The stages (public so that tests and readers can look at each one alone)
# --------------------------------------------------------------------------------------------------


def apply_min_tokens(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Stop tokens (EOS, stop_token_ids) of rows still under min_tokens get -inf."""
    if batch.suppressed is None:
        return logits
    return logits.masked_fill(batch.suppressed, -math.inf)


def apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Repetition penalty over prompt + output tokens, then presence/frequency over output tokens.

    Repetition (Keskar et al. 2019): for a seen token, logit / r if the logit is positive, logit * r
    otherwise, so r > 1 always makes it less likely. Presence/frequency (OpenAI):
    logit - frequency * count - presence * (count > 0), count = occurrences in the output.
    Rows without a penalty carry r = 1 and presence = frequency = 0, which change nothing.
    """
    if batch.output_counts is None:
        return logits
    counts = batch.output_counts.to(logits.dtype)
    seen = batch.prompt_mask | (batch.output_counts > 0)
    penalty = batch.repetition_penalty[:, None]
    logits = torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)
    return (logits - batch.frequency_penalty[:, None] * counts
            - batch.presence_penalty[:, None] * (counts > 0).to(logits.dtype))


def apply_temperature(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Divide each row by its temperature (greedy rows carry 1.0 and are left as they are)."""
    return logits / batch.temperature[:, None]


def apply_top_k_top_p(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Keep each row's top_k tokens, then the nucleus of top_p mass among those; the rest get -inf.

    Works on the row sorted in descending order with a stable sort, so equal logits keep ascending id
    order: top_k keeps exactly k tokens, and top_k=1 keeps the lowest-id argmax, like greedy.
    The nucleus keeps every token whose preceding mass is below top_p, so the most likely token
    always stays (Holtzman et al. 2020, "The curious case of neural text degeneration").
    """
    if not (batch.uses_top_k or batch.uses_top_p):
        return logits
    vocab_size = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=True, stable=True)
    if batch.uses_top_k:
        rank = torch.arange(vocab_size, device=logits.device)
        k = torch.where(batch.top_k > 0, batch.top_k, vocab_size)
        sorted_logits = sorted_logits.masked_fill(rank[None, :] >= k[:, None], -math.inf)
    if batch.uses_top_p:
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        outside_nucleus = mass_before >= batch.top_p[:, None]
        # Rows with top_p = 1 must lose nothing, even where rounding pushes the cumulative sum past 1.
        outside_nucleus &= (batch.top_p < 1)[:, None]
        outside_nucleus[:, 0] = False
        sorted_logits = sorted_logits.masked_fill(outside_nucleus, -math.inf)
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def apply_logits_processors(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Each row's own processors, in order, on a copy (the raw logits stay for the logprobs)."""
    if not batch.processors:
        return logits
    logits = logits.clone()
    for row, processors, output_ids in batch.processors:
        row_logits = logits[row]
        for fn in processors:
            row_logits = fn(list(output_ids), row_logits)
        logits[row] = row_logits
    return logits


def apply_forced_tokens(token_ids: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Forced rows emit their forced token instead of the sampled one (the last stage: everything before it,
    processors included, saw the model's real distribution)."""
    if batch.forced is None:
        return token_ids
    return torch.where(batch.forced >= 0, batch.forced, token_ids)


def apply_min_p(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Drop tokens with probability below min_p * (the row's top probability).

    Compared in log space: p_v < min_p * p_max  <=>  logit_v < max_logit + log(min_p); min_p = 0 gives
    log 0 = -inf, so nothing is dropped. The top token always stays.
    """
    if not batch.uses_min_p:
        return logits
    max_logit = logits.amax(dim=-1, keepdim=True)
    threshold = max_logit + torch.log(batch.min_p)[:, None]
    return logits.masked_fill(logits < threshold, -math.inf)


# --------------------------------------------------------------------------------------------------
# The sampler
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SamplerOutput:
    """The sampled tokens of a step, with logprobs of the model's raw distribution.

    token_ids: [N] int64.
    logprobs: [N] fp32, log_softmax(raw logits) at the chosen token.
    top_logprobs, top_token_ids: [N, k] (fp32, int64) with k = the batch's largest `logprobs` request,
        most likely first; None when no row asked for any. Rows that asked for fewer ignore the extras.
    """

    token_ids: torch.Tensor
    logprobs: torch.Tensor
    top_logprobs: torch.Tensor | None
    top_token_ids: torch.Tensor | None


class Sampler:
    """Turns a batch of logits into next tokens, all rows at once, on the logits' device.

    Greedy rows (temperature 0) take the argmax of their penalised logits (ties go to the lowest id).
    Other rows use the Gumbel-max trick: argmax over v of logit_v / T + G_v, with Gumbel noise
    G_v = -log(-log u_v), picks v with probability softmax(logits / T)_v (Gumbel 1954; see e.g.
    Maddison et al. 2014, "A* sampling"). u_v = hash_uniform(seed, step, v) from minikv.hashing, so
    the draw is reproducible per request and independent of the batch around it.
    """

    def __init__(self) -> None:
        # mix_word(arange(V)) depends only on V and the device; computing it once saves a third of the
        # hash work per step.
        self._mixed_vocab_ids: dict[tuple[int, torch.device], torch.Tensor] = {}

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        if logits.dim() != 2 or logits.shape[0] != batch.num_rows:
            raise ValueError(f"logits must be [num_rows={batch.num_rows}, vocab], got {tuple(logits.shape)}")
        history = batch.output_counts if batch.output_counts is not None else batch.suppressed
        if history is not None and history.shape != logits.shape:
            raise ValueError(f"the batch's token history is {tuple(history.shape)}, the logits {tuple(logits.shape)}")
        raw = logits.float()
        processed = self.process_logits(apply_logits_processors(raw, batch), batch)
        token_ids = apply_forced_tokens(self.sample(processed, batch), batch)
        return _with_logprobs(raw, token_ids, batch.max_logprobs)

    @staticmethod
    def process_logits(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """Every stage before the draw, in vLLM's order; returns new fp32 logits (-inf = excluded)."""
        logits = apply_min_tokens(logits.float(), batch)
        logits = apply_penalties(logits, batch)
        logits = apply_temperature(logits, batch)
        logits = apply_top_k_top_p(logits, batch)
        return apply_min_p(logits, batch)

    def sample(self, processed_logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """Argmax for greedy rows, Gumbel-max for the rest. torch.argmax returns the first maximum.

        On CUDA the draw is one fused Triton kernel (minikv.kernels.sampling: the same noise bits, hashed in
        place, no [N, vocab] noise tensor); elsewhere a few vectorised torch ops."""
        greedy_ids = processed_logits.argmax(dim=-1)
        if batch.all_greedy:
            return greedy_ids
        if processed_logits.is_cuda and _fused_draw is not None:
            drawn = _fused_draw(processed_logits, batch.seed, batch.step)
        else:
            noise = self.gumbel_noise(batch, processed_logits.shape[-1], processed_logits.device)
            drawn = (processed_logits + noise).argmax(dim=-1)
        return torch.where(batch.greedy, greedy_ids, drawn)

    def gumbel_noise(self, batch: SamplingBatch, vocab_size: int, device: torch.device) -> torch.Tensor:
        """[N, V] Gumbel noise, G[i, v] = -log(-log(hash_uniform(seed_i, step_i, v)))."""
        row_state = absorb(absorb(torch.zeros_like(batch.seed), batch.seed), batch.step)
        state = absorb_mixed(row_state[:, None], self._mixed_vocab(vocab_size, device)[None, :])
        u = uniform_from_hash(finalize(state, num_words=3))
        return -torch.log(-torch.log(u))

    def _mixed_vocab(self, vocab_size: int, device: torch.device) -> torch.Tensor:
        key = (vocab_size, torch.device(device))
        if key not in self._mixed_vocab_ids:
            self._mixed_vocab_ids[key] = mix_word(torch.arange(vocab_size, dtype=torch.int64, device=device))
        return self._mixed_vocab_ids[key]


def _with_logprobs(raw_logits: torch.Tensor, token_ids: torch.Tensor, max_logprobs: int) -> SamplerOutput:
    """Logprobs of the raw model distribution: logit - logsumexp, without materialising log_softmax."""
    log_normaliser = raw_logits.logsumexp(dim=-1)
    chosen = raw_logits.gather(1, token_ids[:, None]).squeeze(1) - log_normaliser
    if max_logprobs == 0:
        return SamplerOutput(token_ids, chosen, None, None)
    top_logits, top_ids = raw_logits.topk(min(max_logprobs, raw_logits.shape[-1]), dim=-1)
    return SamplerOutput(token_ids, chosen, top_logits - log_normaliser[:, None], top_ids)


try:  # the fused draw needs Triton (and runs on CUDA only); the torch path needs nothing
    from .kernels.sampling import gumbel_argmax_triton as _fused_draw
except ImportError:
    _fused_draw = None

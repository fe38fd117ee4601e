"""The sampler: turns a batch of logits into next tokens, one row per request, all rows at once.

Each engine step gathers its sampling rows into a `SamplingBatch` (per-row parameters as device tensors,
plus host-side flags saying which stages any row uses) and calls `Sampler` on the batch's logits. Stages no
row uses are skipped on the host's knowledge alone, and the sampler never reads a tensor value on the host;
the only Python loop over rows is for requests that bring their own logits processors.

Order of operations (as in vLLM):

    raw logits ──► logprobs (log_softmax of the raw logits, computed only when read)
        │
        ├─ logits processors (per request, on a copy)
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

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch

from minikv.errors import InvalidRequestError
from minikv.hashing import MASK32, absorb, absorb_mixed, finalize, mix_word, uniform_from_hash
from minikv.sampling_params import RequestOutputKind, SamplingParams  # noqa: F401  (re-exported)

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
    same thing from Python lists (tests, one-off use). The flags below the tensors are known on the host from
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
    uses_temperature: bool  # some sampling row has a temperature other than 1
    uses_top_k: bool
    uses_top_p: bool
    uses_min_p: bool
    # When every sampling row that filters has a top_k, the largest of them: the filters then need only each
    # row's top `top_k_bound` tokens instead of a sort of the whole vocabulary (0: some row needs the sort).
    top_k_bound: int
    max_logprobs: int  # the most top logprobs any row asked for; 0 = none
    wants_logprobs: bool  # some row asked for logprobs (logprobs=0 included): computed with the tokens
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
                   forced=_as_tensor(forced_tokens(params, [row.step for row in rows]), device))


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
    """What the batch uses, known on the host without reading a tensor. Greedy rows use no stage after the
    penalties: their argmax is the same with or without temperature and filters."""
    sampling = [p for p in params if not p.is_greedy]
    filtering = [p for p in sampling if p.top_k > 0 or p.top_p < 1]
    return dict(all_greedy=not sampling, uses_temperature=any(p.temperature != 1.0 for p in sampling),
                uses_top_k=any(p.top_k > 0 for p in sampling), uses_top_p=any(p.top_p < 1 for p in sampling),
                uses_min_p=any(p.min_p > 0 for p in sampling),
                top_k_bound=max((p.top_k for p in filtering), default=0) if all(p.top_k > 0 for p in filtering) else 0,
                max_logprobs=max(p.logprobs or 0 for p in params),
                wants_logprobs=any(p.logprobs is not None for p in params), num_rows=len(params))


def forced_tokens(params: Sequence[SamplingParams], steps: Sequence[int]) -> list[int] | None:
    """Each row's forced token at its step (-1 where it samples), or None if no row is forced."""
    if not any(step < len(p.forced_token_ids) for p, step in zip(params, steps)):
        return None
    return [p.forced_token_ids[step] if step < len(p.forced_token_ids) else -1 for p, step in zip(params, steps)]


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


def _as_tensor(ids: list[int] | None, device) -> torch.Tensor | None:
    return None if ids is None else torch.tensor(ids, dtype=torch.int64, device=device)


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
    """Divide each row by its temperature (greedy rows carry 1.0 and are left as they are); skipped when
    every sampling row's temperature is 1, since dividing by 1 changes nothing."""
    if not batch.uses_temperature:
        return logits
    return logits / batch.temperature[:, None]


def apply_top_k_top_p(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Keep each row's top_k tokens, then the nucleus of top_p mass among those; the rest get -inf.

    Tokens are ranked as by a stable descending sort, so equal logits keep ascending id order: top_k
    keeps exactly k tokens, and top_k=1 keeps the lowest-id argmax, like greedy. The nucleus keeps every
    token whose preceding mass is below top_p, so the most likely token always stays (Holtzman et al.
    2020, "The curious case of neural text degeneration"). When every filtering row has a small top_k,
    only each row's top `batch.top_k_bound` tokens are ranked (`top_ids`), not the whole vocabulary.
    """
    if not (batch.uses_top_k or batch.uses_top_p):
        return logits
    if 0 < batch.top_k_bound <= logits.shape[-1] // 4:
        ids = top_ids(logits, batch.top_k_bound)
        candidates = torch.full_like(logits, -math.inf).scatter_(-1, ids, _filter_ranked(logits.gather(-1, ids), batch))
        # Rows that filter nothing keep the whole vocabulary (greedy rows: their argmax is a candidate anyway).
        filters = ~batch.greedy & ((batch.top_k > 0) | (batch.top_p < 1))
        return torch.where(filters[:, None], candidates, logits)
    ranked, order = logits.sort(dim=-1, descending=True, stable=True)
    return torch.empty_like(logits).scatter_(-1, order, _filter_ranked(ranked, batch))


def _filter_ranked(ranked: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """top_k then top_p on logits in rank order (each row's first columns are its most likely tokens)."""
    width = ranked.shape[-1]
    if batch.uses_top_k:
        rank = torch.arange(width, device=ranked.device)
        k = torch.where(batch.top_k > 0, batch.top_k, width)
        ranked = ranked.masked_fill(rank[None, :] >= k[:, None], -math.inf)
    if batch.uses_top_p:
        probs = ranked.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        outside_nucleus = mass_before >= batch.top_p[:, None]
        # Rows with top_p = 1 must lose nothing, even where rounding pushes the cumulative sum past 1.
        outside_nucleus &= (batch.top_p < 1)[:, None]
        outside_nucleus[:, 0] = False
        ranked = ranked.masked_fill(outside_nucleus, -math.inf)
    return ranked


def top_ids(logits: torch.Tensor, k: int) -> torch.Tensor:
    """[N, k] int64: the ids of each row's k largest fp32 logits in the order of a stable descending sort
    (equal logits in ascending id order), found by a partial selection instead of a sort of the row.

    torch.topk does not say how it orders ties, so it runs on int64 keys that are unique per token: the
    logit's bits mapped to an integer of the same order in the high half, the id reversed in the low half.
    """
    bits = (logits.float() + 0.0).view(torch.int32)  # + 0.0 makes -0.0 into +0.0: they compare equal
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negative floats: flip all but the sign bit
    low = MASK32 - torch.arange(logits.shape[-1], device=logits.device)
    keys = ordered.to(torch.int64).mul_(1 << 32).add_(low)
    return MASK32 - (keys.topk(k, dim=-1).values & MASK32)


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


class SamplerOutput:
    """The sampled tokens of a step, with logprobs of the model's raw distribution: computed with the tokens
    when a row asked for them (so one read of the device brings both back), otherwise only if read, so a
    step whose requests asked for none never pays for a full-vocabulary logsumexp.

    token_ids: [N] int64.
    logprobs: [N] fp32, log_softmax(raw logits) at the chosen token.
    top_logprobs, top_token_ids: [N, k] (fp32, int64) with k = the batch's largest `logprobs` request,
        most likely first; None when no row asked for any. Rows that asked for fewer ignore the extras.
    """

    def __init__(self, token_ids: torch.Tensor, raw_logits: torch.Tensor, max_logprobs: int, eager: bool = False):
        self.token_ids = token_ids
        self._raw_logits = raw_logits
        self._num_top = min(max_logprobs, raw_logits.shape[-1])
        if eager:  # queued now, so that the caller's one read of the tokens finds them done too
            _ = self.logprobs, self._top

    @cached_property
    def logprobs(self) -> torch.Tensor:
        return self._raw_logits.gather(1, self.token_ids[:, None]).squeeze(1) - self._log_normaliser

    @property
    def top_logprobs(self) -> torch.Tensor | None:
        return self._top[0]

    @property
    def top_token_ids(self) -> torch.Tensor | None:
        return self._top[1]

    @cached_property
    def _log_normaliser(self) -> torch.Tensor:  # logit - logsumexp, without materialising log_softmax
        return self._raw_logits.logsumexp(dim=-1)

    @cached_property
    def _top(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if not self._num_top:
            return None, None
        top_logits, top_ids = self._raw_logits.topk(self._num_top, dim=-1)
        return top_logits - self._log_normaliser[:, None], top_ids


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
        return SamplerOutput(token_ids, raw, batch.max_logprobs, eager=batch.wants_logprobs)

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


try:  # the fused draw needs Triton (and runs on CUDA only); the torch path needs nothing
    from .kernels.sampling import gumbel_argmax_triton as _fused_draw
except ImportError:
    _fused_draw = None

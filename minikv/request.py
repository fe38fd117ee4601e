"""One request's whole state inside the engine, in one place.

The scheduler reads how far the model has read it (`num_processed`) and what KV it holds; the engine appends
sampled tokens, detokenises them, checks the stop rules and turns the state into `RequestOutput`s. Nothing
about a request lives anywhere else on the host (its device-side twin is its row of the persistent batch).
"""

from __future__ import annotations

import enum
import time

from .outputs import CompletionOutput, Logprob, PositionLogprobs, RequestMetrics, RequestOutput
from .sampling import RequestOutputKind, SamplingParams
from .tokenizer import IncrementalDetokenizer


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # queued, holds no KV
    RUNNING = "running"  # holds a batch slot and KV: prefilling or decoding
    FINISHED = "finished"


class Request:
    def __init__(self, request_id: str, prompt_ids: list[int], params: SamplingParams, *, seed: int,
                 eos_ids: frozenset[int], tokenizer, prompt_text: str | None = None, kv_budget: int = 0,
                 ring_size: int | None = None, num_blocks_needed: int = 0, session=None):
        self.request_id, self.prompt_ids, self.params, self.seed = request_id, prompt_ids, params, seed
        self.prompt_text = prompt_text
        self.eos_ids = eos_ids  # empty under ignore_eos
        self.kv_budget = kv_budget  # KV slots per layer and KV head this request's ring may hold
        # ... and will ever hold: a ring never needs more than prompt + max_tokens slots.
        self.ring_size = ring_size if ring_size is not None else kv_budget
        self.positions = "original"  # RoPE positions of its ring, "original" or "ring" (set by the engine)
        self.archive = None  # its minikv.archive.Archive when it keeps one (set by the engine)
        self.num_blocks_needed = num_blocks_needed  # what admission reserves in the block pool
        self.blocks: list[int] = []  # the pool blocks of its ring, in ring order (its block table)
        self.status = RequestStatus.WAITING
        self.finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
        self.stop_reason: str | int | None = None
        self.error: str | None = None
        self.slot: int | None = None  # row of the persistent batch while running
        self.num_processed = 0  # tokens whose K/V have gone through the ring
        # Slots a session's rolled-back ring lacks (minikv.session.roll_back_ring): it holds
        # min(ring_size, num_processed - ring_holes) slots, so its next tokens fill the holes before evicting.
        self.ring_holes = 0
        self.session = session  # minikv.session.Session this request continues and parks its ring in, or None
        self.num_cached_tokens = 0  # prompt tokens a session's parked ring had read already (not prefilled)
        self.output_queue = None  # where its outputs go (a deque: minikv.offline's callers); None: Engine.step's result
        self.output_ids: list[int] = []
        self.logprobs: list[PositionLogprobs] | None = [] if params.logprobs is not None else None
        self.cumulative_logprob: float | None = 0.0 if params.logprobs is not None else None
        self.prompt_logprobs: list[PositionLogprobs | None] | None = (
            [None] if params.prompt_logprobs is not None else None)  # the first token has no context
        self.metrics = RequestMetrics(arrival_time=time.monotonic(), kv_budget=kv_budget)
        self._detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids[-IncrementalDetokenizer.CONTEXT_TOKENS:],
                                                   skip_special_tokens=params.skip_special_tokens)
        self._stop_checked = 0  # characters of the text already searched for stop strings
        self._text_end: int | None = None  # where the visible text ends, once a stop string matched
        self._sent_tokens = 0  # what earlier DELTA outputs carried
        self._sent_chars = 0

    # --- where it stands ---------------------------------------------------------------------------
    @property
    def is_prefilling(self) -> bool:
        return self.num_processed < len(self.prompt_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def token_at(self, index: int) -> int:
        n = len(self.prompt_ids)
        return self.prompt_ids[index] if index < n else self.output_ids[index - n]

    @property
    def ring_filled(self) -> int:
        """Ring slots filled (every layer and KV head alike)."""
        return min(self.ring_size, self.num_processed - self.ring_holes)

    @property
    def num_evicted_tokens(self) -> int:
        """Tokens no longer in the ring: the same count in every layer and KV head."""
        return self.num_processed - self.ring_filled

    # --- a new token -------------------------------------------------------------------------------
    def append_token(self, token: int, logprobs: PositionLogprobs | None = None) -> str | None:
        """Record a sampled token; return the finish reason if it ends the request ("stop", "length")."""
        self.output_ids.append(token)
        now = time.monotonic()
        if self.metrics.first_token_time is None:
            self.metrics.first_token_time = now
        self.metrics.last_token_time = now
        if logprobs is not None and self.logprobs is not None:
            self.logprobs.append(logprobs)
            self.cumulative_logprob += logprobs[token].logprob
        self._detokenizer.push(token)
        return self._stop_rule(token)

    def _stop_rule(self, token: int) -> str | None:
        params, generated = self.params, len(self.output_ids)
        if generated <= len(params.forced_token_ids):
            # A forced token is never a stop (SamplingParams.forced_token_ids); only max_tokens ends the
            # request here, when every output is forced.
            self._stop_checked = len(self._detokenizer.text)
            return "length" if generated >= params.max_tokens else None
        if generated < params.min_tokens:
            # vLLM's rule: nothing generated before min_tokens can stop the request, stop strings included;
            # the text so far is never searched again (only an overlap across the seam, for a string that
            # straddles it).
            self._stop_checked = len(self._detokenizer.text)
            return None
        if token in self.eos_ids:
            return "stop"
        if token in params.stop_token_ids:
            self.stop_reason = token
            return "stop"
        if params.stop and self._match_stop_string():
            return "stop"
        return "length" if generated >= params.max_tokens else None

    def _match_stop_string(self) -> bool:
        """Find the earliest stop string in the new text; if found, cut the visible text there."""
        params, text = self.params, self._detokenizer.text
        # Each stop string is searched from len(stop) - 1 characters before the new text: one across the seam
        # is found, one wholly in the old text (skipped under min_tokens) is not.
        found = [(at, stop) for stop in params.stop
                 if (at := text.find(stop, max(0, self._stop_checked - len(stop) + 1))) >= 0]
        self._stop_checked = len(text)
        if not found:
            return False
        at, stop = min(found)
        self._text_end = at + len(stop) if params.include_stop_str_in_output else at
        self.stop_reason = stop
        return True

    # --- text ----------------------------------------------------------------------------------------
    def _text(self) -> str:
        """Final text once finished; mid-run, only what can no longer change: the detokeniser holds back an
        incomplete UTF-8 character, and the tail that could be the start of a stop string is held here."""
        if self.is_finished:
            self._detokenizer.flush()
            return self._detokenizer.text[: self._text_end]
        text = self._detokenizer.text
        hold = max((len(s) - 1 for s in self.params.stop), default=0)
        return text[: len(text) - hold] if hold else text

    # --- outputs -------------------------------------------------------------------------------------
    def make_output(self, kind: RequestOutputKind | None = None) -> RequestOutput | None:
        """This request's output after a step, or None if its kind has nothing to say yet."""
        kind = kind or self.params.output_kind
        if kind is RequestOutputKind.FINAL_ONLY and not self.is_finished:
            return None
        delta = kind is RequestOutputKind.DELTA
        if delta and not self.is_finished and self._sent_tokens == len(self.output_ids):
            return None  # nothing new
        text = self._text()
        first_token, first_char = (self._sent_tokens, self._sent_chars) if delta else (0, 0)
        self._sent_tokens, self._sent_chars = len(self.output_ids), len(text)
        completion = CompletionOutput(
            index=0, text=text[first_char:], token_ids=self.output_ids[first_token:],
            cumulative_logprob=self.cumulative_logprob,
            logprobs=self.logprobs[first_token:] if self.logprobs is not None else None,
            finish_reason=self.finish_reason, stop_reason=self.stop_reason)
        self.metrics.num_generated_tokens = len(self.output_ids)
        self.metrics.num_evicted_tokens = self.num_evicted_tokens
        self.metrics.num_kv_blocks = len(self.blocks)
        self.metrics.num_recalled_tokens = self.archive.recalled if self.archive is not None else 0
        return RequestOutput(
            request_id=self.request_id, prompt=self.prompt_text, prompt_token_ids=self.prompt_ids,
            outputs=[completion], finished=self.is_finished, metrics=self.metrics,
            prompt_logprobs=self.prompt_logprobs if (not delta or first_token == 0) else None, error=self.error,
            num_cached_tokens=self.num_cached_tokens)


def position_logprobs(token: int, token_logprob: float, top_ids: list[int], top_logprobs: list[float],
                      decode) -> PositionLogprobs:
    """The chosen token plus the top ones (vLLM: the top n, plus the chosen token if it is not among them)."""
    out = {tid: Logprob(lp, rank + 1, decode(tid)) for rank, (tid, lp) in enumerate(zip(top_ids, top_logprobs))}
    if token not in out:
        out[token] = Logprob(token_logprob, None, decode(token))
    return out

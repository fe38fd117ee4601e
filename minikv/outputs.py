"""What the engine hands back: vLLM's output shapes, plus minikv's KV accounting.

    RequestOutput(request_id, prompt, prompt_token_ids, prompt_logprobs,
                  outputs=[CompletionOutput(index, text, token_ids, cumulative_logprob, logprobs,
                                            finish_reason, stop_reason)],
                  finished, metrics=RequestMetrics(...), error)

How much of a request's text and tokens one output carries is the request's `SamplingParams.output_kind`:
CUMULATIVE (everything so far, vLLM's default), DELTA (only what is new since its last output: what a stream
or a server sends) or FINAL_ONLY (one output, when it finishes: what `Engine.generate` collects).
`EngineStats` is what `Engine.stats()` hands back: the engine's gauges and counters.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Logprob:
    """One token's log-probability under the model's raw distribution, and its rank there (1 = most likely)."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# Per position: the chosen token plus the top `logprobs` tokens, id -> Logprob (vLLM's SampleLogprobs).
PositionLogprobs = dict[int, Logprob]


@dataclass
class CompletionOutput:
    """One completion of a request (minikv makes one per request: index 0).

    finish_reason: None while running, then "stop" (EOS, a stop token or a stop string), "length" (max_tokens),
    "abort" or "error". stop_reason: the stop string or stop token id that ended it (None for EOS or length).
    """

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[PositionLogprobs] | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    """Timestamps (time.monotonic() seconds) and minikv's KV accounting of one request.

    num_evicted_tokens: tokens no longer in the request's ring (the same count in every layer and KV head).
    num_kv_blocks: pool blocks the request holds now (0 once it has finished).
    kv_budget: the most KV slots per layer and KV head its ring may hold.
    num_recalled_tokens: ring slots its archive's recall overwrote so far, summed over layers and KV heads
        (0 without an archive; SamplingParams.archive_budget).
    """

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    num_generated_tokens: int = 0
    num_evicted_tokens: int = 0
    num_kv_blocks: int = 0
    kv_budget: int = 0
    num_recalled_tokens: int = 0


@dataclass
class RequestOutput:
    """A request's state after a step. `outputs[0]` holds its text and tokens (all of them, or the delta since
    its last output, by its `output_kind`); `error` says what went wrong when finish_reason is "error"."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    error: str | None = None
    num_cached_tokens: int = 0  # prompt tokens not prefilled: a session's ring had read them (vLLM's name)

    def add(self, delta: "RequestOutput") -> "RequestOutput":
        """Append the next DELTA output of the same request (its text, tokens and logprobs); the rest (finish
        state, metrics, error) is the newer output's. Returns self: deltas added up are the cumulative output."""
        mine, new = self.outputs[0], delta.outputs[0]
        mine.text += new.text
        mine.token_ids = mine.token_ids + new.token_ids
        if new.logprobs is not None:
            mine.logprobs = (mine.logprobs or []) + new.logprobs
        mine.cumulative_logprob, mine.finish_reason, mine.stop_reason = (
            new.cumulative_logprob, new.finish_reason, new.stop_reason)
        self.finished, self.metrics, self.error = delta.finished, delta.metrics, delta.error
        self.num_cached_tokens = delta.num_cached_tokens
        return self


@dataclass
class EngineStats:
    """The engine's counters and gauges, cheap to read at any time (a metrics endpoint reads these).

    Gauges: requests running / waiting now; KV blocks of the pool in use (held by running requests) and in
    all; kv_usage = used / total. Counters since the engine started: steps run, prompt tokens processed,
    tokens generated, tokens evicted (summed over finished requests), requests finished by reason;
    peak_running: the most requests that ever ran in one step; peak_kv_blocks_used: the most pool blocks
    rings ever held at once.
    """

    num_running: int
    num_waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    num_steps: int
    prompt_tokens: int
    generation_tokens: int
    evicted_tokens: int
    finished: dict[str, int]
    peak_running: int
    peak_kv_blocks_used: int
    # Sessions (minikv.session): sessions kept, parked rings and their blocks (not in kv_blocks_used:
    # admission takes them back whenever it needs them); requests that reused a parked ring (hits) or found
    # none (misses), prompt tokens not prefilled again, parked rings released because admission or a limit
    # needed their blocks.
    num_sessions: int = 0
    num_parked_sessions: int = 0
    parked_kv_blocks: int = 0
    session_hits: int = 0
    session_misses: int = 0
    session_reused_tokens: int = 0
    sessions_released_by_pressure: int = 0
    recalled_tokens: int = 0  # ring slots the archives' recall overwrote (summed over layers and KV heads)

    @property
    def kv_usage(self) -> float:
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0

"""A request's life inside the engine: its tokens, its ring and how far the model has read it."""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

from .sampling import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # queued, no ring yet
    RUNNING = "running"  # owns a ring: prefilling or decoding
    FINISHED = "finished"


_counter = itertools.count()


@dataclass
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    seed: int  # the request's sampling seed (its own, or derived from the engine's)
    eos_ids: frozenset[int] = frozenset()
    want_prompt_logprobs: bool = False
    output_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    error: str | None = None  # why processing this request failed (finish_reason "error")
    ring: int | None = None
    num_processed: int = 0  # tokens whose K/V have gone through the ring
    arrival: int = field(default_factory=lambda: next(_counter))
    prompt_logprobs: list[float] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    output_top_logprobs: list[dict[int, float]] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def is_prefilling(self) -> bool:
        return self.num_processed < len(self.prompt_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def token_at(self, index: int) -> int:
        n = len(self.prompt_ids)
        return self.prompt_ids[index] if index < n else self.output_ids[index - n]

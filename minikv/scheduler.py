"""Continuous batching: which sequences run in the next step, and how many tokens each.

Every step:
1. each running sequence that is decoding gets its one token (decodes are never starved);
2. waiting requests are admitted, first come first served, while a ring is free; admission never looks
   at prompt length, because the ring bounds a sequence's memory whatever its length;
3. prefill chunks of admitted sequences fill what is left of `max_num_batched_tokens`, oldest first, at
   most `chunk` tokens each, so a long prompt is interleaved with the running decodes instead of stalling them.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .ring import RingStore
from .sequence import Sequence, SequenceStatus


@dataclass
class ScheduledChunk:
    seq: Sequence
    length: int  # prompt tokens of this chunk


@dataclass
class SchedulerOutput:
    decodes: list[Sequence] = field(default_factory=list)
    prefills: list[ScheduledChunk] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.decodes) + sum(c.length for c in self.prefills)

    @property
    def is_empty(self) -> bool:
        return not self.decodes and not self.prefills


class Scheduler:
    def __init__(self, store: RingStore, *, max_num_batched_tokens: int, chunk: int):
        self.store = store
        self.max_num_batched_tokens = max_num_batched_tokens
        self.chunk = chunk
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        out.decodes = [s for s in self.running if not s.is_prefilling][: self.max_num_batched_tokens]
        while self.waiting and self.store.num_free:
            seq = self.waiting.popleft()
            seq.ring = self.store.allocate()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
        room = self.max_num_batched_tokens - len(out.decodes)
        for seq in self.running:
            if room <= 0:
                break
            if seq.is_prefilling:
                length = min(self.chunk, len(seq.prompt_ids) - seq.num_processed, room)
                out.prefills.append(ScheduledChunk(seq, length))
                room -= length
        return out

    def finish(self, seq: Sequence, reason: str) -> None:
        """Finish (or abort) a sequence: its ring is free for the next admission at once."""
        if seq.is_finished:
            return
        if seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        else:
            self.running.remove(seq)
            self.store.free(seq.ring)
            seq.ring = None
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

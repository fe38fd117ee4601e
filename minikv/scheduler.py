"""Continuous batching: which sequences run in the next step, and how many tokens each.

Every step plans at most `max_num_batched_tokens` tokens, all run in one forward pass:
1. each running sequence that is decoding gets its one token (decodes are never starved);
2. waiting requests are admitted, first come first served, while a ring is free; admission never looks
   at prompt length, because the ring bounds a sequence's memory whatever its length;
3. prefill chunks of admitted sequences fill what is left, oldest first, so a long prompt is interleaved
   with the running decodes instead of stalling them (Agrawal et al. 2024, "Sarathi-Serve": chunked
   prefills piggybacked on decodes).

A prefill chunk ends at the next multiple of `chunk` prompt positions (or earlier when the step has less
room). With room for a whole chunk, a prompt is therefore cut at the same places whatever else runs, and
with an evicting policy (which keeps `budget` tokens of ring + chunk at each chunk) a request's result
does not depend on its neighbours in the batch.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .errors import ConfigError
from .ring import RingStore
from .request import Request, RequestStatus


@dataclass
class ScheduledChunk:
    seq: Request
    length: int  # prompt tokens of this chunk

    @property
    def is_last(self) -> bool:
        """The chunk that ends the prompt: its last row samples the first output token."""
        return self.seq.num_processed + self.length >= len(self.seq.prompt_ids)


@dataclass
class SchedulerOutput:
    decodes: list[Request] = field(default_factory=list)
    prefills: list[ScheduledChunk] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.decodes) + sum(c.length for c in self.prefills)

    @property
    def is_empty(self) -> bool:
        return not self.decodes and not self.prefills


class Scheduler:
    def __init__(self, store: RingStore, *, max_num_batched_tokens: int, chunk: int):
        if chunk < 1:
            raise ConfigError(f"chunk must be a positive number of tokens, got {chunk}")
        if max_num_batched_tokens < store.num_rings:
            raise ConfigError(f"max_num_batched_tokens ({max_num_batched_tokens}) must be >= max_num_seqs "
                              f"({store.num_rings}) so every running sequence can decode each step")
        self.store = store
        self.max_num_batched_tokens = max_num_batched_tokens
        self.chunk = chunk
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # admission order (FCFS), each owns a ring

    def add(self, seq: Request) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def schedule(self) -> SchedulerOutput:
        """Plan the next step (see the module docstring). Admitted sequences leave `waiting` with a ring."""
        out = SchedulerOutput(decodes=[s for s in self.running if not s.is_prefilling])
        self._admit()
        room = self.max_num_batched_tokens - len(out.decodes)
        for seq in self.running:
            if room <= 0:
                break
            if seq.is_prefilling:
                length = min(self._chunk_end(seq) - seq.num_processed, room)
                out.prefills.append(ScheduledChunk(seq, length))
                room -= length
        return out

    def _admit(self) -> None:
        while self.waiting and self.store.num_free:
            seq = self.waiting.popleft()
            seq.slot = self.store.allocate()
            seq.status = RequestStatus.RUNNING
            self.running.append(seq)

    def _chunk_end(self, seq: Request) -> int:
        """Where the current chunk of `seq`'s prompt ends: the next multiple of `chunk`, or the prompt's end."""
        next_boundary = (seq.num_processed // self.chunk + 1) * self.chunk
        return min(next_boundary, len(seq.prompt_ids))

    def finish(self, seq: Request, reason: str) -> None:
        """Finish (or abort) a sequence wherever it is: its ring is free for the next admission at once."""
        if seq.is_finished:
            return
        if seq.status is RequestStatus.WAITING:
            self.waiting.remove(seq)
        else:
            self.running.remove(seq)
            self.store.free(seq.slot)
            seq.slot = None
        seq.status = RequestStatus.FINISHED
        seq.finish_reason = reason

"""Continuous batching: which requests run in the next step, how many tokens each, and their KV blocks.

Every step plans at most `max_num_batched_tokens` tokens, all run in one forward pass:
1. each running request that is decoding gets its one token (decodes are never starved);
2. waiting requests are admitted, first come first served, while a batch slot is free and the pool can
   reserve every block the request can ever hold (`Request.num_blocks_needed`); the head of the queue
   waits rather than being overtaken, so admission stays FCFS;
3. prefill chunks of admitted requests fill what is left, oldest first, so a long prompt is interleaved
   with the running decodes instead of stalling them (Agrawal et al. 2024, "Sarathi-Serve": chunked
   prefills piggybacked on decodes).

A prefill chunk always ends at the next multiple of `chunk` prompt positions (or at the prompt's end): a
chunk that does not fit the step's room waits for the next step instead of being cut short. A prompt is
therefore cut at the same places whatever else runs, and with an evicting policy (which keeps `budget` of
ring + chunk at each chunk) a request's result does not depend on its neighbours in the batch. Only when a
step has room for less than one chunk at all (`max_num_batched_tokens` < chunk + max_num_seqs) is the first
prefill of the step cut to fit, so that prompts still make progress.

Reserving at admission what a request can ever hold means a running request never waits for memory and
nothing is ever preempted; blocks are taken from the reservation as its ring fills (`_grow`), and all of
them go back at finish.

Sessions (minikv.session): a request on a session takes over the session's parked ring at admission (its
blocks, what it has read, its policy state) and reserves only the blocks beyond it; when it finishes its
ring is parked instead of freed. Parked rings never make admission wait: when the pool is short, the least
recently used ones are released first.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .block_pool import KVPool
from .errors import ConfigError
from .input_batch import InputBatch
from .request import Request, RequestStatus
from .session import SessionStore


@dataclass
class ScheduledChunk:
    req: Request
    length: int  # prompt tokens of this chunk


@dataclass
class SchedulerOutput:
    decodes: list[Request] = field(default_factory=list)
    prefills: list[ScheduledChunk] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.decodes and not self.prefills

    @property
    def requests(self) -> list[Request]:
        return [*self.decodes, *(chunk.req for chunk in self.prefills)]


class Scheduler:
    def __init__(self, pool: KVPool, batch: InputBatch, *, max_num_batched_tokens: int, chunk: int,
                 sessions: SessionStore | None = None):
        if chunk < 1:
            raise ConfigError(f"chunk must be a positive number of tokens, got {chunk}")
        if max_num_batched_tokens < batch.max_num_seqs:
            raise ConfigError(f"max_num_batched_tokens ({max_num_batched_tokens}) must be >= max_num_seqs "
                              f"({batch.max_num_seqs}) so every running request can decode each step")
        self.pool, self.batch = pool, batch
        self.max_num_batched_tokens = max_num_batched_tokens
        self.chunk = chunk
        self.sessions = sessions
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # admission order (FCFS), each holds a slot and a reservation

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def schedule(self) -> SchedulerOutput:
        """Plan the next step (see the module docstring) and give its requests the blocks it will fill."""
        out = SchedulerOutput(decodes=[r for r in self.running if not r.is_prefilling])
        self._admit()
        room = self.max_num_batched_tokens - len(out.decodes)
        for req in self.running:
            if req.is_prefilling and room > 0:
                length = self._chunk_end(req) - req.num_processed
                if length > room:
                    if out.prefills or room >= self.chunk:
                        break  # a whole chunk waits for the next step: never cut a chunk short (FCFS)
                    length = room  # the step cannot hold any whole chunk: cut the first one to fit
                out.prefills.append(ScheduledChunk(req, length))
                room -= length
        self._grow(out)
        return out

    def _admit(self) -> None:
        while self.waiting and self.batch.num_free:
            req = self.waiting[0]
            ring, cached = self.sessions.claim(req.session, req.prompt_ids) if req.session else (None, 0)
            short = req.num_blocks_needed - (len(ring.blocks) if ring else 0)
            if short > self.pool.num_unreserved and self.sessions is not None:
                self.sessions.release_for(short, keep=req.session)  # parked rings never make work wait
            if short > self.pool.num_unreserved:
                break  # the head waits for blocks to come back; nobody overtakes it
            self.waiting.popleft()
            req.slot = self.batch.admit(req, req.ring_size)
            if ring is not None:
                self._take_over(req, ring, cached)
            else:
                self.pool.reserve(req.slot, req.num_blocks_needed)
            if req.session is not None:
                self.sessions.admitted(req.session, ring, cached)
            req.status = RequestStatus.RUNNING
            self.running.append(req)

    def _take_over(self, req: Request, ring, cached: int) -> None:
        """`req` continues its session's parked ring: the ring's blocks, its place in the stream (the first
        `cached` prompt tokens are read already) and its policy state move into the request's batch slot."""
        req.blocks = self.pool.adopt(ring.owner, req.slot, req.num_blocks_needed)
        req.num_processed = req.num_cached_tokens = cached
        req.ring_holes = ring.holes  # 0 unless SessionStore.claim compacted the ring (then cached == num_processed)
        self.batch.ring_holes[req.slot] = req.ring_holes
        n = len(req.blocks)
        self.batch.write_blocks([req.slot] * n, list(range(n)), req.blocks)
        self.batch.position[req.slot] = cached
        self.sessions.policy.load_ring_state(req.slot, ring.policy_state)
        req.archive = self.sessions.take_archive(ring, req.archive, cached)

    def _chunk_end(self, req: Request) -> int:
        """Where the current chunk of a prompt ends: the next multiple of `chunk`, or the prompt's end."""
        next_boundary = (req.num_processed // self.chunk + 1) * self.chunk
        return min(next_boundary, len(req.prompt_ids))

    def _grow(self, out: SchedulerOutput) -> None:
        """Take from each scheduled request's reservation the blocks its ring fills this step."""
        slots, indices, blocks = [], [], []
        steps = [(req, 1) for req in out.decodes] + [(c.req, c.length) for c in out.prefills]
        for req, new_tokens in steps:
            held = len(req.blocks)
            needed = self.pool.blocks_for(min(req.ring_size, req.num_processed - req.ring_holes + new_tokens))
            if needed > held:
                new = self.pool.grow(req.slot, needed)
                req.blocks.extend(new)
                slots += [req.slot] * len(new)
                indices += range(held, needed)
                blocks += new
        self.batch.write_blocks(slots, indices, blocks)

    def finish(self, req: Request, reason: str) -> None:
        """Finish (or abort) a request wherever it is: its blocks and slot are free for the next admission."""
        if req.is_finished:
            return
        if req.status is RequestStatus.WAITING:
            self.waiting.remove(req)
            if req.session is not None:
                self.sessions.cancel(req.session)
        else:
            self.running.remove(req)
            parked = False
            if req.session is not None:
                # An error may have left the ring half written: only a clean finish or an abort between
                # steps parks it. The history is kept either way.
                parked = self.sessions.finish(req.session, req.prompt_ids + req.output_ids, slot=req.slot,
                                              num_processed=req.num_processed, ring_size=req.ring_size,
                                              ring_holes=req.ring_holes, keep_ring=reason != "error",
                                              archive=req.archive)
            if not parked:
                self.pool.release(req.slot)
            self.batch.release(req.slot)
            req.slot = None
            req.blocks = []
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason

"""The persistent batch (vLLM v1's shape): what the device needs of every running request, one row each.

A running request owns one row (its *slot*) from admission to finish. The row holds its next decode input
(the last sampled token), its position (tokens processed), its ring's budget and block table, its sampling
parameters, seed and step, and the token history its penalties read (prompt mask, output counts). Rows are
written when something changes — admit, a new block, a sampled token, finish — never rebuilt from Python
lists each step; a step's inputs are gathers of the rows it runs (`slot_ids`), the same gathers a CUDA graph
replays.

What a step does build from host lists (slot ids, chunk tokens, new block-table entries) reaches the device
through `host_to_device`: one pinned buffer and one non-blocking copy, never a blocking `torch.tensor(list,
device=...)`; nothing here reads a device value back.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import chain

import torch

from .request import Request
from .sampling import (SamplingBatch, fold_seed, forced_tokens, needs_history, row_flags, suppressed_ids,
                       uses_penalties)


def host_to_device(lists: Sequence[Sequence[int | float]], device: torch.device,
                   dtype: torch.dtype = torch.int64) -> list[torch.Tensor]:
    """One device tensor per host list, from one copy that does not block the host.

    `torch.tensor(list, device="cuda")` copies from pageable memory, so the host waits for the copy, and the
    copy waits for every kernel already queued. Written into pinned memory instead, the lists go in one
    non-blocking copy that the stream orders before the kernels that read it; the caching host allocator
    keeps the pinned block from reuse until the copy is done. On CPU the lists become one tensor.
    """
    on_cuda = torch.device(device).type == "cuda"
    flat = torch.tensor(list(chain.from_iterable(lists)), dtype=dtype, pin_memory=on_cuda)
    return list(flat.to(device, non_blocking=True).split([len(x) for x in lists]))


class InputBatch:
    def __init__(self, max_num_seqs: int, max_blocks_per_seq: int, vocab_size: int, device: torch.device, *,
                 empty_block: int = 0, scratch_slot: bool = False):
        """`empty_block` fills unused block-table entries (the pool's scratch block when there is one);
        `scratch_slot` adds one row never handed out, for the rows that pad a CUDA-graph batch."""
        self.max_num_seqs, self.vocab_size, self.device = max_num_seqs, vocab_size, device
        self.max_blocks_per_seq = max_blocks_per_seq
        self.empty_block = empty_block
        self.scratch_slot = max_num_seqs if scratch_slot else None
        rows = max_num_seqs + int(scratch_slot)
        i32, i64, f32 = (dict(dtype=t, device=device) for t in (torch.int32, torch.int64, torch.float32))
        self.token = torch.zeros(rows, **i64)  # next decode input: the last sampled token
        self.position = torch.zeros(rows, **i32)  # tokens processed = position of the next one
        self.kv_budget = torch.ones(rows, **i32)  # ring slots per layer and KV head
        self.ring_holes = torch.zeros(rows, **i32)  # Request.ring_holes: filled = min(budget, position - holes)
        self.ring_positions = torch.zeros(rows, dtype=torch.bool, device=device)  # positions="ring"
        self.block_table = torch.full((rows, max_blocks_per_seq), empty_block, **i32)
        self.seed = torch.zeros(rows, **i64)  # folded to 32 bits
        self.num_generated = torch.zeros(rows, **i64)  # the sampler's step counter
        self.reals = torch.ones(6, rows, **f32)  # temperature, top_p, min_p, repetition, presence, frequency
        self.top_k = torch.zeros(rows, **i64)
        self.greedy = torch.zeros(rows, dtype=torch.bool, device=device)
        self.penalised = torch.zeros(rows, dtype=torch.bool, device=device)  # repetition/presence/frequency
        self.min_tokens = torch.zeros(rows, **i64)
        # Token history, allocated when a request first needs it (a [rows, vocab] tensor each).
        self.prompt_mask: torch.Tensor | None = None
        self.output_counts: torch.Tensor | None = None
        self.stop_mask: torch.Tensor | None = None  # tokens min_tokens holds back
        self.requests: list[Request | None] = [None] * rows
        self._free = list(range(max_num_seqs - 1, -1, -1))  # pop() hands out low slots first

    @property
    def num_free(self) -> int:
        return len(self._free)

    # --- admit / finish --------------------------------------------------------------------------
    def admit(self, req: Request, ring_size: int) -> int:
        """Give `req` a row and write everything the device needs of it; return the slot."""
        slot = self._free.pop()
        self.requests[slot] = req
        p = req.params
        self.position[slot] = 0
        self.num_generated[slot] = 0
        self.kv_budget[slot] = ring_size
        self.ring_holes[slot] = 0
        self.ring_positions[slot] = req.positions == "ring"
        self.block_table[slot] = self.empty_block
        self.seed[slot] = fold_seed(req.seed)
        (reals,) = host_to_device([[1.0 if p.is_greedy else p.temperature, p.top_p, p.min_p, p.repetition_penalty,
                                    p.presence_penalty, p.frequency_penalty]], self.device, torch.float32)
        self.reals[:, slot] = reals
        self.top_k[slot] = max(p.top_k, 0)
        self.greedy[slot] = p.is_greedy
        self.penalised[slot] = uses_penalties(p)
        self.min_tokens[slot] = p.min_tokens
        if uses_penalties(p) or p.min_tokens > 0:
            self._write_history(slot, req)
        return slot

    def _write_history(self, slot: int, req: Request) -> None:
        """The row's prompt-token mask and zeroed output counts (penalties), and its stop tokens (min_tokens)."""
        p = req.params
        stop_ids = suppressed_ids(p, sorted(req.eos_ids)) if p.min_tokens > 0 else []
        prompt_ids, stop_ids = host_to_device([req.prompt_ids if uses_penalties(p) else [], stop_ids], self.device)
        if uses_penalties(p):
            self._history("prompt_mask", torch.bool)[slot] = False
            self.prompt_mask[slot, prompt_ids] = True
            self._history("output_counts", torch.int32)[slot] = 0
        if p.min_tokens > 0:
            self._history("stop_mask", torch.bool)[slot] = False
            self.stop_mask[slot, stop_ids] = True

    def release(self, slot: int) -> None:
        """The row is free for the next admission; nothing is zeroed (admit overwrites what it reads)."""
        if self.requests[slot] is None:
            raise RuntimeError(f"slot {slot} released twice")
        self.requests[slot] = None
        self._free.append(slot)

    def _history(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        if getattr(self, name) is None:
            setattr(self, name, torch.zeros(len(self.requests), self.vocab_size, dtype=dtype, device=self.device))
        return getattr(self, name)

    # --- writes during a step -------------------------------------------------------------------
    def write_blocks(self, slots: list[int], indices: list[int], blocks: list[int]) -> None:
        """New blocks of some rings: block_table[slot, index] = block, in one write."""
        if slots:
            rows, cols, blocks = host_to_device([slots, indices, blocks], self.device)
            self.block_table[rows, cols] = blocks.to(torch.int32)

    def advance(self, slot_ids: torch.Tensor, num_tokens: torch.Tensor) -> None:
        """These rows processed `num_tokens` more tokens each (their K/V went through the ring)."""
        self.position.index_add_(0, slot_ids, num_tokens.to(torch.int32))

    def record_sampled(self, slot_ids: torch.Tensor, tokens: torch.Tensor) -> None:
        """Sampled tokens become the rows' next decode inputs and enter their penalty counts."""
        self.token[slot_ids] = tokens
        self.num_generated[slot_ids] += 1
        if self.output_counts is not None:
            self.output_counts.index_put_((slot_ids, tokens), torch.ones_like(tokens, dtype=torch.int32),
                                          accumulate=True)

    # --- what a step reads ---------------------------------------------------------------------
    def sampling_batch(self, slot_ids: torch.Tensor, requests: list[Request]) -> SamplingBatch:
        """The sampler's view of these rows: gathers of the persistent parameters and token history."""
        params = [req.params for req in requests]
        steps = [len(req.output_ids) for req in requests]
        temperature, top_p, min_p, repetition, presence, frequency = self.reals[:, slot_ids].unbind(0)
        history = dict(suppressed=None, prompt_mask=None, output_counts=None)
        if needs_history(params, steps):
            history = self._gather_history(slot_ids, params, steps)
        forced = forced_tokens(params, steps)
        return SamplingBatch(
            temperature=temperature, greedy=self.greedy[slot_ids], top_k=self.top_k[slot_ids], top_p=top_p,
            min_p=min_p, repetition_penalty=repetition, presence_penalty=presence, frequency_penalty=frequency,
            seed=self.seed[slot_ids], step=self.num_generated[slot_ids], **history, **row_flags(params),
            processors=tuple((i, tuple(req.params.logits_processors), req.output_ids)
                             for i, req in enumerate(requests) if req.params.logits_processors),
            forced=host_to_device([forced], self.device)[0] if forced is not None else None)

    def _gather_history(self, slot_ids, params, steps) -> dict[str, torch.Tensor | None]:
        """Rows without a penalty read zeros (r = 1 and presence = frequency = 0 leave them as they are); a
        row's stop tokens are suppressed only while it is under min_tokens. Which rows those are is read
        from the rows themselves, so no per-step mask is built on the host."""
        out: dict[str, torch.Tensor | None] = dict(suppressed=None, prompt_mask=None, output_counts=None)
        if any(uses_penalties(p) for p in params):
            keep = self.penalised[slot_ids][:, None]
            out["prompt_mask"] = self.prompt_mask[slot_ids] & keep
            out["output_counts"] = self.output_counts[slot_ids] * keep
        if any(step < p.min_tokens for p, step in zip(params, steps)):
            under_min = self.num_generated[slot_ids] < self.min_tokens[slot_ids]
            out["suppressed"] = self.stop_mask[slot_ids] & under_min[:, None]
        return out

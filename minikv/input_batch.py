"""The persistent batch (vLLM v1's shape): what the device needs of every running request, one row each.

A running request owns one row (its *slot*) from admission to finish. The row holds its next decode input
(the last sampled token), its position (tokens processed), its ring's budget and block table, its sampling
parameters, seed and step, and the token history its penalties read (prompt mask, output counts). Rows are
written when something changes — admit, a new block, a sampled token, finish — never rebuilt from Python
lists each step; a step's inputs are gathers of the rows it runs (`slot_ids`), the same gathers a CUDA graph
replays.
"""

from __future__ import annotations

import torch

from .request import Request
from .sampling import (SamplingBatch, fold_seed, forced_tokens, needs_history, row_flags, suppressed_ids,
                       uses_penalties)


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
        self.ring_positions = torch.zeros(rows, dtype=torch.bool, device=device)  # positions="ring"
        self.block_table = torch.full((rows, max_blocks_per_seq), empty_block, **i32)
        self.seed = torch.zeros(rows, **i64)  # folded to 32 bits
        self.num_generated = torch.zeros(rows, **i64)  # the sampler's step counter
        self.reals = torch.ones(6, rows, **f32)  # temperature, top_p, min_p, repetition, presence, frequency
        self.top_k = torch.zeros(rows, **i64)
        self.greedy = torch.zeros(rows, dtype=torch.bool, device=device)
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
        self.ring_positions[slot] = req.positions == "ring"
        self.block_table[slot] = self.empty_block
        self.seed[slot] = fold_seed(req.seed)
        self.reals[:, slot] = torch.tensor([1.0 if p.is_greedy else p.temperature, p.top_p, p.min_p,
                                            p.repetition_penalty, p.presence_penalty, p.frequency_penalty])
        self.top_k[slot] = max(p.top_k, 0)
        self.greedy[slot] = p.is_greedy
        if uses_penalties(p):
            self._history("prompt_mask", torch.bool)[slot] = False
            self.prompt_mask[slot, torch.tensor(req.prompt_ids, device=self.device)] = True
            self._history("output_counts", torch.int32)[slot] = 0
        if p.min_tokens > 0:
            self._history("stop_mask", torch.bool)[slot] = False
            stop_ids = suppressed_ids(p, sorted(req.eos_ids))
            if stop_ids:
                self.stop_mask[slot, torch.tensor(stop_ids, device=self.device)] = True
        return slot

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
            rows = torch.tensor(slots, device=self.device)
            cols = torch.tensor(indices, device=self.device)
            self.block_table[rows, cols] = torch.tensor(blocks, dtype=torch.int32, device=self.device)

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
            history = self._gather_history(slot_ids, requests, steps)
        return SamplingBatch(
            temperature=temperature, greedy=self.greedy[slot_ids], top_k=self.top_k[slot_ids], top_p=top_p,
            min_p=min_p, repetition_penalty=repetition, presence_penalty=presence, frequency_penalty=frequency,
            seed=self.seed[slot_ids], step=self.num_generated[slot_ids], **history, **row_flags(params),
            processors=tuple((i, tuple(req.params.logits_processors), req.output_ids)
                             for i, req in enumerate(requests) if req.params.logits_processors),
            forced=forced_tokens(params, steps, self.device))

    def _gather_history(self, slot_ids, requests, steps) -> dict[str, torch.Tensor | None]:
        """Rows without a penalty read zeros (r = 1 and presence = frequency = 0 leave them as they are); a
        row's stop tokens are suppressed only while it is under min_tokens."""
        penalised = [uses_penalties(r.params) for r in requests]
        under_min = [step < r.params.min_tokens for step, r in zip(steps, requests)]
        out: dict[str, torch.Tensor | None] = dict(suppressed=None, prompt_mask=None, output_counts=None)
        if any(penalised):
            keep = torch.tensor(penalised, device=self.device)[:, None]
            out["prompt_mask"] = self.prompt_mask[slot_ids] & keep
            out["output_counts"] = self.output_counts[slot_ids] * keep
        if any(under_min):
            out["suppressed"] = self.stop_mask[slot_ids] & torch.tensor(under_min, device=self.device)[:, None]
        return out

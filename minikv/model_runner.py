"""The mechanism under the engine: turns a scheduled step into one forward pass over a flat batch.

The scheduler decides *what* runs (policy); the runner owns the tensors (mechanism): it lays the step's
tokens side by side (decodes first, then prefill chunks), tells the attention call point which ring each
segment uses, runs the model once, and returns the logits of the rows that sample a token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .attention import PrefillSegment, RingAttention, StepPlan
from .scheduler import SchedulerOutput
from .sequence import Sequence


@dataclass
class StepResult:
    seqs: list[Sequence]  # sequences that sample a token this step, in the order of `logits` rows
    logits: torch.Tensor  # [len(seqs), vocab] fp32


class ModelRunner:
    def __init__(self, model: torch.nn.Module, attention: RingAttention, device: torch.device):
        self.model, self.attention, self.device = model, attention, device
        self.budget = attention.store.budget

    @torch.inference_mode()
    def run(self, sched: SchedulerOutput) -> StepResult:
        input_ids, positions, plan = self._lay_out(sched)
        self.attention.begin_step(plan)
        layer_inputs = [] if self.attention.policy.needs_hidden_states else None
        hidden = self.model(input_ids, positions, self.attention, layer_inputs)
        self.attention.end_step(layer_inputs)

        sample_rows, sample_seqs = list(range(plan.num_decode)), list(sched.decodes)
        for seg, chunk in zip(plan.prefills, sched.prefills):
            seq = chunk.seq
            if seq.want_prompt_logprobs:
                self._record_prompt_logprobs(seq, hidden[seg.start: seg.start + seg.length], seg.first_pos)
            seq.num_processed += chunk.length
            if not seq.is_prefilling:  # the chunk that ends the prompt samples the first output token
                sample_rows.append(seg.start + seg.length - 1)
                sample_seqs.append(seq)
        for seq in sched.decodes:
            seq.num_processed += 1
        rows = torch.tensor(sample_rows, dtype=torch.long, device=self.device)
        return StepResult(sample_seqs, self.model.compute_logits(hidden.index_select(0, rows)))

    def _lay_out(self, sched: SchedulerOutput):
        ids: list[int] = []
        positions: list[int] = []
        for seq in sched.decodes:
            ids.append(seq.token_at(seq.num_processed))
            positions.append(seq.num_processed)
        plan = StepPlan(num_decode=len(sched.decodes))
        if sched.decodes:
            as_tensor = lambda xs: torch.tensor(xs, dtype=torch.int32, device=self.device)  # noqa: E731
            plan.decode_rings = as_tensor([s.ring for s in sched.decodes])
            plan.decode_filled = as_tensor([min(self.budget, s.num_processed) for s in sched.decodes])
            plan.decode_pos = as_tensor(positions)
        for chunk in sched.prefills:
            seq = chunk.seq
            seq_start = seq.num_processed
            plan.prefills.append(PrefillSegment(ring=seq.ring, start=len(ids), length=chunk.length,
                                                filled=min(self.budget, seq_start), first_pos=seq_start))
            ids.extend(seq.prompt_ids[seq_start: seq_start + chunk.length])
            positions.extend(range(seq_start, seq_start + chunk.length))
        return (torch.tensor(ids, dtype=torch.long, device=self.device),
                torch.tensor(positions, dtype=torch.long, device=self.device), plan)

    def _record_prompt_logprobs(self, seq: Sequence, hidden: torch.Tensor, first_pos: int) -> None:
        """log p(prompt[i+1] | prompt[:i+1]) for the chunk's rows: the eviction-aware next-token loss."""
        targets = seq.prompt_ids[first_pos + 1: first_pos + 1 + hidden.shape[0]]
        if not targets:
            return
        logprobs = torch.log_softmax(self.model.compute_logits(hidden[: len(targets)]), dim=-1)
        idx = torch.tensor(targets, device=logprobs.device)[:, None]
        seq.prompt_logprobs.extend(logprobs.gather(1, idx)[:, 0].tolist())

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
from .request import Request, position_logprobs


@dataclass
class StepResult:
    seqs: list[Request]  # sequences that sample a token this step, in the order of `logits` rows
    logits: torch.Tensor  # [len(seqs), vocab] fp32


class ModelRunner:
    def __init__(self, model: torch.nn.Module, attention: RingAttention, device: torch.device, *,
                 max_num_seqs: int = 1, use_cuda_graphs: bool = False):
        self.model, self.attention, self.device = model, attention, device
        self.budget = attention.store.budget
        self.graphs = DecodeGraphs(model, attention, max_num_seqs, device) if use_cuda_graphs else None

    @torch.inference_mode()
    def run(self, sched: SchedulerOutput) -> StepResult:
        input_ids, positions, plan = self._lay_out(sched)
        self.attention.begin_step(plan)
        # Policies that read each layer's input hidden state (epikv) run eagerly: a graph does not return them.
        layer_inputs = [] if self.attention.policy.needs_hidden_states else None
        if self.graphs is not None and not plan.prefills and layer_inputs is None:
            hidden = self.graphs.replay(input_ids, positions, plan)
        else:
            hidden = self.model(input_ids, positions, self.attention, layer_inputs)
        self.attention.end_step(layer_inputs)

        sample_rows, sample_seqs = list(range(plan.num_decode)), list(sched.decodes)
        for seg, chunk in zip(plan.prefills, sched.prefills):
            seq = chunk.seq
            if seq.params.prompt_logprobs is not None:
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
            plan.decode_rings = as_tensor([s.slot for s in sched.decodes])
            plan.decode_filled = as_tensor([min(self.budget, s.num_processed) for s in sched.decodes])
            plan.decode_pos = as_tensor(positions)
        for chunk in sched.prefills:
            seq = chunk.seq
            seq_start = seq.num_processed
            plan.prefills.append(PrefillSegment(ring=seq.slot, start=len(ids), length=chunk.length,
                                                filled=min(self.budget, seq_start), first_pos=seq_start))
            ids.extend(seq.prompt_ids[seq_start: seq_start + chunk.length])
            positions.extend(range(seq_start, seq_start + chunk.length))
        return (torch.tensor(ids, dtype=torch.long, device=self.device),
                torch.tensor(positions, dtype=torch.long, device=self.device), plan)

    def _record_prompt_logprobs(self, seq: Request, hidden: torch.Tensor, first_pos: int) -> None:
        """log p(prompt[i+1] | prompt[:i+1]) for the chunk's rows, with the top `prompt_logprobs` tokens:
        under an evicting policy this is the eviction-aware next-token loss."""
        targets = seq.prompt_ids[first_pos + 1: first_pos + 1 + hidden.shape[0]]
        if not targets:
            return
        logprobs = torch.log_softmax(self.model.compute_logits(hidden[: len(targets)]).float(), dim=-1)
        chosen = logprobs.gather(1, torch.tensor(targets, device=logprobs.device)[:, None])[:, 0].tolist()
        n = seq.params.prompt_logprobs
        top_vals, top_ids = logprobs.topk(n, dim=-1) if n else (None, None)
        for i, token in enumerate(targets):
            ids, vals = (top_ids[i].tolist(), top_vals[i].tolist()) if n else ([], [])
            seq.prompt_logprobs.append(position_logprobs(token, chosen[i], ids, vals, lambda t: None))

class DecodeGraphs:
    """CUDA graphs of the decode-only step, one per padded batch size (the nano-vllm recipe).

    A decode step launches a few kernels per layer with tiny inputs; on a GPU the launch overhead
    dominates, so the whole forward is captured once per batch size and replayed. Inputs live in static
    buffers; a batch is padded up to the next captured size with rows that point at the store's scratch
    ring (never handed to a sequence), so padding never touches a real ring.
    """

    def __init__(self, model, attention: RingAttention, max_batch: int, device: torch.device):
        self.model, self.attention = model, attention
        self.sizes = sorted({*(b for b in (1, 2, 4, 8) if b <= max_batch), *range(16, max_batch + 1, 16), max_batch})
        self.scratch = attention.store.scratch_ring
        i32 = dict(dtype=torch.int32, device=device)
        self.input_ids = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.positions = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.rings = torch.full((max_batch,), self.scratch, **i32)
        self.filled = torch.zeros(max_batch, **i32)
        self.new_pos = torch.zeros(max_batch, **i32)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        pool = None
        for size in reversed(self.sizes):  # largest first, so smaller graphs reuse its memory pool
            graph, hidden = self._capture(size, pool)
            pool = graph.pool()
            self.graphs[size] = (graph, hidden)

    def _plan(self, size: int) -> StepPlan:
        return StepPlan(num_decode=size, decode_rings=self.rings[:size], decode_filled=self.filled[:size],
                        decode_pos=self.new_pos[:size])

    @torch.inference_mode()
    def _capture(self, size: int, pool):
        self.attention.plan = self._plan(size)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm up (autotuning, lazy init) outside the capture
            self.model(self.input_ids[:size], self.positions[:size], self.attention)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            hidden = self.model(self.input_ids[:size], self.positions[:size], self.attention)
        return graph, hidden

    def replay(self, input_ids: torch.Tensor, positions: torch.Tensor, plan: StepPlan) -> torch.Tensor:
        n = plan.num_decode
        size = next(b for b in self.sizes if b >= n)
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.rings[:n].copy_(plan.decode_rings)
        self.filled[:n].copy_(plan.decode_filled)
        self.new_pos[:n].copy_(plan.decode_pos)
        self.rings[n:size].fill_(self.scratch)  # padding rows write only into the scratch ring
        self.filled[n:size].zero_()
        self.new_pos[n:size].zero_()
        graph, hidden = self.graphs[size]
        graph.replay()
        return hidden[:n]

"""The mechanism under the engine: turns a scheduled step into one forward pass over a flat batch.

The scheduler decides *what* runs (policy); the runner owns the tensors (mechanism). It lays the step's
tokens side by side (decodes first, then prefill chunks), reading the decode inputs straight from the
persistent batch (each decoding request's last sampled token and position live in its row), tells the
attention call point which ring and block table each segment uses, runs the model once, and returns the
logits of the rows that sample a token. After the step, the rows' positions advance on the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .attention import PrefillSegment, RingAttention, StepPlan
from .input_batch import InputBatch
from .request import Request, position_logprobs
from .scheduler import SchedulerOutput


@dataclass
class StepResult:
    requests: list[Request]  # requests that sample a token this step, in the order of `logits` rows
    slot_ids: torch.Tensor  # [len(requests)] int64: their batch slots
    logits: torch.Tensor  # [len(requests), vocab] fp32


class ModelRunner:
    def __init__(self, model: torch.nn.Module, attention: RingAttention, batch: InputBatch, device: torch.device,
                 *, use_cuda_graphs: bool = False, workers=None):
        """`workers` (minikv.distributed.Workers): under tensor parallelism, the other ranks, which get
        each step's inputs before the forward (they run eagerly: no CUDA graphs then)."""
        self.model, self.attention, self.batch, self.device = model, attention, batch, device
        self.workers = workers
        use_cuda_graphs = use_cuda_graphs and workers is None
        # Policies that read each layer's input hidden state (epikv) run eagerly: a graph does not return them.
        use_cuda_graphs = use_cuda_graphs and not attention.policy.needs_hidden_states
        self.graphs = DecodeGraphs(model, attention, batch, device) if use_cuda_graphs else None

    @torch.inference_mode()
    def run(self, sched: SchedulerOutput) -> StepResult:
        decode_slots = torch.tensor([r.slot for r in sched.decodes], dtype=torch.long, device=self.device)
        plan = self._plan(sched, decode_slots)
        self.attention.begin_step(plan)
        layer_inputs = [] if self.attention.policy.needs_hidden_states else None
        if self.graphs is not None and not plan.prefills:
            hidden = self.graphs.replay(decode_slots)
        else:
            input_ids, positions = self._inputs(sched, decode_slots)
            if self.workers is not None:  # the other ranks' one message of the step
                self.workers.send_step(plan, input_ids, positions, logit_rows(sched, plan))
            hidden = self.model(input_ids, positions, self.attention, layer_inputs)
        self.attention.end_step(layer_inputs)
        result = self._finish_step(sched, plan, decode_slots, hidden)
        if self.workers is not None:
            self.workers.end_step()
        return result

    def _plan(self, sched: SchedulerOutput, decode_slots: torch.Tensor) -> StepPlan:
        plan = decode_plan(self.batch, decode_slots)
        start = len(sched.decodes)
        for chunk in sched.prefills:
            req = chunk.req
            plan.prefills.append(PrefillSegment(
                slot=req.slot, start=start, length=chunk.length, filled=min(req.ring_size, req.num_processed),
                first_pos=req.num_processed, ring_size=req.ring_size, table=self.batch.block_table[req.slot],
                ends_prompt=req.num_processed + chunk.length == len(req.prompt_ids)))
            start += chunk.length
        return plan

    def _inputs(self, sched: SchedulerOutput, decode_slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and positions of the flat batch: decodes from the persistent batch, then the chunks."""
        ids = [self.batch.token[decode_slots]]
        positions = [self.batch.position[decode_slots].long()]
        if sched.prefills:
            chunk_ids, chunk_positions = [], []
            for chunk in sched.prefills:
                start = chunk.req.num_processed
                chunk_ids += chunk.req.prompt_ids[start: start + chunk.length]
                chunk_positions += range(start, start + chunk.length)
            ids.append(torch.tensor(chunk_ids, dtype=torch.long, device=self.device))
            positions.append(torch.tensor(chunk_positions, dtype=torch.long, device=self.device))
        return torch.cat(ids), torch.cat(positions)

    def _finish_step(self, sched, plan: StepPlan, decode_slots, hidden) -> StepResult:
        sample_rows, sampling = list(range(plan.num_decode)), list(sched.decodes)
        for seg, chunk in zip(plan.prefills, sched.prefills):
            req = chunk.req
            if req.params.prompt_logprobs is not None:
                self._record_prompt_logprobs(req, hidden[seg.start: seg.start + seg.length], seg.first_pos)
            req.num_processed += chunk.length
            if seg.ends_prompt:  # the chunk that ends the prompt samples the first output token
                sample_rows.append(seg.start + seg.length - 1)
                sampling.append(req)
        for req in sched.decodes:
            req.num_processed += 1
        advanced = torch.tensor([c.req.slot for c in sched.prefills], dtype=torch.long, device=self.device)
        counts = torch.tensor([c.length for c in sched.prefills], dtype=torch.int32, device=self.device)
        self.batch.advance(torch.cat([decode_slots, advanced]),
                           torch.cat([torch.ones_like(decode_slots, dtype=torch.int32), counts]))
        rows = torch.tensor(sample_rows, dtype=torch.long, device=self.device)
        slot_ids = torch.tensor([r.slot for r in sampling], dtype=torch.long, device=self.device)
        return StepResult(sampling, slot_ids, self.model.compute_logits(hidden.index_select(0, rows)))

    def _record_prompt_logprobs(self, req: Request, hidden: torch.Tensor, first_pos: int) -> None:
        """log p(prompt[i+1] | prompt[:i+1]) for the chunk's rows, with the top `prompt_logprobs` tokens:
        under an evicting policy this is the eviction-aware next-token loss."""
        targets = req.prompt_ids[first_pos + 1: first_pos + 1 + hidden.shape[0]]
        if not targets:
            return
        logprobs = torch.log_softmax(self.model.compute_logits(hidden[: len(targets)]).float(), dim=-1)
        chosen = logprobs.gather(1, torch.tensor(targets, device=logprobs.device)[:, None])[:, 0].tolist()
        n = req.params.prompt_logprobs
        top_vals, top_ids = logprobs.topk(n, dim=-1) if n else (None, None)
        for i, token in enumerate(targets):
            ids, vals = (top_ids[i].tolist(), top_vals[i].tolist()) if n else ([], [])
            req.prompt_logprobs.append(position_logprobs(token, chosen[i], ids, vals, lambda t: None))


def logit_rows(sched: SchedulerOutput, plan: StepPlan) -> list[list[int]]:
    """The flat-batch rows of each `compute_logits` call `_finish_step` will make, in its order: the
    prompt-logprob rows of each chunk that asks for them, then the rows that sample. Under tensor
    parallelism the other ranks make the same LM-head calls (each gathers its vocabulary shard to rank 0)."""
    calls = []
    for seg, chunk in zip(plan.prefills, sched.prefills):
        if chunk.req.params.prompt_logprobs is not None:
            targets = min(seg.length, len(chunk.req.prompt_ids) - 1 - seg.first_pos)
            if targets > 0:
                calls.append(list(range(seg.start, seg.start + targets)))
    calls.append(list(range(plan.num_decode)) + [seg.start + seg.length - 1 for seg in plan.prefills if seg.ends_prompt])
    return calls


def decode_plan(batch: InputBatch, slots: torch.Tensor) -> StepPlan:
    """The decode half of a step's plan: gathers of the persistent batch's rows (no host data), so a CUDA
    graph captures them and replays them for whatever slots its static buffer holds."""
    position = batch.position[slots]
    budget = batch.kv_budget[slots]
    return StepPlan(num_decode=len(slots), decode_slots=slots, decode_tables=batch.block_table[slots],
                    decode_filled=torch.minimum(position, budget), decode_budget=budget, decode_pos=position)


class DecodeGraphs:
    """CUDA graphs of the decode-only step, one per padded batch size (the nano-vllm recipe).

    A decode step launches a few kernels per layer with tiny inputs; on a GPU the launch overhead
    dominates, so the whole forward is captured once per batch size and replayed. The graph's only input is
    a static buffer of slot ids: the token ids, positions, block tables and budgets are gathered from the
    persistent batch inside the graph. A batch is padded up to the next captured size with the batch's
    scratch slot, whose block table points at the pool's scratch block, so padding never touches a ring.
    """

    def __init__(self, model, attention: RingAttention, batch: InputBatch, device: torch.device):
        self.model, self.attention, self.batch = model, attention, batch
        max_batch = batch.max_num_seqs
        self.sizes = sorted({*(b for b in (1, 2, 4, 8) if b <= max_batch), *range(16, max_batch + 1, 16), max_batch})
        self.slot_ids = torch.full((max_batch,), batch.scratch_slot, dtype=torch.long, device=device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        pool = None
        for size in reversed(self.sizes):  # largest first, so smaller graphs reuse its memory pool
            graph, hidden = self._capture(size, pool)
            pool = graph.pool()
            self.graphs[size] = (graph, hidden)

    def _forward(self, size: int) -> torch.Tensor:
        slots = self.slot_ids[:size]
        self.attention.plan = decode_plan(self.batch, slots)
        return self.model(self.batch.token[slots], self.batch.position[slots].long(), self.attention)

    @torch.inference_mode()
    def _capture(self, size: int, pool):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm up (autotuning, lazy init) outside the capture
            self._forward(size)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            hidden = self._forward(size)
        return graph, hidden

    def replay(self, slot_ids: torch.Tensor) -> torch.Tensor:
        n = len(slot_ids)
        size = next(b for b in self.sizes if b >= n)
        self.slot_ids[:n].copy_(slot_ids)
        self.slot_ids[n:size].fill_(self.batch.scratch_slot)
        graph, hidden = self.graphs[size]
        graph.replay()
        return hidden[:n]

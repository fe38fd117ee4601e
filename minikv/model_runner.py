"""The mechanism under the engine: turns a scheduled step into one forward pass over a flat batch.

The scheduler decides *what* runs (policy); the runner owns the tensors (mechanism). It lays the step's
tokens side by side (decodes first, then prefill chunks), reading the decode inputs straight from the
persistent batch (each decoding request's last sampled token and position live in its row), tells the
attention call point which ring and block table each segment uses, runs the model once, and returns the
logits of the rows that sample a token. After the step, the rows' positions advance on the device.

Everything a step needs from the host (slot ids, chunk tokens and positions, which rows sample) is known
before the forward pass and reaches the device in one non-blocking copy (`input_batch.host_to_device`).
The runner reads nothing back but prompt logprobs (one read per chunk that asks for them); the engine's
read of the sampled ids is then a decode step's one synchronisation (tests/test_step_sync.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .attention import PrefillSegment, RingAttention, StepPlan
from .archive import archive_step_of
from .input_batch import InputBatch, host_to_device
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
        inputs = StepInputs.stage(sched, self.device)
        plan = self._plan(sched, inputs.decode_slots)
        self.attention.begin_step(plan)
        archive_step = archive_step_of(sched, plan, self.attention.archive)
        layer_inputs = [] if self.attention.policy.needs_hidden_states else None
        if self.graphs is not None and not plan.prefills and archive_step is None:
            hidden = self.graphs.replay(inputs.decode_slots)
        else:
            input_ids = torch.cat([self.batch.token[inputs.decode_slots], inputs.chunk_ids])
            positions = torch.cat([self.batch.position[inputs.decode_slots].long(), inputs.chunk_positions])
            if self.workers is not None:  # the other ranks' one message of the step
                self.workers.send_step(plan, input_ids, positions, logit_rows(sched, plan, inputs.sample_row_ids))
            hidden = self.model(input_ids, positions, self.attention, layer_inputs)
        self.attention.end_step(layer_inputs)
        result = self._finish_step(sched, plan, inputs, hidden)
        if self.workers is not None:
            self.workers.end_step()
        return result

    def _plan(self, sched: SchedulerOutput, decode_slots: torch.Tensor) -> StepPlan:
        plan = decode_plan(self.batch, decode_slots)
        start = len(sched.decodes)
        for chunk in sched.prefills:
            req = chunk.req
            plan.prefills.append(PrefillSegment(
                slot=req.slot, start=start, length=chunk.length, filled=req.ring_filled,
                first_pos=req.num_processed, ring_size=req.ring_size, table=self.batch.block_table[req.slot],
                ends_prompt=ends_prompt(chunk), ring_positions=req.positions == "ring"))
            start += chunk.length
        return plan

    def _finish_step(self, sched, plan: StepPlan, inputs: StepInputs, hidden) -> StepResult:
        for seg, chunk in zip(plan.prefills, sched.prefills):
            req = chunk.req
            if req.params.prompt_logprobs is not None:
                self._record_prompt_logprobs(req, hidden[seg.start: seg.start + seg.length], seg.first_pos)
            req.num_processed += chunk.length
        for req in sched.decodes:
            req.num_processed += 1
        self.batch.advance(inputs.advanced_slots, inputs.advanced_counts)
        logits = self.model.compute_logits(hidden.index_select(0, inputs.sample_rows))
        return StepResult(inputs.sampling, inputs.sample_slots, logits)

    def _record_prompt_logprobs(self, req: Request, hidden: torch.Tensor, first_pos: int) -> None:
        """log p(prompt[i+1] | prompt[:i+1]) for the chunk's rows, with the top `prompt_logprobs` tokens:
        under an evicting policy this is the eviction-aware next-token loss. The chunk's numbers come back
        in one read, not one per row."""
        targets = req.prompt_ids[first_pos + 1: first_pos + 1 + hidden.shape[0]]
        if not targets:
            return
        logprobs = torch.log_softmax(self.model.compute_logits(hidden[: len(targets)]).float(), dim=-1)
        (target_ids,) = host_to_device([targets], logprobs.device)
        n = req.params.prompt_logprobs
        columns = [logprobs.gather(1, target_ids[:, None])]
        if n:
            top_vals, top_ids = logprobs.topk(n, dim=-1)
            columns += [top_vals, top_ids]  # ids < 2^53: exact as float64
        rows = torch.cat([c.double() for c in columns], dim=1).tolist()
        for token, row in zip(targets, rows):
            ids, vals = [int(i) for i in row[1 + n:]], row[1: 1 + n]
            req.prompt_logprobs.append(position_logprobs(token, row[0], ids, vals, lambda t: None))


def ends_prompt(chunk) -> bool:
    """Whether this chunk ends its request's prompt (and so samples the first output token)."""
    return chunk.req.num_processed + chunk.length == len(chunk.req.prompt_ids)


@dataclass
class StepInputs:
    """A step's host-side lists on the device, from one copy: made before the forward pass, read after it."""

    decode_slots: torch.Tensor  # int64 [num_decode]
    chunk_ids: torch.Tensor  # int64: the prefill chunks' token ids, side by side
    chunk_positions: torch.Tensor  # int64
    advanced_slots: torch.Tensor  # int64: every row that processed tokens this step...
    advanced_counts: torch.Tensor  # int32: ...and how many
    sample_rows: torch.Tensor  # int64: the rows of the flat batch whose next token is sampled...
    sample_slots: torch.Tensor  # int64: ...their batch slots
    sampling: list[Request]  # ...and their requests
    sample_row_ids: list[int]  # `sample_rows` as the host built it (tensor parallelism sends it to the other ranks)

    @classmethod
    def stage(cls, sched: SchedulerOutput, device: torch.device) -> StepInputs:
        decode_slots = [r.slot for r in sched.decodes]
        chunk_ids, chunk_positions, sample_rows, sampling = [], [], list(range(len(decode_slots))), list(sched.decodes)
        start = len(decode_slots)
        for chunk in sched.prefills:
            first = chunk.req.num_processed
            chunk_ids += chunk.req.prompt_ids[first: first + chunk.length]
            chunk_positions += range(first, first + chunk.length)
            start += chunk.length
            if ends_prompt(chunk):
                sample_rows.append(start - 1)
                sampling.append(chunk.req)
        advanced = decode_slots + [c.req.slot for c in sched.prefills]
        counts = [1] * len(decode_slots) + [c.length for c in sched.prefills]
        tensors = host_to_device([decode_slots, chunk_ids, chunk_positions, advanced, counts, sample_rows,
                                  [r.slot for r in sampling]], device)
        tensors[4] = tensors[4].to(torch.int32)
        return cls(*tensors, sampling=sampling, sample_row_ids=sample_rows)


def logit_rows(sched: SchedulerOutput, plan: StepPlan, sample_rows: list[int]) -> list[list[int]]:
    """The flat-batch rows of each `compute_logits` call `_finish_step` will make, in its order: the
    prompt-logprob rows of each chunk that asks for them, then the rows that sample. Under tensor
    parallelism the other ranks make the same LM-head calls (each gathers its vocabulary shard to rank 0)."""
    calls = []
    for seg, chunk in zip(plan.prefills, sched.prefills):
        if chunk.req.params.prompt_logprobs is not None:
            targets = min(seg.length, len(chunk.req.prompt_ids) - 1 - seg.first_pos)
            if targets > 0:
                calls.append(list(range(seg.start, seg.start + targets)))
    calls.append(sample_rows)
    return calls


def decode_plan(batch: InputBatch, slots: torch.Tensor) -> StepPlan:
    """The decode half of a step's plan: gathers of the persistent batch's rows (no host data), so a CUDA
    graph captures them and replays them for whatever slots its static buffer holds."""
    position = batch.position[slots]
    budget = batch.kv_budget[slots]
    filled = torch.minimum(position - batch.ring_holes[slots], budget)
    ring = batch.ring_positions[slots]
    # under positions="ring" the query's RoPE position follows the ring's ranks 0..filled-1
    return StepPlan(num_decode=len(slots), decode_slots=slots, decode_tables=batch.block_table[slots],
                    decode_filled=filled, decode_budget=budget, decode_pos=position,
                    decode_rope_pos=torch.where(ring, filled, position), decode_ring=ring)


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

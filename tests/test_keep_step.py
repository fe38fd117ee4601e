"""The prefill keep step runs once per layer for all of a step's segments (minikv.prefill_keep): the same
rings as when each segment runs alone, and a number of torch operations that does not grow with the
number of segments (the per-ring policy calls aside)."""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

from minikv.attention import PrefillSegment, RingAttention, StepPlan
from minikv.block_pool import KVPool
from minikv.config import ModelConfig
from minikv.policies import make_policy
from minikv.prefill_keep import KeepStep

CONFIG = ModelConfig(architecture="LlamaForCausalLM", vocab_size=8, hidden_size=64, intermediate_size=8,
                     num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16)
BLOCK = 8
BUDGETS = (24, 32, 24, 40)
FIRST = (20, 30, 10, 40)  # ring 2 stays within its budget, the others evict at the second chunk
SECOND = (12, 9, 6, 16)
RING_POSITIONS = (False, True, False, True)
INV_FREQ = 1.0 / (10000 ** (torch.arange(0, CONFIG.head_dim, 2).float() / CONFIG.head_dim))


class _CountOps(TorchFunctionMode):
    """Counts torch calls (functions, methods, indexing) made while `active`."""

    def __init__(self):
        super().__init__()
        self.count, self.active = 0, True

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.count += self.active
        return func(*args, **(kwargs or {}))


def _tables():
    """Each ring's blocks, scattered over the pool and out of order."""
    tables, next_block = [], 0
    for budget in BUDGETS:
        n = -(-budget // BLOCK)
        tables.append(torch.arange(next_block + n - 1, next_block - 1, -1, dtype=torch.int32))
        next_block += n
    return tables, next_block


def _chunk(ring: int, step: int, length: int):
    g = torch.Generator().manual_seed(100 * ring + step)
    return [torch.randn(length, h, CONFIG.head_dim, generator=g) for h in (4, 2, 2)]  # q, k, v


def _run(policy_name: str, groups: list[list[int]], counter: _CountOps | None = None):
    """Two chunks per ring; in each step the rings of one group run together. Returns every ring's pool
    contents and the attention outputs."""
    policy = make_policy(policy_name, n_sink=2, window=4)
    tables, num_blocks = _tables()
    pool = KVPool(CONFIG, num_blocks, BLOCK, dtype=torch.float32, device=torch.device("cpu"),
                  edges_per_slot=policy.top_m)
    attention = RingAttention(pool, policy, scale=0.25, seed=3, num_slots=len(BUDGETS), max_budget=max(BUDGETS))
    outputs = {}
    for step, lengths in enumerate((FIRST, SECOND)):
        for group in groups:
            segments, parts, start = [], [], 0
            for r in group:
                done = 0 if step == 0 else FIRST[r]
                segments.append(PrefillSegment(slot=r, start=start, length=lengths[r],
                                               filled=min(done, BUDGETS[r]), first_pos=done, ring_size=BUDGETS[r],
                                               table=tables[r], ends_prompt=step == 1,
                                               ring_positions=RING_POSITIONS[r]))
                parts.append(_chunk(r, step, lengths[r]))
                start += lengths[r]
            q, k, v = (torch.cat(p) for p in zip(*parts))
            attention.begin_step(StepPlan(prefills=segments))
            for layer in range(CONFIG.num_layers):
                out = attention.forward(layer, q, k, v, INV_FREQ)
                for seg in segments:
                    outputs[seg.slot, step, layer] = out[seg.start:seg.start + seg.length]
            attention.end_step(None)
    rings = {}
    for r, budget in enumerate(BUDGETS):
        filled = min(FIRST[r] + SECOND[r], budget)
        for name in ("k", "v", "pos", "score", "edge_slot", "edge_pos", "edge_w", "held", "rope_pos"):
            rings[r, name] = pool.ring(name, tables[r].tolist(), filled)
    return rings, outputs


@pytest.mark.parametrize("policy", ["nexus", "snapkv", "h2o", "streaming", "nestedkv"])
def test_segments_batched_give_the_rings_they_get_alone(policy):
    together, out_together = _run(policy, [[0, 1, 2, 3]])
    alone, out_alone = _run(policy, [[0], [1], [2], [3]])
    for key in together:
        assert torch.equal(together[key], alone[key]), key
    for key in out_together:
        assert torch.equal(out_together[key], out_alone[key]), key


def test_keep_step_ops_per_layer_do_not_grow_with_segments(monkeypatch):
    counter = _CountOps()
    runs = {}
    real_run, real_score = KeepStep.run, KeepStep._score_segment

    def counted_run(self, layer, *args):
        counter.count = 0
        with counter:
            real_run(self, layer, *args)
        runs.setdefault(len(args[1]), []).append(counter.count)

    def policy_part(self, *args):  # the per-ring policy calls are not the keep step's own work
        counter.active = False
        try:
            return real_score(self, *args)
        finally:
            counter.active = True

    monkeypatch.setattr(KeepStep, "run", counted_run)
    monkeypatch.setattr(KeepStep, "_score_segment", policy_part)
    _run("nexus", [[0, 1, 2, 3]])
    _run("nexus", [[0], [1], [2], [3]])
    # per layer: the second chunk's keep step (evicting) of 4 segments at once vs 1 segment
    four, one = runs[4][-1], runs[1][-1]
    assert four > 20  # the counter does see the keep step's work
    assert four == one, (four, one)

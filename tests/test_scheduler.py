"""The scheduler alone: step plans, chunking, admission by block reservation, FCFS, block growth and
release (no model runs)."""

from __future__ import annotations

import pytest
import torch

from minikv.config import ModelConfig
from minikv.errors import ConfigError
from minikv.block_pool import KVPool
from minikv.input_batch import InputBatch
from minikv.request import Request, RequestStatus
from minikv.sampling import SamplingParams
from minikv.scheduler import Scheduler

CONFIG = ModelConfig(architecture="LlamaForCausalLM", vocab_size=64, hidden_size=8, intermediate_size=16,
                     num_layers=1, num_heads=2, num_kv_heads=1, head_dim=4)


BLOCK, BUDGET = 4, 16


def make_scheduler(num_rings: int = 3, max_num_batched_tokens: int = 16, chunk: int = 8,
                   num_blocks: int | None = None) -> Scheduler:
    """`num_rings` batch slots; a pool of `num_blocks` blocks of 4 slots (default: num_rings full rings)."""
    pool = KVPool(CONFIG, num_blocks or num_rings * BUDGET // BLOCK, BLOCK, dtype=torch.float32,
                  device=torch.device("cpu"))
    batch = InputBatch(num_rings, BUDGET // BLOCK, CONFIG.vocab_size, torch.device("cpu"), empty_block=pool.scratch_block)
    return Scheduler(pool, batch, max_num_batched_tokens=max_num_batched_tokens, chunk=chunk)


def make_seq(name: str, prompt_len: int, max_tokens: int = 100, budget: int = BUDGET) -> Request:
    ring = min(budget, prompt_len + max_tokens)
    return Request(name, list(range(prompt_len)), SamplingParams(max_tokens=max_tokens), seed=0, eos_ids=frozenset(),
                   tokenizer=None, kv_budget=budget, ring_size=ring, num_blocks_needed=-(-ring // BLOCK))


def run_plan(plan) -> None:
    """What the model runner and engine do with a plan: tokens go through the ring, ends of prompts sample."""
    for seq in plan.decodes:
        seq.num_processed += 1
        seq.output_ids.append(0)
    for chunk in plan.prefills:
        chunk.req.num_processed += chunk.length
        if not chunk.req.is_prefilling:
            chunk.req.output_ids.append(0)


def describe(plan) -> tuple[list[str], list[tuple[str, int]]]:
    return [s.request_id for s in plan.decodes], [(c.req.request_id, c.length) for c in plan.prefills]


def test_long_prompt_is_chunked_and_interleaved_with_running_decodes():
    sched = make_scheduler(num_rings=3, max_num_batched_tokens=10, chunk=8)
    a, b = make_seq("a", 3), make_seq("b", 2)
    sched.add(a)
    sched.add(b)
    first = sched.schedule()
    assert describe(first) == ([], [("a", 3), ("b", 2)])
    run_plan(first)

    long = make_seq("long", 30)  # three times max_num_batched_tokens
    sched.add(long)
    plans = []
    while long.is_prefilling:
        plan = sched.schedule()
        plans.append(describe(plan))
        assert len(plan.decodes) + sum(c.length for c in plan.prefills) <= 10
        run_plan(plan)
    # Every step both decodes run; the prompt fills the other 8 tokens, cut at multiples of chunk=8.
    assert plans == [(["a", "b"], [("long", 8)]), (["a", "b"], [("long", 8)]),
                     (["a", "b"], [("long", 8)]), (["a", "b"], [("long", 6)])]
    assert len(long.output_ids) == 1  # the last chunk sampled the first token
    assert describe(sched.schedule()) == (["a", "b", "long"], [])


def test_request_added_while_others_decode_is_admitted_in_the_next_step():
    sched = make_scheduler(num_rings=2)
    a = make_seq("a", 4)
    sched.add(a)
    run_plan(sched.schedule())
    run_plan(sched.schedule())  # a decodes
    b = make_seq("b", 5)
    sched.add(b)
    assert b.status is RequestStatus.WAITING
    plan = sched.schedule()
    assert describe(plan) == (["a"], [("b", 5)])
    assert b.status is RequestStatus.RUNNING and b.slot is not None


def test_chunk_boundaries_are_multiples_of_chunk_even_after_a_short_step():
    sched = make_scheduler(num_rings=3, max_num_batched_tokens=4, chunk=4)
    d1, d2 = make_seq("d1", 1), make_seq("d2", 1)
    sched.add(d1)
    sched.add(d2)
    run_plan(sched.schedule())  # both prompts in one step, then both decode
    p = make_seq("p", 10)
    sched.add(p)
    lengths = []
    while p.is_prefilling:
        plan = sched.schedule()
        lengths.append(describe(plan)[1][0][1])
        run_plan(plan)
        if len(lengths) == 1:  # d1 finishes: later steps have room for whole chunks
            sched.finish(d1, "stop")
            sched.finish(d2, "stop")
    assert lengths == [2, 2, 4, 2]  # 0-2 (room 2), 2-4 (back on the boundary), 4-8, 8-10


def test_admission_is_first_come_first_served_and_needs_a_free_ring():
    sched = make_scheduler(num_rings=2, max_num_batched_tokens=64)
    seqs = [make_seq(str(i), 3) for i in range(4)]
    for s in seqs:
        sched.add(s)
    plan = sched.schedule()
    assert describe(plan) == ([], [("0", 3), ("1", 3)])
    assert [s.request_id for s in sched.waiting] == ["2", "3"]
    assert sched.batch.num_free == 0
    run_plan(plan)
    sched.finish(seqs[1], "stop")
    assert sched.batch.num_free == 1
    plan = sched.schedule()
    assert describe(plan) == (["0"], [("2", 3)])  # the oldest waiting one takes the freed ring


def test_prefills_fill_the_room_oldest_first_and_a_chunk_that_does_not_fit_waits_whole():
    """A chunk is never cut short to fill a step: its eviction points (and so its result) would then depend
    on its neighbours."""
    sched = make_scheduler(num_rings=3, max_num_batched_tokens=20, chunk=8)
    for name, n in (("x", 20), ("y", 20), ("z", 20)):
        sched.add(make_seq(name, n))
    plan = sched.schedule()
    assert describe(plan) == ([], [("x", 8), ("y", 8)])  # z's 8 do not fit in the 4 left: it waits
    run_plan(plan)
    assert describe(sched.schedule()) == ([], [("x", 8), ("y", 8)])


@pytest.mark.parametrize("where", ["waiting", "prefilling", "decoding"])
def test_finish_frees_the_ring_at_once_wherever_the_sequence_is(where):
    sched = make_scheduler(num_rings=1, max_num_batched_tokens=4, chunk=4)
    seq = make_seq("s", 10)
    blocker = None
    if where == "waiting":
        blocker = make_seq("blocker", 2)
        sched.add(blocker)
        sched.schedule()
    sched.add(seq)
    if where in ("prefilling", "decoding"):
        run_plan(sched.schedule())
        assert seq.is_prefilling
    if where == "decoding":
        while seq.is_prefilling:
            run_plan(sched.schedule())
        assert sched.schedule().decodes == [seq]
    free_before, reserved_before = sched.batch.num_free, sched.pool.num_reserved
    sched.finish(seq, "abort")
    assert seq.is_finished and seq.finish_reason == "abort" and seq.slot is None and seq.blocks == []
    assert seq not in sched.running and seq not in sched.waiting
    assert sched.batch.num_free == free_before + (where != "waiting")
    assert sched.pool.num_reserved == reserved_before - (seq.num_blocks_needed if where != "waiting" else 0)
    sched.finish(seq, "abort")  # a second finish is harmless
    if blocker is not None:
        assert sched.batch.num_free == 0


def test_bad_settings_are_config_errors():
    with pytest.raises(ConfigError, match="max_num_batched_tokens"):
        make_scheduler(num_rings=4, max_num_batched_tokens=3)
    with pytest.raises(ConfigError, match="chunk"):
        make_scheduler(chunk=0)


# --- blocks ----------------------------------------------------------------------------------------


def test_admission_reserves_what_a_ring_can_ever_hold_and_blocks_come_as_it_fills():
    sched = make_scheduler(num_rings=4, max_num_batched_tokens=12, chunk=8, num_blocks=10)
    short, long = make_seq("short", 3, max_tokens=2), make_seq("long", 30, max_tokens=5)
    sched.add(short)
    sched.add(long)
    plan = sched.schedule()
    assert short.num_blocks_needed == 2 and long.num_blocks_needed == BUDGET // BLOCK  # ceil(5/4); the budget
    assert sched.pool.num_reserved == 6
    assert len(short.blocks) == 1 and len(long.blocks) == 2  # 3 tokens; the first 8-token chunk
    run_plan(plan)
    for _ in range(3):
        run_plan(sched.schedule())
    assert len(long.blocks) == 4 and long.num_processed == 30  # full ring: 16 slots, no block more
    assert sched.pool.num_used == len(short.blocks) + len(long.blocks) <= sched.pool.num_reserved
    owners = {sched.pool.owner_of(b) for b in long.blocks}
    assert owners == {long.slot} and not set(long.blocks) & set(short.blocks)
    table = sched.batch.block_table[long.slot].tolist()
    assert table == long.blocks  # the device-side table is the host's, entry by entry


def test_the_head_of_the_queue_waits_for_blocks_and_nobody_overtakes_it():
    sched = make_scheduler(num_rings=4, max_num_batched_tokens=64, chunk=8, num_blocks=6)
    first, big, small = make_seq("first", 10), make_seq("big", 10), make_seq("small", 1, max_tokens=1)
    for s in (first, big, small):
        sched.add(s)
    sched.schedule()
    assert [s.request_id for s in sched.running] == ["first"]  # big needs 4 blocks, 2 are left
    assert [s.request_id for s in sched.waiting] == ["big", "small"]  # small would fit, but waits its turn
    sched.finish(first, "stop")
    sched.schedule()
    assert [s.request_id for s in sched.running] == ["big", "small"]

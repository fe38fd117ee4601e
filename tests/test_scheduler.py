"""The scheduler alone: step plans, chunking, admission, FCFS and ring release (no model runs)."""

from __future__ import annotations

import pytest
import torch

from minikv.config import ModelConfig
from minikv.errors import ConfigError
from minikv.ring import RingStore
from minikv.sampling import SamplingParams
from minikv.scheduler import Scheduler
from minikv.request import Request, RequestStatus

CONFIG = ModelConfig(architecture="LlamaForCausalLM", vocab_size=64, hidden_size=8, intermediate_size=16,
                     num_layers=1, num_heads=2, num_kv_heads=1, head_dim=4)


def make_scheduler(num_rings: int = 3, max_num_batched_tokens: int = 16, chunk: int = 8) -> Scheduler:
    store = RingStore(CONFIG, num_rings, 16, dtype=torch.float32, device=torch.device("cpu"))
    return Scheduler(store, max_num_batched_tokens=max_num_batched_tokens, chunk=chunk)


def make_seq(name: str, prompt_len: int) -> Request:
    return Request(name, list(range(prompt_len)), SamplingParams(max_tokens=100), seed=0, eos_ids=frozenset(),
                   tokenizer=None)


def run_plan(plan) -> None:
    """What the model runner and engine do with a plan: tokens go through the ring, ends of prompts sample."""
    for seq in plan.decodes:
        seq.num_processed += 1
        seq.output_ids.append(0)
    for chunk in plan.prefills:
        chunk.seq.num_processed += chunk.length
        if not chunk.seq.is_prefilling:
            chunk.seq.output_ids.append(0)


def describe(plan) -> tuple[list[str], list[tuple[str, int]]]:
    return [s.request_id for s in plan.decodes], [(c.seq.request_id, c.length) for c in plan.prefills]


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
        assert plan.num_tokens <= 10
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
    assert sched.store.num_free == 0
    run_plan(plan)
    sched.finish(seqs[1], "stop")
    assert sched.store.num_free == 1
    plan = sched.schedule()
    assert describe(plan) == (["0"], [("2", 3)])  # the oldest waiting one takes the freed ring


def test_prefills_fill_the_room_oldest_first():
    sched = make_scheduler(num_rings=3, max_num_batched_tokens=12, chunk=8)
    for name, n in (("x", 20), ("y", 20), ("z", 20)):
        sched.add(make_seq(name, n))
    assert describe(sched.schedule()) == ([], [("x", 8), ("y", 4)])


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
    free_before = sched.store.num_free
    sched.finish(seq, "abort")
    assert seq.is_finished and seq.finish_reason == "abort" and seq.slot is None
    assert seq not in sched.running and seq not in sched.waiting
    assert sched.store.num_free == free_before + (where != "waiting")
    sched.finish(seq, "abort")  # a second finish is harmless
    if blocker is not None:
        assert sched.store.num_free == 0


def test_bad_settings_are_config_errors():
    with pytest.raises(ConfigError, match="max_num_batched_tokens"):
        make_scheduler(num_rings=4, max_num_batched_tokens=3)
    with pytest.raises(ConfigError, match="chunk"):
        make_scheduler(chunk=0)

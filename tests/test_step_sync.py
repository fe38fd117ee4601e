"""A decode step reads one thing back from the device, the sampled ids, and builds no tensor from host lists
except through the one staged copy (`input_batch.host_to_device`: pinned memory, non-blocking on CUDA).

On CPU nothing synchronises, so the test counts structurally: every host read of a tensor value and every
tensor made from host data by the engine's host-side modules during one `Engine.step()`.
"""

from __future__ import annotations

import sys

import pytest
import torch

from minikv.engine import Engine
from minikv.sampling import SamplingParams

# The modules that run a step on the host; kernels and policies are outside this test.
STEP_MODULES = {"minikv.engine", "minikv.scheduler", "minikv.request", "minikv.block_pool", "minikv.model_runner",
                "minikv.input_batch", "minikv.sampling", "minikv.sampling_params"}
HOST_READS = ("tolist", "item", "__bool__", "__int__", "__float__", "__index__", "numpy", "cpu", "nonzero")
HOST_BUILDS = ("tensor", "as_tensor", "from_numpy")


def count_host_work(monkeypatch, run):
    """Run `run()`; return the host reads and host-built tensors of STEP_MODULES, and the staged copies."""
    reads, builds, staged = [], [], []

    def caller():
        frame = sys._getframe(2)
        return frame.f_globals.get("__name__"), frame.f_code.co_name

    def spy(owner, name, log):
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            module, function = caller()
            if function == "host_to_device" and module == "minikv.input_batch":
                staged.append(name)
            elif module in STEP_MODULES:
                log.append((module, function, name))
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, wrapper)

    for name in HOST_READS:
        spy(torch.Tensor, name, reads)
    for name in HOST_BUILDS:
        spy(torch, name, builds)
    try:
        run()
    finally:
        monkeypatch.undo()
    return reads, builds, staged


@pytest.mark.parametrize("policy", ["nexus", "full"])
def test_a_decode_step_reads_only_the_sampled_ids_and_stages_its_inputs_in_one_copy(loaded, monkeypatch, policy):
    options = dict(policy=policy, budget=32, window=8) if policy == "nexus" else dict(policy="full")
    engine = Engine(loaded, max_num_seqs=4, chunk=16, max_model_len=256, **options)
    params = [SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
              SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=1, max_tokens=40, ignore_eos=True),
              SamplingParams(repetition_penalty=1.3, presence_penalty=0.5, min_tokens=30, seed=2, max_tokens=40),
              SamplingParams(temperature=1.2, min_p=0.05, seed=3, max_tokens=40, ignore_eos=True)]
    for i, p in enumerate(params):
        engine.add_request([1] + [3 + (7 * i + j) % 250 for j in range(40)], p)
    for _ in range(30):  # prefill everything, then decode until every ring is full (no block grows)
        engine.step()
    assert len(engine.scheduler.running) == 4 and not any(r.is_prefilling for r in engine.scheduler.running)
    used = engine.pool.num_used

    outputs = []
    reads, builds, staged = count_host_work(monkeypatch, lambda: outputs.extend(engine.step()))

    assert len(outputs) == 4 and engine.pool.num_used == used  # a decode step of all four, no new block
    assert reads == [("minikv.engine", "_sample_rows", "tolist")], reads  # the sampled ids, nothing else
    assert builds == [], builds  # no torch.tensor(list, device=...) outside the staged copy
    assert staged == ["tensor"]  # the step's host lists: one copy


def test_host_to_device_splits_one_copy_into_the_lists():
    from minikv.input_batch import host_to_device

    a, empty, b = host_to_device([[1, 2], [], [7]], torch.device("cpu"))
    assert a.tolist() == [1, 2] and empty.numel() == 0 and b.tolist() == [7] and a.dtype == torch.int64
    (reals,) = host_to_device([[0.5, 2.0]], torch.device("cpu"), torch.float32)
    assert reals.dtype == torch.float32 and reals.tolist() == [0.5, 2.0]

"""Starting the ranks, rank 0's handle on the others (`Workers`), and the loop a worker rank runs.

Rank 0 owns everything that decides (scheduler, block allocation, sampler, API); ranks 1..N-1 only
compute. Once per step rank 0 sends one message: the step's `StepPlan` (decode slots and block tables,
prefill chunk spans and tables), the flat batch's token ids and positions, and which rows the LM head
reads (`logit_rows`), pickled and broadcast over the gloo control group (`TPGroup.send`). Each worker then
runs exactly what rank 0 runs: `RingAttention.begin_step`, the model, `end_step`, the LM head over those
rows. The block ids come from rank 0, so one block id is the same block on every rank; each rank's pool
holds only its own KV heads, and each rank evicts its heads' slots by itself, with no communication.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import sys
import time

import torch

from .group import DistributedError, TPGroup, close_group, init_group

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class RankState:
    """What one rank computes with (rank 0 has the same three, held by the engine)."""

    model: torch.nn.Module
    pool: object  # KVPool of this rank's KV heads
    attention: object  # RingAttention


def kv_config(config, size: int):
    """The ModelConfig of one rank's share of the heads: what its KV pool is sized and shaped by."""
    return dataclasses.replace(config, num_heads=config.num_heads // size, num_kv_heads=config.num_kv_heads // size)


def ring_positions(state: RankState, blocks: list[int], length: int) -> torch.Tensor:
    """This rank's heads' ring positions [layers, kv_heads / N, length] (Engine.kv_positions gathers them)."""
    return state.pool.ring("pos", blocks, length).cpu()


class Workers:
    """Rank 0's handle on ranks 1..N-1: the setup messages, one message per step, and shutdown."""

    def __init__(self, tp: TPGroup, processes: list):
        self.tp, self.processes = tp, processes
        self.in_step = False  # a step message went out and its collectives have not all completed
        self.closed = False

    @property
    def size(self) -> int:
        return self.tp.size

    def load(self, model_dir, dtype: torch.dtype) -> None:
        self.tp.send(("load", str(model_dir), dtype))

    def setup(self, *, num_blocks: int, block_size: int, policy, seed: int, num_slots: int, max_budget: int,
              scale: float) -> None:
        """Every worker builds its pool and attention; the first error a rank met loading or here is raised."""
        self.tp.send(("setup", dict(num_blocks=num_blocks, block_size=block_size, policy=policy, seed=seed,
                                    num_slots=num_slots, max_budget=max_budget, scale=scale)))
        errors = self.tp.gather_objects(None)
        for rank, error in enumerate(errors):
            if error is not None:
                raise DistributedError(f"tensor-parallel rank {rank} could not start: {error}")

    def send_step(self, plan, input_ids: torch.Tensor, positions: torch.Tensor, logit_rows: list[list[int]]) -> None:
        """The step's message (see the module docstring). Tensors travel as CPU copies: a view would pickle
        its whole storage (a block table row is a view of the persistent batch), a CUDA tensor its device."""
        self.in_step = True
        self.tp.send(("step", _portable(plan), input_ids.cpu(), positions.cpu(), logit_rows))

    def end_step(self) -> None:
        self.in_step = False

    def call(self, fn, args: tuple, own: object) -> list:
        """fn(RankState, *args) on every worker; returns [own] + their results, in rank order. For
        inspection (Engine.kv_positions), not for a serving loop."""
        self.tp.send(("call", fn, args))
        return self.tp.gather_objects(own, self.tp.timeout)

    def close(self) -> None:
        """Stop the workers and leave the group (a clean shutdown; `abort` after a failure)."""
        if self.closed:
            return
        self.closed = True
        try:
            self.tp.send(("stop",))
        except DistributedError:
            pass
        _join(self.processes, grace=10.0)
        close_group(self.tp)

    def abort(self) -> None:
        """After a failure: end the workers this process started (without waiting on any collective)."""
        if self.closed:
            return
        self.closed = True
        # The ranks this process spawned are ended first: leaving the group waits for transfers still pending
        # with them, which a stuck rank never completes. (Under torchrun there are none to end: the group is
        # left as it is, and the other ranks exit when their own collectives fail or this process exits.)
        _join(self.processes, grace=2.0)
        if self.processes:
            close_group(self.tp)


def _join(processes, grace: float) -> None:
    deadline = time.monotonic() + grace
    for p in processes:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in processes:
        if p.is_alive():
            p.kill()
            p.join(5)


def _portable(value):
    """A copy of `value` (tensors, dataclasses, lists of them) with every tensor a compact CPU tensor."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if dataclasses.is_dataclass(value):
        return dataclasses.replace(value, **{f.name: _portable(getattr(value, f.name))
                                             for f in dataclasses.fields(value) if f.init})
    if isinstance(value, list):
        return [_portable(v) for v in value]
    return value


def _on_device(value, device: torch.device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if dataclasses.is_dataclass(value):
        return dataclasses.replace(value, **{f.name: _on_device(getattr(value, f.name), device)
                                             for f in dataclasses.fields(value) if f.init})
    if isinstance(value, list):
        return [_on_device(v, device) for v in value]
    return value


# --- starting ranks ----------------------------------------------------------------------------------
def spawn_workers(size: int, devices: list[torch.device], timeout: float):
    """Start ranks 1..N-1 as spawned processes (not forked: CUDA and threads do not survive a fork) and
    wait until each has reached rank 0's store; return the store (the rendezvous) and the processes.

    Rank 0 hosts the TCPStore itself, so it can watch the processes while they start (import torch, load
    nothing yet): one that exits first is an error at once, not after the whole timeout."""
    import torch.distributed as dist
    import torch.multiprocessing as mp

    store = dist.TCPStore("127.0.0.1", 0, size, is_master=True, timeout=datetime.timedelta(seconds=timeout),
                          wait_for_workers=False)
    ctx = mp.get_context("spawn")
    processes = []
    for rank in range(1, size):
        p = ctx.Process(target=_spawned_main, name=f"minikv-rank{rank}", daemon=True,
                        args=(rank, size, store.port, str(devices[rank]), timeout, torch.get_num_threads()))
        p.start()
        processes.append(p)
    deadline = time.monotonic() + timeout
    for rank, p in enumerate(processes, start=1):
        while not store.check([f"minikv/started/{rank}"]):
            if not p.is_alive():
                _join(processes, grace=0.0)
                raise DistributedError(f"tensor-parallel rank {rank} exited (code {p.exitcode}) while starting; "
                                       "its error is printed above")
            if time.monotonic() > deadline:
                _join(processes, grace=0.0)
                raise DistributedError(f"tensor-parallel rank {rank} did not start within {timeout:g} s")
            time.sleep(0.05)
    return store, processes


def _spawned_main(rank: int, size: int, port: int, device: str, timeout: float, threads: int) -> None:
    import torch.distributed as dist

    torch.set_num_threads(threads)
    try:
        store = dist.TCPStore("127.0.0.1", port, size, is_master=False, timeout=datetime.timedelta(seconds=timeout))
        store.set(f"minikv/started/{rank}", "1")
        tp = init_group(rank, size, store, torch.device(device), timeout)
    except (DistributedError, RuntimeError) as err:
        print(f"minikv rank {rank}: {err}", file=sys.stderr)
        os._exit(1)
    run_worker(tp)


def run_worker(tp: TPGroup) -> None:
    """A worker rank's whole life: load, set up, then run rank 0's steps until it stops or a rank fails.
    Ends the process on failure (os._exit: nothing may wait on a collective that will never complete)."""
    try:
        serve(tp)
    except DistributedError as err:
        print(f"minikv rank {tp.rank}: {err}; exiting", file=sys.stderr)
        os._exit(1)
    except BaseException:  # noqa: BLE001  (a bug: print it, then leave without waiting on peers)
        logger.exception("minikv rank %d failed", tp.rank)
        sys.stderr.flush()
        os._exit(1)
    close_group()


def serve(tp: TPGroup) -> None:
    error, state = None, None
    message = tp.receive()
    if message[0] == "stop":  # rank 0 failed before loading
        return
    try:
        model = _load_shard(message[1], tp, message[2])
    except Exception as err:  # noqa: BLE001  (reported to rank 0, which raises it)
        error = f"{type(err).__name__}: {err}"
    message = tp.receive()
    if message[0] == "stop":
        return
    settings = message[1]
    if error is None:
        try:
            state = _setup(model, tp, **settings)
        except Exception as err:  # noqa: BLE001
            error = f"{type(err).__name__}: {err}"
    tp.gather_objects(error)
    if error is not None:
        return
    while True:
        message = tp.receive()
        if message[0] == "stop":
            return
        if message[0] == "step":
            _run_step(state, tp.device, *message[1:])
        elif message[0] == "call":
            tp.gather_objects(message[1](state, *message[2]))


def _load_shard(model_dir: str, tp: TPGroup, dtype: torch.dtype) -> torch.nn.Module:
    from ..loader import build_model, load_state_dict, read_config, weight_files

    from pathlib import Path

    path = Path(model_dir)
    return build_model(read_config(path), load_state_dict(weight_files(path)), tp.device, dtype, tp=tp)


def _setup(model, tp: TPGroup, *, num_blocks, block_size, policy, seed, num_slots, max_budget, scale) -> RankState:
    from ..attention import RingAttention
    from ..block_pool import KVPool

    dtype = next(model.parameters()).dtype
    pool = KVPool(kv_config(model.config, tp.size), num_blocks, block_size, dtype=dtype, device=tp.device,
                  edges_per_slot=policy.top_m)
    attention = RingAttention(pool, policy, scale=scale, seed=seed, num_slots=num_slots, max_budget=max_budget)
    return RankState(model, pool, attention)


@torch.inference_mode()
def _run_step(state: RankState, device: torch.device, plan, input_ids, positions, logit_rows) -> None:
    plan = _on_device(plan, device)
    state.attention.begin_step(plan)
    if state.attention.archive is not None:  # KV archives: replay rank 0's record, begin the step's work
        state.attention.archive.begin_remote(plan)
    layer_inputs = [] if state.attention.policy.needs_hidden_states else None
    hidden = state.model(input_ids.to(device), positions.to(device), state.attention, layer_inputs)
    state.attention.end_step(layer_inputs)
    for rows in logit_rows:  # the same LM-head calls as rank 0, in the same order (each gathers to rank 0)
        state.model.compute_logits(hidden[torch.tensor(rows, dtype=torch.long, device=device)])

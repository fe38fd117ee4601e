"""Tensor parallelism on torch.distributed: one model split over N ranks (GPUs, or CPU processes).

    engine = Engine("path/to/model", tensor_parallel_size=2)     # ranks 1..N-1 are spawned here

Rank 0 is the engine (scheduler, block allocator, sampler, API); ranks 1..N-1 compute their shard of every
layer (layers.py), following rank 0's one message per step (worker.py). Each rank's KV pool holds only its
KV heads, and since every policy scores and evicts per KV head, each rank evicts its own slots without
any communication. Under torchrun (env:// rendezvous, one process per GPU, any number of machines) every
process runs the same program; `Engine(...)` returns on rank 0 and serves rank 0 on the others, which then
exit (see docs/design.md, "Tensor parallelism").
"""

from __future__ import annotations

import torch

from .group import DistributedError, TPGroup, check_tensor_parallel, init_group, rank_devices, torchrun_rank
from .worker import Workers, kv_config, ring_positions, run_worker, spawn_workers

__all__ = ["DistributedError", "TPGroup", "Workers", "check_tensor_parallel", "kv_config", "ring_positions",
           "start"]


def start(model, device, dtype, size: int, timeout: float):
    """Start (or, under torchrun, join) the N ranks and load rank 0's shard; returns (Workers, LoadedModel).

    `model` may be an already loaded model: its files, device and dtype are used, not its weights (the caller
    keeps them; bench and eval pass one). Under torchrun a process whose RANK is not 0 never returns: it
    serves rank 0 and exits the process."""
    from ..errors import ConfigError
    from ..loader import LoadedModel, default_dtype, load_model, parse_device, parse_dtype, read_config, resolve_model_dir

    if isinstance(model, LoadedModel):  # each rank loads its shard from the model's files, as it was loaded
        weight = next(model.model.parameters())
        device = weight.device if device is None else device
        dtype = weight.dtype if dtype is None else dtype
        model = model.path
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not timeout > 0:
        raise ConfigError(f"distributed_timeout must be a positive number of seconds, got {timeout!r}")
    check_tensor_parallel_size(size)
    launched = torchrun_rank()
    device = parse_device(device) if launched is None else _torchrun_device(device, launched)
    dtype = parse_dtype(dtype) if dtype is not None else default_dtype(device)
    model_dir = resolve_model_dir(model)
    check_tensor_parallel(read_config(model_dir), size)
    if launched is None:
        devices = rank_devices(device, size)
        device = devices[0]  # "cuda" means cuda:0 here: NCCL needs each rank's device by index
        rendezvous, processes = spawn_workers(size, devices, timeout)
        rank = 0
    else:
        rank, world, _ = launched
        if world != size:
            raise ConfigError(f"tensor_parallel_size={size} but torchrun started {world} processes (WORLD_SIZE): "
                              "give torchrun --nnodes x --nproc-per-node = tensor_parallel_size")
        rendezvous, processes = "env://", []
    try:
        tp = init_group(rank, size, rendezvous, device, timeout)
    except DistributedError:
        for p in processes:
            p.kill()
        raise
    if rank != 0:
        run_worker(tp)
        raise SystemExit(0)
    workers = Workers(tp, processes)
    try:
        workers.load(model_dir, dtype)
        loaded = load_model(model_dir, device=device, dtype=dtype, tp=tp)
    except BaseException:
        workers.abort()
        raise
    return workers, loaded


def check_tensor_parallel_size(size) -> None:
    from ..errors import ConfigError

    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ConfigError(f"tensor_parallel_size must be a positive integer, got {size!r}")


def _torchrun_device(device, launched) -> torch.device:
    """Under torchrun each process takes the GPU of its LOCAL_RANK (or the CPU when asked, or without GPUs)."""
    from ..loader import parse_device

    wanted = parse_device(device)
    if wanted.type == "cpu":
        return wanted
    return parse_device(f"cuda:{launched[2]}")

"""The process group of a tensor-parallel engine: who is who, the collectives the model calls, and the
checks that run before any rank starts.

Two groups over the same ranks:
- `group` (NCCL on CUDA, gloo on CPU) carries the model's all-reduces and the logits gather. It has a
  timeout (`Engine(distributed_timeout=...)`): a collective that a dead or stuck rank never joins raises
  after it instead of hanging.
- `control` (always gloo, on the CPU) carries rank 0's per-step message and its setup messages. Idle
  workers wait here for the next step for as long as the engine lives, so the group has no practical
  timeout; rank 0 bounds its own waits there by the timeout instead. A rank that dies closes its sockets,
  and the peers blocked on them get an error at once.
"""

from __future__ import annotations

import datetime
import gc
import os
import pickle
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import ConfigError, MiniKVError

# Idle workers wait on the control group between steps, for as long as the server stays idle.
_CONTROL_TIMEOUT = datetime.timedelta(days=365)


class DistributedError(MiniKVError):
    """A tensor-parallel rank died, timed out or failed: the requests in flight fail, the engine stops."""


@dataclass
class TPGroup:
    rank: int
    size: int
    device: torch.device
    group: object  # the compute ProcessGroup (the default group)
    control: object  # the gloo ProcessGroup of the step messages
    timeout: datetime.timedelta  # the most rank 0 waits for another rank (the compute group's timeout too)

    @property
    def is_driver(self) -> bool:
        return self.rank == 0

    # --- what the model calls -------------------------------------------------------------------
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum `x` over the ranks, in place; every rank gets the sum."""
        _collective(dist.all_reduce, x, group=self.group)
        return x

    def gather(self, x: torch.Tensor) -> list[torch.Tensor] | None:
        """Every rank's `x` (same shape), in rank order, on rank 0; None on the other ranks."""
        shards = [torch.empty_like(x) for _ in range(self.size)] if self.is_driver else None
        _collective(dist.gather, x, shards, dst=0, group=self.group)
        return shards

    # --- rank 0's messages ------------------------------------------------------------------------
    # Over the control group, whose own timeout is a year (idle workers wait there between steps); rank 0's
    # side waits at most `timeout` for each transfer, so a worker that stops answering (alive, its sockets
    # open: gloo's sends wait for the receiver) fails the step instead of hanging rank 0.
    def send(self, message: object) -> None:
        """Rank 0: one pickled object to every other rank (a gloo broadcast of its size, then its bytes)."""
        data = pickle.dumps(message)
        payload = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        for tensor in (torch.tensor([len(data)], dtype=torch.int64), payload):
            _collective(_wait, dist.broadcast(tensor, src=0, group=self.control, async_op=True), self.timeout)

    def receive(self) -> object:
        """A worker: the next object rank 0 sends (waits for as long as rank 0 is alive)."""
        size = torch.empty(1, dtype=torch.int64)
        _collective(dist.broadcast, size, src=0, group=self.control)
        payload = torch.empty(int(size), dtype=torch.uint8)
        _collective(dist.broadcast, payload, src=0, group=self.control)
        return pickle.loads(payload.numpy().tobytes())

    def gather_objects(self, obj: object, timeout: datetime.timedelta | None = None) -> list | None:
        """Every rank's `obj`, in rank order, on rank 0 (None elsewhere). Rank 0 waits at most `timeout`
        for each rank (None: the control group's year, for work as long as loading a model)."""
        if not self.is_driver:
            data = pickle.dumps(obj)
            _collective(dist.send, torch.tensor([len(data)], dtype=torch.int64), dst=0, group=self.control)
            _collective(dist.send, torch.frombuffer(bytearray(data), dtype=torch.uint8), dst=0, group=self.control)
            return None
        out = [obj]
        for rank in range(1, self.size):
            size = torch.empty(1, dtype=torch.int64)
            _collective(_wait, dist.irecv(size, src=rank, group=self.control), timeout)
            payload = torch.empty(int(size), dtype=torch.uint8)
            _collective(_wait, dist.irecv(payload, src=rank, group=self.control), timeout)
            out.append(pickle.loads(payload.numpy().tobytes()))
        return out


def _wait(work, timeout: datetime.timedelta | None) -> None:
    if not (work.wait() if timeout is None else work.wait(timeout)):
        raise RuntimeError(f"no answer within {timeout.total_seconds():g} s")


def _collective(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except (RuntimeError, ValueError, pickle.UnpicklingError, EOFError) as err:
        why = f"a tensor-parallel collective failed ({fn.__name__}): another rank died, was killed or timed out: {err}"
    # Raised outside the except block, with the arguments dropped: the error must not keep the process group
    # alive through its traceback, or the group's sockets stay open after close_group and a peer blocked on
    # this rank never learns that it is gone.
    del args, kwargs
    raise DistributedError(why)


def init_group(rank: int, size: int, rendezvous, device: torch.device, timeout: float) -> TPGroup:
    """Join the process group (blocks until all `size` ranks have joined, at most `timeout` seconds).
    `rendezvous`: "env://" (torchrun), or a TCPStore that rank 0 made and the spawned ranks reach."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    limit = datetime.timedelta(seconds=timeout)
    where = dict(init_method=rendezvous) if isinstance(rendezvous, str) else dict(store=rendezvous)
    try:
        dist.init_process_group(backend, rank=rank, world_size=size, timeout=limit, **where,
                                **({"device_id": device} if device.type == "cuda" else {}))
        control = dist.new_group(backend="gloo", timeout=_CONTROL_TIMEOUT)
    except (RuntimeError, ValueError) as err:
        raise DistributedError(f"rank {rank} of {size} could not join the tensor-parallel group "
                               f"within {timeout:g} s: {err}") from err
    return TPGroup(rank, size, device, dist.group.WORLD, control, limit)


def close_group(tp: TPGroup | None = None) -> None:
    """Leave the process group. The groups' last references go too: their sockets close only then, and
    a peer still blocked on this rank sees its connection close instead of waiting for good."""
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001  (a group whose peers died may fail to close cleanly; it is gone)
            pass
    if tp is not None:
        tp.group = tp.control = None
    gc.collect()


def check_tensor_parallel(config, size: int) -> None:
    """Refuse a model that cannot be split N ways, naming the config.json field. The vocabulary need not
    divide: the last rank's shard is padded (see layers.vocab_shard)."""
    fields = {"num_attention_heads": config.num_heads, "num_key_value_heads": config.num_kv_heads,
              "intermediate_size": config.intermediate_size}
    for field, value in fields.items():
        if value % size:
            raise ConfigError(f"tensor_parallel_size={size} does not divide the model's {field} ({value}): each "
                              f"rank must hold the same number of them; pick a tensor_parallel_size that divides "
                              f"{field}")


def rank_devices(device: torch.device, size: int) -> list[torch.device]:
    """The device of each rank started on this machine: cuda:0..N-1 (from the device given), or the CPU."""
    if device.type == "cpu":
        return [device] * size
    first = device.index or 0
    count = torch.cuda.device_count()
    if first + size > count:
        raise ConfigError(f"tensor_parallel_size={size} needs {size} CUDA devices from cuda:{first}, but this "
                          f"machine has {count} (cuda:0 to cuda:{count - 1}); lower --tensor-parallel-size, or "
                          "start ranks on several machines with torchrun")
    return [torch.device("cuda", first + r) for r in range(size)]


def torchrun_rank() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) when this process was started by torchrun, else None."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ or "MASTER_ADDR" not in os.environ:
        return None
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))

"""The KV block pool: one pool of fixed-size blocks per layer, shared by every running sequence.

A sequence's ring is a block table: ring slot j lives at offset `j % block_size` of block
`table[j // block_size]`, for every KV head of every layer (one block id names the same block in every
layer). The table grows a block at a time while the ring fills; once the ring holds its budget, eviction
overwrites slots in place, so nothing is ever compacted, moved or freed before the sequence ends.

    ring slot:  0 1 2 3 | 4 5 6 7 | 8 9 . .        (budget 10, block_size 4: 3 blocks)
    table:      [  17   ,    3    ,   42  ]         pool blocks, in any order
    pool:       block 3 = slots 4..7, block 17 = slots 0..3, block 42 = slots 8, 9 (+ 2 never used)

Admission reserves every block a sequence can ever hold, ceil(min(budget, prompt + max_tokens) / block_size),
so a running sequence never waits for memory and nothing is ever preempted; blocks are then taken from the
reservation as the ring fills, so the pool's usage is what the rings really hold. When the free list has a run
of consecutive blocks as long as the reservation, the reservation is that run (set aside, not used), so the
ring's blocks follow each other in the pool and the CPU decode reads it as one view (kernels.cpu_decode)
however rings grow beside each other. A prefill chunk in flight
needs nothing from the pool: its K/V stay in the step's activations until the keep step writes the kept
tokens into ring slots (docs/design.md, section 4).
"""

from __future__ import annotations

import math
import re

import torch

from .config import ModelConfig
from .errors import ConfigError
from .kernels.common import PoolLayer

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def read_kv_memory(value: int | float | str) -> int | float:
    """A KV memory setting as bytes (int) or as a fraction in (0, 1] of free CUDA memory (float): an int of
    bytes, a float fraction, or a string with a unit ("2GiB", "512MB", "1.5G") or a fraction ("0.9")."""
    if isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value)
        if not match or match.group(2).lower() not in _UNITS:
            raise ConfigError(f"cannot read kv_memory {value!r}: write a size like '2GiB', '512MB' or '1073741824', "
                              "or a fraction of free CUDA memory like '0.9'")
        number, unit = float(match.group(1)), match.group(2).lower()
        if unit == "" and "." in match.group(1) and number <= 1:
            value = number
        else:
            value = int(number * _UNITS[unit])
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"kv_memory must be a positive size in bytes (e.g. '2GiB') or a fraction in (0, 1] of free "
                          f"CUDA memory; got {value!r}")
    if isinstance(value, float) and value > 1:
        return int(value)
    return value


def parse_kv_memory(value: int | float | str, device: torch.device | str) -> int:
    """KV memory in bytes for `device` (see read_kv_memory); a fraction is of the CUDA memory free now, after
    the model's weights."""
    value = read_kv_memory(value)
    if isinstance(value, int):
        return value
    if torch.device(device).type != "cuda":
        raise ConfigError(f"kv_memory={value} is a fraction of free CUDA memory, but the engine runs on {device}; "
                          "give a size instead, e.g. '2GiB'")
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    return int(free * value)


def check_budget(budget: int, chunk: int, policy, *, most: int | None = None) -> None:
    """Every rule a ring's budget and the prefill chunk must meet under an evicting `policy`, in one place;
    ConfigError names the rule and the fix. The engine's --budget (before the model loads), a request's
    kv_budget (`most`: the engine's budget, the most a request may ask for) and the eval's budgets (before
    any model loads) all come here."""
    if most is not None:
        lowest = policy.n_sink + policy.window + 1
        if not lowest <= budget <= most:
            raise ConfigError(f"out of range: it must be in [{lowest}, {most}] (above n_sink + window = "
                              f"{lowest - 1}, so some slot can be evicted, and at most the engine's --budget)")
    check_ring_settings(budget, chunk, policy.n_sink, policy.window)
    policy.check_budget(budget, chunk)  # the policy's own rule (epikv keeps a whole chunk beside the sinks)


def check_ring_settings(budget: int, chunk: int, n_sink: int, window: int) -> None:
    """Refuse settings under which the ring cannot work, with the reason and the fix."""
    if chunk <= 0:
        raise ConfigError(f"chunk must be a positive number of tokens, got {chunk}")
    if budget <= n_sink + window:
        raise ConfigError(f"budget ({budget}) must exceed n_sink + window ({n_sink} + {window} = {n_sink + window}): "
                          "otherwise every slot is protected and none can be evicted; raise --budget or lower "
                          "--n-sink/--window")


def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype, edges_per_slot: int) -> int:
    """Pool bytes of one block: K and V plus per-slot metadata (pos, RoPE position, score, held mark,
    out-edges), every layer and KV head."""
    element = torch.empty((), dtype=dtype).element_size()
    per_slot_and_head = 2 * config.head_dim * element + 4 + 4 + 4 + 1 + max(edges_per_slot, 1) * (4 + 4 + 4)
    return config.num_layers * config.num_kv_heads * block_size * per_slot_and_head


class KVPool:
    """The pool's tensors, one PoolLayer view per layer, and the block allocator (with reservations).

    One extra block, `scratch_block`, is never handed out: writes that must go somewhere to keep shapes
    static (dropped prefill tokens, the rows that pad a CUDA-graph batch) land there.
    """

    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int, *, dtype: torch.dtype,
                 device: torch.device, edges_per_slot: int = 0):
        if num_blocks < 1:
            raise ConfigError("the KV pool has room for no block: raise kv_memory")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.num_layers, self.num_kv_heads, self.head_dim = config.num_layers, config.num_kv_heads, config.head_dim
        self.scratch_block = num_blocks
        shape = (config.num_layers, num_blocks + 1, block_size, config.num_kv_heads)
        m = max(edges_per_slot, 1)  # policies without edges still get one (unused): one layout for the kernels
        self.k = torch.zeros(*shape, config.head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.pos = torch.full(shape, -1, dtype=torch.int32, device=device)
        self.score = torch.zeros(shape, dtype=torch.float32, device=device)
        self.edge_slot = torch.full((*shape, m), -1, dtype=torch.int32, device=device)
        self.edge_pos = torch.full((*shape, m), -1, dtype=torch.int32, device=device)
        self.edge_w = torch.zeros((*shape, m), dtype=torch.float32, device=device)
        self.held = torch.zeros(shape, dtype=torch.int8, device=device)  # one byte a slot: all zero unless hold
        # The position RoPE gives each slot's key: its text position, or its rank in the ring (positions="ring")
        self.rope_pos = torch.zeros(shape, dtype=torch.int32, device=device)
        self._layers = [PoolLayer(self.k[i], self.v[i], self.pos[i], self.score[i], self.edge_slot[i],
                                  self.edge_pos[i], self.edge_w[i], self.held[i], self.rope_pos[i])
                        for i in range(config.num_layers)]
        self.bytes_per_block = bytes_per_block(config, block_size, dtype, edges_per_slot)
        # The allocator: a stack of free block ids, and who owns each block (-1 = free).
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first
        self._owner = [-1] * num_blocks
        self._reserved: dict[int, int] = {}  # owner -> blocks reserved (taken or not)
        self._taken: dict[int, list[int]] = {}  # owner -> its blocks, in ring order
        self._runs: dict[int, list[int]] = {}  # owner -> consecutive blocks set aside for it, next one last
        self._set_aside = 0  # blocks in _runs: off the free list, not used
        self.peak_used = 0  # the most blocks rings held at once

    def layer(self, index: int) -> PoolLayer:
        return self._layers[index]

    def all_layers(self) -> PoolLayer:
        """Every layer's pool as one PoolLayer of layers x (blocks + 1) blocks: layer l's block b is block
        l * (blocks + 1) + b. The CPU path scores a step's decodes of every layer in one batch through it."""
        view = lambda t: t.view(-1, *t.shape[2:])  # noqa: E731
        return PoolLayer(view(self.k), view(self.v), view(self.pos), view(self.score), view(self.edge_slot),
                         view(self.edge_pos), view(self.edge_w), view(self.held), view(self.rope_pos))

    # --- accounting ------------------------------------------------------------------------------
    @property
    def num_used(self) -> int:
        """Blocks held by rings now."""
        return self.num_blocks - len(self._free) - self._set_aside

    @property
    def num_reserved(self) -> int:
        """Blocks promised to running sequences (held or still to be taken)."""
        return sum(self._reserved.values())

    @property
    def num_unreserved(self) -> int:
        return self.num_blocks - self.num_reserved

    @property
    def usage(self) -> float:
        """Fraction of the pool's blocks held by rings: the one number a metrics endpoint reads."""
        return self.num_used / self.num_blocks

    @property
    def total_bytes(self) -> int:
        return self.num_blocks * self.bytes_per_block

    def blocks_for(self, slots: int) -> int:
        return -(-slots // self.block_size)

    # --- allocation ------------------------------------------------------------------------------
    def reserve(self, owner: int, num_blocks: int) -> None:
        """Promise `num_blocks` to `owner` (a batch slot); the caller checked num_unreserved first."""
        if owner in self._reserved:
            raise RuntimeError(f"owner {owner} already holds a reservation")
        if num_blocks > self.num_unreserved:
            raise RuntimeError(f"reserving {num_blocks} blocks with {self.num_unreserved} unreserved")
        self._reserved[owner] = num_blocks
        self._taken[owner] = []
        self._set_aside_run(owner, num_blocks)

    def _set_aside_run(self, owner: int, num_blocks: int) -> None:
        """Take the lowest run of `num_blocks` consecutive free blocks off the free list for `owner`'s ring
        (nothing when there is none: its blocks then come from the free list one by one)."""
        if num_blocks < 2 or num_blocks > len(self._free):
            return
        free, start = sorted(self._free), None
        for i in range(num_blocks - 1, len(free)):
            if free[i] - free[i - num_blocks + 1] == num_blocks - 1:
                start = free[i - num_blocks + 1]
                break
        if start is None:
            return
        run = set(range(start, start + num_blocks))
        self._free = [b for b in self._free if b not in run]
        self._runs[owner] = list(range(start + num_blocks - 1, start - 1, -1))
        self._set_aside += num_blocks

    def _return_run(self, owner: int) -> None:
        """The blocks set aside for `owner` and not taken go back to the free list."""
        run = self._runs.pop(owner, [])
        self._set_aside -= len(run)
        self._free.extend(run)

    def grow(self, owner: int, num_blocks: int) -> list[int]:
        """Take blocks from the owner's reservation until it holds `num_blocks`; return the new ones."""
        taken = self._taken[owner]
        if num_blocks > self._reserved[owner]:
            raise RuntimeError(f"owner {owner} needs {num_blocks} blocks but reserved {self._reserved[owner]}")
        new = []
        run = self._runs.get(owner)
        while len(taken) < num_blocks:
            if run:
                block = run.pop()
                self._set_aside -= 1
            else:
                block = self._free.pop()  # cannot fail: reservations never exceed the pool
            self._owner[block] = owner
            taken.append(block)
            new.append(block)
        self.peak_used = max(self.peak_used, self.num_used)
        return new

    def release(self, owner: int) -> None:
        """Free every block of `owner` and drop its reservation: O(blocks), nothing is zeroed."""
        self._return_run(owner)
        for block in self._taken.pop(owner):
            self._owner[block] = -1
            self._free.append(block)
        del self._reserved[owner]

    def adopt(self, parked: int, owner: int, num_blocks: int) -> list[int]:
        """Hand the blocks of `parked` (a parked session ring) to `owner` (a batch slot) and reserve
        `num_blocks` for it in all: the ring's blocks beyond that go back to the free list (a rolled-back
        ring may hold more than its new request needs). Return the blocks `owner` now holds, in ring order.
        The caller checked that num_unreserved covers what is reserved beyond the parked blocks."""
        if owner in self._reserved:
            raise RuntimeError(f"owner {owner} already holds a reservation")
        self._return_run(parked)  # a ring restored by take() may keep an empty one
        taken = self._taken.pop(parked)
        extra = num_blocks - self._reserved.pop(parked)
        if extra > self.num_unreserved:
            self._reserved[parked], self._taken[parked] = num_blocks - extra, taken  # undo: nothing changed
            raise RuntimeError(f"adopting {num_blocks} blocks with {self.num_unreserved} unreserved")
        for block in taken[num_blocks:]:
            self._owner[block] = -1
            self._free.append(block)
        taken = taken[:num_blocks]
        for block in taken:
            self._owner[block] = owner
        self._reserved[owner], self._taken[owner] = num_blocks, taken
        return list(taken)

    def park(self, owner: int, parked: int) -> list[int]:
        """Move `owner`'s blocks to the id `parked` (a session's ring outlives its request) and shrink the
        reservation to the blocks held: a parked ring never grows. Return its blocks in ring order."""
        self._return_run(owner)
        taken = self._taken.pop(owner)
        del self._reserved[owner]
        for block in taken:
            self._owner[block] = parked
        self._reserved[parked], self._taken[parked] = len(taken), taken
        return list(taken)

    def take(self, owner: int, num_blocks: int) -> list[int]:
        """Reserve and take `num_blocks` for `owner` at once (a ring restored from disk)."""
        self.reserve(owner, num_blocks)
        return self.grow(owner, num_blocks)

    def ring(self, name: str, blocks: list[int], length: int) -> torch.Tensor:
        """Slots 0..length-1 of the ring held in `blocks` (its block table), every layer, in ring order:
        [layers, kv_heads, length, ...] of the pool tensor `name` ("pos", "score", "k", ...)."""
        table = torch.tensor(blocks, dtype=torch.long, device=self.k.device)
        rows = (table[:, None] * self.block_size + torch.arange(self.block_size, device=table.device)).flatten()
        t = getattr(self, name)
        return t.view(self.num_layers, -1, *t.shape[3:])[:, rows[:length]].transpose(1, 2)

    def blocks_of(self, owner: int) -> list[int]:
        return list(self._taken.get(owner, ()))

    def owner_of(self, block: int) -> int:
        return self._owner[block]

"""The ring KV store: one fixed pool of `budget` slots per (layer, ring, KV head), allocated once.

Every running sequence owns one ring from admission to finish. A ring's memory never grows with the
sequence: when it is full, the policy picks the slot the next token overwrites (see minikv.policies and
minikv.kernels). Physical slot order means nothing: a slot's `pos` says which token it holds, so nothing
is ever compacted or gathered. Freeing a ring is O(1): the slots past `filled` count as empty, whatever
they still hold.
"""

from __future__ import annotations

from collections import deque

import torch

from .config import ModelConfig
from .errors import ConfigError
from .kernels.common import RingLayer


def check_ring_settings(budget: int, chunk: int, n_sink: int, window: int) -> None:
    """Refuse settings under which the ring cannot work, with the reason and the fix."""
    if chunk <= 0:
        raise ConfigError(f"chunk must be a positive number of tokens, got {chunk}")
    if budget <= n_sink + window:
        raise ConfigError(f"budget ({budget}) must exceed n_sink + window ({n_sink} + {window} = {n_sink + window}): "
                          "otherwise every slot is protected and none can be evicted; raise --budget or lower "
                          "--n-sink/--window")


class RingStore:
    def __init__(self, config: ModelConfig, num_rings: int, budget: int, *, dtype: torch.dtype,
                 device: torch.device, edges_per_slot: int = 0, scratch_ring: bool = False):
        """`scratch_ring` adds one ring never handed to a sequence: padded rows of a CUDA-graph batch
        write there, so padding never touches a live ring."""
        if num_rings < 1:
            raise ConfigError(f"the ring store needs at least one ring (max_num_seqs), got {num_rings}")
        self.num_rings, self.budget = num_rings, budget
        self.scratch_ring = num_rings if scratch_ring else None
        num_rings += int(scratch_ring)
        self.num_layers, self.num_kv_heads, self.head_dim = config.num_layers, config.num_kv_heads, config.head_dim
        shape = (config.num_layers, num_rings, config.num_kv_heads, budget)
        self.k = torch.zeros(*shape, config.head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.pos = torch.full(shape, -1, dtype=torch.int32, device=device)
        self.score = torch.zeros(shape, dtype=torch.float32, device=device)
        # Nexus out-edges; policies without edges still get one (unused) so kernels see one layout.
        m = max(edges_per_slot, 1)
        self.edge_slot = torch.full((*shape, m), -1, dtype=torch.int32, device=device)
        self.edge_pos = torch.full((*shape, m), -1, dtype=torch.int32, device=device)
        self.edge_w = torch.zeros((*shape, m), dtype=torch.float32, device=device)
        self._free: deque[int] = deque(range(self.num_rings))
        self._layers = [RingLayer(self.k[i], self.v[i], self.pos[i], self.score[i], self.edge_slot[i],
                                  self.edge_pos[i], self.edge_w[i]) for i in range(config.num_layers)]

    def layer(self, index: int) -> RingLayer:
        return self._layers[index]

    # --- allocation: O(1) ------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise RuntimeError("no free ring: the scheduler must admit a sequence only when num_free > 0")
        return self._free.popleft()

    def free(self, ring: int) -> None:
        if ring in self._free:
            raise RuntimeError(f"ring {ring} freed twice")
        self._free.append(ring)

    # --- accounting ------------------------------------------------------------------------------
    @property
    def bytes_per_ring(self) -> int:
        """KV + metadata bytes one sequence owns, whatever its length."""
        per_layer_head_slot = (2 * self.head_dim * self.k.element_size() + 4 + 4
                               + self.edge_slot.shape[-1] * (4 + 4 + 4))
        return self.num_layers * self.num_kv_heads * self.budget * per_layer_head_slot

    @property
    def total_bytes(self) -> int:
        return self.num_rings * self.bytes_per_ring

"""Shared definitions of minikv's kernels: the ring layout, the eviction constants, the slot hash.

Both implementations of every kernel (the torch reference in `reference.py` and the Triton one) take
these exact structures, so a test can hand the same inputs to both and compare.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..hashing import fmix32

# How a slot's score S changes when a token attends the ring (docs/design.md, section 3).
SCORE_NONE = 0  # scores unused (streaming, full, snapkv's decode phase)
SCORE_ATTN = 1  # S <- decay * S + walk(a): h2o (decay 1), tova (decay 0), nexus (decay 0.99 + walk)
SCORE_KEYDIFF = 2  # S = -cos(k, mean of normalised keys), recomputed every step
SCORE_EXTERNAL = 3  # S fixed at write time by the caller (epikv, nestedkv)

# Which unprotected slot a full ring overwrites.
VICTIM_OLDEST = 0  # smallest original position (StreamingLLM)
VICTIM_MIN_SCORE = 1  # deterministic argmin S (top-K keep)
VICTIM_RESERVOIR = 2  # Efraimidis-Spirakis A-Res: weighted sampling without replacement


class PoolLayer(NamedTuple):
    """One layer's view of the block pool (docs/design.md, section 2): every tensor is indexed by block first.

    A block holds `block_size` consecutive ring slots for every KV head of the layer. Slot j of a
    sequence's ring lives in block `block_table[j // block_size]` at offset `j % block_size`, for every
    KV head; the ring math (positions, scores, victims, edges) only ever sees ring slot indices j.

    k, v:       [num_blocks, block_size, num_kv_heads, head_dim]  K before RoPE (after the model's key norm):
                                                                  the kernels rotate each key as they load it.
    pos:        [num_blocks, block_size, num_kv_heads] int32      original position of the token in the slot.
    score:      [num_blocks, block_size, num_kv_heads] fp32       the policy's importance score.
    edge_slot:  [num_blocks, block_size, num_kv_heads, M] int32   Nexus out-edges: target *ring slot*, -1 = none.
    edge_pos:   [num_blocks, block_size, num_kv_heads, M] int32   target's position when the edge was made;
                                                                  an edge is dead once pos[target] differs.
    edge_w:     [num_blocks, block_size, num_kv_heads, M] fp32    normalised edge weight.
    held:       [num_blocks, block_size, num_kv_heads] int8       1 = a decode victim only when nothing else
                                                                  is (Nexus's reserve, EvictionSpec.hold).
    rope_pos:   [num_blocks, block_size, num_kv_heads] int32      the position RoPE gives the slot's key: `pos`
                                                                  under positions="original", the slot's rank
                                                                  in its ring under "ring" (see Rope). None:
                                                                  `pos` is used.

    Slots at ring index >= filled are empty whatever the pool holds there, so freeing a sequence's blocks is
    O(blocks) and nothing is zeroed. Policies without edges use M = 1 and never read them; policies without
    `hold` never read or write `held` (it stays all zero).
    """

    k: torch.Tensor
    v: torch.Tensor
    pos: torch.Tensor
    score: torch.Tensor
    edge_slot: torch.Tensor
    edge_pos: torch.Tensor
    edge_w: torch.Tensor
    held: torch.Tensor
    rope_pos: torch.Tensor | None = None

    @property
    def rope_positions(self) -> torch.Tensor:
        """The tensor holding each slot's RoPE position: rope_pos, or pos when the pool keeps none."""
        return self.pos if self.rope_pos is None else self.rope_pos

    @property
    def block_size(self) -> int:
        return self.k.shape[1]

    def rows(self, name: str) -> torch.Tensor:
        """A pool tensor with (block, offset) flattened into one row axis: [num_blocks * block_size, ...]."""
        t = self.rope_positions if name == "rope_pos" else getattr(self, name)
        return t.view(-1, *t.shape[2:])


def physical_rows(block_table: torch.Tensor, slots: torch.Tensor, block_size: int) -> torch.Tensor:
    """Ring slot indices -> rows of PoolLayer.rows(...): block_table[slot // block_size] * block_size +
    slot % block_size (int64). Either one sequence's table [W] with slots of any shape, or tables [..., W]
    and slots [..., n] that share their leading dimensions."""
    slots = slots.long()
    if block_table.dim() == 1:
        blocks = block_table.long()[slots // block_size]
    else:
        blocks = block_table.long().gather(-1, slots // block_size)
    return blocks * block_size + slots % block_size


@dataclass(frozen=True)
class EvictionSpec:
    """The compile-time constants that turn one decode kernel into every policy.

    score_mode / victim_mode: one of the SCORE_* / VICTIM_* constants above.
    decay:  lambda of S <- decay * S + n (1 = accumulate like H2O, 0 = last step only like TOVA).
    gamma, hops: Nexus walk n = a + gamma a P + ... + gamma^hops a P^hops (hops 0 = direct attention).
    tau:    reservoir temperature; key = log(-ln u) - log(S + eps) / tau, the largest key is evicted.
    top_m:  out-edges a query token records (0 = none).
    n_sink, window: the first n_sink positions and the `window` positions before the new token are
            never victims.
    hold:   slots marked in PoolLayer.held are victims only when a ring has no other unprotected slot, and
            the new token's mark is cleared when it is written (Nexus's novelty reserve survives decode).
    """

    score_mode: int = SCORE_NONE
    victim_mode: int = VICTIM_OLDEST
    decay: float = 1.0
    gamma: float = 0.0
    hops: int = 0
    tau: float = 1.0
    top_m: int = 0
    n_sink: int = 4
    window: int = 64
    eps: float = 1e-6
    hold: bool = False


# --- the slot hash -------------------------------------------------------------------------------
# A-Res needs one uniform u_j per slot, fixed when the token is written. Instead of storing it we derive it
# from (seed, layer, head, pos) with a counter-based hash: nothing to store, identical in torch and Triton,
# and reproducible from the seed alone. The mixing is murmur3's fmix32, shared with the sampler's hash.

_MASK32 = 0xFFFFFFFF
_MIX_SEED, _MIX_LAYER, _MIX_HEAD, _MIX_POS = 0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D, 0x27D4EB2F


def hash_seed_layer(seed: int, layer):
    """The (seed, layer) rounds of slot_hash_u32, folded once: a uint32 Python int for an int layer, or an
    int64 tensor of them for a tensor of layer ids (the CPU engine scores every layer in one batch)."""
    if isinstance(layer, torch.Tensor):
        layer = layer.long()
    return fmix32(((seed * _MIX_SEED) & _MASK32) ^ ((layer * _MIX_LAYER) & _MASK32))


def slot_hash_u32(seed: int, layer, head: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """uint32 hash (held in int64) of (seed, layer, head, pos); broadcasts layer (an int, or a tensor of
    layer ids) and head against pos.

    The rounds are folded from the outside in, (seed, layer) first and head on head's own (small) shape,
    so only the last round runs over the broadcast shape: the same value at a third of the cost.
    """
    p = torch.as_tensor(pos)
    h = torch.as_tensor(head, device=p.device).to(torch.int64)
    x = fmix32(hash_seed_layer(seed, layer) ^ ((h * _MIX_HEAD) & _MASK32))
    return fmix32(x ^ ((p.to(torch.int64) * _MIX_POS) & _MASK32))


def slot_uniform(seed: int, layer: int, head: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """u in (0, 1), never 0 or 1: the top 24 bits of the hash, centred in their bucket."""
    bits = slot_hash_u32(seed, layer, head, pos) >> 8
    return (bits.to(torch.float32) + 0.5) * (1.0 / (1 << 24))


# --- RoPE applied by the kernels -----------------------------------------------------------------
# Keys are stored unrotated; every kernel rotates a key as it loads it, with the position its slot takes
# under the request's position mode, and the query with the query's. Two modes:
#   original  a slot's RoPE position is its token's position in the text (what the model was trained on);
#   ring      the ring's kept tokens take consecutive positions in their original order (sinks first) and
#             the query the next one, so no distance exceeds the ring's size (StreamingLLM, Xiao et al.
#             2023, "positions within the cache"). A slot's ring position is its rank: an eviction shifts
#             the ranks above the victim's down by one (the decode kernel does it in its pass over the ring).

POSITION_MODES = ("original", "ring")


class Rope:
    """The model's RoPE frequencies inv_freq [D/2] (fp32, with its scaling already applied: llama3, linear,
    Qwen's theta) and the rotation every kernel applies, in *paired* channel order (GPT-J's "interleaved"
    layout): frequency f rotates channels (2f, 2f + 1), [a, b] -> [a cos - b sin, b cos + a sin], angle =
    fp32(position) * inv_freq[f], all in fp32.

    Paired order is how minikv holds q and k everywhere: the loader permutes each head's q / k output
    channels of a Hugging Face checkpoint, (x_f, x_{f + D/2}) -> channels (2f, 2f + 1) (loader.to_paired_order),
    so this rotation of the permuted vectors is Hugging Face's "rotate_half" of the originals, permuted, and
    q . k is unchanged. In torch a key's pairs are then complex numbers as stored (torch.view_as_complex, no
    copy) and the rotation is one complex multiply by cos + i sin, read from a table indexed by integer
    position (the same values as computing them, at a gather's cost); the table grows by doubling to the
    largest position asked for.
    """

    def __init__(self, inv_freq: torch.Tensor):
        self.source = inv_freq  # the tensor it was made from (the model's buffer)
        self.inv_freq = inv_freq.detach().float().contiguous()
        self._phase = torch.zeros(0, self.inv_freq.shape[0], dtype=torch.complex64, device=self.inv_freq.device)

    @property
    def head_dim(self) -> int:
        return 2 * self.inv_freq.shape[0]

    def phases(self, pos: torch.Tensor, max_pos: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """cos + i sin of integer positions `pos` [...] (0 <= pos <= max_pos): complex64 [..., D/2]
        (`out`: a complex64 scratch of pos.numel() rows of D/2 to write into)."""
        table = self._table(max_pos)
        return torch.index_select(table, 0, pos.reshape(-1), out=out).view(*pos.shape, table.shape[1])

    def _table(self, max_pos: int) -> torch.Tensor:
        """[P, D/2] complex64 cos + i sin of positions 0..P-1, P > max_pos."""
        if max_pos >= self._phase.shape[0]:
            size = max(64, 1 << int(max_pos).bit_length())
            angles = torch.arange(size, device=self.inv_freq.device).float()[:, None] * self.inv_freq[None, :]
            self._phase = torch.complex(angles.cos(), angles.sin())
        return self._phase

    @staticmethod
    def turn(x: torch.Tensor, phases: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """x [..., D] (paired order) rotated by `phases` [..., D/2] (Rope.phases): [..., D] fp32. An fp32 x
        is read in place as D/2 complex numbers, so this is one pass. `out`: complex64 [..., D/2] scratch to
        write into (None: a new tensor)."""
        x32 = x.float()
        if x32.storage_offset() % 2 or any(s % 2 for s in x32.stride()[:-1]) or x32.stride(-1) != 1:
            x32 = x32.clone(memory_format=torch.contiguous_format)  # view_as_complex needs pairs aligned
        pairs = torch.view_as_complex(x32.unflatten(-1, (-1, 2)))
        return torch.view_as_real(torch.mul(pairs, phases, out=out)).flatten(-2)

    def rotate(self, x: torch.Tensor, pos: torch.Tensor, max_pos: int | None = None) -> torch.Tensor:
        """x [..., D] (paired order) rotated to integer positions `pos` [...] (>= 0): [..., D] fp32.
        `max_pos`: a bound on pos known to the caller (saves a host read)."""
        if max_pos is None:
            max_pos = int(pos.max()) if pos.numel() else 0
        table = self._table(max_pos)
        index = pos.reshape(-1).long().clamp(0, table.shape[0] - 1)  # padding lanes may hold anything
        return self.turn(x, table.index_select(0, index).view(*pos.shape, table.shape[1]))

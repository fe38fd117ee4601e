"""Megatron-style sharded layers, and the slicing of a full checkpoint into one rank's shard.

Every rank holds 1/N of each big matrix:

- column-parallel (q/k/v, gate/up): each rank computes its own output columns (its heads, its slice of
  the MLP's intermediate), from the full (replicated) input; nothing is communicated;
- row-parallel (o, down): each rank multiplies its slice of the input by its rows of the weight, giving a
  partial sum of the full output; one all-reduce adds the N partial sums, so every rank holds the whole
  hidden state again (which is why policies that read hidden states see the same numbers at any N);
- vocab-parallel embedding and LM head: each rank owns ceil(vocab / N) consecutive token ids (the last
  shard padded with zero rows when vocab does not divide). The embedding looks up the ids it owns, zeroes
  the rest, and an all-reduce sums the N rows (exactly one is non-zero). The LM head computes its ids'
  logits; rank 0 gathers the shards into whole rows and drops the padding.

A column-parallel layer is a plain `nn.Linear` with fewer output features (the model just builds it
smaller), so only row-parallel, embedding and LM head need classes here.
"""

from __future__ import annotations

import torch
from torch import nn

from .group import TPGroup


class RowParallelLinear(nn.Linear):
    """o_proj / down_proj: [in / N] -> partial [out], then one all-reduce to the whole output."""

    def __init__(self, in_features: int, out_features: int, tp: TPGroup):
        super().__init__(in_features // tp.size, out_features, bias=False)
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.all_reduce(super().forward(x))


def vocab_shard(vocab_size: int, size: int) -> int:
    """Token ids per rank: ceil(vocab / N); the last rank's shard is padded up to it."""
    return -(-vocab_size // size)


class VocabParallelEmbedding(nn.Embedding):
    """embed_tokens: this rank's rows of the table; ids outside them read zeros; an all-reduce sums ranks."""

    def __init__(self, vocab_size: int, dim: int, tp: TPGroup):
        super().__init__(vocab_shard(vocab_size, tp.size), dim)
        self.tp, self.first = tp, tp.rank * self.num_embeddings

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.first
        mine = (local >= 0) & (local < self.num_embeddings)
        x = super().forward(torch.where(mine, local, 0))
        return self.tp.all_reduce(x * mine[:, None].to(x.dtype))


class ParallelLMHead(nn.Linear):
    """lm_head: this rank's ids' logits; rank 0 gathers them into [rows, vocab] (other ranks get their shard)."""

    def __init__(self, dim: int, vocab_size: int, tp: TPGroup):
        super().__init__(dim, vocab_shard(vocab_size, tp.size), bias=False)
        self.tp, self.vocab_size = tp, vocab_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shards = self.tp.gather(super().forward(x).contiguous())
        if shards is None:  # not rank 0
            return x.new_empty(0)
        return torch.cat(shards, dim=-1)[..., : self.vocab_size]


# Which dimension of a checkpoint tensor each rank slices, by the parameter's last two name parts.
_COLUMN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")  # output rows: dim 0 (weight and bias)
_ROW = ("o_proj", "down_proj")  # input columns: dim 1
_VOCAB = ("embed_tokens", "lm_head")  # vocabulary rows, padded


def shard_state_dict(state: dict[str, torch.Tensor], tp: TPGroup) -> dict[str, torch.Tensor]:
    """One rank's slice of every tensor of a full checkpoint (norms and the like are replicated). Slices
    are copies, so the full tensors can be freed."""
    out = {}
    for name, tensor in state.items():
        module = name.rsplit(".", 2)[-2] if name.count(".") else name
        if module in _COLUMN:
            out[name] = tensor.chunk(tp.size, dim=0)[tp.rank].clone()
        elif module in _ROW:
            out[name] = tensor.chunk(tp.size, dim=1)[tp.rank].clone()
        elif module in _VOCAB:
            rows = vocab_shard(tensor.shape[0], tp.size)
            part = tensor[tp.rank * rows: (tp.rank + 1) * rows]
            out[name] = torch.cat([part, part.new_zeros(rows - part.shape[0], *part.shape[1:])])
        else:
            out[name] = tensor
    return out

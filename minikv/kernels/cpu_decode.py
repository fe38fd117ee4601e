"""Decode attention on the CPU: every ring attended where it lies in the block pool, nothing gathered.

`reference.decode_attend` (the contract) gathers every ring's K and V into one padded [N, Hkv, F + 1, D]
batch and attends it with two batched matmuls: every layer of every step copies each ring twice. This
module computes the same output and a(j) reading the rings in place, in pieces (`ring_pieces`):

- a run of ring slots whose blocks follow each other in the pool is a strided view [L, Hkv, D] of it; the
  allocator gives a ring one run when it can (block_pool.KVPool.reserve), so a ring is usually one piece;
- a fragmented ring (blocks scattered one by one, e.g. grown a block at a time beside other rings) is
  gathered once, as one piece: the copy the reference makes, for that ring only.

Values are attended straight from the view. Keys are rotated on load (`Rope.turn`, the query likewise):
the pool holds each head's channels in RoPE's paired order, so an fp32 key is read in place as D/2 complex
numbers and rotated by one complex multiply into a scratch tile small enough to stay in cache, and attended
from there: the rotation costs the one pass over K that the gather cost before. Pieces are cut into tiles
of about `TILE_BYTES` of keys so that the tile, its phases and the query's logits stay in L2.

The price is a Python loop over the batch's pieces (a handful of torch ops each), which is why only the CPU
runs this: there a per-op cost of microseconds is small beside copying megabytes a layer.
"""

from __future__ import annotations

import torch

from .common import PoolLayer, Rope, physical_rows

TILE_BYTES = 1 << 20  # keys per tile (fp32): with the phases and scratch, well inside a 2-4 MiB L2
MIN_RUN = 64  # ring slots per run, on average, below which a ring is gathered instead (per-op cost)


def ring_pieces(block_tables: torch.Tensor, filled: torch.Tensor, block_size: int) -> tuple:
    """Where each sequence's filled ring slots 0..filled-1 lie in the pool, as pieces in ring order.

    Per sequence a tuple of (slot, rows, length): ring slots slot..slot+length-1 are the pool rows `rows`,
    a slice of consecutive rows (a view, no copy) or an int64 tensor of rows (a fragmented ring, gathered).
    One host read of the tables a step; every layer shares the answer (layers share block tables)."""
    tables, counts = block_tables.tolist(), filled.tolist()
    pieces = []
    for i, (table, f) in enumerate(zip(tables, counts)):
        runs: list[list[int]] = []  # [slot, first row, length]
        for b in range(-(-f // block_size)):
            row, length = table[b] * block_size, min(block_size, f - b * block_size)
            if runs and runs[-1][1] + runs[-1][2] == row:
                runs[-1][2] += length
            else:
                runs.append([b * block_size, row, length])
        if len(runs) <= max(1, f // MIN_RUN):
            pieces.append(tuple((s, slice(r, r + n), n) for s, r, n in runs))
        else:
            rows = physical_rows(block_tables[i], torch.arange(f, device=block_tables.device), block_size)
            pieces.append(((0, rows, f),))
    return tuple(pieces)


def _tiles(pieces, tile: int):
    """(slot, rows, length) of every piece, cut into tiles of at most `tile` slots."""
    for slot, rows, length in pieces:
        for start in range(0, length, tile):
            n = min(tile, length - start)
            if isinstance(rows, slice):
                part = slice(rows.start + start, rows.start + start + n)
            else:
                part = rows[start:start + n]
            yield slot + start, part, n


def _read(t: torch.Tensor, rows) -> torch.Tensor:
    """Pool rows [n, ...] of t flattened to rows: a view for a slice, a gather for a tensor of rows."""
    return t[rows] if isinstance(rows, slice) else t.index_select(0, rows)


def attend_in_place(q, k_new, v_new, pool: PoolLayer, pieces: tuple, width: int, *, scale: float,
                    rope: Rope | None = None, q_pos: torch.Tensor | None = None):
    """reference.decode_attend's output [N, Hq, D] and a(j) [N, Hkv, F + 1] (F = width; lane F is the new
    token, padding lanes get exactly 0), reading ring i's slots from `pieces[i]` (ring_pieces). Keys are
    rotated to pool.rope_positions when `rope` is given (q_pos: the query's and the new token's positions)."""
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads = k_new.shape[1]
    group, half = num_heads // num_kv_heads, head_dim // 2
    k_rows, v_rows = pool.rows("k"), pool.rows("v")
    qg = q.float().view(num_seqs, num_kv_heads, group, head_dim)
    k_new = k_new.float()
    if rope is not None:
        max_pos = int(q_pos.max())  # every key's RoPE position is at most its query's
        pos_rows = pool.rows("rope_pos")
        qg = Rope.turn(qg, rope.phases(q_pos[:, None, None].expand(-1, num_kv_heads, group), max_pos))
        k_new = Rope.turn(k_new, rope.phases(q_pos[:, None].expand(-1, num_kv_heads), max_pos))
    qg = qg * scale
    ragged = any(sum(n for _, _, n in p) < width for p in pieces)
    logits = q.new_empty(num_seqs, num_kv_heads, group, width + 1, dtype=torch.float32)
    if ragged:
        logits.fill_(float("-inf"))  # padding lanes
    logits[..., width] = (qg * k_new[:, :, None, :]).sum(-1)
    tile = max(MIN_RUN, TILE_BYTES // (num_kv_heads * head_dim * 4))
    scratch = phases = None
    for i, ring in enumerate(pieces):
        for slot, rows, n in _tiles(ring, tile):
            keys = _read(k_rows, rows)  # [n, Hkv, D], as stored
            if rope is not None:
                if scratch is None:  # one tile's rotated keys and their phases, reused: they stay in cache
                    scratch, phases = torch.empty(2, tile * num_kv_heads, half, dtype=torch.complex64,
                                                  device=q.device)
                turn = rope.phases(_read(pos_rows, rows), max_pos, out=phases[:n * num_kv_heads])
                keys = Rope.turn(keys, turn, out=scratch[:n * num_kv_heads].view(n, num_kv_heads, half))
            elif keys.dtype != torch.float32:
                keys = keys.float()
            logits[i, :, :, slot:slot + n] = torch.matmul(qg[i], keys.permute(1, 2, 0))
    probs = torch.softmax(logits, dim=-1)
    out = probs[..., width, None] * v_new.float()[:, :, None, :]  # [N, Hkv, G, D]: the new token's share
    for i, ring in enumerate(pieces):
        for slot, rows, n in _tiles(ring, tile):
            values = _read(v_rows, rows)
            if values.dtype != torch.float32:
                values = values.float()
            out[i].baddbmm_(probs[i, :, :, slot:slot + n], values.transpose(0, 1))
    return out.view(num_seqs, num_heads, head_dim).to(q.dtype), probs.mean(dim=2)

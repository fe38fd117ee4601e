"""The sampler's draw fused in Triton: Gumbel-max with counter-based noise, without an [N, vocab] noise tensor.

For each row i the token is argmax_v (logits[i, v] + G(seed_i, step_i, v)), G = -log(-log u) with
u = minikv.hashing.hash_uniform(seed, step, v) (MurmurHash3_x86_32 of three uint32 words). The torch
reference (`minikv.sampling.Sampler.gumbel_noise` + argmax) builds the whole [N, V] noise tensor: three
hash rounds, two logs and an add over 150k entries per row for a Qwen vocabulary. Here one program per row
walks the vocabulary in blocks, hashes in native uint32 arithmetic (the same bits as the torch version, which
emulates uint32 in int64) and keeps a running argmax; ties go to the lowest id, as torch.argmax's first
maximum. Only the token ids come back.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attend_score_sample import _fmix32


@triton.jit
def _mix_word(k):
    k = k * 0xCC9E2D51
    k = (k << 15) | (k >> 17)
    return k * 0x1B873593


@triton.jit
def _absorb(h, k):
    h = h ^ _mix_word(k)
    h = (h << 13) | (h >> 19)
    return h * 5 + 0xE6546B64


@triton.jit
def _finalize(h, num_words: tl.constexpr):
    # murmur3 folds in the input's length in bytes, then applies the same fmix32 as the slot hash.
    return _fmix32(h ^ (4 * num_words))


@triton.jit
def _gumbel_argmax_kernel(logits_ptr, seed_ptr, step_ptr, out_ptr, noise_ptr, vocab_size, stride_row,
                          BLOCK: tl.constexpr, STORE_NOISE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    seed = tl.load(seed_ptr + row).to(tl.uint32)
    step = tl.load(step_ptr + row).to(tl.uint32)
    state = _absorb(_absorb(tl.zeros([], tl.uint32), seed), step)
    best = tl.full([], float("-inf"), tl.float32)
    best_id = tl.full([], 0, tl.int64)
    for start in range(0, vocab_size, BLOCK):
        v = start + tl.arange(0, BLOCK)
        ok = v < vocab_size
        h = _finalize(_absorb(state, v.to(tl.uint32)), 3)
        u = ((h >> 9).to(tl.float32) + 0.5) * (1.0 / 8388608.0)
        noise = -tl.log(-tl.log(u))
        if STORE_NOISE:
            tl.store(noise_ptr + row * vocab_size + v, noise, mask=ok)
        x = tl.load(logits_ptr + row * stride_row + v, mask=ok, other=float("-inf")).to(tl.float32) + noise
        x = tl.where(ok, x, float("-inf"))
        block_best = tl.max(x, axis=0)
        block_id = tl.min(tl.where(x == block_best, v, vocab_size), axis=0).to(tl.int64)
        better = block_best > best  # strict: on ties the earlier block (lower id) stays
        best_id = tl.where(better, block_id, best_id)
        best = tl.where(better, block_best, best)
    tl.store(out_ptr + row, best_id)


def gumbel_argmax_triton(logits: torch.Tensor, seed: torch.Tensor, step: torch.Tensor, *,
                         block: int | None = None, return_noise: bool = False):
    """Token ids [N] int64 of argmax(logits + Gumbel(hash(seed, step, v))); logits [N, V] (any float dtype),
    seed / step [N] int64 holding uint32 values. With return_noise (tests), also the [N, V] noise."""
    num_rows, vocab_size = logits.shape
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    out = torch.empty(num_rows, dtype=torch.int64, device=logits.device)
    noise = torch.empty(num_rows, vocab_size, dtype=torch.float32, device=logits.device) if return_noise else out
    if num_rows:
        block = block or (4096 if logits.is_cuda else triton.next_power_of_2(vocab_size))
        _gumbel_argmax_kernel[(num_rows,)](logits, seed, step, out, noise, vocab_size, logits.stride(0),
                                           BLOCK=block, STORE_NOISE=return_noise)
    return (out, noise) if return_noise else out

"""Counter-based hashing: reproducible random numbers from integer coordinates, with no generator state.

minikv needs randomness that is reproducible from a seed whatever the batch looks like. This module
serves the sampler, which draws one uniform number per (request seed, step, vocabulary id) for the
Gumbel-max trick, and derives seeds: the engine's per request, the CLI's per chat turn. (The nexus
policy's per-slot keys for weighted reservoir sampling, Efraimidis & Spirakis 2006, follow the same idea
with a hash of their own, three rounds of murmur3's fmix32 over (seed, layer, head, pos), which the decode
kernel evaluates in-line: `minikv.kernels.common.slot_hash_u32`.)

A stateful `torch.Generator` cannot give this: its output depends on the order and size of earlier draws,
so the same request would sample differently in a different batch. A *counter-based* generator instead
hashes the coordinates of the number it wants (Salmon et al., "Parallel random numbers: as easy as
1, 2, 3", SC 2011). Here the hash is MurmurHash3_x86_32 (Austin Appleby, SMHasher) over the inputs read
as little-endian uint32 words, with murmur seed 0:

    hash_u32(a, b, c) == MurmurHash3_x86_32(bytes of uint32 a, b, c, seed=0)

It is a standard function, so a Triton kernel working in native uint32 arithmetic can produce the very
same bits (absorb each word with `mix_word`, then `finalize`), and tests can check it against a plain
Python implementation.

torch has no uint32 arithmetic on every device, so values live in int64 tensors holding [0, 2^32) and every
step masks back to 32 bits. Products of two 32-bit numbers would overflow int64, so multiplication by a
constant is split into its 16-bit halves (`_mul_u32`); nothing here relies on signed overflow wrapping.
"""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF

# MurmurHash3_x86_32 constants.
_C1 = 0xCC9E2D51
_C2 = 0x1B873593
_FMIX1 = 0x85EBCA6B
_FMIX2 = 0xC2B2AE35
_ROUND_ADD = 0xE6546B64


def _mul_u32(x: torch.Tensor, constant: int) -> torch.Tensor:
    """(x * constant) mod 2^32 for x in [0, 2^32), without int64 overflow.

    x * constant can reach 2^64; x * (16-bit half of constant) stays below 2^48.
    """
    low = x * (constant & 0xFFFF)
    high = ((x * (constant >> 16)) & 0xFFFF) << 16
    return (low + high) & MASK32


def _rotl32(x: torch.Tensor, r: int) -> torch.Tensor:
    return ((x << r) | (x >> (32 - r))) & MASK32


def to_u32(x: torch.Tensor | int) -> torch.Tensor:
    """Read an integer tensor (or int) as its low 32 bits, as an int64 tensor in [0, 2^32)."""
    return torch.as_tensor(x, dtype=torch.int64) & MASK32


def mix_word(word: torch.Tensor | int) -> torch.Tensor:
    """The per-word scramble of MurmurHash3 (k *= c1; k = rotl(k, 15); k *= c2).

    It depends on the word only, so a caller hashing the same word against many states (the sampler's
    vocabulary ids) can compute it once and pass it to `absorb_mixed`.
    """
    k = _mul_u32(to_u32(word), _C1)
    k = _rotl32(k, 15)
    return _mul_u32(k, _C2)


def absorb_mixed(state: torch.Tensor, mixed_word: torch.Tensor) -> torch.Tensor:
    """Fold one already-mixed word (from `mix_word`) into the running hash state."""
    h = state ^ mixed_word
    h = _rotl32(h, 13)
    return (h * 5 + _ROUND_ADD) & MASK32


def absorb(state: torch.Tensor, word: torch.Tensor | int) -> torch.Tensor:
    """Fold one uint32 word into the running hash state (one MurmurHash3 block round)."""
    return absorb_mixed(state, mix_word(word))


def fmix32(h):
    """murmur3's fmix32 avalanche on uint32 values (Python ints or int64 tensors holding [0, 2^32)): the one
    mixing function of both hash uses, the sampler's (via `finalize`) and the slot hash
    (kernels.common.slot_hash_u32); the Triton kernels' `_fmix32` computes the same bits."""
    h = h ^ (h >> 16)
    h = _mul_u32(h, _FMIX1)
    h = h ^ (h >> 13)
    h = _mul_u32(h, _FMIX2)
    return h ^ (h >> 16)


def finalize(state: torch.Tensor, num_words: int) -> torch.Tensor:
    """MurmurHash3's tail: xor the length in bytes, then the fmix32 avalanche."""
    return fmix32(state ^ (4 * num_words))


def hash_u32(*ints: torch.Tensor | int) -> torch.Tensor:
    """MurmurHash3_x86_32 (seed 0) of the inputs read as uint32 words, broadcast elementwise.

    Each input is an integer tensor or a Python int; each is read as its low 32 bits. The inputs
    broadcast against each other like the operands of `+`. Returns an int64 tensor with values in
    [0, 2^32). Order matters: hash_u32(a, b) != hash_u32(b, a) in general.
    """
    if not ints:
        raise ValueError("hash_u32 needs at least one input")
    state = torch.zeros((), dtype=torch.int64)
    for word in ints:
        word_tensor = torch.as_tensor(word, dtype=torch.int64)
        state = absorb(state.to(word_tensor.device), word_tensor)
    return finalize(state, len(ints))


def uniform_from_hash(h: torch.Tensor) -> torch.Tensor:
    """Map a uint32 hash (int64 tensor in [0, 2^32)) to float32 uniform in (0, 1), never 0 or 1.

    Uses the top 23 bits: u = (k + 0.5) / 2^23, so every value is exactly representable in float32 and
    lies in [2^-24, 1 - 2^-24]. log(u) and log(1 - u) are therefore always finite.
    """
    top_bits = (h >> 9).to(torch.float32)
    return (top_bits + 0.5) * (2.0**-23)


def hash_uniform(*ints: torch.Tensor | int) -> torch.Tensor:
    """Uniform float32 in (0, 1) from integer coordinates: uniform_from_hash(hash_u32(*ints)).

    Example: the sampler's noise for token v of a request is hash_uniform(seed, step, v).
    """
    return uniform_from_hash(hash_u32(*ints))

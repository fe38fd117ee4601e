"""One hash family: the slot hash and the sampler's hash share murmur3's fmix32 (minikv.hashing.fmix32), and
the Triton kernels compute the same bits as the torch definitions (run under the Triton interpreter)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from minikv.hashing import fmix32
from minikv.kernels.attend_score_sample import _fmix32, _slot_uniform, hash_base
from minikv.kernels.common import slot_uniform


@triton.jit
def _hash_probe(values_ptr, heads_ptr, pos_ptr, mixed_ptr, uniform_ptr, base, n, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    ok = i < n
    x = tl.load(values_ptr + i, mask=ok, other=0).to(tl.uint32, bitcast=True)
    tl.store(mixed_ptr + i, _fmix32(x).to(tl.int32, bitcast=True), mask=ok)
    head = tl.load(heads_ptr + i, mask=ok, other=0)
    pos = tl.load(pos_ptr + i, mask=ok, other=0)
    tl.store(uniform_ptr + i, _slot_uniform(base, head, pos), mask=ok)


def test_triton_and_torch_hashes_agree():
    g = torch.Generator().manual_seed(0)
    n = 64
    values = torch.randint(-(2**31), 2**31 - 1, (n,), generator=g, dtype=torch.int64)
    values[:4] = torch.tensor([0, 1, -1, 2**31 - 1])
    heads = torch.randint(0, 16, (n,), generator=g, dtype=torch.int32)
    pos = torch.randint(0, 1 << 20, (n,), generator=g, dtype=torch.int32)
    for seed, layer in ((0, 0), (7, 3), (2**31 + 5, 29)):
        mixed = torch.empty(n, dtype=torch.int32)
        uniform = torch.empty(n, dtype=torch.float32)
        _hash_probe[(1,)](values.to(torch.int32), heads, pos, mixed, uniform, hash_base(seed, layer), n,
                          BLOCK=triton.next_power_of_2(n))
        assert torch.equal(mixed.long() & 0xFFFFFFFF, fmix32(values & 0xFFFFFFFF))
        assert torch.equal(uniform, slot_uniform(seed, layer, heads, pos))

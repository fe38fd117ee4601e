"""Triton RMSNorm and SiLU-mul against their torch references, under the interpreter on CPU tensors."""

from __future__ import annotations

import pytest
import torch

from minikv.kernels.ops import rms_norm_reference, rms_norm_triton, silu_mul_reference, silu_mul_triton


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(3, 576), (2, 5, 64), (1, 100)])
def test_rms_norm_matches_reference(shape, dtype):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(*shape, generator=gen) * 3).to(dtype)
    weight = torch.randn(shape[-1], generator=gen).to(dtype)
    got = rms_norm_triton(x, weight, 1e-5)
    assert got.dtype == dtype and got.shape == x.shape
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(got, rms_norm_reference(x, weight, 1e-5), rtol=tol, atol=tol)


def test_rms_norm_of_a_strided_view():
    x = torch.randn(4, 2, 64)[:, 1]  # rows 128 elements apart
    weight = torch.rand(64)
    torch.testing.assert_close(rms_norm_triton(x, weight, 1e-6), rms_norm_reference(x, weight, 1e-6))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_silu_mul_matches_reference(dtype):
    gen = torch.Generator().manual_seed(1)
    gate = (torch.randn(3, 1536, generator=gen) * 4).to(dtype)
    up = torch.randn(3, 1536, generator=gen).to(dtype)
    got = silu_mul_triton(gate, up, block=2048)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(got, silu_mul_reference(gate, up), rtol=tol, atol=tol)


def test_silu_mul_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape"):
        silu_mul_triton(torch.zeros(2, 3), torch.zeros(3, 2))

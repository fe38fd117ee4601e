"""The whole model through the Triton kernels (interpreter) equals the reference path, evictions included."""

import pytest
import torch

from helpers import load_tiny, make_tiny_checkpoint, ring_logits


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return load_tiny(make_tiny_checkpoint(tmp_path_factory.mktemp("e2e"), "Qwen3ForCausalLM"))


@pytest.mark.parametrize("policy", ["nexus", "h2o", "snapkv"])
def test_triton_path_equals_reference_path_under_eviction(tiny, policy, monkeypatch):
    model, config = tiny
    ids = torch.randint(3, config.vocab_size, (110,), generator=torch.Generator().manual_seed(2)).tolist()
    runs = {}
    for backend in ("reference", "triton"):
        monkeypatch.setenv("MINIKV_KERNELS", backend)
        runs[backend] = ring_logits(model, config, ids, prefill=[48, 32], budget=40, policy=policy, window=8)
    (ref_logits, ref_store, _), (tri_logits, tri_store, _) = runs["reference"], runs["triton"]
    assert torch.equal(ref_store.pos, tri_store.pos)  # the same tokens were evicted everywhere
    torch.testing.assert_close(tri_logits, ref_logits, rtol=1e-4, atol=1e-4)

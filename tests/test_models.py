"""minikv's models against transformers on tiny random checkpoints, through chunked prefill and decode."""

import pytest
import torch

from helpers import hf_logits, make_tiny_checkpoint, ring_logits
from minikv.config import ModelConfig
from minikv.errors import ModelLoadError
from minikv.loader import build_model, load_state_dict, read_config, weight_files

LLAMA3_SCALING = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=64)

VARIANTS = {
    "llama": ("LlamaForCausalLM", {}),
    "llama-tied-llama3-rope": ("LlamaForCausalLM", dict(tie_word_embeddings=True, rope_scaling=LLAMA3_SCALING)),
    "llama-linear-rope": ("LlamaForCausalLM", dict(rope_scaling=dict(rope_type="linear", factor=2.0))),
    "mistral": ("MistralForCausalLM", {}),
    "qwen2": ("Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3ForCausalLM", {}),
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def checkpoint(request, tmp_path_factory):
    arch, overrides = VARIANTS[request.param]
    return make_tiny_checkpoint(tmp_path_factory.mktemp(request.param), arch, **overrides)


def test_logits_match_transformers(checkpoint):
    """Prefill in two chunks, then token-by-token decode: every position's logits equal transformers'."""
    config = read_config(checkpoint)
    model = build_model(config, load_state_dict(weight_files(checkpoint)), "cpu", torch.float32)
    ids = torch.randint(3, config.vocab_size, (96,), generator=torch.Generator().manual_seed(1)).tolist()
    expected = hf_logits(checkpoint, ids)
    got, _, _ = ring_logits(model, config, ids, prefill=[50, 30], budget=128, policy="nexus")
    scale = expected.abs().max()
    assert (got - expected).abs().max() <= 1e-4 * scale


def test_tied_embeddings_share_storage(tmp_path):
    path = make_tiny_checkpoint(tmp_path, tie_word_embeddings=True)
    config = read_config(path)
    model = build_model(config, load_state_dict(weight_files(path)), "cpu", torch.float32)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_qwen_flags_come_from_the_architecture():
    base = dict(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2)
    assert ModelConfig.from_hf({**base, "architectures": ["Qwen2ForCausalLM"]}).qkv_bias
    qwen3 = ModelConfig.from_hf({**base, "architectures": ["Qwen3ForCausalLM"], "head_dim": 16})
    assert qwen3.qk_norm and not qwen3.qkv_bias and qwen3.head_dim == 16


def test_unsupported_architecture_names_the_supported_ones():
    with pytest.raises(ModelLoadError, match="LlamaForCausalLM.*Qwen3ForCausalLM"):
        ModelConfig.from_hf({"architectures": ["GPT2LMHeadModel"]})


def test_unsupported_rope_scaling_is_refused():
    base = dict(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
                architectures=["LlamaForCausalLM"])
    with pytest.raises(ModelLoadError, match="yarn"):
        ModelConfig.from_hf({**base, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})

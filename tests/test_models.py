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


def test_pool_keys_are_transformers_keys_in_paired_order(checkpoint):
    """The layout the kernels rely on: the pool holds, per layer and KV head, transformers' key before RoPE
    (k_proj with its bias, then Qwen3's k_norm) with each head's channels (f, f + D/2) at (2f, 2f + 1)."""
    import transformers

    config = read_config(checkpoint)
    model = build_model(config, load_state_dict(weight_files(checkpoint)), "cpu", torch.float32)
    ids = torch.randint(3, config.vocab_size, (40,), generator=torch.Generator().manual_seed(2)).tolist()
    _, ring, _ = ring_logits(model, config, ids, prefill=[40], budget=64, policy="full")
    hf = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    keys = []
    for layer in hf.model.layers:
        attn = layer.self_attn
        source = attn.k_norm if config.qk_norm else attn.k_proj
        source.register_forward_hook(lambda module, args, out: keys.append(out.detach()))
    with torch.no_grad():
        hf(torch.tensor([ids]))
    half = config.head_dim // 2
    for layer, k in enumerate(keys):  # [1, T, Hkv * D] or [1, T, Hkv, D]
        paired = k.reshape(len(ids), config.num_kv_heads, 2, half).transpose(-1, -2).flatten(-2)
        torch.testing.assert_close(ring.k[layer], paired.transpose(0, 1), rtol=1e-5, atol=1e-5)
    assert len(keys) == config.num_layers


def test_loader_permutes_only_q_and_k_channels_within_heads(checkpoint):
    """to_paired_order moves channel f + j * D/2 of every q / k head to 2f + j (weight rows, biases, Qwen3's
    norms) and leaves every other tensor, v_proj and o_proj included, as it was."""
    from minikv.loader import to_paired_order

    config = read_config(checkpoint)
    state = load_state_dict(weight_files(checkpoint))
    paired = to_paired_order(state, config)
    d, half = config.head_dim, config.head_dim // 2
    in_head = [j * half + f for f in range(half) for j in (0, 1)]  # new channel 2f + j <- old j * D/2 + f
    moved = set()
    for name, tensor in state.items():
        module = name.split(".")[-2]
        if module in ("q_proj", "k_proj", "q_norm", "k_norm"):
            heads = tensor.shape[0] // d
            order = torch.tensor([h * d + c for h in range(heads) for c in in_head])
            assert torch.equal(paired[name], tensor[order]), name
            assert not torch.equal(paired[name], tensor), name
            moved.add(module)
        else:
            assert paired[name] is tensor, name
    assert moved == ({"q_proj", "k_proj", "q_norm", "k_norm"} if config.qk_norm else {"q_proj", "k_proj"})
    assert any(name.endswith("q_proj.bias") for name in state) == config.qkv_bias


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

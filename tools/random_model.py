"""Real-shaped models with random weights, built in memory: no download, no checkpoint on disk.

The benchmarks and the GPU check need models of the size that matters on a GPU (Qwen3-0.6B, Llama-3.2-1B)
on a machine that has no network. Speed does not depend on the weights' values, so a random state dict in
the real shapes, put through minikv's own loader (`minikv.loader.build_model`: tied embeddings, RoPE
frequencies rebuilt in fp32), gives the same work as the real checkpoint. A word-level tokenizer stand-in
(token id i is the word `<wi>`) gives every id visible text, which is all the engine asks of a tokenizer
when prompts are token ids.

Only torch and tokenizers are needed (no transformers, huggingface_hub, gguf or jinja2).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# config.json fields of the real models (their Hugging Face configs), enough for minikv.config.ModelConfig.
MODEL_SHAPES = {
    # Qwen3-0.6B: 28 layers, hidden 1024, 16 q / 8 kv heads of 128 (q/k norm), MLP 3072, vocab 151936, tied
    "qwen3-0.6b": dict(architectures=["Qwen3ForCausalLM"], hidden_size=1024, intermediate_size=3072,
                       num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                       vocab_size=151936, tie_word_embeddings=True, rope_theta=1e6, rms_norm_eps=1e-6,
                       max_position_embeddings=40960, bos_token_id=151643, eos_token_id=151645),
    # Llama-3.2-1B: 16 layers, hidden 2048, 32 q / 8 kv heads of 64, MLP 8192, vocab 128256, tied, llama3 RoPE
    "llama-3.2-1b": dict(architectures=["LlamaForCausalLM"], hidden_size=2048, intermediate_size=8192,
                         num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                         vocab_size=128256, tie_word_embeddings=True, rope_theta=5e5, rms_norm_eps=1e-5,
                         rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0,
                                           high_freq_factor=4.0, original_max_position_embeddings=8192),
                         max_position_embeddings=131072, bos_token_id=128000, eos_token_id=128001),
}


def shrunk(shape: dict, *, layers: int = 1, intermediate: int = 256, vocab: int = 1024) -> dict:
    """The same attention shapes (hidden, heads, KV heads, head_dim, RoPE, q/k norm) with fewer layers, a
    narrow MLP and a small vocabulary: what a CPU dry run can afford while the kernels still see real heads."""
    return {**shape, "num_hidden_layers": layers, "intermediate_size": intermediate, "vocab_size": vocab,
            "bos_token_id": 1, "eos_token_id": 2}


def random_state(config, *, seed: int = 0, std: float = 0.02, device="cpu", dtype=torch.float32) -> dict:
    """A state dict of `config`'s model in the checkpoint's names: matrices ~ N(0, std), norm weights near
    1, biases small. Generated on `device` directly (a 1B model in bf16 never passes through host memory)."""
    from minikv.models import MODEL_CLASSES

    with torch.device("meta"):
        shapes = {name: t.shape for name, t in MODEL_CLASSES[config.architecture](config).state_dict().items()}
    gen = torch.Generator(device=device).manual_seed(seed)
    state = {}
    for name, shape in shapes.items():
        if config.tie_word_embeddings and name == "lm_head.weight":
            continue
        noise = torch.randn(shape, generator=gen, device=device, dtype=torch.float32)
        if len(shape) >= 2:
            value = noise * std
        elif "norm" in name:
            value = 1.0 + 0.1 * noise.clamp(-2, 2)
        else:  # biases (Qwen2)
            value = 0.05 * noise
        state[name] = value.to(dtype)
    return state


def stand_in_tokenizer(vocab_size: int, bos_id: int | None = 1, eos_id: int | None = 2):
    """minikv's Tokenizer over a word-level vocabulary: id i <-> `<wi>`, words split on whitespace."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, pre_tokenizers

    from minikv.tokenizer import Tokenizer

    backend = Backend(models.WordLevel({f"<w{i}>": i for i in range(vocab_size)}, unk_token="<w0>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    special = {}
    if bos_id is not None:
        special["bos_token"] = f"<w{bos_id}>"
    if eos_id is not None:
        special["eos_token"] = f"<w{eos_id}>"
    return Tokenizer(backend, special)


def random_loaded_model(shape: dict, *, device="cpu", dtype=torch.float32, seed: int = 0, std: float = 0.02,
                        state: dict | None = None):
    """A minikv LoadedModel of the config.json fields `shape` with random weights (or the given `state`)."""
    from minikv.config import ModelConfig
    from minikv.loader import LoadedModel, build_model

    config = ModelConfig.from_hf(shape)
    if state is None:
        state = random_state(config, seed=seed, std=std, device=device, dtype=dtype)
    model = build_model(config, state, device, dtype)
    eos = config.eos_token_ids[0] if config.eos_token_ids else None
    tokenizer = stand_in_tokenizer(config.vocab_size, config.bos_token_id, eos)
    return LoadedModel(model, config, tokenizer, Path(f"<random {config.architecture}>"))


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter once (a tied embedding is one tensor): what a decode step must read."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def write_random_checkpoint(shape: dict, path: Path, *, dtype=torch.bfloat16, seed: int = 0, std: float = 0.02) -> Path:
    """The random model of `shape` as a model directory (config.json, model.safetensors, the stand-in
    tokenizer): what a tensor-parallel engine needs, since each rank loads its shard from files."""
    import json

    from safetensors.torch import save_file

    from minikv.config import ModelConfig

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = ModelConfig.from_hf(shape)
    state = random_state(config, seed=seed, std=std, dtype=dtype)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(shape))
    eos = config.eos_token_ids[0] if config.eos_token_ids else None
    stand_in_tokenizer(config.vocab_size, config.bos_token_id, eos)._backend.save(str(path / "tokenizer.json"))
    special = {"bos_token": f"<w{config.bos_token_id}>", "eos_token": f"<w{eos}>"}
    (path / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in special.items() if "None" not in v}))
    return path

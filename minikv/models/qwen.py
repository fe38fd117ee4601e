"""Qwen2 and Qwen3: Llama's block with two changes, both switched on by ModelConfig.

- Qwen2 (Qwen2 / Qwen2.5): a bias on the q, k and v projections (`qkv_bias`).
- Qwen3: RMSNorm on each head's q and k before RoPE (`qk_norm`), and an explicit head_dim.
"""

from .llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    pass


class Qwen3ForCausalLM(LlamaForCausalLM):
    pass

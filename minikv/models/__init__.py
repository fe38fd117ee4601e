"""Model families, by Hugging Face architecture name."""

from .llama import LlamaForCausalLM
from .qwen import Qwen2ForCausalLM, Qwen3ForCausalLM

MODEL_CLASSES = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
}

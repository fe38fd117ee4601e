"""minikv: bounded-memory inference for Llama- and Qwen-family LLMs."""

__version__ = "0.1.0"

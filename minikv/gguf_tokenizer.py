"""A GGUF file's vocabulary as a `tokenizers`-library tokenizer.json, and its tokenizer_config.json.

llama.cpp stores a tokenizer as metadata (`tokenizer.ggml.*`): the tokens, their types and scores, the
merges, and the names of the model (`gpt2`: byte-level BPE; `llama`: SentencePiece) and of the
pre-tokenizer. This module writes the tokenizer.json that does what llama.cpp does with them.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

from minikv.errors import ModelLoadError

# llama.cpp token types (llama_token_type in llama.h); 2 is unknown, 5 unused, 6 a `<0xNN>` byte.
_TOKEN_TYPE_NORMAL = 1
_TOKEN_TYPE_CONTROL = 3
_TOKEN_TYPE_USER_DEFINED = 4

# SentencePiece's spelling of a space (U+2581, LOWER ONE EIGHTH BLOCK).
_SPACE = "\u2581"

# The regular expression GPT-2's byte-level BPE splits words with (the `tokenizers` ByteLevel default).
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


# Vocabularies split with Llama 3's regex. Their BPE also takes a pre-token that is itself in the vocabulary
# whole, without running merges (`ignore_merges`, as in Llama 3's tokenizer.json and llama.cpp).
_LLAMA3_PRE_NAMES = ("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "falcon3")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (Radford et al., 2019, encoder.py).

    Printable Latin-1 bytes map to themselves; the other 68 bytes map to code points from 256 upwards,
    so every byte string has a whitespace-free spelling the BPE vocabulary can hold.
    """
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    table = {byte: chr(byte) for byte in printable}
    next_code_point = 256
    for byte in range(256):
        if byte not in table:
            table[byte] = chr(next_code_point)
            next_code_point += 1
    return table


def _byte_level_pre_tokenizer(pre: str) -> dict[str, Any]:
    """The `tokenizers` pre-tokenizer that splits text as the vocabulary named `tokenizer.ggml.pre` was trained.

    The names and regexes are llama.cpp's (`llama-vocab.cpp`, LLAMA_VOCAB_PRE_TYPE_*).
    """
    byte_level_gpt2 = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    byte_level_only = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}

    def split_then_bytes(pattern: str) -> dict[str, Any]:
        split = {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False}
        return {"type": "Sequence", "pretokenizers": [split, byte_level_only]}

    if pre in ("default", "gpt-2", "gpt2"):
        return byte_level_gpt2
    if pre in ("smollm", "starcoder", "refact", "codeshell"):
        # Every digit is its own pre-token, then GPT-2's split (the StarCoder tokenizer's Digits + ByteLevel).
        digits = {"type": "Digits", "individual_digits": True}
        return {"type": "Sequence", "pretokenizers": [digits, byte_level_gpt2]}
    if pre in _LLAMA3_PRE_NAMES:
        return split_then_bytes(_LLAMA3_SPLIT)
    if pre in ("qwen2", "deepseek-r1-qwen"):
        return split_then_bytes(_QWEN2_SPLIT)
    raise ModelLoadError(
        f"GGUF tokenizer pre-tokenizer {pre!r} is not supported by minikv (supported: default/gpt2, "
        "smollm/starcoder, llama-bpe/llama3, qwen2). Load the model's Hugging Face checkpoint instead."
    )


def _post_processor(bos: str | None, eos: str | None, bos_id, eos_id, add_bos: bool, add_eos: bool):
    """A TemplateProcessing that adds BOS/EOS when the file says llama.cpp adds them, else None."""
    add_bos, add_eos = add_bos and bos is not None, add_eos and eos is not None
    if not (add_bos or add_eos):
        return None

    def template(sequence: str, type_id: int) -> list[dict[str, Any]]:
        pieces = [{"SpecialToken": {"id": bos, "type_id": type_id}}] if add_bos else []
        pieces.append({"Sequence": {"id": sequence, "type_id": type_id}})
        if add_eos:
            pieces.append({"SpecialToken": {"id": eos, "type_id": type_id}})
        return pieces

    special_tokens = {}
    if add_bos:
        special_tokens[bos] = {"id": bos, "ids": [bos_id], "tokens": [bos]}
    if add_eos:
        special_tokens[eos] = {"id": eos, "ids": [eos_id], "tokens": [eos]}
    return {
        "type": "TemplateProcessing",
        "single": template("A", 0),
        "pair": template("A", 0) + template("B", 1),
        "special_tokens": special_tokens,
    }


def build_tokenizer_json(metadata: dict[str, Any], path: pathlib.Path) -> str:
    """A `tokenizers` JSON for the vocabulary stored in GGUF metadata (byte-level BPE or SentencePiece)."""
    model = metadata.get("tokenizer.ggml.model")
    if model == "gpt2":
        return json.dumps(_byte_level_document(metadata, path), ensure_ascii=False)
    if model == "llama":
        return json.dumps(_sentencepiece_document(metadata, path), ensure_ascii=False)
    raise ModelLoadError(
        f"GGUF file {str(path)!r} has a {model!r} tokenizer; minikv builds byte-level BPE ('gpt2') and "
        "SentencePiece ('llama') tokenizers from GGUF metadata. Load the model's Hugging Face checkpoint "
        "(with tokenizer.json) instead."
    )


def _tokens(metadata: dict[str, Any], path: pathlib.Path) -> tuple[list[str], list[int]]:
    """The vocabulary and each token's llama.cpp type (normal when the file gives none)."""
    if "tokenizer.ggml.tokens" not in metadata:
        raise ModelLoadError(f"GGUF file {str(path)!r} lacks the metadata key 'tokenizer.ggml.tokens'; "
                             "it is not a complete model.")
    tokens = list(metadata["tokenizer.ggml.tokens"])
    token_types = list(metadata.get("tokenizer.ggml.token_type") or [_TOKEN_TYPE_NORMAL] * len(tokens))
    return tokens, token_types


def _added_token(token_id: int, token: str, special: bool) -> dict[str, Any]:
    """A token matched whole in raw text before the model runs, as llama.cpp does; a special one is
    dropped by decode(skip_special_tokens=True)."""
    return {"id": token_id, "content": token, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": special}


def _document(metadata, tokens, added_tokens, normalizer, pre_tokenizer, decoder, model) -> dict[str, Any]:
    """A tokenizer.json from its parts, with the post-processor that adds BOS/EOS as llama.cpp does."""
    bos_id = _optional_int(metadata.get("tokenizer.ggml.bos_token_id"))
    eos_id = _optional_int(metadata.get("tokenizer.ggml.eos_token_id"))
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added_tokens,
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": _post_processor(
            _token_text(tokens, bos_id), _token_text(tokens, eos_id), bos_id, eos_id,
            _adds_bos_token(metadata), bool(metadata.get("tokenizer.ggml.add_eos_token", False)),
        ),
        "decoder": decoder,
        "model": model,
    }


def _adds_bos_token(metadata: dict[str, Any]) -> bool:
    """Whether llama.cpp prepends BOS: the file's flag, else yes for SentencePiece vocabularies (older
    Llama-2 files have no flag and llama.cpp adds BOS to them) and no for byte-level BPE."""
    default = metadata.get("tokenizer.ggml.model") == "llama"
    return bool(metadata.get("tokenizer.ggml.add_bos_token", default))


def _byte_level_document(metadata: dict[str, Any], path: pathlib.Path) -> dict[str, Any]:
    """Byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM): tokens spelled in GPT-2's byte alphabet, merges given."""
    tokens, token_types = _tokens(metadata, path)
    merges = list(metadata.get("tokenizer.ggml.merges") or [])
    pre = metadata.get("tokenizer.ggml.pre", "default")
    pre_tokenizer = _byte_level_pre_tokenizer(pre)

    byte_spelling = _bytes_to_unicode()
    alphabet = set(byte_spelling.values())
    vocab: dict[str, int] = {}
    added_tokens = []
    for token_id, (token, token_type) in enumerate(zip(tokens, token_types)):
        if token_type in (_TOKEN_TYPE_CONTROL, _TOKEN_TYPE_USER_DEFINED):
            added_tokens.append(_added_token(token_id, token, special=token_type == _TOKEN_TYPE_CONTROL))
        # A normal token is already spelled in the byte alphabet; respell any that is not so BPE can reach it.
        if not set(token) <= alphabet:
            token = "".join(byte_spelling[b] for b in token.encode("utf-8"))
        vocab.setdefault(token, token_id)

    decoder = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    model = {
        "type": "BPE",
        "dropout": None,
        "unk_token": None,
        "continuing_subword_prefix": None,
        "end_of_word_suffix": None,
        "fuse_unk": False,
        "byte_fallback": False,
        "ignore_merges": pre in _LLAMA3_PRE_NAMES,
        "vocab": vocab,
        "merges": merges,
    }
    return _document(metadata, tokens, added_tokens, None, pre_tokenizer, decoder, model)


def _sentencepiece_document(metadata: dict[str, Any], path: pathlib.Path) -> dict[str, Any]:
    """SentencePiece (Llama 2, Mistral, TinyLlama): `▁` for a space, `<0xNN>` byte tokens, scores.

    llama.cpp tokenizes such a vocabulary by merging, again and again, the adjacent pair of pieces whose
    concatenation is the highest-scoring token; a character no token holds is spelled with its UTF-8
    byte tokens. That is BPE whose merges are ranked by the score of the token they make, with
    `byte_fallback`; the merges are recovered from the vocabulary (`_merges_from_scores`).

    Spaces become `▁`, and llama.cpp puts one `▁` before the text and before the text after each special
    token (unless `tokenizer.ggml.add_space_prefix` is false): the `Prepend` normalizer, which `tokenizers`
    runs on each stretch of text between added tokens, does the same. Decoding reverses both, dropping
    the first leading space.
    """
    tokens, token_types = _tokens(metadata, path)
    scores = list(metadata.get("tokenizer.ggml.scores") or [])
    if len(scores) != len(tokens):
        raise ModelLoadError(f"GGUF file {str(path)!r} has a SentencePiece vocabulary of {len(tokens)} tokens but "
                             f"{len(scores)} scores (tokenizer.ggml.scores); the file is damaged.")
    unk_id = _optional_int(metadata.get("tokenizer.ggml.unknown_token_id"))
    added_tokens = [
        _added_token(token_id, token, special=token_type != _TOKEN_TYPE_USER_DEFINED)
        for token_id, (token, token_type) in enumerate(zip(tokens, token_types))
        if token_type in (_TOKEN_TYPE_CONTROL, _TOKEN_TYPE_USER_DEFINED) or token_id == unk_id
    ]
    vocab: dict[str, int] = {}
    for token_id, token in enumerate(tokens):
        vocab.setdefault(token, token_id)
    mergeable = [
        (token, score) for token, token_type, score in zip(tokens, token_types, scores)
        if token_type in (_TOKEN_TYPE_NORMAL, _TOKEN_TYPE_USER_DEFINED)
    ]

    replace_spaces = {"type": "Replace", "pattern": {"String": " "}, "content": _SPACE}
    add_space_prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
    normalizers = [{"type": "Prepend", "prepend": _SPACE}] if add_space_prefix else []
    normalizer = {"type": "Sequence", "normalizers": [*normalizers, replace_spaces]}
    decoders = [
        {"type": "Replace", "pattern": {"String": _SPACE}, "content": " "},
        {"type": "ByteFallback"},
        {"type": "Fuse"},
    ]
    if add_space_prefix:
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    model = {
        "type": "BPE",
        "dropout": None,
        "unk_token": _token_text(tokens, unk_id),
        "continuing_subword_prefix": None,
        "end_of_word_suffix": None,
        "fuse_unk": True,
        "byte_fallback": True,
        "ignore_merges": False,
        "vocab": vocab,
        "merges": _merges_from_scores(mergeable, vocab),
    }
    decoder = {"type": "Sequence", "decoders": decoders}
    return _document(metadata, tokens, added_tokens, normalizer, None, decoder, model)


def _merges_from_scores(mergeable: list[tuple[str, float]], vocab: dict[str, int]) -> list[list[str]]:
    """BPE merges for a scored vocabulary: every way to cut a token into two vocabulary tokens, best
    token first (higher score; equal scores by lower id, the earlier-learnt piece).

    Each cut of a token is a merge of its own, so the token is reachable whatever pieces the text was
    split into before; all cuts of one token share its score, as in llama.cpp, which ranks a pair only
    by the token it makes.
    """
    ranked = []
    for token, score in mergeable:
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                ranked.append((-score, vocab[token], vocab[left], vocab[right], left, right))
    ranked.sort()
    return [[left, right] for *_, left, right in ranked]


def _token_text(tokens: list[str], token_id: int | None) -> str | None:
    if token_id is None or not 0 <= token_id < len(tokens):
        return None
    return tokens[token_id]


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


def build_tokenizer_config(metadata: dict[str, Any]) -> dict[str, Any]:
    """tokenizer_config.json: the special tokens' texts, whether BOS/EOS are added, the chat template."""
    tokens = metadata.get("tokenizer.ggml.tokens") or []

    def special(key: str) -> str | None:
        return _token_text(tokens, _optional_int(metadata.get(f"tokenizer.ggml.{key}")))

    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": special("bos_token_id"),
        "eos_token": special("eos_token_id"),
        "unk_token": special("unknown_token_id"),
        "pad_token": special("padding_token_id"),
        "add_bos_token": _adds_bos_token(metadata),
        "add_eos_token": bool(metadata.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(metadata.get(f"{metadata.get('general.architecture')}.context_length", 2048)),
    }
    if "tokenizer.chat_template" in metadata:
        config["chat_template"] = metadata["tokenizer.chat_template"]
    return config

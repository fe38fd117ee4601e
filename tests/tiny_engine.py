"""A tiny random model wrapped in an Engine, for engine/scheduler tests (no real tokenizer needed).

`ByteTokenizer` is a test stand-in with the interface of minikv.tokenizer.Tokenizer that the engine
uses (encode, decode, apply_chat_template, eos_token_ids), built on the byte-level tokenizer.json
that tests/helpers.write_byte_tokenizer writes.
"""

from __future__ import annotations

from pathlib import Path

import torch

from minikv.errors import InvalidRequestError
from minikv.loader import LoadedModel, build_model, load_state_dict, read_config, weight_files

from helpers import make_tiny_checkpoint

CHAT_ROLES = ("system", "user", "assistant")


class ByteTokenizer:
    """Bytes for ids 3-258; the model's other ids become words `<wN>`, so that every id has visible text."""

    def __init__(self, path: Path, vocab_size: int = 384):
        from tokenizers import AddedToken, Tokenizer

        self._tok = Tokenizer.from_file(str(path / "tokenizer.json"))
        first = self._tok.get_vocab_size()
        self._tok.add_tokens([AddedToken(f"<w{i}>", special=False) for i in range(first, vocab_size)])
        self.eos_token_ids = [2]
        self.bos_token_id = 1

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return [self.bos_token_id, *ids] if add_special_tokens else ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> str:
        parts = []
        for m in messages:
            if m.get("role") not in CHAT_ROLES:
                raise InvalidRequestError(f"unknown chat role {m.get('role')!r}; use one of {CHAT_ROLES}")
            parts.append(f"<s>{m['role']}\n{m.get('content', '')}\n")
        if add_generation_prompt:
            parts.append("<s>assistant\n")
        return "".join(parts)


_CACHE: dict[str, LoadedModel] = {}


def tiny_loaded(tmp_root: Path, seed: int = 0) -> LoadedModel:
    """A tiny Llama (2 layers, hidden 64, vocab 384) with a byte tokenizer, built once per process."""
    key = f"{seed}"
    if key not in _CACHE:
        path = make_tiny_checkpoint(tmp_root / f"tiny-{seed}", seed=seed)
        config = read_config(path)
        model = build_model(config, load_state_dict(weight_files(path)), torch.device("cpu"), torch.float32)
        _CACHE[key] = LoadedModel(model, config, ByteTokenizer(path, config.vocab_size), path)
    return _CACHE[key]

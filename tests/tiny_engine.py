"""A tiny random Llama with minikv's real Tokenizer, for engine, scheduler and bench tests.

The byte-level tokenizer of tests/helpers covers ids 0-258, but the tiny model's vocabulary has 384 ids,
and a random model picks the others often. Those ids become words `<wN>` here, so that every token
the model can sample has visible text (stop strings and streaming need text to work on).
"""

from __future__ import annotations

from pathlib import Path

from helpers import make_tiny_checkpoint

from minikv.loader import LoadedModel, load_model

_CACHE: dict[int, LoadedModel] = {}


def tiny_checkpoint(path: Path, seed: int = 0) -> Path:
    """A tiny Llama checkpoint (2 layers, hidden 64, vocab 384) whose every id has text."""
    from tokenizers import AddedToken, Tokenizer

    make_tiny_checkpoint(path, seed=seed)
    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    first = tokenizer.get_vocab_size()
    tokenizer.add_tokens([AddedToken(f"<w{i}>", special=False) for i in range(first, 384)])
    tokenizer.save(str(path / "tokenizer.json"))
    return path


def tiny_loaded(tmp_root: Path, seed: int = 0) -> LoadedModel:
    """The tiny model loaded like any model directory (fp32, CPU), built once per process."""
    if seed not in _CACHE:
        _CACHE[seed] = load_model(tiny_checkpoint(tmp_root / f"tiny-{seed}", seed), device="cpu", dtype="float32")
    return _CACHE[seed]

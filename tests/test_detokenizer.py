"""IncrementalDetokenizer.text: the same text as joining every delta, each delta joined once."""

from __future__ import annotations

import pytest

from minikv.tokenizer import IncrementalDetokenizer

from gguf_helpers import smollm_tokenizer

TEXT = ("Streaming text 🤗 with emoji 👍🏽, accents (é, ü), CJK 日本語 and plain words, " * 6).strip()


@pytest.mark.parametrize("read_every", [1, 3, 1000])
def test_text_is_the_joined_deltas_whatever_the_read_pattern(read_every):
    tokenizer = smollm_tokenizer()
    ids = tokenizer.encode(TEXT)
    detokenizer = IncrementalDetokenizer(tokenizer)
    deltas = []
    for i, token_id in enumerate(ids):
        deltas.append(detokenizer.push(token_id))
        if i % read_every == 0:
            assert detokenizer.text == "".join(deltas)
    deltas.append(detokenizer.flush())
    assert detokenizer.text == "".join(deltas) == TEXT


def test_reading_joins_only_what_is_new():
    tokenizer = smollm_tokenizer()
    detokenizer = IncrementalDetokenizer(tokenizer)
    for token_id in tokenizer.encode(TEXT):
        detokenizer.push(token_id)
        text = detokenizer.text
        # Everything emitted is now in one string: the next read has nothing to join...
        assert detokenizer._unjoined == []
        # ...and returns that very string, not a new join of every piece.
        assert detokenizer.text is text
    assert len(detokenizer.text) == len(TEXT)

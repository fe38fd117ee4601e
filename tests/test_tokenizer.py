"""Tokenizer: special ids, BOS handling, chat templates and the incremental detokenizer."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, pre_tokenizers

from minikv.errors import InvalidRequestError, ModelLoadError
from minikv.tokenizer import IncrementalDetokenizer, Tokenizer

from gguf_helpers import smollm_checkpoint_without_weights, smollm_tokenizer, transformers_gguf_tokenizer

CONVERSATION = [
    {"role": "system", "content": "You answer in one short sentence."},
    {"role": "user", "content": "What is the capital of France? 🇫🇷"},
    {"role": "assistant", "content": "Paris is the capital of France."},
]


def smollm_with(tokenizer_config=None, generation_config=None, config=None) -> Tokenizer:
    checkpoint = smollm_checkpoint_without_weights()
    return Tokenizer.from_files(
        checkpoint.tokenizer_json,
        {**checkpoint.tokenizer_config, **(tokenizer_config or {})},
        generation_config,
        config,
    )


# ----------------------------------------------------------------------------------------------------
# Loading and special tokens


def test_from_dir_reads_all_files(tmp_path):
    checkpoint = smollm_checkpoint_without_weights()
    (tmp_path / "tokenizer.json").write_text(checkpoint.tokenizer_json)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(checkpoint.tokenizer_config))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 5, "bos_token_id": 1}))
    tokenizer = Tokenizer.from_dir(tmp_path)
    assert tokenizer.eos_token_ids == {0, 2, 5}
    assert tokenizer.bos_token_id == 1
    assert tokenizer.vocab_size == 49152
    assert tokenizer.chat_template == checkpoint.tokenizer_config["chat_template"]


def test_from_dir_without_tokenizer_json(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="no tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


def test_eos_from_tokenizer_config_alone():
    tokenizer = smollm_with(tokenizer_config={"eos_token": "<|endoftext|>"})
    assert tokenizer.eos_token_ids == {0}


def test_pad_token_id():
    assert smollm_tokenizer().pad_token_id == 2


def test_bos_added_only_when_config_says_so():
    plain = smollm_tokenizer()
    assert plain.encode("hi")[0] != plain.bos_token_id
    with_bos = smollm_with(tokenizer_config={"add_bos_token": True})
    assert with_bos.encode("hi") == [with_bos.bos_token_id, *plain.encode("hi")]
    assert with_bos.encode("hi", add_special_tokens=False) == plain.encode("hi")


def test_decode_skips_special_tokens_by_default():
    tokenizer = smollm_tokenizer()
    ids = tokenizer.encode("<|im_start|>user\nhello<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    assert tokenizer.decode(ids) == "user\nhello"
    assert tokenizer.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nhello<|im_end|>"


# ----------------------------------------------------------------------------------------------------
# Chat templates


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(add_generation_prompt):
    ours = smollm_tokenizer().apply_chat_template(CONVERSATION, add_generation_prompt=add_generation_prompt)
    expected = transformers_gguf_tokenizer().apply_chat_template(
        CONVERSATION, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert ours == expected
    assert ours.startswith("<|im_start|>system\nYou answer in one short sentence.<|im_end|>\n")
    assert ours.endswith("<|im_start|>assistant\n") == add_generation_prompt


def test_chat_template_inserts_default_system_prompt():
    prompt = smollm_tokenizer().apply_chat_template([{"role": "user", "content": "Hi"}])
    assert prompt == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


@pytest.mark.parametrize("role", ["robot", "", None, "User"])
def test_bad_role_is_rejected(role):
    messages = [{"role": "user", "content": "hi"}, {"role": role, "content": "x"}]
    with pytest.raises(InvalidRequestError, match=f"messages\\[1\\] has role {role!r}"):
        smollm_tokenizer().apply_chat_template(messages)


@pytest.mark.parametrize("messages", [[], "hello", [["user", "hi"]], [{"role": "user", "content": 3}]])
def test_malformed_messages_are_rejected(messages):
    with pytest.raises(InvalidRequestError):
        smollm_tokenizer().apply_chat_template(messages)


def test_template_helpers():
    template = (
        "{% if messages[0]['role'] == 'tool' %}{{ raise_exception('tools are not supported') }}{% endif %}"
        "{{ bos_token }}{{ messages | tojson }}|{{ strftime_now('%Y') | length }}|{{ eos_token }}"
    )
    tokenizer = smollm_with(tokenizer_config={"chat_template": template})
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "<b>é</b>"}])
    # tojson keeps non-ASCII and HTML characters as they are (Jinja's built-in filter would escape them).
    assert rendered == '<|im_start|>[{"role": "user", "content": "<b>é</b>"}]|4|<|im_end|>'
    with pytest.raises(InvalidRequestError, match="tools are not supported"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "{}"}])


def test_template_is_sandboxed():
    tokenizer = smollm_with(tokenizer_config={"chat_template": "{{ messages.append(1) }}"})
    with pytest.raises(InvalidRequestError, match="SecurityError"):
        tokenizer.apply_chat_template([{"role": "user", "content": "x"}])


def test_no_template_falls_back_to_joined_contents():
    tokenizer = smollm_with(tokenizer_config={"chat_template": None})
    assert tokenizer.apply_chat_template(CONVERSATION[:2]) == (
        "You answer in one short sentence.\nWhat is the capital of France? 🇫🇷"
    )


# ----------------------------------------------------------------------------------------------------
# Incremental detokenizer

STREAM_TEXTS = [
    "Emoji 🤗👍🏽 and flags 🇫🇷🇯🇵, done.",
    "日本語のテキスト、中文文本和한국어 텍스트。",
    "  two leading spaces,   three inner,\n\n\ttab and trailing  ",
]


@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_deltas_concatenate_to_full_decode(text):
    tokenizer = smollm_tokenizer()
    ids = tokenizer.encode(text)
    detokenizer = IncrementalDetokenizer(tokenizer)
    deltas = [detokenizer.push(token_id) for token_id in ids]
    assert "".join(deltas) == tokenizer.decode(ids) == text
    assert detokenizer.text == text
    assert all("\ufffd" not in delta for delta in deltas)
    assert detokenizer.token_ids == ids


def test_partial_character_is_held_back_then_flushed():
    tokenizer = smollm_tokenizer()
    ids = tokenizer.encode("a🤗")
    assert len(ids) > 2, "the emoji must span several byte tokens for this test to mean anything"
    detokenizer = IncrementalDetokenizer(tokenizer)
    assert detokenizer.push(ids[0]) == "a"
    assert detokenizer.push(ids[1]) == ""  # first bytes of the emoji: nothing printable yet
    assert detokenizer.flush() == "\ufffd"  # generation stopped mid-character: show that it did
    assert detokenizer.flush() == ""


def test_special_tokens_are_skipped_in_stream():
    tokenizer = smollm_tokenizer()
    prompt = tokenizer.encode("<|im_start|>assistant\n")
    detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids=prompt)
    pieces = [detokenizer.push(i) for i in tokenizer.encode(" Hello there.<|im_end|>")]
    assert "".join(pieces) == " Hello there."
    assert pieces[-1] == ""


def _metaspace_tokenizer() -> Tokenizer:
    """A SentencePiece-style vocabulary, whose decoder drops the space of the first token it decodes."""
    vocab = {"<unk>": 0, "▁Hello": 1, "▁world": 2, "!": 3, "▁again": 4}
    backend = BackendTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    return Tokenizer(backend)


def test_leading_spaces_survive_token_boundaries():
    tokenizer = _metaspace_tokenizer()
    ids = [1, 2, 4, 3]
    assert tokenizer.decode(ids) == "Hello world again!"
    # Decoding one token at a time loses every space: the failure the sliding window avoids.
    assert "".join(tokenizer.decode([i]) for i in ids) == "Helloworldagain!"
    detokenizer = IncrementalDetokenizer(tokenizer)
    assert [detokenizer.push(i) for i in ids] == ["Hello", " world", " again", "!"]


def test_prompt_context_keeps_first_generated_space():
    tokenizer = _metaspace_tokenizer()
    detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids=[1])
    assert detokenizer.push(2) == " world"
    assert detokenizer.text == " world"

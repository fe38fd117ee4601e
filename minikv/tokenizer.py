"""Text <-> token ids, chat templates and streaming detokenisation.

`Tokenizer` wraps a `tokenizers.Tokenizer` (the Rust library behind Hugging Face's fast tokenizers) with
the bits of `transformers` minikv needs and nothing else: which special ids to add and to stop on, and
the model's Jinja chat template. `IncrementalDetokenizer` turns a stream of generated ids into a stream
of text pieces that never split a character or lose a space.
"""

from __future__ import annotations

import json
import os
import pathlib
from datetime import datetime
from typing import Any, Iterable

from minikv.errors import InvalidRequestError, ModelLoadError

CHAT_ROLES = ("system", "user", "assistant", "tool")
REPLACEMENT_CHARACTER = "\ufffd"


def _read_json(path: pathlib.Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{str(path)!r} is not valid JSON ({exc}); the model directory is damaged.") from exc


def _token_content(token: Any) -> str | None:
    """A special token as tokenizer_config.json spells it: a string or an AddedToken-like dict."""
    if isinstance(token, dict):
        return token.get("content")
    return token if isinstance(token, str) else None


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


class Tokenizer:
    """A model's tokenizer: encode/decode, special ids and the chat template."""

    def __init__(
        self,
        backend,
        tokenizer_config: dict[str, Any] | None = None,
        generation_config: dict[str, Any] | None = None,
        config: dict[str, Any] | None = None,
    ) -> None:
        self._backend = backend
        self._tokenizer_config = dict(tokenizer_config or {})
        self._generation_config = dict(generation_config or {})
        self._config = dict(config or {})
        self.bos_token = _token_content(self._tokenizer_config.get("bos_token"))
        self.eos_token = _token_content(self._tokenizer_config.get("eos_token"))
        self.pad_token = _token_content(self._tokenizer_config.get("pad_token"))
        self.unk_token = _token_content(self._tokenizer_config.get("unk_token"))
        self.chat_template: str | None = self._pick_chat_template(self._tokenizer_config.get("chat_template"))
        self.bos_token_id = self._id_of(self.bos_token, fallback=self._config.get("bos_token_id"))
        self.pad_token_id = self._id_of(self.pad_token, fallback=self._generation_config.get("pad_token_id"))
        self.eos_token_ids = self._collect_eos_ids()
        self._add_bos_token = bool(self._tokenizer_config.get("add_bos_token", False))
        self._template = None  # compiled lazily: most callers never chat

    # -- construction ---------------------------------------------------------------------------------

    @classmethod
    def from_files(
        cls,
        tokenizer_json: str,
        tokenizer_config: dict[str, Any] | None = None,
        generation_config: dict[str, Any] | None = None,
        config: dict[str, Any] | None = None,
    ) -> "Tokenizer":
        """Build from the contents of tokenizer.json (a string) and the other files' parsed dicts."""
        import tokenizers

        try:
            backend = tokenizers.Tokenizer.from_str(tokenizer_json)
        except Exception as exc:  # the Rust side raises a bare Exception on malformed JSON
            raise ModelLoadError(f"tokenizer.json could not be parsed by the tokenizers library: {exc}") from exc
        return cls(backend, tokenizer_config, generation_config, config)

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str]) -> "Tokenizer":
        """Load from a Hugging Face model directory (tokenizer.json, plus the optional config files)."""
        path = pathlib.Path(path)
        tokenizer_file = path / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise ModelLoadError(
                f"{str(path)!r} has no tokenizer.json; minikv needs a fast-tokenizer file "
                "(a model whose repo has only tokenizer.model/vocab.txt is not supported)."
            )
        return cls.from_files(
            tokenizer_file.read_text(encoding="utf-8"),
            _read_json(path / "tokenizer_config.json"),
            _read_json(path / "generation_config.json"),
            _read_json(path / "config.json"),
        )

    # -- special tokens -------------------------------------------------------------------------------

    def _id_of(self, token: str | None, fallback: Any = None) -> int | None:
        if token is not None:
            token_id = self._backend.token_to_id(token)
            if token_id is not None:
                return token_id
        ids = _as_id_list(fallback)
        return ids[0] if ids else None

    def _collect_eos_ids(self) -> set[int]:
        """Every id that ends generation: generation_config wins in transformers, but chat models often
        list only one of their end markers in each file, so the union of all three sources is used."""
        ids = set(_as_id_list(self._generation_config.get("eos_token_id")))
        ids.update(_as_id_list(self._config.get("eos_token_id")))
        eos_id = self._id_of(self.eos_token)
        if eos_id is not None:
            ids.add(eos_id)
        return ids

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce, added tokens included."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    def _pick_chat_template(self, template: Any) -> str | None:
        # Some repos store several named templates as a list; use the default one.
        if isinstance(template, list):
            named = {entry.get("name"): entry.get("template") for entry in template if isinstance(entry, dict)}
            return named.get("default")
        return template if isinstance(template, str) and template else None

    # -- encode / decode ------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids for `text`.

        With `add_special_tokens`, tokenizer.json's post-processor runs (it adds BOS for Llama 3, for
        instance); if tokenizer_config says `add_bos_token: true` and the post-processor did not add one,
        BOS is prepended, which is what transformers' Llama tokenizers do.
        """
        if not isinstance(text, str):
            raise InvalidRequestError(f"Text to encode must be a string, got {type(text).__name__}.")
        ids = self._backend.encode(text, add_special_tokens=add_special_tokens).ids
        wants_bos = add_special_tokens and self._add_bos_token and self.bos_token_id is not None
        if wants_bos and (not ids or ids[0] != self.bos_token_id):
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text for `ids`; special tokens (BOS, `<|im_end|>`, ...) are dropped unless asked for."""
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(token_id)

    # -- chat -----------------------------------------------------------------------------------------

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **template_kwargs: Any
    ) -> str:
        """Render `messages` into a prompt string with the model's Jinja chat template.

        The template runs in a sandboxed Jinja environment with the helpers transformers provides
        (`raise_exception`, `strftime_now`, `tojson`, the special-token strings). A model without a
        template gets its messages' contents joined by newlines, with no role markers: enough for base
        models, which have no chat format to follow anyway.
        """
        validate_messages(messages)
        if self.chat_template is None:
            return "\n".join(message["content"] for message in messages)
        variables = {
            "messages": messages,
            "add_generation_prompt": add_generation_prompt,
            "bos_token": self.bos_token or "",
            "eos_token": self.eos_token or "",
            "pad_token": self.pad_token or "",
            "unk_token": self.unk_token or "",
            **template_kwargs,
        }
        from jinja2 import TemplateError

        try:
            return self._compiled_template().render(**variables)
        except _TemplateRaised as exc:
            raise InvalidRequestError(f"The model's chat template rejected the conversation: {exc}") from exc
        except TemplateError as exc:  # includes the sandbox's SecurityError
            raise InvalidRequestError(
                f"The model's chat template failed on this conversation ({type(exc).__name__}: {exc})."
            ) from exc

    def _compiled_template(self):
        if self._template is None:
            self._template = _compile_chat_template(self.chat_template)
        return self._template


class _TemplateRaised(Exception):
    """`raise_exception(...)` was called from inside a chat template."""


def validate_messages(messages: Any) -> None:
    """Check a chat request's shape: a non-empty list of {role, content} dicts with known roles."""
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts.")
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidRequestError(f"messages[{index}] must be a dict with 'role' and 'content', got {message!r}.")
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise InvalidRequestError(
                f"messages[{index}] has role {role!r}; the role must be one of {', '.join(CHAT_ROLES)}."
            )
        if not isinstance(message.get("content"), str):
            raise InvalidRequestError(
                f"messages[{index}] (role {role!r}) must have a string 'content', got {message.get('content')!r}."
            )


def _compile_chat_template(source: str):
    """Compile a chat template the way transformers does: sandboxed, trimmed blocks, loop controls."""
    from jinja2 import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise _TemplateRaised(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False):
        # Jinja's own |tojson escapes HTML characters, which would corrupt prompts; use plain JSON.
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format_string: str) -> str:
        return datetime.now().strftime(format_string)

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    environment.filters["tojson"] = tojson
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = strftime_now
    try:
        return environment.from_string(source)
    except TemplateError as exc:
        raise ModelLoadError(f"The model's chat template is not valid Jinja: {exc}") from exc


class IncrementalDetokenizer:
    """Turns generated token ids, one at a time, into text deltas.

    Decoding each token alone loses information: a byte-level BPE token may hold half of a UTF-8
    character, and SentencePiece-style decoders drop a token's leading space when it comes first. So,
    as vLLM's `detokenize_incrementally` and transformers' `TextStreamer` do, we decode a short window of
    already-emitted tokens together with the new ones and emit only the text past the window's own
    decoding. While the decoded tail ends in U+FFFD (an incomplete character) nothing is emitted; the
    bytes are emitted once the character is complete.
    """

    # Tokens of already-emitted context decoded with each step: enough to fix spacing, cheap to decode.
    CONTEXT_TOKENS = 5

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int] | None = None, skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._ids: list[int] = list(prompt_ids or [])
        self._prompt_length = len(self._ids)
        # ids[prefix_offset:read_offset] is the context window already emitted; ids[read_offset:] is pending.
        self._read_offset = len(self._ids)
        self._prefix_offset = max(self._read_offset - self.CONTEXT_TOKENS, 0)
        self._text = ""  # the deltas joined so far
        self._unjoined: list[str] = []  # deltas emitted since `text` was last read

    def push(self, token_id: int) -> str:
        """Add one generated id; return the text it completes ("" while a character is still partial)."""
        self._ids.append(int(token_id))
        return self._emit(final=False)

    def flush(self) -> str:
        """Emit whatever is still held back (a sequence that ended mid-character shows its U+FFFD)."""
        return self._emit(final=True)

    @property
    def text(self) -> str:
        """All text emitted so far. Each delta is joined once, on the first read after it: a read with nothing
        new returns the same string, so reading every step stays linear in the text, not quadratic."""
        if self._unjoined:
            self._text += "".join(self._unjoined)
            self._unjoined.clear()
        return self._text

    @property
    def token_ids(self) -> list[int]:
        """Generated ids pushed so far (the prompt excluded)."""
        return self._ids[self._prompt_length:]

    def _decode(self, start: int, end: int | None = None) -> str:
        return self._tokenizer.decode(self._ids[start:end], skip_special_tokens=self._skip_special_tokens)

    def _emit(self, final: bool) -> str:
        if self._read_offset >= len(self._ids):
            return ""
        window_text = self._decode(self._prefix_offset, self._read_offset)
        full_text = self._decode(self._prefix_offset)
        if len(full_text) <= len(window_text) and not final:
            return ""  # e.g. a skipped special token: nothing new, but keep the pending ids for spacing
        if full_text.endswith(REPLACEMENT_CHARACTER) and not final:
            return ""
        delta = full_text[len(window_text):]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self._unjoined.append(delta)
        return delta

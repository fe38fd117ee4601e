"""Requests in: a caller's prompt and SamplingParams become a checked `Request` (vLLM's InputProcessor).

A prompt is text (used as is: no chat template), token ids, or chat messages (the model's chat template is
applied, with the generation prompt). Every check a request must pass runs here, before it is queued, so
that a bad request fails at `Engine.add_request` with InvalidRequestError naming the field and never inside a
step: the sampling parameters against the vocabulary, the RoPE position mode, the length against
max_model_len, the KV budget against the policy and the engine's, the archive, and whether the request's ring
can ever fit the block pool. A turn of a session is encoded against the session's history.
"""

from __future__ import annotations

import dataclasses
import itertools
import numbers

from .block_pool import check_budget
from .errors import ConfigError, InvalidRequestError
from .hashing import hash_u32
from .request import Request
from .sampling import SamplingParams
from .tokenizer import validate_messages

Prompt = str | list[int] | list[dict]  # text, token ids, or chat messages


class InputProcessor:
    """The engine's settings a request is checked against, and the tokenizer its prompt goes through."""

    def __init__(self, tokenizer, *, vocab_size: int, policy, budget: int, chunk: int, max_model_len: int,
                 positions: str, pool, archive, archive_budget: int, seed: int):
        self.tokenizer, self.vocab_size, self.policy = tokenizer, vocab_size, policy
        self.budget, self.chunk, self.max_model_len = budget, chunk, max_model_len
        self.positions = positions  # the engine's default RoPE position mode
        self.pool, self.archive, self.archive_budget = pool, archive, archive_budget
        self.seed = seed
        self._seeds = itertools.count()

    def make_request(self, request_id: str, prompt: Prompt, params: SamplingParams, session=None, *,
                     append: bool = False, tokenized: tuple[list[int], str | None] | None = None) -> Request:
        """The Request for `prompt` (params already through `check_params`; `session`: the minikv.session
        Session it continues, or None), or InvalidRequestError; nothing changes either way (the engine
        begins the session and opens the archive). `append`, `tokenized`: see Engine.add_request."""
        if append and session is not None and session.token_ids:
            prompt_ids, prompt_text = self._encode_appended(prompt, session.token_ids)
        elif session is not None and session.token_ids and (isinstance(prompt, str) or is_chat(prompt)):
            prompt_ids, prompt_text = self.encode_continuing(prompt, session, tokenized)
        else:
            prompt_ids, prompt_text = tokenized or self.tokenize(prompt)
        total = len(prompt_ids) + params.max_tokens
        positions = self.request_positions(params, session)
        if session is not None and session.positions not in (None, positions):
            raise InvalidRequestError(f"session {session.session_id!r} was written with positions="
                                      f"{session.positions!r}; its requests cannot ask for {positions!r} (a ring's "
                                      "RoPE positions are one mode's): leave positions out or start another session")
        # under "ring" no distance exceeds the ring, so the model's context no longer bounds the request
        if total > self.max_model_len and positions != "ring":
            raise InvalidRequestError(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) = {total} exceeds "
                f"max_model_len ({self.max_model_len}); shorten the prompt or lower max_tokens, or use "
                "positions='ring' with an evicting policy (the ring's memory is then the bound)")
        # Without its own seed a request draws from the engine's: same engine seed, same order -> same samples.
        # (hash_u32 reads the low 32 bits of each word: masking first keeps any Python int, even >= 2^63, usable.)
        seed = params.seed if params.seed is not None else int(hash_u32(self.seed & 0xFFFFFFFF, next(self._seeds)))
        eos = frozenset() if params.ignore_eos else frozenset(self.tokenizer.eos_token_ids)
        budget = self._request_budget(params, len(prompt_ids), session)
        self._check_archive(params, positions)
        ring_size = min(budget, len(prompt_ids) + params.max_tokens)
        blocks = self.pool.blocks_for(ring_size)
        if blocks > self.pool.num_blocks:
            raise InvalidRequestError(
                f"this request can never fit the KV pool: its ring of {ring_size} slots needs {blocks} blocks of "
                f"{self.pool.block_size} ({blocks * self.pool.bytes_per_block / 2**20:.1f} MiB) and the pool has "
                f"{self.pool.num_blocks} ({self.pool.total_bytes / 2**20:.1f} MiB); lower "
                f"{'kv_budget or max_tokens' if self.policy.evicts else 'max_tokens or shorten the prompt'}, "
                "or give the engine more kv_memory")
        req = Request(request_id, prompt_ids, params, seed=seed, eos_ids=eos, tokenizer=self.tokenizer,
                      prompt_text=prompt_text, kv_budget=budget, ring_size=ring_size, num_blocks_needed=blocks)
        req.positions = positions
        return req

    def tokenize(self, prompt: Prompt, *, chat_template_kwargs: dict | None = None) -> tuple[list[int], str | None]:
        """The token ids `add_request` would run for `prompt`, and its text (None for token ids); bad prompts
        raise InvalidRequestError. Chat messages go through the chat template, with `chat_template_kwargs` as
        extra template variables (e.g. enable_thinking). It reads only the tokenizer and the config, so another
        thread may call it while the engine steps (the server tokenizes in its request handlers)."""
        if isinstance(prompt, str):
            check_unicode(prompt, "the prompt")
            ids, text = (self.tokenizer.encode(prompt) if prompt else []), prompt
        elif is_chat(prompt):
            validate_messages(prompt)
            text = self.tokenizer.apply_chat_template(prompt, add_generation_prompt=True,
                                                      **(chat_template_kwargs or {}))
            check_unicode(text, "a chat message")
            ids = self.tokenizer.encode(text, add_special_tokens=False)
        elif is_token_ids(prompt):
            bad = [t for t in prompt if not 0 <= t < self.vocab_size]
            if bad:
                raise InvalidRequestError(f"token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})")
            ids, text = [int(t) for t in prompt], None
        else:
            raise InvalidRequestError("a prompt is a string, a non-empty list of token ids, or a non-empty "
                                      "list of chat messages ({'role': ..., 'content': ...})")
        if not ids:
            raise InvalidRequestError("the prompt is empty; give at least one token of text")
        return ids, text

    def check_params(self, params: SamplingParams | None) -> SamplingParams:
        if params is None:
            return SamplingParams()
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError(f"params must be a SamplingParams, got {type(params).__name__}")
        # A private copy, validated again by its __post_init__: the caller may have changed fields since
        # construction, and may change them again while the request runs.
        params = dataclasses.replace(params)
        for name in ("stop_token_ids", "forced_token_ids"):
            out_of_vocab = [t for t in getattr(params, name) if t >= self.vocab_size]
            if out_of_vocab:
                raise InvalidRequestError(f"{name} {out_of_vocab[:5]} are outside the vocabulary "
                                          f"[0, {self.vocab_size})")
        return params

    # --- a session's turn ------------------------------------------------------------------------
    def encode_continuing(self, prompt: Prompt, session, tokenized=None) -> tuple[list[int], str | None]:
        """A session's whole conversation as text or chat messages. When its text begins with the text of
        the session's history, the history's own ids are kept and only the rest is tokenized: a reply's
        generated ids need not be how its text tokenizes, and the ring has read the generated ones."""
        ids, text = tokenized or self.tokenize(prompt)
        history = session.token_ids
        history_text = self.history_text(session)
        if history_text and len(text) > len(history_text) and text.startswith(history_text):
            rest = self.tokenizer.encode(text[len(history_text):], add_special_tokens=False)
            if rest:
                return history + rest, text
        return ids, text

    def history_text(self, session) -> str:
        """The text of a session's token ids (decoded once, kept on the session)."""
        if session.text is None:
            session.text = self.tokenizer.decode(session.token_ids, skip_special_tokens=False)
        return session.text

    def _encode_appended(self, prompt: Prompt, history: list[int]) -> tuple[list[int], str | None]:
        if isinstance(prompt, str):
            check_unicode(prompt, "the prompt")
            new = self.tokenizer.encode(prompt, add_special_tokens=False)
        elif is_token_ids(prompt):
            new, _ = self.tokenize(prompt)
        else:
            raise InvalidRequestError("append=True takes the new text or token ids of a session's turn; for chat "
                                      "messages send the whole conversation without append")
        if not new:
            raise InvalidRequestError("the appended prompt is empty; give at least one token of text")
        return history + new, None

    # --- the engine's limits ---------------------------------------------------------------------
    def request_positions(self, params: SamplingParams, session=None) -> str:
        """The position mode `params` runs under: its own, else its session's (one mode per ring), else the
        engine's. Raises InvalidRequestError for "ring" under `full`. Thread-safe (the server's handlers call
        it to choose a default max_tokens)."""
        if params.positions == "ring" and not self.policy.evicts:
            raise InvalidRequestError("positions='ring' needs an evicting policy, and this engine runs 'full': "
                                      "leave positions out")
        if params.positions is None and session is not None and session.positions is not None:
            return session.positions
        return params.positions or self.positions

    def _request_budget(self, params: SamplingParams, prompt_len: int, session=None) -> int:
        """The request's own KV budget: SamplingParams.kv_budget within what the engine can honour, else the
        engine's; under `full` the whole request (nothing is ever evicted). A session's budget is the one
        its first request had."""
        if session is not None and session.kv_budget is not None:
            if params.kv_budget not in (None, session.kv_budget):
                raise InvalidRequestError(f"kv_budget={params.kv_budget}: session {session.session_id!r} was started "
                                          f"with kv_budget {session.kv_budget}, fixed for its life; leave "
                                          "kv_budget out")
            return session.kv_budget
        if not self.policy.evicts:
            if params.kv_budget is not None:
                raise InvalidRequestError(f"kv_budget={params.kv_budget} asks for eviction, but policy 'full' never "
                                          "evicts: leave kv_budget out, or run an evicting policy")
            return prompt_len + params.max_tokens
        if params.kv_budget is None:
            return self.budget
        try:
            check_budget(params.kv_budget, self.chunk, self.policy, most=self.budget)
        except ConfigError as err:
            raise InvalidRequestError(f"kv_budget={params.kv_budget}: {err}") from None
        return params.kv_budget

    def _check_archive(self, params: SamplingParams, positions: str) -> None:
        if params.archive_budget is None:
            # the engine's default archive is for the requests that can keep one
            params.archive_budget = self.archive_budget if self.archive is not None else 0
        if not params.archive_budget:
            return
        why = "policy 'full' never evicts" if self.archive is None else None
        if why:
            raise InvalidRequestError(f"archive_budget={params.archive_budget} asks for a KV archive, but {why}: "
                                      "leave archive_budget at 0")


def is_chat(prompt: object) -> bool:
    return isinstance(prompt, list) and bool(prompt) and all(isinstance(m, dict) for m in prompt)


def is_token_ids(prompt: object) -> bool:
    return (isinstance(prompt, (list, tuple)) and bool(prompt)
            and all(isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in prompt))


def check_unicode(text: str, what: str) -> None:
    """A lone surrogate (e.g. bytes decoded with errors="surrogateescape") is not text a tokenizer can read."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise InvalidRequestError(
            f"{what} holds {text[err.start]!r} at index {err.start}, a lone surrogate, which is not valid Unicode; "
            "decode the original bytes as UTF-8 with errors='replace', or fix their encoding") from None

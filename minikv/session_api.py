"""The engine's session methods: `Engine.session`, `session_ids`, `close_session`, `save_session`,
`restore_session`, `match_session`, and the check a request that continues a session passes first.

The sessions themselves (parked rings, their limits, the files) are minikv.session's `SessionStore`; what
lives here needs the engine around the store: its tokenizer (to match a resent conversation), its policy and
model (what a saved ring is valid under), tensor parallelism (what cannot be parked or saved), and `abort`.
"""

from __future__ import annotations

from .errors import InvalidRequestError, SessionFileError
from .input_processor import InputProcessor, Prompt, is_chat
from .sampling import SamplingParams
from .session import Session, SessionInfo, SessionStore, read_session_file


class SessionAPI:
    def __init__(self, store: SessionStore, processor: InputProcessor, *, model, config, pool, policy,
                 budget: int, block_size: int, tensor_parallel: bool, abort):
        self.store, self.processor = store, processor
        self.model, self.config, self.pool, self.policy = model, config, pool, policy
        self.budget, self.block_size, self.tensor_parallel = budget, block_size, tensor_parallel
        self.abort = abort  # Engine.abort
        self._identity: dict | None = None

    def session(self, session_id: str) -> SessionInfo | None:
        """What the engine keeps of a session (its history, its parked ring), or None if it is unknown."""
        session = self.store.get(session_id)
        return None if session is None else self.store.info(session)

    def session_ids(self) -> list[str]:
        """Every session kept, least recently used first."""
        return list(self.store.sessions)

    def close_session(self, session_id: str) -> bool:
        """Forget a session: its request in flight is aborted, its ring's blocks are free at once. Returns
        False if the session was unknown."""
        session = self.store.get(session_id)
        if session is None:
            return False
        if session.request_id is not None:
            self.abort(session.request_id)
        return self.store.close(session_id)

    def save_session(self, session_id: str, directory) -> str:
        """Save a session (history and parked ring) as DIR/<id>.json + DIR/<id>.safetensors; it stays in
        the engine. Returns the JSON file's path. Raises SessionFileError if DIR cannot be written."""
        self._check_session_files()
        session = self.store.get(session_id)
        if session is None:
            raise InvalidRequestError(f"unknown session {session_id!r}")
        if session.request_id is not None:
            raise InvalidRequestError(f"session {session_id!r} has a request in flight ({session.request_id!r}); "
                                      "save it when the request has finished")
        return str(self.store.save(session, directory, self._session_identity()))

    def restore_session(self, path) -> str:
        """Load a session saved by `save_session` (its .json path) and park its ring (or, with no room in
        the pool now, only its history); returns its id. A file from another model, policy, block size or
        dtype, or a truncated or corrupt one, raises SessionFileError and changes nothing."""
        self._check_session_files()
        meta, _ = read_session_file(path, self._session_identity())
        bad = [t for t in meta["token_ids"] if t >= self.config.vocab_size]
        budget = meta.get("kv_budget")
        if bad or (budget is not None and (not self.policy.evicts or budget > self.budget)):
            raise SessionFileError(f"session file {str(path)!r} does not fit this engine (token ids outside the "
                                   f"vocabulary, or kv_budget {budget} beyond --budget {self.budget})")
        return self.store.load(path, self._session_identity()).session_id

    def match_session(self, prompt: Prompt, *, tokenized: tuple[list[int], str | None] | None = None) -> str | None:
        """The idle session whose parked ring would serve the most of `prompt` (text, ids or chat messages,
        the whole conversation), or None: how a server reuses rings for clients that resend the history
        (OpenAI chat completions), as a prefix cache would. Text that extends a session's history text
        counts all of its ring; otherwise the common prefix of the token ids (see Session.reusable_prefix), and
        only if it diverges from the ring within its last `window` tokens (a re-tokenized reply, a stop token):
        a conversation that shares only a beginning with another must not take that one's ring. `tokenized`:
        as in add_request."""
        ids, text = tokenized or self.processor.tokenize(prompt)
        best, best_tokens = None, 0
        for session in self.store.sessions.values():
            if session.ring is None or session.request_id is not None:
                continue
            tokens = session.reusable_prefix(ids, self.store.rollback_window)
            if text is not None and (isinstance(prompt, str) or is_chat(prompt)):
                history_text = self.processor.history_text(session)
                if history_text and len(text) > len(history_text) and text.startswith(history_text):
                    tokens = max(tokens, session.ring.num_processed)
            if tokens > best_tokens and tokens >= session.ring.num_processed - self.policy.window:
                best, best_tokens = session.session_id, tokens
        return best

    @property
    def supports_sessions(self) -> bool:
        """Whether requests may park their rings in sessions: not under tensor parallelism with a policy that
        keeps per-ring state (only rank 0's state would move with the ring)."""
        return not self.tensor_parallel or not self.policy.ring_state_axes

    def check_session(self, session_id: str | None, params: SamplingParams, append: bool) -> Session | None:
        """The session a request continues (None for a new one or none), checked before anything changes."""
        if session_id is None:
            if append:
                raise InvalidRequestError("append=True adds the prompt to a session's history: give session_id too")
            return None
        if not isinstance(session_id, str) or not session_id or len(session_id) > 256:
            raise InvalidRequestError(f"session_id must be a non-empty string of at most 256 characters, "
                                      f"got {session_id!r}")
        if params.prompt_logprobs is not None:
            raise InvalidRequestError("prompt_logprobs cannot be asked of a session request: the prompt's prefix "
                                      "that the session's ring has read is not computed again")
        if not self.supports_sessions:
            raise InvalidRequestError(f"sessions of policy {self.policy.name!r} are not supported under tensor "
                                      "parallelism: its per-ring state lives on every rank, and only rank 0's would "
                                      "be parked; use tensor_parallel_size=1 or a policy without per-ring state")
        session = self.store.get(session_id)
        if session is not None and session.request_id is not None:
            raise InvalidRequestError(f"session {session_id!r} already has a request in flight "
                                      f"({session.request_id!r}); wait for it to finish, or abort it")
        return session

    def _check_session_files(self) -> None:
        if self.tensor_parallel:  # a file would hold rank 0's KV heads only
            raise SessionFileError("saving and restoring sessions is not supported under tensor parallelism: each "
                                   "rank holds its own KV heads; run with tensor_parallel_size=1")

    def _session_identity(self) -> dict:
        """What a saved ring is only valid under: the model (config and a weight checksum), the policy with
        its options, the block size and the KV dtype."""
        if self._identity is None:
            import hashlib

            digest = hashlib.sha256(repr(self.config).encode())
            for p in list(self.model.parameters())[:3]:
                digest.update(p.detach().flatten()[:4096].float().cpu().numpy().tobytes())
            policy = f"{self.policy.label} n_sink={self.policy.n_sink} window={self.policy.window}"
            self._identity = dict(model=digest.hexdigest()[:32], policy=policy, block_size=self.block_size,
                                  dtype=str(self.pool.k.dtype).removeprefix("torch."))
        return self._identity

"""The engine: requests in, tokens out, many sequences at once, each in its own bounded ring.

    engine = Engine("path/or/repo", budget=4096, policy="nexus")
    outputs = engine.generate(["The capital of France is"], SamplingParams(max_tokens=16))   # raw text
    outputs = engine.chat([{"role": "user", "content": "Hi"}], SamplingParams(max_tokens=64))  # chat template
    with engine.stream([{"role": "user", "content": "Hi"}]) as stream:
        for delta in stream:
            print(delta, end="")

Sessions keep a conversation's ring between requests (minikv.session): pass `session_id=` and each turn
prefills only what the ring has not read.

    engine.chat(messages, params, session_id="conv-1")            # turn 1: the ring is parked at the end
    engine.chat(messages + [reply, next_question], params, session_id="conv-1")   # only the new turn runs

`add_request` / `step` / `abort` drive it from a caller's loop; `generate`, `chat` and `stream` are that loop
for the common cases. The engine decides what runs (Scheduler) and the model runner executes it
(ModelRunner); a request's whole host-side state is one `Request`.

Failure is per request: a bad request is refused with InvalidRequestError when it is added, and an exception
while processing a running request finishes that request (finish_reason "error", the message in
`RequestOutput.error`) and frees its KV; the engine keeps serving the others. The engine is not thread-safe:
drive it from one thread (minikv.server runs it on one background thread).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import numbers
import time
import weakref
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from .attention import RingAttention
from .archive import ArchiveStore
from .block_pool import KVPool, bytes_per_block, check_ring_settings, parse_kv_memory, read_kv_memory
from .config import check_engine_settings
from .distributed import DistributedError, check_tensor_parallel_size, kv_config, ring_positions, start
from .errors import ConfigError, InvalidRequestError, SessionFileError
from .input_batch import InputBatch
from .kernels.common import POSITION_MODES
from .hashing import hash_u32
from .loader import LoadedModel, load_model, parse_device, parse_dtype
from .model_runner import ModelRunner
from .outputs import RequestOutput
from .policies import Policy, make_policy
from .request import Request, RequestStatus, position_logprobs
from .sampling import RequestOutputKind, Sampler, SamplingParams
from .scheduler import Scheduler, SchedulerOutput
from .session import SessionInfo, SessionStore
from .tokenizer import validate_messages

logger = logging.getLogger(__name__)

Prompt = str | list[int] | list[dict]  # text, token ids, or chat messages

# KV slots per pool block (vLLM's default too); see docs/benchmarks.md for the measurement behind it.
DEFAULT_BLOCK_SIZE = 16
# The positions RoPE gives an evicting policy's ring unless a request says otherwise: "ring" keeps perplexity flat
# past the trained context and recalls as well or better (docs/quality.md, "Positions inside the ring").
DEFAULT_POSITIONS = "ring"


@dataclass
class EngineStats:
    """The engine's counters and gauges, cheap to read at any time (a metrics endpoint reads these).

    Gauges: requests running / waiting now; KV blocks of the pool in use (held by running requests) and in
    all; kv_usage = used / total. Counters since the engine started: steps run, prompt tokens processed,
    tokens generated, tokens evicted (summed over finished requests), requests finished by reason;
    peak_running: the most requests that ever ran in one step; peak_kv_blocks_used: the most pool blocks
    rings ever held at once.
    """

    num_running: int
    num_waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    num_steps: int
    prompt_tokens: int
    generation_tokens: int
    evicted_tokens: int
    finished: dict[str, int]
    peak_running: int
    peak_kv_blocks_used: int
    # Sessions (minikv.session): sessions kept, parked rings and their blocks (not in kv_blocks_used:
    # admission takes them back whenever it needs them); requests that reused a parked ring (hits) or found
    # none (misses), prompt tokens not prefilled again, parked rings released because admission or a limit
    # needed their blocks.
    num_sessions: int = 0
    num_parked_sessions: int = 0
    parked_kv_blocks: int = 0
    session_hits: int = 0
    session_misses: int = 0
    session_reused_tokens: int = 0
    sessions_released_by_pressure: int = 0
    recalled_tokens: int = 0  # ring slots the archives' recall overwrote (summed over layers and KV heads)

    @property
    def kv_usage(self) -> float:
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0


@dataclass
class _Sampled:
    """One sampled token, with its logprobs when the request asked for them."""

    token: int
    logprobs: dict | None = None


class Engine:
    def __init__(
        self,
        model: str | LoadedModel | None = None,
        *,
        budget: int = 4096,
        policy: str | Policy = "nexus",
        chunk: int = 512,
        n_sink: int = 4,
        window: int = 64,
        max_num_seqs: int = 8,
        max_num_batched_tokens: int | None = None,
        max_model_len: int | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        seed: int = 0,
        policy_options: dict | None = None,
        enforce_eager: bool = False,
        kv_memory: int | float | str | None = None,
        block_size: int = DEFAULT_BLOCK_SIZE,
        positions: str | None = None,
        tensor_parallel_size: int = 1,
        distributed_timeout: float = 300.0,
        max_sessions: int = 1024,
        max_parked_sessions: int = 64,
        max_parked_kv_memory: int | str | None = None,
        archive_memory: int | float | str | None = None,
        recall_interval: int = 16,
        archive_budget: int = 0,
    ):
        """`budget` is the most KV slots per layer and KV head one request may hold (a request can ask for
        fewer with SamplingParams.kv_budget; under `full` a request holds prompt + max_tokens). `kv_memory`
        sizes the one block pool every request draws from: bytes, a size like "2GiB", or on CUDA a fraction
        of free device memory; by default, room for `max_num_seqs` rings of `budget` slots (under `full`, at
        least room for one request of max_model_len tokens). `max_num_seqs` caps how many requests run at
        once. `positions` ("original" or "ring"; None: DEFAULT_POSITIONS, and always "original" under `full`)
        is the positions RoPE gives the ring's tokens (see SamplingParams.positions; a request may ask for the
        other mode). Sessions: at most `max_sessions` kept (token histories), at most `max_parked_sessions`
        of them with a parked ring, and those rings within `max_parked_kv_memory` (bytes or a size like "1GiB";
        default: the pool, as admission releases them whenever it needs blocks).

        `tensor_parallel_size` N > 1 splits the model over N ranks (N GPUs from `device` on, or N CPU
        processes; minikv.distributed): this process is rank 0 and starts the others (under torchrun it
        joins them instead). `kv_memory` is then per rank, each rank holding its 1/N of the KV heads.
        `distributed_timeout` (seconds) bounds every collective of a step: a rank that dies fails the
        requests in flight within it, and the engine stops (call `close()` to end the ranks otherwise).

        `archive_memory` bounds the host memory of every request's KV archive together (bytes or a size like
        "2GiB"; None: 4x the KV pool's bytes); a request keeps one when it asks (SamplingParams.archive_budget)
        and recalls from it at the prompt's last chunk and every `recall_interval` decode steps (minikv.archive);
        `archive_budget` is the archive of requests that do not say (0: none)."""
        check_engine_settings(budget=budget, chunk=chunk, n_sink=n_sink, window=window, max_num_seqs=max_num_seqs,
                              max_num_batched_tokens=max_num_batched_tokens, max_model_len=max_model_len, seed=seed,
                              policy_options=policy_options)
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ConfigError(f"block_size must be a positive number of KV slots, got {block_size!r}")
        self.policy = make_policy(policy, n_sink=n_sink, window=window, **(policy_options or {}))
        self.positions = self._check_positions(positions, archive_budget)
        if isinstance(recall_interval, bool) or not isinstance(recall_interval, int) or recall_interval < 1:
            raise ConfigError(f"recall_interval must be a positive number of decode steps, got {recall_interval!r}")
        if isinstance(archive_budget, bool) or not isinstance(archive_budget, int) or archive_budget < 0:
            raise ConfigError(f"archive_budget must be a number of tokens >= 0 (0 = no archive), "
                              f"got {archive_budget!r}")
        self.archive_budget = archive_budget
        self._archive_settings = (None if archive_memory is None else read_kv_memory(archive_memory), recall_interval)
        if isinstance(self._archive_settings[0], float):
            raise ConfigError(f"archive_memory must be a size in bytes (e.g. '2GiB'), got {archive_memory!r}")
        self.workers, self._dead = None, None  # tensor parallelism: the other ranks; why they were lost
        check_tensor_parallel_size(tensor_parallel_size)
        if tensor_parallel_size == 1:
            loaded = _loaded_model(model, device, dtype)
        else:
            self.workers, loaded = start(model, device, dtype, tensor_parallel_size, distributed_timeout)
            self._closer = weakref.finalize(self, self.workers.close)
        try:
            self._build(loaded, budget, chunk, seed, block_size, max_num_seqs, max_num_batched_tokens, max_model_len,
                        kv_memory, enforce_eager, dict(max_sessions=max_sessions, max_parked=max_parked_sessions,
                                                       max_parked_kv_memory=max_parked_kv_memory))
        except BaseException:
            if self.workers is not None:
                self.workers.abort()
            raise

    def _build(self, loaded, budget, chunk, seed, block_size, max_num_seqs, max_num_batched_tokens, max_model_len,
               kv_memory, enforce_eager, session_limits: dict) -> None:
        self.model, self.config, self.tokenizer = loaded.model, loaded.config, loaded.tokenizer
        self.device = next(self.model.parameters()).device
        self.max_model_len = self._max_model_len(max_model_len)
        self.budget = self._check_budget(budget, chunk)
        self.chunk, self.seed, self.block_size = chunk, seed, block_size
        # Room for every running decode plus one whole prefill chunk: prompts are then always cut at
        # multiples of `chunk`, whatever else runs (see minikv.scheduler).
        self.max_num_batched_tokens = max_num_batched_tokens or chunk + max_num_seqs
        self.pool = self._make_pool(kv_memory, budget, max_num_seqs)
        # A ring never needs more blocks than its budget, nor more than the pool has.
        max_blocks = min(self.pool.blocks_for(self.budget), self.pool.num_blocks)
        # CUDA graphs for the decode step, as nano-vllm; `enforce_eager` (or a CPU device) runs eagerly.
        use_graphs = self.device.type == "cuda" and not enforce_eager and self.workers is None
        self.batch = InputBatch(max_num_seqs, max_blocks, self.config.vocab_size, self.device,
                                empty_block=self.pool.scratch_block, scratch_slot=use_graphs)
        self.sessions = SessionStore(self.pool, self.policy, max_sessions=session_limits["max_sessions"],
                                     max_parked=session_limits["max_parked"],
                                     max_parked_blocks=self._parked_blocks(session_limits["max_parked_kv_memory"]))
        self.scheduler = Scheduler(self.pool, self.batch, max_num_batched_tokens=self.max_num_batched_tokens,
                                   chunk=chunk, sessions=self.sessions)
        if self.workers is not None:  # before bind: each rank gets the policy unbound, and binds its own
            self.workers.setup(num_blocks=self.pool.num_blocks, block_size=block_size, policy=self.policy, seed=seed,
                               num_slots=max_num_seqs + int(use_graphs), max_budget=self.budget,
                               scale=self.config.head_dim**-0.5)
        self.attention = RingAttention(self.pool, self.policy, scale=self.config.head_dim**-0.5, seed=seed,
                                       num_slots=max_num_seqs + int(use_graphs), max_budget=self.budget)
        self.archive = self._make_archive()
        self.attention.archive = self.archive
        self.runner = ModelRunner(self.model, self.attention, self.batch, self.device, use_cuda_graphs=use_graphs,
                                  workers=self.workers)
        self.sampler = Sampler()
        self._requests: dict[str, Request] = {}  # every request not yet reported finished
        self._finished_unreported: list[Request] = []  # finished outside a forward pass (abort, error)
        self._unclaimed: deque[RequestOutput] = deque()  # outputs for `step` callers, made by another loop
        self._sinks: dict[str, deque[RequestOutput]] = {}  # outputs of requests owned by generate/stream
        self._ids = itertools.count()
        self._seeds = itertools.count()
        self._counters = dict(num_steps=0, prompt_tokens=0, generation_tokens=0, evicted_tokens=0, peak_running=0)
        self._finished_by_reason: dict[str, int] = {}

    def _make_archive(self) -> ArchiveStore | None:
        """The requests' KV archives (host memory; pinned on CUDA): single-rank evicting engines only."""
        if not self.policy.evicts or self.workers is not None:
            return None
        memory, interval = self._archive_settings
        return ArchiveStore(num_layers=self.config.num_layers, num_kv_heads=self.config.num_kv_heads,
                            head_dim=self.config.head_dim, dtype=self.pool.k.dtype,
                            memory=4 * self.pool.total_bytes if memory is None else memory,
                            recall_interval=interval, pin=self.device.type == "cuda")

    def _check_archive(self, params: SamplingParams, positions: str) -> None:
        if params.archive_budget is None:
            # the engine's default archive is for the requests that can keep one
            usable = self.archive is not None and positions == "original"
            params.archive_budget = self.archive_budget if usable else 0
        if not params.archive_budget:
            return
        why = ("policy 'full' never evicts" if not self.policy.evicts else
               "tensor parallelism keeps no archive" if self.archive is None else
               "positions='ring' gives recalled tokens no rank" if positions == "ring" else None)
        if why:
            hint = " or positions out" if positions == "ring" else ""
            raise InvalidRequestError(f"archive_budget={params.archive_budget} asks for a KV archive, but {why}: "
                                      f"leave archive_budget at 0{hint}")

    def _max_model_len(self, requested: int | None) -> int:
        """The longest request (prompt + max_tokens): as asked, else the model's trained context. Under `full`
        a model trained with a sliding window (Mistral v0.1) is held to that window, because minikv's
        attention has no window: a longer request would attend further back than the model ever did.
        (The evicting policies bound attention with the ring instead.)"""
        window = self.config.sliding_window
        if self.policy.evicts or window is None:
            return requested or self.config.max_position_embeddings
        if requested is not None and requested > window:
            raise ConfigError(
                f"max_model_len={requested} is longer than the model's sliding_window ({window}), which policy "
                f"'full' does not implement (it attends to the whole request): use max_model_len <= {window}, or "
                f"an evicting policy (e.g. streaming with budget <= {window})")
        return min(requested or self.config.max_position_embeddings, window)

    def _check_positions(self, positions: str | None, archive_budget) -> str:
        if positions is not None and positions not in POSITION_MODES:
            raise ConfigError(f"positions={positions!r} is invalid: it must be one of {', '.join(POSITION_MODES)}")
        if not self.policy.evicts:
            if positions == "ring":
                raise ConfigError("positions='ring' needs an evicting policy: policy 'full' keeps every token at "
                                  "its own position; use positions='original' or another policy")
            return "original"
        return positions or ("original" if archive_budget else DEFAULT_POSITIONS)  # the archive needs "original"

    def request_positions(self, params: SamplingParams, session=None) -> str:
        """The position mode `params` runs under: its own, else its session's (one mode per ring), else
        "original" if it asks for an archive (which needs it), else the engine's. Raises InvalidRequestError
        for "ring" under `full`."""
        if params.positions == "ring" and not self.policy.evicts:
            raise InvalidRequestError("positions='ring' needs an evicting policy, and this engine runs 'full': "
                                      "leave positions out")
        if params.positions is None and session is not None and session.positions is not None:
            return session.positions
        return params.positions or ("original" if params.archive_budget else self.positions)

    def _parked_blocks(self, max_parked_kv_memory) -> int | None:
        if max_parked_kv_memory is None:
            return None
        return parse_kv_memory(max_parked_kv_memory, "cpu") // self.pool.bytes_per_block

    def _check_budget(self, budget: int, chunk: int) -> int:
        if not self.policy.evicts:
            return self.max_model_len  # `full`: a ring holds its whole request, prompt + max_tokens
        check_ring_settings(budget, chunk, self.policy.n_sink, self.policy.window)
        self.policy.check_budget(budget, chunk)
        return budget

    def _make_pool(self, kv_memory, budget: int, max_num_seqs: int) -> KVPool:
        dtype = next(self.model.parameters()).dtype
        config = self.config if self.workers is None else kv_config(self.config, self.workers.size)  # this rank's heads
        per_block = bytes_per_block(config, self.block_size, dtype, self.policy.top_m)
        if kv_memory is None:
            # an evicting ring under positions="ring" is not bounded by max_model_len: room for its budget
            longest = budget if self.positions == "ring" else min(budget, self.max_model_len)
            blocks = max_num_seqs * -(-longest // self.block_size)
            if not self.policy.evicts:  # `full` ignores --budget: a ring holds its whole request, so one must fit
                blocks = max(blocks, -(-self.max_model_len // self.block_size))
        else:
            memory = parse_kv_memory(kv_memory, self.device)
            blocks = memory // per_block
            if blocks < 1:
                raise ConfigError(f"kv_memory={kv_memory!r} ({memory} bytes) holds no KV block: one block of "
                                  f"{self.block_size} slots takes {per_block} bytes on this model; raise kv_memory")
        return KVPool(config, blocks, self.block_size, dtype=dtype, device=self.device,
                      edges_per_slot=self.policy.top_m)

    # --- requests --------------------------------------------------------------------------------
    def add_request(self, prompt: Prompt, params: SamplingParams | None = None, request_id: str | None = None,
                    *, session_id: str | None = None, append: bool = False,
                    tokenized: tuple[list[int], str | None] | None = None) -> str:
        """Queue one request and return its id; a bad request raises InvalidRequestError and changes nothing.

        `prompt` is text (used as is: no chat template), token ids, or chat messages (the model's chat
        template is applied, with the generation prompt).

        `session_id`: the request continues that session (or starts it) and parks its ring there when it
        finishes. Its prompt is the whole conversation so far; the prefix the session's ring has read is
        not computed again (RequestOutput.num_cached_tokens). With `append=True` the prompt (text or ids)
        holds only the new tokens, appended to the session's history (text without a BOS).

        `tokenized`: `tokenize(prompt)`'s result when the caller has it already (the server tokenizes in its
        handlers, off the engine thread); only the new tail of a session continued by text is encoded here.
        """
        if self._dead is not None:
            raise DistributedError(f"the engine stopped: {self._dead}; start a new one")
        params = self._check_params(params)
        request_id = self._check_request_id(request_id)
        session = self._check_session(session_id, params, append)
        if append and session is not None and session.token_ids:
            prompt_ids, prompt_text = self._encode_appended(prompt, session.token_ids)
        elif session is not None and session.token_ids and (isinstance(prompt, str) or _is_chat(prompt)):
            prompt_ids, prompt_text = self._encode_continuing(prompt, session, tokenized)
        else:
            prompt_ids, prompt_text = tokenized or self.tokenize(prompt)
        total = len(prompt_ids) + params.max_tokens
        positions = self.request_positions(params, session)
        if session is not None and session.positions not in (None, positions):
            raise InvalidRequestError(f"session {session_id!r} was written with positions={session.positions!r}; "
                                      f"its requests cannot ask for {positions!r} (a ring's RoPE positions are one "
                                      "mode's): leave positions out or start another session")
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
                f"{self.block_size} ({blocks * self.pool.bytes_per_block / 2**20:.1f} MiB) and the pool has "
                f"{self.pool.num_blocks} ({self.pool.total_bytes / 2**20:.1f} MiB); lower "
                f"{'kv_budget or max_tokens' if self.policy.evicts else 'max_tokens or shorten the prompt'}, "
                "or give the engine more kv_memory")
        req = Request(request_id, prompt_ids, params, seed=seed, eos_ids=eos, tokenizer=self.tokenizer,
                      prompt_text=prompt_text, kv_budget=budget, ring_size=ring_size, num_blocks_needed=blocks)
        req.positions = positions
        if session_id is not None:
            req.session = self.sessions.begin(session_id, request_id, budget if self.policy.evicts else None)
            req.session.positions = positions
        if params.archive_budget:
            req.archive = self.archive.open(params.archive_budget)
        self._requests[request_id] = req
        self.scheduler.add(req)
        return request_id

    def _check_params(self, params: SamplingParams | None) -> SamplingParams:
        if params is None:
            return SamplingParams()
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError(f"params must be a SamplingParams, got {type(params).__name__}")
        # A private copy, validated again by its __post_init__: the caller may have changed fields since
        # construction, and may change them again while the request runs.
        params = dataclasses.replace(params)
        for name in ("stop_token_ids", "forced_token_ids"):
            out_of_vocab = [t for t in getattr(params, name) if t >= self.config.vocab_size]
            if out_of_vocab:
                raise InvalidRequestError(f"{name} {out_of_vocab[:5]} are outside the vocabulary "
                                          f"[0, {self.config.vocab_size})")
        return params

    def _check_session(self, session_id: str | None, params: SamplingParams, append: bool):
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
        session = self.sessions.get(session_id)
        if session is not None and session.request_id is not None:
            raise InvalidRequestError(f"session {session_id!r} already has a request in flight "
                                      f"({session.request_id!r}); wait for it to finish, or abort it")
        return session

    def _encode_continuing(self, prompt: Prompt, session, tokenized=None) -> tuple[list[int], str | None]:
        """A session's whole conversation as text or chat messages. When its text begins with the text of
        the session's history, the history's own ids are kept and only the rest is tokenized: a reply's
        generated ids need not be how its text tokenizes, and the ring has read the generated ones."""
        ids, text = tokenized or self.tokenize(prompt)
        history = session.token_ids
        history_text = self._history_text(history, session)
        if history_text and len(text) > len(history_text) and text.startswith(history_text):
            rest = self.tokenizer.encode(text[len(history_text):], add_special_tokens=False)
            if rest:
                return history + rest, text
        return ids, text

    def _history_text(self, history: list[int], session) -> str:
        if session.text is None:
            session.text = self.tokenizer.decode(session.token_ids, skip_special_tokens=False)
        return session.text

    def match_session(self, prompt: Prompt, *, tokenized: tuple[list[int], str | None] | None = None) -> str | None:
        """The idle session whose parked ring would serve the most of `prompt` (text, ids or chat messages,
        the whole conversation), or None: how a server reuses rings for clients that resend the history
        (OpenAI chat completions), as a prefix cache would. Text that extends a session's history text
        counts all of its ring; otherwise the common prefix of the token ids (see Session.reusable_prefix), and
        only if it diverges from the ring within its last `window` tokens (a re-tokenized reply, a stop token):
        a conversation that shares only a beginning with another must not take that one's ring. `tokenized`:
        as in add_request."""
        ids, text = tokenized or self.tokenize(prompt)
        best, best_tokens = None, 0
        for session in self.sessions.sessions.values():
            if session.ring is None or session.request_id is not None:
                continue
            tokens = session.reusable_prefix(ids)
            if text is not None and (isinstance(prompt, str) or _is_chat(prompt)):
                history_text = self._history_text(session.token_ids, session)
                if history_text and len(text) > len(history_text) and text.startswith(history_text):
                    tokens = max(tokens, session.ring.num_processed)
            if tokens > best_tokens and tokens >= session.ring.num_processed - self.policy.window:
                best, best_tokens = session.session_id, tokens
        return best

    def _encode_appended(self, prompt: Prompt, history: list[int]) -> tuple[list[int], str | None]:
        if isinstance(prompt, str):
            _check_unicode(prompt, "the prompt")
            new = self.tokenizer.encode(prompt, add_special_tokens=False)
        elif _is_token_ids(prompt):
            new, _ = self.tokenize(prompt)
        else:
            raise InvalidRequestError("append=True takes the new text or token ids of a session's turn; for chat "
                                      "messages send the whole conversation without append")
        if not new:
            raise InvalidRequestError("the appended prompt is empty; give at least one token of text")
        return history + new, None

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
        lowest = self.policy.n_sink + self.policy.window + 1
        if not lowest <= params.kv_budget <= self.budget:
            raise InvalidRequestError(
                f"kv_budget={params.kv_budget} is out of range: it must be in [{lowest}, {self.budget}] (above "
                f"n_sink + window = {lowest - 1}, so some slot can be evicted, and at most the engine's --budget)")
        try:
            self.policy.check_budget(params.kv_budget, self.chunk)
        except ConfigError as err:
            raise InvalidRequestError(f"kv_budget={params.kv_budget}: {err}") from None
        return params.kv_budget

    def _check_request_id(self, request_id: str | None) -> str:
        if request_id is None:
            request_id = str(next(self._ids))
            while request_id in self._requests:  # a caller may have picked an id like ours
                request_id = str(next(self._ids))
            return request_id
        if not isinstance(request_id, str) or not request_id:
            raise InvalidRequestError(f"request_id must be a non-empty string, got {request_id!r}")
        if request_id in self._requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use; pick another or leave it "
                                      "to the engine")
        return request_id

    def tokenize(self, prompt: Prompt, *, chat_template_kwargs: dict | None = None) -> tuple[list[int], str | None]:
        """The token ids `add_request` would run for `prompt`, and its text (None for token ids); bad prompts
        raise InvalidRequestError. Chat messages go through the chat template, with `chat_template_kwargs` as
        extra template variables (e.g. enable_thinking). It reads only the tokenizer and the config, so another
        thread may call it while the engine steps (the server tokenizes in its request handlers)."""
        if isinstance(prompt, str):
            _check_unicode(prompt, "the prompt")
            ids, text = (self.tokenizer.encode(prompt) if prompt else []), prompt
        elif _is_chat(prompt):
            validate_messages(prompt)
            text = self.tokenizer.apply_chat_template(prompt, add_generation_prompt=True,
                                                      **(chat_template_kwargs or {}))
            _check_unicode(text, "a chat message")
            ids = self.tokenizer.encode(text, add_special_tokens=False)
        elif _is_token_ids(prompt):
            bad = [t for t in prompt if not 0 <= t < self.config.vocab_size]
            if bad:
                raise InvalidRequestError(f"token ids {bad[:5]} are outside the vocabulary [0, {self.config.vocab_size})")
            ids, text = [int(t) for t in prompt], None
        else:
            raise InvalidRequestError("a prompt is a string, a non-empty list of token ids, or a non-empty "
                                      "list of chat messages ({'role': ..., 'content': ...})")
        if not ids:
            raise InvalidRequestError("the prompt is empty; give at least one token of text")
        return ids, text

    def abort(self, request_id: str) -> None:
        """Stop a request wherever it is (waiting, prefilling, decoding); its KV is free at once.

        Its final output (finish_reason "abort") comes with the next step. Unknown or finished ids are ignored.
        """
        req = self._requests.get(request_id)
        if req is not None and not req.is_finished:
            self.scheduler.finish(req, "abort")
            self._finished_unreported.append(req)

    def has_unfinished_requests(self) -> bool:
        """True while `step` has something to do or to report."""
        return self._has_work() or bool(self._unclaimed)

    def _has_work(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._finished_unreported)

    @property
    def num_requests(self) -> int:
        """Requests in the engine, waiting or running."""
        return self.scheduler.num_waiting + self.scheduler.num_running

    def kv_positions(self, request_id: str) -> torch.Tensor:
        """What a running request's rings hold now: the original token position in every filled slot,
        [layers, kv_heads, n] int32 on the CPU, n = min(tokens read, ring size), in ring-slot order (which
        carries no meaning: sort a row to read it). Each (layer, KV head) evicts on its own, so rows differ;
        this is the view tools/kv_heatmap.py draws. It reads the pool (a host sync): for inspection, not
        for a serving loop. Raises InvalidRequestError unless the request is running (its ring exists only
        from admission to finish; read it before the step that finishes it)."""
        req = self._requests.get(request_id)
        if req is None or req.is_finished:
            raise InvalidRequestError(f"request {request_id!r} is not in the engine (unknown, or finished and "
                                      "its ring freed): read kv_positions while it runs")
        if req.status is not RequestStatus.RUNNING:
            raise InvalidRequestError(f"request {request_id!r} is still waiting for admission and holds no ring "
                                      "yet: step the engine first")
        length = min(req.num_processed, req.ring_size)
        positions = self.pool.ring("pos", req.blocks, length).cpu()
        if self.workers is None:
            return positions
        # Tensor parallel: rank r holds KV heads [r * Hkv / N, (r + 1) * Hkv / N); the whole model's, in order.
        return torch.cat(self.workers.call(ring_positions, (list(req.blocks), length), own=positions), dim=1)

    def stats(self) -> EngineStats:
        """A snapshot of the engine's gauges and counters (see EngineStats)."""
        sessions = self.sessions
        return EngineStats(num_running=self.scheduler.num_running, num_waiting=self.scheduler.num_waiting,
                           kv_blocks_used=self.pool.num_used - sessions.parked_blocks,
                           kv_blocks_total=self.pool.num_blocks,
                           peak_kv_blocks_used=self.pool.peak_used,
                           recalled_tokens=self.archive.recalled_total if self.archive is not None else 0,
                           finished=dict(self._finished_by_reason), **self._counters,
                           num_sessions=len(sessions.sessions), num_parked_sessions=sessions.num_parked,
                           parked_kv_blocks=sessions.parked_blocks, session_hits=sessions.counters.hits,
                           session_misses=sessions.counters.misses,
                           session_reused_tokens=sessions.counters.reused_tokens,
                           sessions_released_by_pressure=sessions.counters.released_by_pressure)

    # --- sessions --------------------------------------------------------------------------------
    def session(self, session_id: str) -> SessionInfo | None:
        """What the engine keeps of a session (its history, its parked ring), or None if it is unknown."""
        session = self.sessions.get(session_id)
        return None if session is None else self.sessions.info(session)

    def session_ids(self) -> list[str]:
        """Every session kept, least recently used first."""
        return list(self.sessions.sessions)

    def close_session(self, session_id: str) -> bool:
        """Forget a session: its request in flight is aborted, its ring's blocks are free at once. Returns
        False if the session was unknown."""
        session = self.sessions.get(session_id)
        if session is None:
            return False
        if session.request_id is not None:
            self.abort(session.request_id)
        return self.sessions.close(session_id)

    def save_session(self, session_id: str, directory) -> str:
        """Save a session (history and parked ring) as DIR/<id>.json + DIR/<id>.safetensors; it stays in
        the engine. Returns the JSON file's path. Raises SessionFileError if DIR cannot be written."""
        self._check_session_files()
        session = self.sessions.get(session_id)
        if session is None:
            raise InvalidRequestError(f"unknown session {session_id!r}")
        if session.request_id is not None:
            raise InvalidRequestError(f"session {session_id!r} has a request in flight ({session.request_id!r}); "
                                      "save it when the request has finished")
        return str(self.sessions.save(session, directory, self._session_identity()))

    def restore_session(self, path) -> str:
        """Load a session saved by `save_session` (its .json path) and park its ring (or, with no room in
        the pool now, only its history); returns its id. A file from another model, policy, block size or
        dtype, or a truncated or corrupt one, raises SessionFileError and changes nothing."""
        self._check_session_files()
        from .session import read_session_file

        meta, _ = read_session_file(path, self._session_identity())
        bad = [t for t in meta["token_ids"] if t >= self.config.vocab_size]
        budget = meta.get("kv_budget")
        if bad or (budget is not None and (not self.policy.evicts or budget > self.budget)):
            raise SessionFileError(f"session file {str(path)!r} does not fit this engine (token ids outside the "
                                   f"vocabulary, or kv_budget {budget} beyond --budget {self.budget})")
        return self.sessions.load(path, self._session_identity()).session_id

    @property
    def supports_sessions(self) -> bool:
        """Whether requests may park their rings in sessions: not under tensor parallelism with a policy that
        keeps per-ring state (only rank 0's state would move with the ring)."""
        return self.workers is None or not self.policy.ring_state_axes

    def _check_session_files(self) -> None:
        if self.workers is not None:  # a file would hold rank 0's KV heads only
            raise SessionFileError("saving and restoring sessions is not supported under tensor parallelism: each "
                                   "rank holds its own KV heads; run with tensor_parallel_size=1")

    def _session_identity(self) -> dict:
        """What a saved ring is only valid under: the model (config and a weight checksum), the policy with
        its options, the block size and the KV dtype."""
        if not hasattr(self, "_identity"):
            import hashlib

            digest = hashlib.sha256(repr(self.config).encode())
            for p in list(self.model.parameters())[:3]:
                digest.update(p.detach().flatten()[:4096].float().cpu().numpy().tobytes())
            policy = f"{self.policy.label} n_sink={self.policy.n_sink} window={self.policy.window}"
            self._identity = dict(model=digest.hexdigest()[:32], policy=policy, block_size=self.block_size,
                                  dtype=str(self.pool.k.dtype).removeprefix("torch."))
        return self._identity

    # --- the loop --------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one scheduled forward pass; return the outputs of the requests that produced a token or finished
        since the last call (each finished request is reported exactly once, then forgotten).

        Requests owned by `generate` or a stream are not reported here: their outputs go to their owner.
        """
        outputs = list(self._unclaimed)
        self._unclaimed.clear()
        return outputs + self._step()

    def _step(self) -> list[RequestOutput]:
        """One forward pass; outputs of owned requests go to their sinks, the rest are returned."""
        touched = {req.request_id: req for req in self._finished_unreported}
        self._finished_unreported.clear()
        sched = self.scheduler.schedule()
        if not sched.is_empty:
            for req in self._run(sched):
                touched[req.request_id] = req
        outputs = []
        for req in touched.values():
            out = req.make_output()
            sink = self._sinks.get(req.request_id)
            if req.is_finished:
                self._forget_finished(req)
            if out is None:
                continue
            if sink is not None:
                sink.append(out)
            else:
                outputs.append(out)
        return outputs

    def _forget_finished(self, req: Request) -> None:
        del self._requests[req.request_id]
        self._sinks.pop(req.request_id, None)
        if req.archive is not None:  # its host memory is free for the others
            req.archive.close()
        req.metrics.finished_time = time.monotonic()
        self._counters["evicted_tokens"] += req.num_evicted_tokens
        reason = req.finish_reason or "abort"
        self._finished_by_reason[reason] = self._finished_by_reason.get(reason, 0) + 1

    def _run(self, sched: SchedulerOutput) -> list[Request]:
        """Run a scheduled step; return the requests that got a token or finished."""
        now = time.monotonic()
        scheduled = sched.requests
        counters = self._counters
        counters["num_steps"] += 1
        counters["prompt_tokens"] += sum(chunk.length for chunk in sched.prefills)
        counters["peak_running"] = max(counters["peak_running"], self.scheduler.num_running)
        for req in scheduled:
            if req.metrics.first_scheduled_time is None:
                req.metrics.first_scheduled_time = now
        try:
            result = self.runner.run(sched)
        except Exception as err:
            if self.workers is not None and self.workers.in_step:
                return self._lose_ranks(err)
            # The forward pass may have written part of these rings: none of its requests can go on.
            for req in scheduled:
                self._fail(req, err)
            return scheduled
        for req, sampled in zip(result.requests, self._sample(result)):
            try:
                if isinstance(sampled, Exception):
                    raise sampled
                counters["generation_tokens"] += 1
                reason = req.append_token(sampled.token, sampled.logprobs)
                if reason is not None:
                    self.scheduler.finish(req, reason)
            except Exception as err:
                self._fail(req, err)
        return list(result.requests) + [req for req in scheduled if req.is_finished]

    def _lose_ranks(self, err: Exception) -> list[Request]:
        """A step failed with the other ranks in it (a rank died, timed out, or rank 0's forward raised): the
        ranks can no longer agree on any state, so every request fails and the engine stops."""
        self._dead = f"a tensor-parallel step failed ({type(err).__name__}: {err})"
        self.workers.abort()
        failed = [req for req in self._requests.values() if not req.is_finished]
        for req in failed:
            self._fail(req, err)
        return failed

    def close(self) -> None:
        """End the other ranks of a tensor-parallel engine (a no-op at tensor_parallel_size 1). Also runs
        when the engine is garbage-collected or the interpreter exits."""
        if self.workers is not None:
            self._closer()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _fail(self, req: Request, err: Exception) -> None:
        """Finish one request with finish_reason "error" (its KV is freed); the engine serves on."""
        logger.error("request %s failed", req.request_id, exc_info=err)
        if not req.is_finished:
            req.error = f"{type(err).__name__}: {err}"
            self.scheduler.finish(req, "error")

    def _sample(self, result) -> list[_Sampled | Exception]:
        reqs, slot_ids, logits = result.requests, result.slot_ids, result.logits
        if not reqs:  # a step of prefill chunks that all end mid-prompt samples nothing
            return []
        try:
            return self._sample_rows(reqs, slot_ids, logits)
        except Exception as err:
            if len(reqs) == 1:
                return [err]
        # One request broke the batch: sample row by row, so that only that request fails.
        return [self._sample_alone(req, slot_ids[i: i + 1], logits[i: i + 1]) for i, req in enumerate(reqs)]

    def _sample_alone(self, req: Request, slot_ids: torch.Tensor, logits: torch.Tensor) -> _Sampled | Exception:
        try:
            return self._sample_rows([req], slot_ids, logits)[0]
        except Exception as err:
            return err

    def _sample_rows(self, reqs: list[Request], slot_ids: torch.Tensor, logits: torch.Tensor) -> list[_Sampled]:
        out = self.sampler(logits, self.batch.sampling_batch(slot_ids, reqs))
        tokens = out.token_ids.tolist()  # the one host sync of the step
        sampled = self._with_logprobs(reqs, tokens, out)
        # Recorded last, once nothing can fail: a batch that fails is sampled again row by row (see _sample),
        # and a token recorded twice would count twice in the rows' steps and penalties.
        self.batch.record_sampled(slot_ids, out.token_ids)  # the next decode inputs, and the penalty counts
        return sampled

    def _with_logprobs(self, reqs: list[Request], tokens: list[int], out) -> list[_Sampled]:
        if all(r.params.logprobs is None for r in reqs):
            return [_Sampled(t) for t in tokens]
        chosen = out.logprobs.tolist()
        top_ids = out.top_token_ids.tolist() if out.top_token_ids is not None else None
        top_vals = out.top_logprobs.tolist() if out.top_logprobs is not None else None
        sampled = []
        for i, (req, token) in enumerate(zip(reqs, tokens)):
            n = req.params.logprobs
            if n is None:
                sampled.append(_Sampled(token))
                continue
            ids, vals = (top_ids[i][:n], top_vals[i][:n]) if n else ([], [])
            sampled.append(_Sampled(token, position_logprobs(token, chosen[i], ids, vals, self._token_text)))
        return sampled

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    # --- conveniences ----------------------------------------------------------------------------
    def generate(self, prompts: str | list[int] | Iterable[str | list[int]],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 *, use_tqdm: bool = True, session_id: str | None = None, append: bool = False) -> list[RequestOutput]:
        """Complete raw prompts (text as is, or token ids; no chat template) and return their final outputs,
        in the order of `prompts`. For chat messages use `chat`.

        A bad prompt or parameter raises InvalidRequestError naming the prompt's index before anything runs.
        Requests queued with add_request keep running alongside; their outputs wait for `step`.
        `session_id` / `append` (one prompt only): see add_request.
        """
        prompts = _as_prompt_list(prompts)
        for index, prompt in enumerate(prompts):
            if _is_chat(prompt):
                raise InvalidRequestError(f"prompt {index} is a list of chat messages: use Engine.chat(messages) "
                                          "for those (generate completes raw text or token ids)")
        return self._run_to_completion(prompts, sampling_params, use_tqdm, session_id=session_id, append=append)

    def chat(self, messages: list[dict] | Iterable[list[dict]],
             sampling_params: SamplingParams | list[SamplingParams] | None = None,
             *, use_tqdm: bool = True, session_id: str | None = None) -> list[RequestOutput]:
        """Answer one conversation (a list of {"role", "content"} dicts) or a list of them, through the
        model's chat template; return the final outputs in order. With `session_id` (one conversation) the
        session's ring serves the part of the conversation it has read (see add_request)."""
        conversations = [messages] if _is_chat(messages) else list(messages)
        for index, conversation in enumerate(conversations):
            if not _is_chat(conversation):
                raise InvalidRequestError(f"conversation {index} must be a non-empty list of "
                                          "{'role': ..., 'content': ...} dicts")
        return self._run_to_completion(conversations, sampling_params, use_tqdm, session_id=session_id)

    def _run_to_completion(self, prompts: list[Prompt], sampling_params, use_tqdm: bool, *,
                           session_id: str | None = None, append: bool = False) -> list[RequestOutput]:
        params_list = (list(sampling_params) if isinstance(sampling_params, (list, tuple))
                       else [sampling_params] * len(prompts))
        if len(params_list) != len(prompts):
            raise InvalidRequestError(f"got {len(params_list)} SamplingParams for {len(prompts)} prompts")
        if session_id is not None or append:
            if len(prompts) != 1:
                raise InvalidRequestError(f"session_id continues one conversation: got {len(prompts)} prompts")
            ids = [self.add_request(prompts[0], params_list[0], session_id=session_id, append=append)]
        else:
            ids = self._add_all(prompts, params_list)
        sinks = {rid: self._own(rid, RequestOutputKind.FINAL_ONLY) for rid in ids}
        final: dict[str, RequestOutput] = {}
        try:
            with _progress(len(ids), use_tqdm) as bar:
                while len(final) < len(ids):
                    self._step_for_owner()
                    for rid, sink in sinks.items():
                        while sink:
                            final[rid] = sink.popleft()
                            bar.update(1)
        finally:  # interrupted (Ctrl-C, an exception): leave nothing of this batch behind
            for rid in ids:
                if rid not in final:
                    self._discard(rid)
        return [final[rid] for rid in ids]

    def _add_all(self, prompts: list[Prompt], params_list: list[SamplingParams | None]) -> list[str]:
        """Add a whole batch, or nothing of it."""
        ids: list[str] = []
        for index, (prompt, params) in enumerate(zip(prompts, params_list)):
            try:
                ids.append(self.add_request(prompt, params))
            except InvalidRequestError as err:
                for rid in ids:
                    self._discard(rid)
                raise InvalidRequestError(f"prompt {index}: {err}") from None
        return ids

    def _own(self, request_id: str, kind: RequestOutputKind) -> deque[RequestOutput]:
        """Route a request's outputs, of `kind`, to a private queue instead of `step`'s return value."""
        self._requests[request_id].params.output_kind = kind
        sink: deque[RequestOutput] = deque()
        self._sinks[request_id] = sink
        return sink

    def _step_for_owner(self) -> None:
        """A step driven by generate/stream: outputs of requests nobody owns wait for the next `step` call."""
        if not self._has_work():
            raise RuntimeError("requests ended without a final output (a minikv bug)")
        self._unclaimed.extend(self._step())

    def _discard(self, request_id: str) -> None:
        """Abort a request and forget it: no output of it will be delivered."""
        self._sinks.pop(request_id, None)
        req = self._requests.pop(request_id, None)
        if req is not None:
            if not req.is_finished:
                self.scheduler.finish(req, "abort")
                self._finished_by_reason["abort"] = self._finished_by_reason.get("abort", 0) + 1
            if req in self._finished_unreported:
                self._finished_unreported.remove(req)

    def stream(self, prompt: Prompt, params: SamplingParams | None = None,
               request_id: str | None = None, *, session_id: str | None = None,
               append: bool = False) -> "RequestStream":
        """Add a request and iterate over its text deltas as tokens arrive (other requests keep running).

        Bad input raises here, not at the first `next`. The stream's lifetime is explicit: use it in a
        `with` block (leaving the block early, by `break`, `return` or an exception, aborts the request and
        frees its KV at once) or call `close()`. A stream abandoned without either keeps its request running
        until it finishes by itself (max_tokens bounds it); nothing of it stays in the engine afterwards.
        """
        request_id = self.add_request(prompt, params, request_id, session_id=session_id, append=append)
        return RequestStream(self, request_id)


class RequestStream:
    """One request's text, delta by delta. After the last delta, `output` holds its final RequestOutput
    (all of its text and tokens). Use it as a context manager, or call `close()` when stopping early."""

    def __init__(self, engine: Engine, request_id: str):
        self.engine, self.request_id = engine, request_id
        self.output: RequestOutput | None = None
        self._request = engine._requests[request_id]
        self._sink = engine._own(request_id, RequestOutputKind.DELTA)
        self._closed = False

    def __iter__(self) -> "RequestStream":
        return self

    def __next__(self) -> str:
        while not self._closed:
            if not self._sink:
                self.engine._step_for_owner()
                continue
            out = self._sink.popleft()
            if out.finished:
                self.output = self._request.make_output(RequestOutputKind.CUMULATIVE)
                self._closed = True
            if out.outputs[0].text:
                return out.outputs[0].text
        raise StopIteration

    def close(self) -> None:
        """Stop following the request; if it has not finished, abort it (its KV is free at once)."""
        if not self._closed:
            self._closed = True
            if self.output is None:
                self.engine._discard(self.request_id)

    def __enter__(self) -> "RequestStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _loaded_model(model, device, dtype) -> LoadedModel:
    """Load `model`, or take an already loaded one; a device or dtype that an already loaded model does
    not have is an error (it would be silently ignored otherwise, and casting the caller's model in place
    would change it under every other engine that shares it)."""
    if not isinstance(model, LoadedModel):
        return load_model(model, device=device, dtype=dtype)
    weight = next(model.model.parameters())
    wanted = parse_device(device) if device is not None else None
    if wanted is not None and (wanted.type != weight.device.type or wanted.index not in (None, weight.device.index)):
        raise ConfigError(f"the model is already loaded on {weight.device}, not {device}: load it with "
                          f"load_model(..., device={str(device)!r}), or leave device out")
    if dtype is not None and parse_dtype(dtype) != weight.dtype:
        raise ConfigError(f"the model is already loaded as {weight.dtype}, not {dtype}: load it with "
                          f"load_model(..., dtype=...), or leave dtype out")
    return model


def _is_chat(prompt: object) -> bool:
    return isinstance(prompt, list) and bool(prompt) and all(isinstance(m, dict) for m in prompt)


def _is_token_ids(prompt: object) -> bool:
    return (isinstance(prompt, (list, tuple)) and bool(prompt)
            and all(isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in prompt))


def _as_prompt_list(prompts) -> list[Prompt]:
    """One prompt (text, token ids, chat) or many, as a list of prompts."""
    if isinstance(prompts, str) or _is_chat(prompts) or _is_token_ids(prompts):
        return [prompts]
    if isinstance(prompts, (dict, bytes)) or not isinstance(prompts, Iterable):  # generate(5), generate(message)
        raise InvalidRequestError(f"prompts must be a prompt (a string, a list of token ids or a list of chat "
                                  f"messages) or a list of prompts, got {type(prompts).__name__}")
    return list(prompts)


def _check_unicode(text: str, what: str) -> None:
    """A lone surrogate (e.g. bytes decoded with errors="surrogateescape") is not text a tokenizer can read."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise InvalidRequestError(
            f"{what} holds {text[err.start]!r} at index {err.start}, a lone surrogate, which is not valid Unicode; "
            "decode the original bytes as UTF-8 with errors='replace', or fix their encoding") from None


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc="generate", unit="req", disable=not enabled or total < 2)

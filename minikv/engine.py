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
for the common cases (minikv.offline). The engine decides what runs (Scheduler) and the model runner executes
it (ModelRunner); a request's whole host-side state is one `Request`, built and checked by the InputProcessor
(minikv.input_processor). The session methods are minikv.session_api's.

Failure is per request: a bad request is refused with InvalidRequestError when it is added, and an exception
while processing a running request finishes that request (finish_reason "error", the message in
`RequestOutput.error`) and frees its KV; the engine keeps serving the others. The engine is not thread-safe:
drive it from one thread (minikv.server runs it on one background thread).
"""

from __future__ import annotations

import itertools
import logging
import time
import weakref
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from .attention import RingAttention
from .archive import ArchiveStore, RecallRule, make_archive_store
from .block_pool import KVPool, bytes_per_block, check_budget, parse_kv_memory, read_kv_memory
from .config import check_engine_settings
from .distributed import DistributedError, check_tensor_parallel_size, kv_config, ring_positions, start
from .errors import ConfigError, InvalidRequestError
from .input_batch import InputBatch
from .input_processor import InputProcessor, Prompt
from .kernels.common import POSITION_MODES
from .loader import LoadedModel, load_model, parse_device, parse_dtype
from .model_runner import ModelRunner
from .offline import RequestStream, chat as offline_chat, generate as offline_generate, stream as offline_stream
from .outputs import EngineStats, RequestOutput
from .policies import Policy, make_policy
from .request import Request, RequestStatus, position_logprobs
from .sampling import Sampler, SamplingParams
from .scheduler import Scheduler, SchedulerOutput
from .session import SessionInfo, SessionStore
from .session_api import SessionAPI

logger = logging.getLogger(__name__)

# KV slots per pool block (vLLM's default too); see docs/benchmarks.md for the measurement behind it.
DEFAULT_BLOCK_SIZE = 16
# The positions RoPE gives an evicting policy's ring unless a request says otherwise: "ring" keeps perplexity flat
# past the trained context and recalls as well or better (docs/quality.md, "Positions inside the ring").
DEFAULT_POSITIONS = "ring"


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
        recall_rule: RecallRule | None = None,
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
        and recalls from it at the prompt's last chunk and every `recall_interval` decode steps (minikv.archive;
        `recall_rule`: what a recall takes back, None: RecallRule's defaults); `archive_budget` is the archive
        of requests that do not say (0: none)."""
        check_engine_settings(budget=budget, chunk=chunk, n_sink=n_sink, window=window, max_num_seqs=max_num_seqs,
                              max_num_batched_tokens=max_num_batched_tokens, max_model_len=max_model_len, seed=seed,
                              policy_options=policy_options)
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ConfigError(f"block_size must be a positive number of KV slots, got {block_size!r}")
        self.policy = make_policy(policy, n_sink=n_sink, window=window, **(policy_options or {}))
        if self.policy.evicts:  # (`full` ignores the budget: a ring holds its whole request)
            check_budget(budget, chunk, self.policy)
        self.positions = self._check_positions(positions)
        if isinstance(recall_interval, bool) or not isinstance(recall_interval, int) or recall_interval < 1:
            raise ConfigError(f"recall_interval must be a positive number of decode steps, got {recall_interval!r}")
        if recall_rule is not None and not isinstance(recall_rule, RecallRule):
            raise ConfigError(f"recall_rule must be a minikv.archive.RecallRule, got {recall_rule!r}")
        if isinstance(archive_budget, bool) or not isinstance(archive_budget, int) or archive_budget < 0:
            raise ConfigError(f"archive_budget must be a number of tokens >= 0 (0 = no archive), "
                              f"got {archive_budget!r}")
        self.archive_budget = archive_budget
        self._archive_settings = (None if archive_memory is None else read_kv_memory(archive_memory), recall_interval,
                                  recall_rule or RecallRule())
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
        self.budget = budget if self.policy.evicts else self.max_model_len  # `full`: a ring holds its whole request
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
                                     max_parked_blocks=self._parked_blocks(session_limits["max_parked_kv_memory"]),
                                     roll_back_evicted=self.workers is None)
        self.scheduler = Scheduler(self.pool, self.batch, max_num_batched_tokens=self.max_num_batched_tokens,
                                   chunk=chunk, sessions=self.sessions)
        if self.workers is not None:  # before bind: each rank gets the policy unbound, and binds its own
            self.workers.setup(num_blocks=self.pool.num_blocks, block_size=block_size, policy=self.policy, seed=seed,
                               num_slots=max_num_seqs + int(use_graphs), max_budget=self.budget,
                               scale=self.config.head_dim**-0.5)
        self.attention = RingAttention(self.pool, self.policy, scale=self.config.head_dim**-0.5, seed=seed,
                                       num_slots=max_num_seqs + int(use_graphs), max_budget=self.budget)
        self.archive = self._make_archive()
        self.attention.archive = self.sessions.archives = self.archive
        self.runner = ModelRunner(self.model, self.attention, self.batch, self.device, use_cuda_graphs=use_graphs,
                                  workers=self.workers)
        self.sampler = Sampler()
        self.processor = InputProcessor(self.tokenizer, vocab_size=self.config.vocab_size, policy=self.policy,
                                        budget=self.budget, chunk=chunk, max_model_len=self.max_model_len,
                                        positions=self.positions, pool=self.pool, archive=self.archive,
                                        archive_budget=self.archive_budget, seed=seed)
        self.session_api = SessionAPI(self.sessions, self.processor, model=self.model, config=self.config,
                                      pool=self.pool, policy=self.policy, budget=self.budget, block_size=block_size,
                                      tensor_parallel=self.workers is not None, abort=self.abort)
        self._requests: dict[str, Request] = {}  # every request not yet reported finished
        # Outputs made (by a step, or an abort between steps) that wait for the next `step` call; outputs of
        # a request added with an output_queue go to that queue instead (see _report).
        self._outputs: list[RequestOutput] = []
        self._ids = itertools.count()
        self._counters = dict(num_steps=0, prompt_tokens=0, generation_tokens=0, evicted_tokens=0, peak_running=0)
        self._finished_by_reason: dict[str, int] = {}

    def _make_archive(self) -> ArchiveStore | None:
        """The requests' KV archives (host memory; pinned on CUDA), on every rank: evicting engines only."""
        if not self.policy.evicts:
            return None
        memory, interval, rule = self._archive_settings
        return make_archive_store(self.pool, memory=4 * self.pool.total_bytes if memory is None else memory,
                                  recall_interval=interval, rule=rule, workers=self.workers)

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

    def _check_positions(self, positions: str | None) -> str:
        if positions is not None and positions not in POSITION_MODES:
            raise ConfigError(f"positions={positions!r} is invalid: it must be one of {', '.join(POSITION_MODES)}")
        if not self.policy.evicts:
            if positions == "ring":
                raise ConfigError("positions='ring' needs an evicting policy: policy 'full' keeps every token at "
                                  "its own position; use positions='original' or another policy")
            return "original"
        return positions or DEFAULT_POSITIONS

    def _parked_blocks(self, max_parked_kv_memory) -> int | None:
        if max_parked_kv_memory is None:
            return None
        return parse_kv_memory(max_parked_kv_memory, "cpu") // self.pool.bytes_per_block

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
                    tokenized: tuple[list[int], str | None] | None = None,
                    output_queue: deque[RequestOutput] | None = None) -> str:
        """Queue one request and return its id; a bad request raises InvalidRequestError and changes nothing.

        `prompt` is text (used as is: no chat template), token ids, or chat messages (the model's chat
        template is applied, with the generation prompt).

        `session_id`: the request continues that session (or starts it) and parks its ring there when it
        finishes. Its prompt is the whole conversation so far; the prefix the session's ring has read is
        not computed again (RequestOutput.num_cached_tokens). With `append=True` the prompt (text or ids)
        holds only the new tokens, appended to the session's history (text without a BOS).

        `tokenized`: `tokenize(prompt)`'s result when the caller has it already (the server tokenizes in its
        handlers, off the engine thread); only the new tail of a session continued by text is encoded here.
        Every check a request passes is minikv.input_processor's.

        `output_queue`: the request's outputs are appended there instead of being returned by `step` (how
        generate, chat and stream follow their requests while other callers step the engine).
        """
        if self._dead is not None:
            raise DistributedError(f"the engine stopped: {self._dead}; start a new one")
        params = self.processor.check_params(params)
        request_id = self._check_request_id(request_id)
        session = self.session_api.check_session(session_id, params, append)
        req = self.processor.make_request(request_id, prompt, params, session, append=append, tokenized=tokenized)
        if session_id is not None:
            req.session = self.sessions.begin(session_id, request_id, req.kv_budget if self.policy.evicts else None)
            req.session.positions = req.positions
        if req.params.archive_budget:
            req.archive = self.archive.open(req.params.archive_budget)
        req.output_queue = output_queue
        self._requests[request_id] = req
        self.scheduler.add(req)
        return request_id

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
        raise InvalidRequestError. `chat_template_kwargs`: extra chat template variables (e.g. enable_thinking).
        It reads only the tokenizer and the config, so another thread may call it while the engine steps (the
        server tokenizes in its request handlers)."""
        return self.processor.tokenize(prompt, chat_template_kwargs=chat_template_kwargs)

    def request_positions(self, params: SamplingParams, session=None) -> str:
        """The position mode a request with `params` runs under (InputProcessor.request_positions)."""
        return self.processor.request_positions(params, session)

    def abort(self, request_id: str) -> None:
        """Stop a request wherever it is (waiting, prefilling, decoding); its KV is free at once.

        Its final output (finish_reason "abort") comes with the next step (or goes to its output_queue now),
        and its id is free again. Unknown or finished ids are ignored.
        """
        req = self._requests.get(request_id)
        if req is not None and not req.is_finished:
            self.scheduler.finish(req, "abort")
            self._report(req)

    def has_unfinished_requests(self) -> bool:
        """True while `step` has something to do or to report."""
        return self.scheduler.has_unfinished() or bool(self._outputs)

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
        length = req.ring_filled
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

    # --- sessions (minikv.session_api) ----------------------------------------------------------
    def session(self, session_id: str) -> SessionInfo | None:
        """What the engine keeps of a session (its history, its parked ring), or None if it is unknown."""
        return self.session_api.session(session_id)

    def session_ids(self) -> list[str]:
        """Every session kept, least recently used first."""
        return self.session_api.session_ids()

    def close_session(self, session_id: str) -> bool:
        """Forget a session (its request in flight is aborted, its ring freed); False if it was unknown."""
        return self.session_api.close_session(session_id)

    def save_session(self, session_id: str, directory) -> str:
        """Save a session as DIR/<id>.json + DIR/<id>.safetensors; returns the JSON file's path."""
        return self.session_api.save_session(session_id, directory)

    def restore_session(self, path) -> str:
        """Load a session saved by `save_session` (its .json path) and park its ring; returns its id."""
        return self.session_api.restore_session(path)

    def match_session(self, prompt: Prompt, *, tokenized: tuple[list[int], str | None] | None = None) -> str | None:
        """The idle session whose parked ring would serve the most of `prompt` (the whole conversation), or None."""
        return self.session_api.match_session(prompt, tokenized=tokenized)

    @property
    def supports_sessions(self) -> bool:
        """Whether requests may park their rings in sessions (see SessionAPI.supports_sessions)."""
        return self.session_api.supports_sessions

    # --- the loop --------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one scheduled forward pass; return the outputs of the requests that produced a token or finished
        since the last call (each finished request is reported exactly once, then forgotten).

        Outputs of requests added with an output_queue (generate, chat, stream) go to that queue instead.
        """
        self._step()
        outputs, self._outputs = self._outputs, []
        return outputs

    def _step(self) -> None:
        """One forward pass (if anything is scheduled); every request it touched is reported (_report)."""
        sched = self.scheduler.schedule()
        if not sched.is_empty:
            for req in {req.request_id: req for req in self._run(sched)}.values():
                self._report(req)

    def _report(self, req: Request) -> None:
        """The one way out of the engine: a request's output (of its own output_kind) goes to its output_queue,
        or waits for the next `step` call; a finished request is forgotten."""
        out = req.make_output()
        if req.is_finished:
            self._forget_finished(req)
        if out is not None:
            (req.output_queue if req.output_queue is not None else self._outputs).append(out)

    def _forget_finished(self, req: Request) -> None:
        del self._requests[req.request_id]
        if req.archive is not None and not req.archive.parked:  # its host memory is free for the others
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

    def generate(self, prompts: str | list[int] | Iterable[str | list[int]],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 *, use_tqdm: bool = True, session_id: str | None = None, append: bool = False) -> list[RequestOutput]:
        """Complete raw prompts (text as is, or token ids; no chat template) and return their final outputs,
        in the order of `prompts`. For chat messages use `chat`.

        A bad prompt or parameter raises InvalidRequestError naming the prompt's index before anything runs.
        Requests queued with add_request keep running alongside; their outputs wait for `step`.
        `session_id` / `append` (one prompt only): see add_request.
        """
        return offline_generate(self, prompts, sampling_params, use_tqdm=use_tqdm, session_id=session_id,
                                append=append)

    def chat(self, messages: list[dict] | Iterable[list[dict]],
             sampling_params: SamplingParams | list[SamplingParams] | None = None,
             *, use_tqdm: bool = True, session_id: str | None = None) -> list[RequestOutput]:
        """Answer one conversation (a list of {"role", "content"} dicts) or a list of them, through the
        model's chat template; return the final outputs in order. With `session_id` (one conversation) the
        session's ring serves the part of the conversation it has read (see add_request)."""
        return offline_chat(self, messages, sampling_params, use_tqdm=use_tqdm, session_id=session_id)

    def stream(self, prompt: Prompt, params: SamplingParams | None = None,
               request_id: str | None = None, *, session_id: str | None = None,
               append: bool = False) -> "RequestStream":
        """Add a request and iterate over its text deltas as tokens arrive (other requests keep running).

        Bad input raises here, not at the first `next`. The stream's lifetime is explicit: use it in a
        `with` block (leaving the block early, by `break`, `return` or an exception, aborts the request and
        frees its KV at once) or call `close()`. A stream abandoned without either keeps its request running
        until it finishes by itself (max_tokens bounds it); nothing of it stays in the engine afterwards.
        """
        return offline_stream(self, prompt, params, request_id, session_id=session_id, append=append)


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

"""The engine: requests in, tokens out, many sequences at once, each in its own bounded ring.

    engine = Engine("path/or/repo", budget=4096, policy="nexus")
    outputs = engine.generate(["Hello", "Tell me a story"], SamplingParams(max_tokens=64))
    for delta in engine.stream([{"role": "user", "content": "Hi"}]):
        print(delta, end="")

`add_request` / `step` / `abort` drive it from a caller's loop; `stream` yields one request's text as it
grows. The engine decides what runs (Scheduler) and the model runner executes it (ModelRunner).

Failure is per request: a bad request is refused with InvalidRequestError when it is added, and an
exception while processing a running request finishes that request (finish_reason "error", the message in
`RequestOutput.error`) and frees its ring; the engine keeps serving the others. The engine is not
thread-safe: drive it from one thread.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import numbers
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from .attention import RingAttention
from .config import check_engine_settings
from .errors import InvalidRequestError
from .hashing import hash_u32
from .loader import LoadedModel, load_model
from .model_runner import ModelRunner
from .policies import Policy, make_policy
from .ring import RingStore, check_ring_settings
from .sampling import Sampler, SamplingBatch, SamplingParams, SamplingRow
from .scheduler import Scheduler, SchedulerOutput
from .sequence import Sequence
from .tokenizer import IncrementalDetokenizer, validate_messages

logger = logging.getLogger(__name__)

Prompt = str | list[int] | list[dict]  # text, token ids, or chat messages


@dataclass
class RequestOutput:
    """A request's state after a step: cumulative (all text and tokens so far), not a delta."""

    request_id: str
    prompt: str | None
    text: str
    token_ids: list[int]
    finished: bool
    finish_reason: str | None  # "stop", "length", "abort" or "error"
    num_prompt_tokens: int
    num_generated_tokens: int
    num_evicted_tokens: int  # tokens no longer in the ring (the same count in every layer and head)
    logprobs: list[float] | None = None
    top_logprobs: list[dict[int, float]] | None = None
    prompt_logprobs: list[float] | None = None
    error: str | None = None  # what went wrong, when finish_reason is "error"


@dataclass
class _Sampled:
    """One sampled token, with its logprobs when the request asked for them."""

    token: int
    logprob: float | None = None
    top: dict[int, float] | None = None


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
    ):
        check_engine_settings(budget=budget, chunk=chunk, n_sink=n_sink, window=window, max_num_seqs=max_num_seqs,
                              max_num_batched_tokens=max_num_batched_tokens, max_model_len=max_model_len, seed=seed,
                              policy_options=policy_options)
        self.policy = make_policy(policy, n_sink=n_sink, window=window, **(policy_options or {}))
        loaded = model if isinstance(model, LoadedModel) else load_model(model, device=device, dtype=dtype)
        self.model, self.config, self.tokenizer = loaded.model, loaded.config, loaded.tokenizer
        self.device = next(self.model.parameters()).device
        self.max_model_len = max_model_len or self.config.max_position_embeddings
        self.budget = self._check_budget(budget, chunk)
        self.chunk = chunk
        self.seed = seed
        # Room for every running decode plus one whole prefill chunk: prompts are then always cut at
        # multiples of `chunk`, whatever else runs (see minikv.scheduler).
        self.max_num_batched_tokens = max_num_batched_tokens or chunk + max_num_seqs
        # CUDA graphs for the decode step, as nano-vllm; `enforce_eager` (or a CPU device) runs eagerly.
        use_graphs = self.device.type == "cuda" and not enforce_eager
        self.store = RingStore(self.config, max_num_seqs, self.budget, dtype=next(self.model.parameters()).dtype,
                               device=self.device, edges_per_slot=self.policy.top_m, scratch_ring=use_graphs)
        self.scheduler = Scheduler(self.store, max_num_batched_tokens=self.max_num_batched_tokens, chunk=chunk)
        self.attention = RingAttention(self.store, self.policy, scale=self.config.head_dim**-0.5, seed=seed)
        self.runner = ModelRunner(self.model, self.attention, self.device, max_num_seqs=max_num_seqs,
                                  use_cuda_graphs=use_graphs)
        self.sampler = Sampler()
        self._requests: dict[str, _Request] = {}  # every request not yet reported finished
        self._finished_unreported: list[_Request] = []  # finished outside a forward pass (abort, error)
        self._undelivered: dict[str, RequestOutput] = {}  # latest output a caller has not seen yet
        self._claimed: set[str] = set()  # requests whose outputs go to `generate` or a stream, not `step`
        self._ids = itertools.count()
        self._seeds = itertools.count()

    def _check_budget(self, budget: int, chunk: int) -> int:
        if not self.policy.evicts:
            budget = self.max_model_len  # `full`: the ring holds the whole context
        check_ring_settings(budget, chunk, self.policy.n_sink, self.policy.window)
        self.policy.check_budget(budget, chunk)
        return budget

    # --- requests --------------------------------------------------------------------------------
    def add_request(self, prompt: Prompt, params: SamplingParams | None = None, request_id: str | None = None,
                    *, prompt_logprobs: bool = False) -> str:
        """Queue one request and return its id; a bad request raises InvalidRequestError and changes nothing."""
        params = self._check_params(params)
        request_id = self._check_request_id(request_id)
        prompt_ids, prompt_text = self._encode(prompt)
        total = len(prompt_ids) + params.max_tokens
        if total > self.max_model_len:
            raise InvalidRequestError(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) = {total} exceeds "
                f"max_model_len ({self.max_model_len}); shorten the prompt or lower max_tokens")
        # Without its own seed a request draws from the engine's: same engine seed, same order -> same samples.
        seed = params.seed if params.seed is not None else int(hash_u32(torch.tensor(self.seed), torch.tensor(next(self._seeds))))
        eos = frozenset() if params.ignore_eos else frozenset(self.tokenizer.eos_token_ids)
        seq = Sequence(request_id, prompt_ids, params, seed, eos, want_prompt_logprobs=prompt_logprobs)
        self._requests[request_id] = _Request(seq, prompt_text, self.tokenizer)
        self.scheduler.add(seq)
        return request_id

    def _check_params(self, params: SamplingParams | None) -> SamplingParams:
        if params is None:
            return SamplingParams()
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError(f"params must be a SamplingParams, got {type(params).__name__}")
        # A private copy, validated again by its __post_init__: the caller may have changed fields since
        # construction, and may change them again while the request runs.
        params = dataclasses.replace(params)
        out_of_vocab = [t for t in params.stop_token_ids if t >= self.config.vocab_size]
        if out_of_vocab:
            raise InvalidRequestError(f"stop_token_ids {out_of_vocab[:5]} are outside the vocabulary "
                                      f"[0, {self.config.vocab_size})")
        return params

    def _check_request_id(self, request_id: str | None) -> str:
        if request_id is None:
            request_id = str(next(self._ids))
            while self._id_in_use(request_id):  # a caller may have picked an id like ours
                request_id = str(next(self._ids))
            return request_id
        if not isinstance(request_id, str) or not request_id:
            raise InvalidRequestError(f"request_id must be a non-empty string, got {request_id!r}")
        if self._id_in_use(request_id):
            raise InvalidRequestError(f"request id {request_id!r} is already in use; pick another or leave it "
                                      "to the engine")
        return request_id

    def _id_in_use(self, request_id: str) -> bool:
        return request_id in self._requests or request_id in self._undelivered

    def _encode(self, prompt: Prompt) -> tuple[list[int], str | None]:
        if isinstance(prompt, str):
            _check_unicode(prompt, "the prompt")
            ids, text = (self.tokenizer.encode(prompt) if prompt else []), prompt
        elif _is_chat(prompt):
            validate_messages(prompt)
            text = self.tokenizer.apply_chat_template(prompt, add_generation_prompt=True)
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
        """Stop a request wherever it is (waiting, prefilling, decoding); its ring is free at once.

        Its final output (finish_reason "abort") comes with the next step. Unknown or finished ids are ignored.
        """
        req = self._requests.get(request_id)
        if req is not None and not req.seq.is_finished:
            self.scheduler.finish(req.seq, "abort")
            self._finished_unreported.append(req)

    def has_unfinished_requests(self) -> bool:
        """True while `step` has something to do or to report."""
        return self._has_work() or any(rid not in self._claimed for rid in self._undelivered)

    def _has_work(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._finished_unreported)

    @property
    def num_requests(self) -> int:
        """Requests in the engine, waiting or running."""
        return self.scheduler.num_waiting + self.scheduler.num_running

    # --- the loop --------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one scheduled forward pass; the outputs of the requests that advanced or finished since the
        last call (each finished request is reported exactly once, then forgotten)."""
        outputs = {rid: out for rid, out in self._undelivered.items() if rid not in self._claimed}
        for rid in outputs:
            del self._undelivered[rid]
        for out in self._step():
            if out.request_id in self._claimed:
                self._undelivered[out.request_id] = out
            else:
                outputs[out.request_id] = out
        return list(outputs.values())

    def _step(self) -> list[RequestOutput]:
        touched = {req.seq.request_id: req for req in self._finished_unreported}
        self._finished_unreported.clear()
        sched = self.scheduler.schedule()
        for seq in _scheduled_seqs(sched):
            touched[seq.request_id] = self._requests[seq.request_id]
        if not sched.is_empty:
            self._run(sched)
        outputs = [self._output(req) for req in touched.values()]
        for out in outputs:
            if out.finished:
                del self._requests[out.request_id]
        return outputs

    def _run(self, sched: SchedulerOutput) -> None:
        try:
            result = self.runner.run(sched)
        except Exception as err:
            # The forward pass may have written part of these rings: none of its sequences can go on.
            for seq in _scheduled_seqs(sched):
                self._fail(seq, err)
            return
        for seq, sampled in zip(result.seqs, self._sample(result.seqs, result.logits)):
            try:
                if isinstance(sampled, Exception):
                    raise sampled
                self._append_token(seq, sampled)
            except Exception as err:
                self._fail(seq, err)

    def _fail(self, seq: Sequence, err: Exception) -> None:
        """Finish one request with finish_reason "error" (its ring is freed); the engine serves on."""
        logger.error("request %s failed", seq.request_id, exc_info=err)
        if not seq.is_finished:
            seq.error = f"{type(err).__name__}: {err}"
            self.scheduler.finish(seq, "error")

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> list[_Sampled | Exception]:
        if not seqs:  # a step of prefill chunks that all end mid-prompt samples nothing
            return []
        try:
            return self._sample_rows(seqs, logits)
        except Exception as err:
            if len(seqs) == 1:
                return [err]
        # One request broke the batch: sample row by row, so that only that request fails.
        return [self._sample_alone(seq, logits[i: i + 1]) for i, seq in enumerate(seqs)]

    def _sample_alone(self, seq: Sequence, logits: torch.Tensor) -> _Sampled | Exception:
        try:
            return self._sample_rows([seq], logits)[0]
        except Exception as err:
            return err

    def _sample_rows(self, seqs: list[Sequence], logits: torch.Tensor) -> list[_Sampled]:
        rows = [SamplingRow(s.params, s.prompt_ids, s.output_ids, s.seed, tuple(s.eos_ids)) for s in seqs]
        out = self.sampler(logits, SamplingBatch.from_rows(rows, device=logits.device))
        tokens = out.token_ids.tolist()  # the one host sync of the step
        if all(s.params.logprobs is None for s in seqs):
            return [_Sampled(t) for t in tokens]
        chosen = out.logprobs.tolist()
        top_ids = out.top_token_ids.tolist() if out.top_token_ids is not None else None
        top_vals = out.top_logprobs.tolist() if out.top_logprobs is not None else None
        sampled = []
        for i, (seq, token) in enumerate(zip(seqs, tokens)):
            n = seq.params.logprobs
            if n is None:
                sampled.append(_Sampled(token))
                continue
            top = dict(zip(top_ids[i][:n], top_vals[i][:n])) if n else {}
            top.setdefault(token, chosen[i])  # as in vLLM: the top n, plus the chosen token
            sampled.append(_Sampled(token, chosen[i], top))
        return sampled

    def _append_token(self, seq: Sequence, sampled: _Sampled) -> None:
        seq.output_ids.append(sampled.token)
        if sampled.logprob is not None:
            seq.output_logprobs.append(sampled.logprob)
            seq.output_top_logprobs.append(sampled.top)
        req = self._requests[seq.request_id]
        req.push_text(sampled.token)
        reason = self._stop_reason(seq, req, sampled.token)
        if reason is not None:
            self.scheduler.finish(seq, reason)

    @staticmethod
    def _stop_reason(seq: Sequence, req: "_Request", token: int) -> str | None:
        params = seq.params
        generated = len(seq.output_ids)
        if generated >= params.min_tokens:
            if token in seq.eos_ids or token in params.stop_token_ids:
                return "stop"
            if params.stop and req.match_stop_string():
                return "stop"
        elif params.stop:
            req.skip_stop_strings()  # as vLLM: a stop string produced before min_tokens is ignored for good
        return "length" if generated >= params.max_tokens else None

    def _output(self, req: "_Request") -> RequestOutput:
        seq = req.seq
        return RequestOutput(
            request_id=seq.request_id, prompt=req.prompt_text, text=req.visible_text(), token_ids=list(seq.output_ids),
            finished=seq.is_finished, finish_reason=seq.finish_reason, num_prompt_tokens=len(seq.prompt_ids),
            num_generated_tokens=len(seq.output_ids), num_evicted_tokens=max(0, seq.num_processed - self.budget),
            logprobs=list(seq.output_logprobs) if seq.params.logprobs is not None else None,
            top_logprobs=list(seq.output_top_logprobs) if seq.params.logprobs is not None else None,
            prompt_logprobs=list(seq.prompt_logprobs) if seq.want_prompt_logprobs else None,
            error=seq.error)

    # --- conveniences ----------------------------------------------------------------------------
    def generate(self, prompts: Prompt | Iterable[Prompt], params: SamplingParams | list[SamplingParams] | None = None,
                 *, use_tqdm: bool = True) -> list[RequestOutput]:
        """Run a batch to completion; outputs in the order of `prompts`.

        A bad prompt or parameter raises InvalidRequestError naming the prompt's index before anything
        runs. Requests queued with add_request keep running alongside; their outputs wait for `step`.
        """
        prompts = _as_prompt_list(prompts)
        params_list = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise InvalidRequestError(f"got {len(params_list)} SamplingParams for {len(prompts)} prompts")
        ids = self._add_all(prompts, params_list)
        final: dict[str, RequestOutput] = {}
        try:
            with _progress(len(ids), use_tqdm) as bar:
                for out in self._outputs_of(ids):
                    if out.finished:
                        final[out.request_id] = out
                        bar.update(1)
        finally:  # interrupted (Ctrl-C, an exception): leave nothing of this batch behind
            for rid in ids:
                if rid not in final:
                    self._discard(rid)
            self._claimed.difference_update(ids)
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
        self._claimed.update(ids)
        return ids

    def _outputs_of(self, request_ids: Iterable[str]) -> Iterator[RequestOutput]:
        """Step the engine, yielding the outputs of `request_ids` until each has finished; outputs of other
        requests are kept for whoever owns them."""
        pending = set(request_ids)
        while pending:
            outs = [self._undelivered.pop(rid) for rid in list(pending) if rid in self._undelivered]
            if not outs:
                if not self._has_work():
                    raise RuntimeError(f"requests {sorted(pending)} ended without a final output (a minikv bug)")
                for out in self._step():
                    if out.request_id in pending:
                        outs.append(out)
                    else:
                        self._undelivered[out.request_id] = out
            for out in outs:
                if out.finished:
                    pending.discard(out.request_id)
                yield out

    def _discard(self, request_id: str) -> None:
        """Abort a request and forget it: no output of it will be delivered."""
        req = self._requests.pop(request_id, None)
        if req is not None:
            if not req.seq.is_finished:
                self.scheduler.finish(req.seq, "abort")
            if req in self._finished_unreported:
                self._finished_unreported.remove(req)
        self._undelivered.pop(request_id, None)
        self._claimed.discard(request_id)

    def stream(self, prompt: Prompt, params: SamplingParams | None = None,
               request_id: str | None = None) -> "RequestStream":
        """Add a request and iterate over its text deltas as tokens arrive (other requests keep running).

        Bad input raises here, not at the first `next`. Stopping early (break, close(), dropping the
        iterator) aborts the request and frees its ring.
        """
        request_id = self.add_request(prompt, params, request_id)
        return RequestStream(self, request_id)


class RequestStream:
    """One request's text, delta by delta. After the last delta, `output` holds its final RequestOutput."""

    def __init__(self, engine: Engine, request_id: str):
        self.engine, self.request_id = engine, request_id
        self.output: RequestOutput | None = None
        self._request = engine._requests[request_id]
        self._sent = 0  # characters already yielded
        self._closed = False
        engine._claimed.add(request_id)
        self._outputs = engine._outputs_of([request_id])

    def __iter__(self) -> "RequestStream":
        return self

    def __next__(self) -> str:
        while not self._closed:
            out = next(self._outputs)
            # Mid-stream, hold back what may still change: a possible stop string, a broken UTF-8 tail.
            text = out.text if out.finished else self._request.stable_text()
            if out.finished:
                self.output = out
                self.close()
            if len(text) > self._sent:
                delta, self._sent = text[self._sent:], len(text)
                return delta
        raise StopIteration

    def close(self) -> None:
        """Stop following the request; if it has not finished, abort it."""
        if self._closed:
            return
        self._closed = True
        self._outputs.close()
        if self.output is None:
            self.engine._discard(self.request_id)
        self.engine._claimed.discard(self.request_id)

    def __enter__(self) -> "RequestStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # during interpreter shutdown the engine may be half torn down
            pass


class _Request:
    """Engine-side bookkeeping of one request: its text, detokenised as tokens arrive, and stop strings."""

    def __init__(self, seq: Sequence, prompt_text: str | None, tokenizer):
        self.seq, self.prompt_text = seq, prompt_text
        self.detokenizer = IncrementalDetokenizer(tokenizer, seq.prompt_ids[-IncrementalDetokenizer.CONTEXT_TOKENS:],
                                                  skip_special_tokens=seq.params.skip_special_tokens)
        self.stop_checked = 0  # characters of the text already searched for stop strings
        self.text_end: int | None = None  # where the visible text ends, once a stop string matched

    @property
    def text(self) -> str:
        """The text so far; the detokeniser holds back an incomplete UTF-8 character until it completes."""
        if self.seq.is_finished:
            self.detokenizer.flush()  # nothing more will come: show what is held back
        return self.detokenizer.text

    def push_text(self, token: int) -> None:
        self.detokenizer.push(token)

    def skip_stop_strings(self) -> None:
        """Mark the text so far as searched: no stop string that ends in it will ever match."""
        self.stop_checked = len(self.text)

    def match_stop_string(self) -> bool:
        """Find the earliest stop string that ends in the new text; if found, set how much of the text to trim."""
        params, text = self.seq.params, self.text
        # Each stop string is searched from len(stop) - 1 characters before the new text: one across the seam
        # is found, one wholly in the old text (skipped under min_tokens) is not.
        found = [(at, stop) for stop in params.stop
                 if (at := text.find(stop, max(0, self.stop_checked - len(stop) + 1))) >= 0]
        self.stop_checked = len(text)
        if not found:
            return False
        at, stop = min(found)
        self.text_end = at + len(stop) if params.include_stop_str_in_output else at
        return True

    def visible_text(self) -> str:
        return self.text[: self.text_end]

    def stable_text(self) -> str:
        """Text safe to show mid-stream: hold back what could be the start of a stop string."""
        text = self.text
        hold = max((len(s) - 1 for s in self.seq.params.stop), default=0)
        return text[: len(text) - hold] if hold else text


def _scheduled_seqs(sched: SchedulerOutput) -> list[Sequence]:
    return [*sched.decodes, *(chunk.seq for chunk in sched.prefills)]


def _is_chat(prompt: object) -> bool:
    return isinstance(prompt, list) and bool(prompt) and all(isinstance(m, dict) for m in prompt)


def _is_token_ids(prompt: object) -> bool:
    return (isinstance(prompt, (list, tuple)) and bool(prompt)
            and all(isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in prompt))


def _as_prompt_list(prompts: Prompt | Iterable[Prompt]) -> list[Prompt]:
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

"""The engine: requests in, tokens out, many sequences at once, each in its own bounded ring.

    engine = Engine("path/or/repo", budget=4096, policy="nexus")
    outputs = engine.generate(["Hello", "Tell me a story"], SamplingParams(max_tokens=64))

`add_request` / `step` / `abort` drive it from a caller's loop; `stream` yields one request's text as it
grows. The engine decides what runs (Scheduler) and the model runner executes it (ModelRunner).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence as SequenceABC
from dataclasses import dataclass

import torch

from .attention import RingAttention
from .hashing import hash_u32
from .errors import ConfigError, InvalidRequestError
from .loader import LoadedModel, load_model
from .model_runner import ModelRunner
from .policies import Policy, make_policy
from .ring import RingStore, check_ring_settings
from .sampling import Sampler, SamplingBatch, SamplingParams, SamplingRow
from .scheduler import Scheduler
from .sequence import Sequence, SequenceStatus

Prompt = str | list[int] | list[dict]  # text, token ids, or chat messages


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    text: str
    token_ids: list[int]
    finished: bool
    finish_reason: str | None  # "stop", "length" or "abort"
    num_prompt_tokens: int
    num_generated_tokens: int
    num_evicted_tokens: int  # tokens no longer in the ring (summed over nothing: per layer and head alike)
    logprobs: list[float] | None = None
    top_logprobs: list[dict[int, float]] | None = None
    prompt_logprobs: list[float] | None = None


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
    ):
        self.policy = make_policy(policy, n_sink=n_sink, window=window, **(policy_options or {}))
        loaded = model if isinstance(model, LoadedModel) else load_model(model, device=device, dtype=dtype)
        self.model, self.config, self.tokenizer = loaded.model, loaded.config, loaded.tokenizer
        self.device = next(self.model.parameters()).device
        self.max_model_len = max_model_len or self.config.max_position_embeddings
        self.budget = self._check_budget(budget, chunk)
        self.chunk = chunk
        self.seed = seed
        self.max_num_batched_tokens = max_num_batched_tokens or max(chunk, max_num_seqs)
        if self.max_num_batched_tokens < max_num_seqs:
            raise ConfigError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_num_seqs "
                              f"({max_num_seqs}) so every running sequence can decode each step")
        self.store = RingStore(self.config, max_num_seqs, self.budget, dtype=next(self.model.parameters()).dtype,
                               device=self.device, edges_per_slot=self.policy.top_m)
        self.attention = RingAttention(self.store, self.policy, scale=self.config.head_dim**-0.5, seed=seed)
        self.runner = ModelRunner(self.model, self.attention, self.device)
        self.scheduler = Scheduler(self.store, max_num_batched_tokens=self.max_num_batched_tokens, chunk=chunk)
        self.sampler = Sampler()
        self._requests: dict[str, _Request] = {}
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
        """Queue one request; a bad request raises InvalidRequestError and leaves the engine untouched."""
        params = params or SamplingParams()
        request_id = request_id if request_id is not None else str(next(self._ids))
        if request_id in self._requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
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

    def _encode(self, prompt: Prompt) -> tuple[list[int], str | None]:
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("the prompt is empty; give at least one character")
            return self.tokenizer.encode(prompt), prompt
        if isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
            text = self.tokenizer.apply_chat_template(prompt, add_generation_prompt=True)
            return self.tokenizer.encode(text, add_special_tokens=False), text
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            bad = [t for t in prompt if not 0 <= t < self.config.vocab_size]
            if bad:
                raise InvalidRequestError(f"token ids {bad[:5]} are outside the vocabulary [0, {self.config.vocab_size})")
            return list(prompt), None
        raise InvalidRequestError("a prompt is a non-empty string, a non-empty list of token ids, "
                                  "or a non-empty list of chat messages ({'role': ..., 'content': ...})")

    def abort(self, request_id: str) -> None:
        """Stop a request wherever it is (waiting, prefilling, decoding); its ring is free at once."""
        req = self._requests.get(request_id)
        if req is not None and not req.seq.is_finished:
            self.scheduler.finish(req.seq, "abort")

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # --- the loop --------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one scheduled forward pass; outputs of the requests that advanced or finished in it."""
        aborted = [r for r in self._requests.values() if r.seq.finish_reason == "abort" and not r.reported]
        sched = self.scheduler.schedule()
        touched = {c.seq.request_id for c in sched.prefills}
        if not sched.is_empty:
            result = self.runner.run(sched)
            # A step of mid-prompt chunks only has no row to sample.
            tokens = self._sample(result.seqs, result.logits) if result.seqs else []
            for seq, token in zip(result.seqs, tokens):
                self._append_token(seq, token)
                touched.add(seq.request_id)
        outputs = [self._output(self._requests[rid]) for rid in touched]
        outputs += [self._output(r) for r in aborted]
        for out in outputs:
            if out.finished:
                self._requests[out.request_id].reported = True
        return outputs

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> list[int]:
        rows = [SamplingRow(s.params, s.prompt_ids, s.output_ids, s.seed, s.eos_ids) for s in seqs]
        out = self.sampler(logits, SamplingBatch.from_rows(rows, device=logits.device))
        tokens = out.token_ids.tolist()  # the one host sync of the step
        if out.top_logprobs is not None or any(s.params.logprobs is not None for s in seqs):
            self._record_logprobs(seqs, tokens, out)
        return tokens

    @staticmethod
    def _record_logprobs(seqs, tokens, out) -> None:
        chosen = out.logprobs.tolist()
        top_ids = out.top_token_ids.tolist() if out.top_token_ids is not None else None
        top_vals = out.top_logprobs.tolist() if out.top_logprobs is not None else None
        for i, seq in enumerate(seqs):
            n = seq.params.logprobs
            if n is None:
                continue
            seq.output_logprobs.append(chosen[i])
            top = dict(zip(top_ids[i][:n], top_vals[i][:n])) if n and top_ids is not None else {}
            top[tokens[i]] = chosen[i]
            seq.output_top_logprobs.append(top)

    def _append_token(self, seq: Sequence, token: int) -> None:
        seq.output_ids.append(token)
        req = self._requests[seq.request_id]
        req.update_text()
        p = seq.params
        if len(seq.output_ids) >= p.min_tokens:
            if token in seq.eos_ids or token in p.stop_token_ids:
                return self.scheduler.finish(seq, "stop")
            if req.match_stop_string():
                return self.scheduler.finish(seq, "stop")
        if len(seq.output_ids) >= p.max_tokens:
            self.scheduler.finish(seq, "length")

    def _output(self, req: "_Request") -> RequestOutput:
        seq = req.seq
        return RequestOutput(
            request_id=seq.request_id, prompt=req.prompt_text, text=req.visible_text(), token_ids=list(seq.output_ids),
            finished=seq.is_finished, finish_reason=seq.finish_reason, num_prompt_tokens=len(seq.prompt_ids),
            num_generated_tokens=len(seq.output_ids), num_evicted_tokens=max(0, seq.num_processed - self.budget),
            logprobs=list(seq.output_logprobs) if seq.params.logprobs is not None else None,
            top_logprobs=list(seq.output_top_logprobs) if seq.params.logprobs is not None else None,
            prompt_logprobs=list(seq.prompt_logprobs) if seq.want_prompt_logprobs else None)

    # --- conveniences ----------------------------------------------------------------------------
    def generate(self, prompts: Prompt | Iterable[Prompt], params: SamplingParams | list[SamplingParams] | None = None,
                 *, use_tqdm: bool = True) -> list[RequestOutput]:
        """Run a batch to completion; outputs in the order of `prompts`."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], (int, dict))):
            prompts = [prompts]
        prompts = list(prompts)
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise InvalidRequestError(f"got {len(params_list)} SamplingParams for {len(prompts)} prompts")
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, params_list)]
        final: dict[str, RequestOutput] = {}
        bar = _progress(len(ids), use_tqdm)
        while len(final) < len(ids) and self.has_unfinished_requests():
            for out in self.step():
                if out.finished and out.request_id in ids and out.request_id not in final:
                    final[out.request_id] = out
                    bar.update(1)
        bar.close()
        for rid in ids:
            self._requests.pop(rid, None)
        return [final[rid] for rid in ids]

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[str]:
        """Yield the request's text deltas as tokens arrive (other requests in the engine keep running)."""
        rid = self.add_request(prompt, params)
        sent = 0
        try:
            while True:
                done = False
                for out in self.step():
                    if out.request_id != rid:
                        continue
                    text = out.text if out.finished else self._requests[rid].stable_text()
                    if len(text) > sent:
                        yield text[sent:]
                        sent = len(text)
                    done = out.finished
                if done or not self.has_unfinished_requests():
                    return
        finally:
            self.abort(rid)
            self._requests.pop(rid, None)


class _Request:
    """Engine-side bookkeeping of one request: detokenised text and stop strings."""

    def __init__(self, seq: Sequence, prompt_text: str | None, tokenizer):
        self.seq, self.prompt_text, self.tokenizer = seq, prompt_text, tokenizer
        self.text = ""
        self.reported = False

    def update_text(self) -> None:
        self.text = self.tokenizer.decode(self.seq.output_ids, skip_special_tokens=self.seq.params.skip_special_tokens)

    def match_stop_string(self) -> bool:
        for stop in self.seq.params.stop:
            at = self.text.find(stop)
            if at >= 0:
                end = at + len(stop) if self.seq.params.include_stop_str_in_output else at
                self.seq.stop_trim = len(self.text) - end
                return True
        return False

    def visible_text(self) -> str:
        return self.text[: len(self.text) - self.seq.stop_trim] if self.seq.stop_trim else self.text

    def stable_text(self) -> str:
        """Text safe to show mid-stream: hold back a possible stop-string prefix and a broken UTF-8 tail."""
        text = self.text.rstrip("\ufffd")
        hold = max((len(s) - 1 for s in self.seq.params.stop), default=0)
        return text[: len(text) - hold] if hold else text


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc="generate", unit="req", disable=not enabled or total < 2)

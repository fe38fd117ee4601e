"""Decode-phase tasks: does a bounded cache hold up while tokens arrive one decode step at a time?

The prefill tasks (minikv.eval.tasks) read a long prompt and answer at once; here most of the context goes
through the *decode* path, each token one step, so the policy evicts at every step. The tokens are
teacher-forced (``SamplingParams.forced_token_ids``), so every config sees exactly the same text:

- ``decode_fidelity``: a prose prompt of P tokens, then G tokens forced: the `full` cache's own greedy
  continuation of it (the *reference*). Per step, the model's next-token distribution under the policy is
  compared with the reference's: KL(full ‖ policy), top-1 agreement, and the NLL of the forced token.
- ``needle_after_gen``: a chat whose user message (P tokens) hides a 7-digit "special magic number"; then
  about G forced tokens of unrelated prose as the assistant's reply, the end of that turn and a new user
  turn asking for the number; then up to ANSWER_TOKENS free greedy tokens, scored by exact match.
- ``multiturn``: the first user turn (P tokens) states such a fact; MULTITURN_TURNS long turns follow (user
  messages quoting prose, assistant replies of prose), all forced, about G tokens in all; the last user turn
  asks for the fact; free answer, exact match.

The reference continuation is greedy with a no-repeat-NO_REPEAT_NGRAM-gram rule (a token that would
repeat a 4-gram of the prompt or continuation is banned, as are the end-of-sequence ids): a small model's
plain greedy text falls into loops within a few hundred tokens, and a loop would make agreement trivially
high. The reference is computed once per sample and cached in a file next to the results (``reference_path``).

KL is estimated from the reference's top-K (REFERENCE_TOP_K) tokens: with p the reference and q the policy,

    KL ≈ Σ_{v in top-K} p_v (log p_v − log q_v) + p_tail (log p_tail − log q_tail),

where the tail lumps all other tokens into one outcome (p_tail = 1 − Σ_top p_v, the same for q). This is the
exact KL of the two distributions coarsened to K + 1 outcomes, so by the data-processing inequality it is a
lower bound of the exact KL; with K = 256 it misses only what the reference puts outside its top 256.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from minikv.errors import ConfigError
from minikv.eval.haystack import HaystackStream, fit_length, insert_at_depths
from minikv.eval.stats import summarize
from minikv.eval.tasks import _keys, _needle, _number, count_occurrences

DECODE_TASKS = ("decode_fidelity", "needle_after_gen", "multiturn")
REFERENCE_TOP_K = 256
NO_REPEAT_NGRAM = 4
ANSWER_TOKENS = 24  # free tokens after the question: "The special magic number for x-y is 1234567."
MULTITURN_TURNS = 4
MIN_PROMPT_TOKENS = 64
MIN_GEN_TOKENS = 32
# Where the first forced token starts in a rendered conversation: split there into prompt and forced ids.
_FORCED_MARK = "\u2063minikv-forced\u2063"


def is_decode_task(name: str) -> bool:
    return name in DECODE_TASKS


@dataclass(frozen=True)
class DecodeSample:
    """One decode-phase instance: what is prefilled, what is forced through decode, and what is asked.

    ``forced_ids`` is empty for ``decode_fidelity`` until the reference fills it in (``with_reference``);
    ``answers`` are matched against the free answer (empty for decode_fidelity, which has none).
    """

    task: str
    seed: int
    prompt_ids: list[int]
    forced_ids: list[int]
    answers: list[str]

    @property
    def answer_tokens(self) -> int:
        return ANSWER_TOKENS if self.answers else 0


def check_lengths(prompt_tokens: int, gen_tokens: int) -> None:
    if not isinstance(prompt_tokens, int) or prompt_tokens < MIN_PROMPT_TOKENS:
        raise ConfigError(f"--decode-prompt {prompt_tokens} is too short; use at least {MIN_PROMPT_TOKENS} tokens")
    if not isinstance(gen_tokens, int) or gen_tokens < MIN_GEN_TOKENS:
        raise ConfigError(f"--decode-gen {gen_tokens} is too short; use at least {MIN_GEN_TOKENS} tokens")


def context_tokens(prompt_tokens: int, gen_tokens: int) -> int:
    """The context a budget fraction refers to: prompt + forced tokens (the answer's few tokens left out)."""
    return prompt_tokens + gen_tokens


# --- text and token pieces ---------------------------------------------------------------------------


def prose_ids(tokenizer, num_tokens: int, seed: int) -> list[int]:
    """Exactly ``num_tokens`` tokens of the prose haystack, from a seeded sentence start (no special tokens)."""
    stream, words = HaystackStream("prose", seed), num_tokens
    while True:
        ids = tokenizer.encode(stream.text(words), add_special_tokens=False)
        if len(ids) >= num_tokens:
            return ids[:num_tokens]
        words *= 2


def prose(tokenizer, num_tokens: int, seed: int) -> str:
    """About ``num_tokens`` tokens of prose as text (the cut may fall inside a word)."""
    return tokenizer.decode(prose_ids(tokenizer, num_tokens, seed)).strip()


def split_conversation(tokenizer, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """Token ids of a chat up to the first assistant message's content (the prompt), and of the rest up to
    the final assistant header (the forced part), through the model's chat template."""
    first = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
    marked = [dict(m) for m in messages]
    marked[first]["content"] = _FORCED_MARK + marked[first]["content"]
    text = tokenizer.apply_chat_template(marked, add_generation_prompt=True)
    prompt, forced = text.split(_FORCED_MARK)
    return tokenizer.encode(prompt, add_special_tokens=False), tokenizer.encode(forced, add_special_tokens=False)


def _fact(seed: int, task: str) -> tuple[str, str, str]:
    """(key, value, the needle sentence) of a sample, drawn from its own seeded generator."""
    rng = random.Random(f"minikv-eval:{task}:{seed}")
    key, value = _keys(rng, 1)[0], _number(rng, 7)
    return key, value, _needle(key, value)


def _question(key: str) -> str:
    return (f"What is the special magic number for {key} that I gave you in my first message? "
            f"The special magic number for {key} is")


def _fit_first_turn(tokenizer, build_user: Callable[[int], str], rest: list[dict[str, str]],
                    prompt_tokens: int) -> list[dict[str, str]]:
    """The conversation ``[user] + rest`` whose prompt (the first user message ``build_user(words)`` in the
    chat template, up to the assistant's first token) is about ``prompt_tokens`` tokens."""
    def prompt_length(user_text: str) -> int:
        return len(split_conversation(tokenizer, [{"role": "user", "content": user_text}] + rest)[0])

    fixed = prompt_length(build_user(0))
    if fixed > prompt_tokens:
        raise ConfigError(f"--decode-prompt {prompt_tokens} is too short: the first turn's instructions and fact "
                          f"alone take {fixed} tokens with this tokenizer; use a longer --decode-prompt")
    user_text, _, _ = fit_length(build_user, prompt_length, prompt_tokens, max_units=prompt_tokens)
    return [{"role": "user", "content": user_text}] + rest


# --- the three tasks ---------------------------------------------------------------------------------


def fidelity_sample(tokenizer, prompt_tokens: int, seed: int) -> DecodeSample:
    """P tokens of prose; the forced continuation comes from the reference (``with_reference``)."""
    return DecodeSample("decode_fidelity", seed, prose_ids(tokenizer, prompt_tokens, seed), [], [])


def needle_after_gen_sample(tokenizer, prompt_tokens: int, gen_tokens: int, seed: int) -> DecodeSample:
    key, value, needle = _fact(seed, "needle_after_gen")
    depth = random.Random(f"minikv-eval:needle_after_gen:depth:{seed}").random()
    stream = HaystackStream("prose", seed)

    def user(words: int) -> str:
        filler = insert_at_depths(stream.text(words), [(depth, needle)])
        return (f"A text follows with a special magic number hidden in it; memorize it, I will ask for it later."
                f"\n\n{filler}\n\nNow write a long essay on another subject.")

    rest = [{"role": "assistant", "content": prose(tokenizer, gen_tokens, seed + 7919)},
            {"role": "user", "content": _question(key)}]
    prompt_ids, forced_ids = split_conversation(tokenizer, _fit_first_turn(tokenizer, user, rest, prompt_tokens))
    return DecodeSample("needle_after_gen", seed, prompt_ids, forced_ids, [value])


def multiturn_sample(tokenizer, prompt_tokens: int, gen_tokens: int, seed: int,
                     turns: int = MULTITURN_TURNS) -> DecodeSample:
    """Turns after the first: each assistant reply and each user message between them gets an equal share of
    ``gen_tokens`` (2 * turns - 1 pieces of prose), so the fact is about ``gen_tokens`` tokens back."""
    key, value, needle = _fact(seed, "multiturn")
    stream = HaystackStream("prose", seed)
    piece = gen_tokens // (2 * turns - 1)

    def user(words: int) -> str:
        return (f"Remember this, I will ask you about it at the end: {needle} Here is a first text to read."
                f"\n\n{stream.text(words)}")

    rest: list[dict[str, str]] = []
    for turn in range(turns):
        if turn:
            rest.append({"role": "user", "content": "What do you make of this passage?\n\n"
                                                    + prose(tokenizer, piece, seed + 104729 * turn)})
        rest.append({"role": "assistant", "content": prose(tokenizer, piece, seed + 7919 * (turn + 1))})
    rest.append({"role": "user", "content": _question(key)})
    prompt_ids, forced_ids = split_conversation(tokenizer, _fit_first_turn(tokenizer, user, rest, prompt_tokens))
    return DecodeSample("multiturn", seed, prompt_ids, forced_ids, [value])


def generate_decode_sample(task: str, tokenizer, prompt_tokens: int, gen_tokens: int, seed: int) -> DecodeSample:
    if task == "decode_fidelity":
        return fidelity_sample(tokenizer, prompt_tokens, seed)
    if task == "needle_after_gen":
        return needle_after_gen_sample(tokenizer, prompt_tokens, gen_tokens, seed)
    if task == "multiturn":
        return multiturn_sample(tokenizer, prompt_tokens, gen_tokens, seed)
    raise ConfigError(f"unknown decode task {task!r}; known: {', '.join(DECODE_TASKS)}")


def exact_match(answers: list[str], text: str) -> float:
    """Fraction of ``answers`` found in ``text`` as whole words (RULER's string-match-all, as tasks.score)."""
    if not answers:
        raise ConfigError("a sample without answers cannot be scored by exact match")
    return sum(count_occurrences(text, answer) > 0 for answer in answers) / len(answers)


# --- recording the model's distribution at every step ------------------------------------------------


class NoRepeatNgram:
    """Logits processor: bans every token that would repeat an n-gram of prompt + output, and ``banned_ids``.

    The n-grams seen so far are indexed by their first n - 1 tokens as the output grows, so a step costs
    O(1) however long the text (one processor per request: it follows that request's output)."""

    def __init__(self, prompt_ids: list[int], n: int = NO_REPEAT_NGRAM, banned_ids: tuple[int, ...] = ()):
        self.n, self.banned_ids = n, list(banned_ids)
        self.ids: list[int] = []
        self.num_prompt = len(prompt_ids)
        self.followers: dict[tuple[int, ...], set[int]] = {}
        self._extend(list(prompt_ids))

    def _extend(self, new_ids: list[int]) -> None:
        for token in new_ids:
            self.ids.append(token)
            if len(self.ids) >= self.n:
                self.followers.setdefault(tuple(self.ids[-self.n:-1]), set()).add(token)

    def __call__(self, output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        self._extend(list(output_ids[len(self.ids) - self.num_prompt:]))
        banned = sorted(self.followers.get(tuple(self.ids[len(self.ids) - self.n + 1:]), ())) + self.banned_ids
        if banned:
            logits = logits.clone()
            logits[torch.tensor(banned, dtype=torch.long, device=logits.device)] = -math.inf
        return logits


class TopLogprobRecorder:
    """Logits processor that records, per step, the raw distribution's top-k log-probs (it changes nothing).

    Processors run on the raw logits before penalties, sampling and forcing (minikv.sampling)."""

    def __init__(self, steps: int, k: int):
        self.ids = torch.zeros(steps, k, dtype=torch.int32)
        self.logprobs = torch.zeros(steps, k, dtype=torch.float32)

    def __call__(self, output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        values, ids = torch.log_softmax(logits.float(), -1).topk(self.ids.shape[1])
        self.ids[len(output_ids)], self.logprobs[len(output_ids)] = ids.cpu(), values.cpu()
        return logits


class WatchedLogprobRecorder:
    """Logits processor that records, per step, the raw log-probs at given ids (the reference's top-k) and
    the raw argmax."""

    def __init__(self, watched_ids: torch.Tensor):
        self.watched_ids = watched_ids.long()
        self.logprobs = torch.zeros(watched_ids.shape, dtype=torch.float32)
        self.argmax = torch.zeros(watched_ids.shape[0], dtype=torch.int64)

    def __call__(self, output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        step = len(output_ids)
        if step < len(self.argmax):  # the free answer after the forced part is not compared
            logprobs = torch.log_softmax(logits.float(), -1)
            self.logprobs[step] = logprobs[self.watched_ids[step].to(logprobs.device)].cpu()
            self.argmax[step] = int(logprobs.argmax())
        return logits


# --- metrics ------------------------------------------------------------------------------------------


def step_kl(reference_logprobs: torch.Tensor, policy_logprobs: torch.Tensor) -> torch.Tensor:
    """KL(reference ‖ policy) per step from log-probs at the reference's top-k ids ([..., k] -> [...]), the
    rest of each distribution lumped into one tail outcome: a lower bound of the exact KL (module doc)."""
    log_p, log_q = reference_logprobs.double(), policy_logprobs.double()
    p = log_p.exp()
    head = (p * (log_p - log_q)).sum(-1)
    p_tail = (1 - p.sum(-1)).clamp_min(0)
    q_tail = (1 - log_q.exp().sum(-1)).clamp_min(1e-30)
    tail = torch.where(p_tail > 0, p_tail * (p_tail.clamp_min(1e-30).log() - q_tail.log()), torch.zeros_like(p_tail))
    return head + tail


def fidelity_metrics(reference_ids: torch.Tensor, reference_logprobs: torch.Tensor, policy_logprobs: torch.Tensor,
                     policy_argmax: torch.Tensor, forced_logprobs: torch.Tensor) -> dict[str, float]:
    """One sample's means over its steps: KL(full ‖ policy), top-1 agreement (policy argmax == reference
    argmax), and NLL of the forced (reference) token under the policy."""
    return {"kl": float(step_kl(reference_logprobs, policy_logprobs).mean()),
            "top1": float((policy_argmax == reference_ids[:, 0].long()).double().mean()),
            "nll": float(-forced_logprobs.double().mean())}


# --- the reference -----------------------------------------------------------------------------------


@dataclass
class FidelityReference:
    """The `full` cache's greedy continuations and its distribution at each of their steps.

    continuations: [samples][G] token ids; top_ids / top_logprobs: [samples, G, K]; nll: [samples, G], the
    NLL of each continuation token under `full`."""

    key: dict[str, Any]
    continuations: list[list[int]]
    top_ids: torch.Tensor
    top_logprobs: torch.Tensor
    nll: torch.Tensor


def reference_path(results_path: Path) -> Path:
    return results_path.with_suffix(".decode_reference.pt")


def load_or_compute_reference(path: Path, key: dict[str, Any], compute: Callable[[], FidelityReference]
                              ) -> FidelityReference:
    """The reference in ``path`` if it was made with the same ``key`` (model, seed, lengths...); else compute
    it and save it there (atomically)."""
    if path.exists():
        stored = torch.load(path, weights_only=True)
        if stored["key"] == key:
            return FidelityReference(**stored)
    reference = compute()
    tmp = path.with_suffix(path.suffix + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(vars(reference), tmp)
    tmp.replace(path)
    return reference


def compute_reference(engine, samples: list[DecodeSample], gen_tokens: int, k: int = REFERENCE_TOP_K,
                      key: dict[str, Any] | None = None) -> FidelityReference:
    """Run every sample through a `full` engine, greedy under the no-repeat rule, recording the top-k."""
    from minikv.sampling import SamplingParams

    eos = tuple(sorted(getattr(engine.tokenizer, "eos_token_ids", ()) or ()))
    recorders = [TopLogprobRecorder(gen_tokens, k) for _ in samples]
    params = [SamplingParams(temperature=0.0, max_tokens=gen_tokens, ignore_eos=True, logprobs=0,
                             logits_processors=[recorder, NoRepeatNgram(sample.prompt_ids, banned_ids=eos)])
              for sample, recorder in zip(samples, recorders)]
    outputs = engine.generate([s.prompt_ids for s in samples], params, use_tqdm=False)
    continuations = [out.outputs[0].token_ids for out in outputs]
    nll = torch.tensor([[-entry[token].logprob for token, entry in zip(out.outputs[0].token_ids, out.outputs[0].logprobs)]
                        for out in outputs], dtype=torch.float32)
    return FidelityReference(key or {}, continuations, torch.stack([r.ids for r in recorders]),
                             torch.stack([r.logprobs for r in recorders]), nll)


def with_reference(samples: list[DecodeSample], reference: FidelityReference) -> list[DecodeSample]:
    """Fidelity samples with the reference continuation as their forced tokens."""
    return [DecodeSample(s.task, s.seed, s.prompt_ids, list(c), s.answers)
            for s, c in zip(samples, reference.continuations)]


# --- one config --------------------------------------------------------------------------------------


@dataclass
class DecodeRequest:
    """What the runner keeps of one request it added: its sample and, for decode_fidelity, its recorder."""

    task: str
    index: int
    sample: DecodeSample
    recorder: WatchedLogprobRecorder | None


def decode_params(sample: DecodeSample, recorder: WatchedLogprobRecorder | None):
    """Greedy; the sample's forced tokens, then its free answer. A fidelity request records every step and
    asks for the forced tokens' logprobs (logprobs=0: the chosen token's own)."""
    from minikv.sampling import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=len(sample.forced_ids) + sample.answer_tokens,
                          forced_token_ids=sample.forced_ids, logprobs=0 if recorder else None,
                          logits_processors=[recorder] if recorder else None)


def add_decode_requests(engine, samples: dict[str, list[DecodeSample]],
                        reference: FidelityReference | None) -> dict[str, DecodeRequest]:
    """Add every sample of every task to ``engine`` (one batch); request ids are ``task/index``."""
    requests = {}
    for task, task_samples in samples.items():
        for i, sample in enumerate(task_samples):
            recorder = WatchedLogprobRecorder(reference.top_ids[i]) if task == "decode_fidelity" else None
            rid = engine.add_request(sample.prompt_ids, decode_params(sample, recorder), request_id=f"{task}/{i}")
            requests[rid] = DecodeRequest(task, i, sample, recorder)
    return requests


def decode_records(requests: dict[str, DecodeRequest], finished: dict[str, Any], reference: FidelityReference | None,
                   tokenizer) -> dict[str, dict[str, Any]]:
    """Per task, the metrics of its samples (the runner adds the config's fields)."""
    by_task: dict[str, list[tuple[DecodeRequest, Any]]] = {}
    for rid, request in requests.items():
        by_task.setdefault(request.task, []).append((request, finished[rid]))
    records = {}
    for task, pairs in by_task.items():
        pairs.sort(key=lambda pair: pair[0].index)
        if task == "decode_fidelity":
            records[task] = fidelity_record(pairs, reference)
        else:
            records[task] = answer_record(pairs, tokenizer)
    return records


def fidelity_record(pairs: list[tuple[DecodeRequest, Any]], reference: FidelityReference) -> dict[str, Any]:
    """Per-sample means of the three metrics, then their mean and bootstrap interval across samples."""
    per_sample: dict[str, list[float]] = {"kl": [], "top1": [], "nll": []}
    for request, out in pairs:
        steps, completion = len(request.sample.forced_ids), out.outputs[0]
        forced_logprobs = torch.tensor([entry[token].logprob for token, entry
                                        in zip(completion.token_ids[:steps], completion.logprobs[:steps])])
        metrics = fidelity_metrics(reference.top_ids[request.index], reference.top_logprobs[request.index],
                                   request.recorder.logprobs, request.recorder.argmax, forced_logprobs)
        for name, value in metrics.items():
            per_sample[name].append(value)
    record: dict[str, Any] = {name: summarize(values) for name, values in per_sample.items()}
    record["per_sample"] = per_sample
    record["reference_nll"] = summarize(reference.nll.double().mean(-1).tolist())
    return record


def answer_record(pairs: list[tuple[DecodeRequest, Any]], tokenizer) -> dict[str, Any]:
    """Exact-match accuracy of the free answers (the tokens after the forced part), with its interval."""
    answers = [tokenizer.decode(out.outputs[0].token_ids[len(request.sample.forced_ids):]) for request, out in pairs]
    scores = [exact_match(request.sample.answers, text) for (request, _), text in zip(pairs, answers)]
    summary = summarize(scores)
    return {"accuracy": summary["mean"], "accuracy_ci": summary["ci"], "scores": scores,
            "answers": [request.sample.answers for request, _ in pairs], "outputs": answers}

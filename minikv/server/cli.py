"""`minikv serve`: an OpenAI-compatible server (see minikv.server.app).

    minikv serve [MODEL] --host 127.0.0.1 --port 8000 --budget 1024 --max-num-seqs 8 [--session-dir DIR]
"""

from __future__ import annotations

import argparse
import sys

from ..errors import MiniKVError
from .reasoning import REASONING_PARSERS


DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..cli import add_engine_arguments, positive_int

    parser.add_argument("model", nargs="?", default=None,
                        help="model directory, .gguf file or Hugging Face repo id (default: SmolLM2-135M-Instruct)")
    add_engine_arguments(parser)
    s = parser.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
    s.add_argument("--port", type=int, default=8000, help="port to listen on (default %(default)s)")
    s.add_argument("--served-model-name", help="the name clients pass as `model` (default: MODEL as given)")
    s.add_argument("--max-waiting", type=int, default=256,
                   help="requests that may wait for a free ring; more get 503 + Retry-After (default %(default)s)")
    s.add_argument("--session-dir", help="restore parked sessions and stored /v1/responses from DIR at start and "
                   "save them there at shutdown (safetensors + JSON per session)")
    s.add_argument("--no-session-reuse", action="store_true",
                   help="chat completions never continue a parked ring (each prefills its whole prompt)")
    s.add_argument("--max-parked-sessions", type=int, default=64,
                   help="sessions whose ring stays in the KV pool between requests (default %(default)s); "
                   "admission releases them, least recently used first, whenever it needs blocks")
    s.add_argument("--max-parked-kv-memory", default=None,
                   help="cap on the KV memory parked rings hold, e.g. 1GiB (default: the pool)")
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="log level of uvicorn and of minikv's own log (engine errors with their tracebacks), both "
                        "in uvicorn's format on stderr (default %(default)s)")
    s.add_argument("--reasoning-parser", choices=sorted(REASONING_PARSERS), default=None,
                   help="move a reasoning model's <think>...</think> text out of chat answers into "
                        "reasoning_content (vLLM's names: deepseek_r1, qwen3; default: off)")
    s.add_argument("--max-body-size", type=positive_int, default=None, metavar="BYTES",
                   help="largest request body accepted; larger ones get 413 (default 16 MiB)")


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from .app import create_app
    except ImportError as err:
        raise MiniKVError(f"minikv serve needs the serve extra ({err.name} is missing): "
                          "pip install -e \".[serve]\"") from None
    from ..cli import build_engine, set_threads

    model = args.model_flag or args.model
    set_threads(args.threads)
    engine = build_engine(args, model, max_parked_sessions=args.max_parked_sessions,
                          max_parked_kv_memory=args.max_parked_kv_memory)
    name = args.served_model_name or model or DEFAULT_MODEL_NAME
    app = create_app(engine, model_name=name, max_waiting=args.max_waiting, reasoning_parser=args.reasoning_parser,
                     session_dir=args.session_dir, reuse_sessions=not args.no_session_reuse,
                     **({"max_body_bytes": args.max_body_size} if args.max_body_size else {}))
    print(f"minikv serve: {name} on http://{args.host}:{args.port} (policy {engine.policy.label}, budget "
          f"{engine.budget}, {args.max_num_seqs} sequences)", file=sys.stderr, flush=True)
    # On shutdown, open streams get 5 s to finish; then they are cancelled, which aborts their requests.
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5,
                log_config=log_config(args.log_level))
    return 0


def log_config(level: str) -> dict:
    """uvicorn's logging config with minikv's logger added: engine errors (logged with their tracebacks on the
    engine thread) reach stderr in uvicorn's format, at `level`. (The CLI otherwise gives the `minikv` logger a
    NullHandler, since `run` reports failures in one line; dictConfig replaces it here.)"""
    import copy

    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["formatters"]["minikv"] = {"()": "uvicorn.logging.DefaultFormatter",
                                      "fmt": "%(levelprefix)s %(name)s: %(message)s", "use_colors": None}
    config["handlers"]["minikv"] = {"formatter": "minikv", "class": "logging.StreamHandler",
                                    "stream": "ext://sys.stderr"}
    config["loggers"]["minikv"] = {"handlers": ["minikv"], "level": level.upper(), "propagate": False}
    return config

"""What rotating keys on load costs a CPU decode step, measured step by step in one process.

Three engines on one loaded model decode the same requests, their steps interleaved (A, B, C, A, B, C ...),
so a busy machine slows all three alike:

  no-rotation   the attention attends the stored keys as they are (what the kernels did when K was stored
                after RoPE: the same gathers and matmuls, no rotation; its tokens are not the model's);
  original      keys rotated on load to their text positions;
  ring          keys rotated on load to their ranks, which decode keeps up to date.

    PYTHONPATH=. python tools/rope_cost.py [--budget 1024] [--requests 4] [--prompt 1100] [--steps 40]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from minikv import Engine, SamplingParams
from minikv.loader import load_model


def make_engine(loaded, args, positions: str, rotate: bool) -> Engine:
    engine = Engine(loaded, budget=args.budget, policy=args.policy, max_num_seqs=args.requests, positions=positions)
    if not rotate:
        attention = engine.attention
        set_rope = attention._set_rope
        attention._set_rope = lambda inv_freq: set_rope(None)
    gen = torch.Generator().manual_seed(0)
    params = SamplingParams(max_tokens=args.steps + 5, temperature=0.0, ignore_eos=True)
    for _ in range(args.requests):
        engine.add_request(torch.randint(10, 40000, (args.prompt,), generator=gen).tolist(), params)
    while any(r.num_processed < len(r.prompt_ids) for r in engine._requests.values()):  # prefill first
        engine.step()
    return engine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=int, default=1024)
    ap.add_argument("--policy", default="nexus")
    ap.add_argument("--requests", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=1100)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model(args.model, device="cpu", dtype=torch.float32)
    engines = {"no-rotation": make_engine(loaded, args, "original", False),
               "original": make_engine(loaded, args, "original", True),
               "ring": make_engine(loaded, args, "ring", True)}
    times: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(args.steps):
        for name, engine in engines.items():
            started = time.perf_counter()
            engine.step()
            times[name].append(time.perf_counter() - started)
    base = statistics.median(times["no-rotation"])
    print(f"| decode step, {args.requests} x {args.prompt}-token prompts, {args.policy}@{args.budget}, "
          f"{args.steps} steps each, interleaved | median ms | vs no-rotation |")
    print("|---|---|---|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {median * 1e3:.0f} | {median / base:.2f}x |")


if __name__ == "__main__":
    main()

"""What rotating keys on load costs a CPU decode step, measured step by step in one process.

Engines on one loaded model decode the same requests, their steps interleaved (A, B, C, A, B, C ...), so a
busy machine slows them alike. Two axes: whether keys are rotated on load, and whether the decode attention
gathers every ring (the plain form, reference.decode_attend) or reads the rings in place (kernels.cpu_decode,
the CPU engine's default):

  gathered, no rotation   the step before keys were stored unrotated (the same gathers and matmuls, no
                          rotation; its tokens are not the model's): the baseline, 1.00x;
  gathered, original      keys gathered, then rotated to their text positions;
  in place, no rotation   rings read in place, no rotation (tokens not the model's): the gather's share;
  in place, original      the engine's default: rings read in place, keys rotated to their text positions;
  in place, ring          the same, keys rotated to their ranks, which decode keeps up to date.

    PYTHONPATH=. python tools/rope_cost.py [--budget 1024] [--requests 4] [--prompt 1100] [--steps 40]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from minikv import Engine, SamplingParams
from minikv.loader import load_model


VARIANTS = {  # name: (positions, rotate on load, read the rings in place)
    "gathered, no rotation": ("original", False, False),
    "gathered, original": ("original", True, False),
    "in place, no rotation": ("original", False, True),
    "in place, original": ("original", True, True),
    "in place, ring": ("ring", True, True),
}


def make_engine(loaded, args, positions: str, rotate: bool, in_place: bool) -> Engine:
    engine = Engine(loaded, budget=args.budget, policy=args.policy, max_num_seqs=args.requests, positions=positions)
    attention = engine.attention
    attention._deferred.in_place = in_place
    if not rotate:
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
    engines = {name: make_engine(loaded, args, *variant) for name, variant in VARIANTS.items()}
    times: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(args.steps):
        for name, engine in engines.items():
            started = time.perf_counter()
            engine.step()
            times[name].append(time.perf_counter() - started)
    base = statistics.median(times["gathered, no rotation"])
    print(f"| decode step, {args.requests} x {args.prompt}-token prompts, {args.policy}@{args.budget}, "
          f"{args.steps} steps each, interleaved | median ms | vs gathered, no rotation |")
    print("|---|---|---|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {median * 1e3:.0f} | {median / base:.2f}x |")


if __name__ == "__main__":
    main()

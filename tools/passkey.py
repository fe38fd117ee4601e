"""Does a passkey survive the ring? Per policy: found or not, and how many (layer, KV head) rings still
hold every token of the key when the prompt has been read.

The second number is the diagnostic the pass/fail hides: an answer needs the key's tokens in the rings
of the heads that retrieve it, and a policy that keeps them in more rings is closer to finding it.

    PYTHONPATH=. python tools/passkey.py --policies full,nexus,nexus:reserve=0,h2o,tova,keydiff \\
        [--budget 512] [--chunk 256] [--length 2000] [--prompts 3] [--model PATH]
"""

from __future__ import annotations

import argparse
import time

import torch

from minikv import Engine, SamplingParams
from minikv.eval import passkey_prompt
from minikv.eval.runner import parse_policies
from minikv.loader import load_model

DEPTHS = [0.4, 0.2, 0.6, 0.8, 0.5]


def key_rings(engine: Engine, request_id: str, ids: list[int], key_ids: list[int]) -> tuple[int, int]:
    """(rings holding every token of the key, rings in all) for a running request with prompt `ids`."""
    start = next(i for i in range(len(ids)) if ids[i:i + len(key_ids)] == key_ids)
    key_pos = torch.arange(start, start + len(key_ids), dtype=torch.int32)
    pos = engine.kv_positions(request_id)  # [layers, kv heads, budget]
    held = (pos[..., None] == key_pos).any(-2).all(-1)
    return int(held.sum()), held.numel()


def probe(loaded, spec, prompt: str, key: str, args) -> tuple[bool, str, int, int]:
    engine = Engine(loaded, budget=args.budget, chunk=args.chunk, policy=spec.name, max_num_seqs=1,
                    policy_options=spec.options)
    rid = engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=8))
    req = engine._requests[rid]
    while req.is_prefilling:
        engine.step()
    # The first occurrence of the key as the prompt tokenised it (" 27611" and "27611" may differ).
    first = prompt.index(key)
    key_ids = loaded.tokenizer.encode(prompt[:first + len(key)], add_special_tokens=False)
    key_ids = key_ids[len(loaded.tokenizer.encode(prompt[:first], add_special_tokens=False)):]
    held, rings = key_rings(engine, rid, req.prompt_ids, key_ids)
    while not req.is_finished:
        engine.step()
    text = req.make_output().outputs[0].text
    return key in text, text, held, rings


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policies", default="full,nexus,nexus:reserve=0,h2o,tova,keydiff")
    ap.add_argument("--budget", type=int, default=512)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--length", type=int, default=2000)
    ap.add_argument("--prompts", type=int, default=3, help=f"at most {len(DEPTHS)}")
    ap.add_argument("--model", default=None)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(args.model, device="cpu", dtype=torch.float32)
    prompts = [passkey_prompt(loaded.tokenizer, seed, depth, args.length)
               for seed, depth in zip(range(1, args.prompts + 1), DEPTHS)]
    print("| policy | prompt (seed, depth) | found | rings holding the whole key | answer | s |")
    print("|---|---|---|---|---|---|")
    for spec in parse_policies(args.policies):
        for i, (prompt, key) in enumerate(prompts):
            t = time.time()
            found, text, held, rings = probe(loaded, spec, prompt, key, args)
            print(f"| {spec.label} | {i + 1}, {DEPTHS[i]} | {'yes' if found else 'no'} | {held}/{rings} "
                  f"| `{text.strip()}` | {time.time() - t:.0f} |", flush=True)


if __name__ == "__main__":
    main()

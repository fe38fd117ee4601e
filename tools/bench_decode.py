"""Decode throughput against the bandwidth roofline (GPU only).

For a Qwen3-0.6B-shaped and a Llama-3.2-1B-shaped model with random weights, fills every ring with a
prompt, then times decode steps (CUDA graphs unless --enforce-eager) at batch 1 and 64. A decode step must
read every weight once and every live KV slot once, so

    roofline step time = (weight bytes + batch * budget * per-slot KV bytes) / peak bandwidth

and "% roofline" = roofline time / measured time. Peak bandwidth is measured here with a device-to-device
copy (the best a kernel can do on this card), not taken from a datasheet.

    python tools/bench_decode.py [--budget 4096] [--batches 1,64] [--steps 64] [--enforce-eager]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

SHAPES = {
    # Qwen3-0.6B: 28 layers, hidden 1024, 16 q / 8 kv heads of 128, MLP 3072, vocab 151936, tied
    "qwen3-0.6b": dict(architectures=["Qwen3ForCausalLM"], hidden_size=1024, intermediate_size=3072,
                       num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                       vocab_size=151936, tie_word_embeddings=True, rope_theta=1e6, max_position_embeddings=40960),
    # Llama-3.2-1B: 16 layers, hidden 2048, 32 q / 8 kv heads of 64, MLP 8192, vocab 128256, tied
    "llama-3.2-1b": dict(architectures=["LlamaForCausalLM"], hidden_size=2048, intermediate_size=8192,
                         num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                         vocab_size=128256, tie_word_embeddings=True, rope_theta=5e5, max_position_embeddings=131072),
}


def peak_bandwidth(device) -> float:
    """Bytes/s of a large device-to-device copy (read + write)."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        dst.copy_(src)
    torch.cuda.synchronize()
    return 2 * src.numel() * 10 / (time.perf_counter() - start)


def random_model(shape: dict, device):
    from minikv.config import ModelConfig
    from minikv.models import MODEL_CLASSES

    config = ModelConfig.from_hf(shape)
    torch.manual_seed(0)
    with torch.device(device):
        model = MODEL_CLASSES[config.architecture](config).to(torch.bfloat16)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    return model.eval(), config


def bench(name: str, shape: dict, batch: int, args, bandwidth: float) -> dict:
    from minikv.attention import RingAttention
    from minikv.model_runner import ModelRunner
    from minikv.policies import make_policy
    from minikv.ring import RingStore
    from minikv.sampling import SamplingParams
    from minikv.scheduler import Scheduler
    from minikv.sequence import Sequence

    device = torch.device("cuda")
    model, config = random_model(shape, device)
    policy = make_policy(args.policy)
    store = RingStore(config, batch, args.budget, dtype=torch.bfloat16, device=device, edges_per_slot=policy.top_m,
                      scratch_ring=not args.enforce_eager)
    attention = RingAttention(store, policy, scale=config.head_dim**-0.5, seed=0)
    runner = ModelRunner(model, attention, device, max_num_seqs=batch, use_cuda_graphs=not args.enforce_eager)
    scheduler = Scheduler(store, max_num_batched_tokens=max(args.chunk, batch), chunk=args.chunk)
    prompt = torch.randint(0, config.vocab_size, (args.budget,)).tolist()  # fills the ring exactly
    seqs = [Sequence(str(i), prompt, SamplingParams(max_tokens=10**6), seed=i) for i in range(batch)]
    for seq in seqs:
        scheduler.add(seq)
    while any(s.is_prefilling or not s.output_ids for s in seqs):  # prefill everything, first token each
        result = runner.run(scheduler.schedule())
        for seq in result.seqs:
            seq.output_ids.append(1)
    for _ in range(3):  # warm up the decode path (and capture nothing new)
        step(runner, scheduler)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        step(runner, scheduler)
    torch.cuda.synchronize()
    step_s = (time.perf_counter() - start) / args.steps
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    kv_bytes = batch * store.bytes_per_ring  # every slot of every ring is read once per step
    roofline_s = (weight_bytes + kv_bytes) / bandwidth
    return dict(model=name, batch=batch, budget=args.budget, ms=step_s * 1e3, tok_s=batch / step_s,
                gb_s=(weight_bytes + kv_bytes) / step_s / 1e9, roofline=roofline_s / step_s)


def step(runner, scheduler):
    result = runner.run(scheduler.schedule())
    for seq in result.seqs:  # sampling is not what this measures: append a fixed token
        seq.output_ids.append(1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=int, default=4096)
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--policy", default="nexus")
    parser.add_argument("--models", default=",".join(SHAPES))
    parser.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_decode needs a CUDA GPU; nothing to measure on this machine.")
        return 0
    bandwidth = peak_bandwidth("cuda")
    print(f"device: {torch.cuda.get_device_name()}, measured copy bandwidth {bandwidth / 1e9:.0f} GB/s, "
          f"policy {args.policy}, graphs {'off' if args.enforce_eager else 'on'}")
    print(f"| model | batch | budget | step ms | tok/s | GB/s | % roofline |\n|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            r = bench(name, SHAPES[name], batch, args, bandwidth)
            print(f"| {r['model']} | {r['batch']} | {r['budget']} | {r['ms']:.2f} | {r['tok_s']:.0f} | "
                  f"{r['gb_s']:.0f} | {100 * r['roofline']:.0f}% |", flush=True)
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())

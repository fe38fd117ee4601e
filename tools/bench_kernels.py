"""Time the fused decode kernel against plain decode attention over the same ring (GPU only).

For each budget / batch / GQA ratio it times, on a full ring (so the victim path runs):
  sdpa      torch scaled_dot_product_attention of one query over the ring's K/V (no scoring, no write);
  plain     attend_score_sample_triton with SCORE_NONE + VICTIM_OLDEST (scoring and sampling off);
  nexus     attend_score_sample_triton with the default policy (walk of 2 hops, top-4 edges, reservoir).
It prints the median time of CUDA-event-timed repeats, the achieved bandwidth over the bytes of K and V
read, and each kernel's time relative to SDPA.

    python tools/bench_kernels.py [--dtype bf16] [--repeats 50]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

HEAD_DIM = 128
NUM_KV_HEADS = 8
BUDGETS = (1024, 4096, 16384)
BATCHES = (1, 16, 64)
GROUPS = (4, 8)


def time_ms(fn, warmup: int, repeats: int) -> float:
    """Median milliseconds of `fn` over `repeats` CUDA-event-timed runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


def make_ring(num_seqs, budget, num_edges, dtype):
    from minikv.kernels.common import RingLayer

    shape = (num_seqs, NUM_KV_HEADS, budget)
    pos = torch.arange(budget, dtype=torch.int32, device="cuda").expand(shape).contiguous()
    return RingLayer(
        k=torch.randn(*shape, HEAD_DIM, device="cuda", dtype=dtype),
        v=torch.randn(*shape, HEAD_DIM, device="cuda", dtype=dtype),
        pos=pos,
        score=torch.rand(shape, device="cuda"),
        edge_slot=torch.randint(0, budget, (*shape, num_edges), dtype=torch.int32, device="cuda"),
        edge_pos=torch.randint(0, budget, (*shape, num_edges), dtype=torch.int32, device="cuda"),
        edge_w=torch.full((*shape, num_edges), 1.0 / num_edges, device="cuda"),
    )


def bench_case(budget, num_seqs, group, dtype, warmup, repeats):
    from minikv.kernels.attend_score_sample import attend_score_sample_triton
    from minikv.kernels.common import (SCORE_ATTN, SCORE_NONE, VICTIM_OLDEST, VICTIM_RESERVOIR,
                                       EvictionSpec)

    num_heads = NUM_KV_HEADS * group
    scale = HEAD_DIM**-0.5
    q = torch.randn(num_seqs, num_heads, HEAD_DIM, device="cuda", dtype=dtype)
    k_new = torch.randn(num_seqs, NUM_KV_HEADS, HEAD_DIM, device="cuda", dtype=dtype)
    v_new = torch.randn_like(k_new)
    ring_ids = torch.arange(num_seqs, dtype=torch.int32, device="cuda")
    filled = torch.full((num_seqs,), budget, dtype=torch.int32, device="cuda")
    new_pos = torch.full((num_seqs,), budget + 100, dtype=torch.int32, device="cuda")
    plain = EvictionSpec()
    nexus = EvictionSpec(SCORE_ATTN, VICTIM_RESERVOIR, decay=0.99, gamma=0.5, hops=2, top_m=4)
    ring_plain, ring_nexus = make_ring(num_seqs, budget, 1, dtype), make_ring(num_seqs, budget, 4, dtype)

    q4 = q[:, :, None]  # [N, Hq, 1, D]

    def sdpa():
        torch.nn.functional.scaled_dot_product_attention(q4, ring_plain.k, ring_plain.v, scale=scale,
                                                         enable_gqa=True)

    def kernel(spec, ring):
        return lambda: attend_score_sample_triton(q, k_new, v_new, ring, ring_ids, filled, new_pos, spec,
                                                  layer=0, seed=0, scale=scale)

    kv_bytes = 2 * num_seqs * NUM_KV_HEADS * budget * HEAD_DIM * q.element_size()
    results = {}
    for name, fn in (("sdpa", sdpa), ("plain", kernel(plain, ring_plain)), ("nexus", kernel(nexus, ring_nexus))):
        results[name] = time_ms(fn, warmup, repeats)
    return kv_bytes, results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_kernels: no CUDA device; this benchmark runs on a GPU only. Nothing to do.")
        return 0
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    print(f"device: {torch.cuda.get_device_name()}, dtype {args.dtype}, head_dim {HEAD_DIM}, "
          f"{NUM_KV_HEADS} KV heads, full rings; times are medians of {args.repeats} runs")
    header = (f"{'budget':>7} {'batch':>5} {'GQA':>4} | {'sdpa ms':>8} {'GB/s':>6} | {'plain ms':>8} {'GB/s':>6}"
              f" {'x sdpa':>6} | {'nexus ms':>8} {'GB/s':>6} {'x sdpa':>6}")
    print(header)
    print("-" * len(header))
    for budget in BUDGETS:
        for num_seqs in BATCHES:
            for group in GROUPS:
                kv_bytes, t = bench_case(budget, num_seqs, group, dtype, args.warmup, args.repeats)

                def gbps(ms):
                    return kv_bytes / (ms * 1e-3) / 1e9

                print(f"{budget:>7} {num_seqs:>5} {group:>3}:1 | {t['sdpa']:8.3f} {gbps(t['sdpa']):6.0f} | "
                      f"{t['plain']:8.3f} {gbps(t['plain']):6.0f} {t['plain'] / t['sdpa']:6.2f} | "
                      f"{t['nexus']:8.3f} {gbps(t['nexus']):6.0f} {t['nexus'] / t['sdpa']:6.2f}")
                torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())

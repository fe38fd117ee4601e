"""Time the fused decode kernel against plain decode attention over the same paged ring (GPU; CPU: a smoke run).

For each budget / batch / GQA ratio it times, on full rings (so the victim path runs), paged with 16-slot
blocks scattered over the pool:
  sdpa      torch scaled_dot_product_attention of one query over a dense copy of the rings' K/V (no paging,
            no scoring, no write): the bandwidth reference;
  plain     attend_score_sample_triton with SCORE_NONE + VICTIM_OLDEST (scoring and sampling off);
  nexus     attend_score_sample_triton with nexus's heaviest path, `nexus:gamma=0.5,tau=1` (walk of 2 hops
            over top-4 edges, reservoir keys); the default nexus (walk and sampling off) costs less;
each kernel with split-K off (num_splits=1) and on (the automatic choice; "=" when that is 1 too).
It prints the median time of CUDA-event-timed repeats, the achieved bandwidth over the bytes of K and V
read, and each kernel's time relative to SDPA.

    python tools/bench_kernels.py [--dtype bf16] [--repeats 30] [--quick]

`bench_case` and `format_row` are also what tools/gpu_check.py runs. On CPU tensors (its dry run) the
Triton kernel runs under the interpreter (TRITON_INTERPRET=1 before minikv.kernels is imported) and times
are wall-clock: a check that the code runs, never a figure.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

HEAD_DIM = 128
NUM_KV_HEADS = 8
BLOCK_SIZE = 16
BUDGETS = (1024, 4096, 16384)
BATCHES = (1, 16, 64)
GROUPS = (4, 8)


def time_ms(fn, warmup: int, repeats: int, device: torch.device) -> float:
    """Median milliseconds of `fn` over `repeats` runs after `warmup` runs: CUDA events on a GPU,
    wall-clock elsewhere."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop))
        else:
            begin = time.perf_counter()
            fn()
            times.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(times)


def make_pool(num_seqs, budget, num_edges, dtype, device, head_dim=HEAD_DIM, num_kv_heads=NUM_KV_HEADS):
    """A pool of exactly the batch's rings, blocks in random order, and the block tables [N, W]."""
    from minikv.kernels.common import PoolLayer

    blocks_per_ring = budget // BLOCK_SIZE
    num_blocks = num_seqs * blocks_per_ring
    shape = (num_blocks, BLOCK_SIZE, num_kv_heads)
    pool = PoolLayer(
        k=torch.randn(*shape, head_dim, device=device, dtype=dtype),
        v=torch.randn(*shape, head_dim, device=device, dtype=dtype),
        pos=torch.randint(0, budget, shape, dtype=torch.int32, device=device),
        score=torch.rand(shape, device=device),
        edge_slot=torch.randint(0, budget, (*shape, num_edges), dtype=torch.int32, device=device),
        edge_pos=torch.randint(0, budget, (*shape, num_edges), dtype=torch.int32, device=device),
        edge_w=torch.full((*shape, num_edges), 1.0 / num_edges, device=device),
        held=torch.zeros(shape, dtype=torch.int8, device=device),
    )
    tables = torch.randperm(num_blocks, device=device).to(torch.int32).view(num_seqs, blocks_per_ring)
    return pool, tables


def bench_case(budget, num_seqs, group, dtype, warmup, repeats, *, device="cuda", head_dim=HEAD_DIM,
               num_kv_heads=NUM_KV_HEADS, splits=None) -> tuple[int, int, dict]:
    """One (budget, batch, GQA) case: (bytes of K and V read, split-K programs used, {kernel: median ms}).
    `splits`: the split-K setting to compare with one program (default: the automatic choice)."""
    from minikv.kernels.attend_score_sample import attend_score_sample_triton, choose_num_splits
    from minikv.kernels.common import EvictionSpec
    from minikv.policies import make_policy

    device = torch.device(device)
    num_heads = num_kv_heads * group
    scale = head_dim**-0.5
    q = torch.randn(num_seqs, num_heads, head_dim, device=device, dtype=dtype)
    k_new = torch.randn(num_seqs, num_kv_heads, head_dim, device=device, dtype=dtype)
    v_new = torch.randn_like(k_new)
    filled = torch.full((num_seqs,), budget, dtype=torch.int32, device=device)
    budgets = filled.clone()
    new_pos = torch.full((num_seqs,), budget + 100, dtype=torch.int32, device=device)
    plain = EvictionSpec()
    nexus = make_policy("nexus", gamma=0.5, tau=1.0).eviction_spec()  # the walk and the reservoir: the most work
    pool_plain, tables = make_pool(num_seqs, budget, 1, dtype, device, head_dim, num_kv_heads)
    pool_nexus, _ = make_pool(num_seqs, budget, nexus.top_m, dtype, device, head_dim, num_kv_heads)
    dense_k = torch.randn(num_seqs, num_kv_heads, budget, head_dim, device=device, dtype=dtype)
    dense_v = torch.randn_like(dense_k)
    q4 = q[:, :, None]  # [N, Hq, 1, D]
    auto = splits or choose_num_splits(num_seqs, num_kv_heads, budget, 64, device)

    def sdpa():
        torch.nn.functional.scaled_dot_product_attention(q4, dense_k, dense_v, scale=scale, enable_gqa=True)

    def kernel(spec, pool, num_splits):
        return lambda: attend_score_sample_triton(q, k_new, v_new, pool, tables, filled, budgets, new_pos, spec,
                                                  layer=0, seed=0, scale=scale, num_splits=num_splits)

    kv_bytes = 2 * num_seqs * num_kv_heads * budget * head_dim * q.element_size()
    results = {"sdpa": time_ms(sdpa, warmup, repeats, device)}
    for name, spec, pool in (("plain", plain, pool_plain), ("nexus", nexus, pool_nexus)):
        results[name] = time_ms(kernel(spec, pool, 1), warmup, repeats, device)
        results[name + "_split"] = (time_ms(kernel(spec, pool, auto), warmup, repeats, device) if auto > 1
                                    else results[name])
    return kv_bytes, auto, results


TABLE_HEADER = ("| budget | batch | GQA | splits | sdpa ms | GB/s | plain ms | x sdpa | plain split ms | x sdpa "
                "| nexus ms | x sdpa | nexus split ms | x sdpa |\n"
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def format_row(budget, num_seqs, group, kv_bytes, splits, t) -> str:
    def cell(name):
        if name.endswith("_split") and splits == 1:
            return "= | ="
        return f"{t[name]:.3f} | {t[name] / t['sdpa']:.2f}"

    return (f"| {budget} | {num_seqs} | {group}:1 | {splits} | {t['sdpa']:.3f} | "
            f"{kv_bytes / (t['sdpa'] * 1e-3) / 1e9:.0f} | {cell('plain')} | {cell('plain_split')} | "
            f"{cell('nexus')} | {cell('nexus_split')} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--quick", action="store_true", help="budgets 1024/4096, GQA 4 only")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_kernels: no CUDA device; this benchmark runs on a GPU only. Nothing to do.")
        return 0
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    budgets, groups = (BUDGETS[:2], GROUPS[:1]) if args.quick else (BUDGETS, GROUPS)
    print(f"device: {torch.cuda.get_device_name()}, dtype {args.dtype}, head_dim {HEAD_DIM}, "
          f"{NUM_KV_HEADS} KV heads, full paged rings (block_size {BLOCK_SIZE}); medians of {args.repeats} runs")
    print(TABLE_HEADER)
    for budget in budgets:
        for num_seqs in BATCHES:
            for group in groups:
                kv_bytes, splits, t = bench_case(budget, num_seqs, group, dtype, args.warmup, args.repeats)
                print(format_row(budget, num_seqs, group, kv_bytes, splits, t), flush=True)
                torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())

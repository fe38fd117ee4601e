"""Compile every Triton kernel variant minikv launches for a CUDA target, on a machine without a GPU.

The interpreter (TRITON_INTERPRET=1) runs kernels as NumPy and never sees what only the compiler checks:
loop-carried types, constexpr-only control flow, layouts of reshapes and dots, int64 / uint32 promotion.
This tool runs the real Triton frontend, its MLIR passes and the ptxas bundled with the `triton` wheel
(no CUDA driver needed) for every policy x dtype x split-K setting of the decode kernel, the prefill
kernel's variants, the sampler's fused draw and the archive's block bounds and swap, and fails on the first
variant that does not compile. Nothing is launched.

It replaces Triton's active driver with a stub that only names a target, and makes every kernel launch a
compile-only warm-up (JITFunction.run with warmup=True): both are Triton internals, checked with Triton
3.6.0 and 3.7.1. About 4-6 minutes on one CPU core; compiled kernels go to a temporary cache.

    python tools/compile_kernels.py [--arch 90] [--quick] [--only decode,prefill,sampling,archive]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"  # before any kernel is defined
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def install_stub_driver(arch: int) -> list[str]:
    """Point Triton at a GPU-less CUDA target and turn launches into compile-only warm-ups."""
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    class TargetOnlyDriver:
        def get_current_target(self):
            return GPUTarget("cuda", arch, 32)

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_active_torch_device(self):
            return torch.device("cpu")

    driver.set_active(TargetOnlyDriver())
    compiled: list[str] = []
    run = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        compiled.append(self.fn.__name__)
        return kernel

    JITFunction.run = compile_only
    return compiled


def pool_and_tables(num_seqs, blocks_per_seq, block_size, num_kv_heads, head_dim, num_edges, dtype):
    import torch

    from minikv.kernels.common import PoolLayer

    num_blocks = num_seqs * blocks_per_seq + 1
    shape = (num_blocks, block_size, num_kv_heads)
    pool = PoolLayer(torch.zeros(*shape, head_dim, dtype=dtype), torch.zeros(*shape, head_dim, dtype=dtype),
                     torch.zeros(shape, dtype=torch.int32), torch.zeros(shape),
                     torch.zeros(*shape, num_edges, dtype=torch.int32), torch.zeros(*shape, num_edges, dtype=torch.int32),
                     torch.zeros(*shape, num_edges), torch.zeros(shape, dtype=torch.int8),
                     torch.zeros(shape, dtype=torch.int32))
    tables = torch.arange(num_seqs * blocks_per_seq, dtype=torch.int32).view(num_seqs, blocks_per_seq)
    return pool, tables


GROUPS = ("decode", "prefill", "sampling", "archive")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (90 = H100/H200)")
    parser.add_argument("--quick", action="store_true", help="bf16 only, nexus and streaming only")
    parser.add_argument("--only", default=",".join(GROUPS), metavar="GROUPS",
                        help="comma-separated kernel groups to compile, of %(default)s (default: all)")
    args = parser.parse_args()
    only = {g.strip() for g in args.only.split(",") if g.strip()}
    if not only or not only <= set(GROUPS):
        parser.error(f"--only takes groups among {', '.join(GROUPS)}, got {args.only!r}")
    os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="minikv-compile-"))

    import torch
    import triton

    compiled = install_stub_driver(args.arch)
    import importlib

    decode = importlib.import_module("minikv.kernels.attend_score_sample")
    prefill = importlib.import_module("minikv.kernels.prefill")
    from minikv.kernels.common import SCORE_EXTERNAL, Rope
    from minikv.policies import POLICIES, make_policy

    decode.precise_trig = lambda device: True  # compile what a GPU runs: libdevice's cos / sin
    rope = Rope(torch.rand(64))
    ring = torch.tensor([1, 0], dtype=torch.int32)

    dtypes = (torch.bfloat16,) if args.quick else (torch.float16, torch.bfloat16)
    names = ("nexus", "streaming") if args.quick else [n for n in POLICIES if n != "full"]
    names = names if "decode" in only else ()
    start = time.time()
    for name in names:
        spec = make_policy(name).eviction_spec()
        for dtype in dtypes:
            for splits in (1, 4):
                pool, tables = pool_and_tables(2, 8, 16, 8, 128, max(spec.top_m, 1), dtype)
                q = torch.zeros(2, 32, 128, dtype=dtype)
                kv = torch.zeros(2, 8, 128, dtype=dtype)
                ints = torch.full((2,), 100, dtype=torch.int32)
                new_score = torch.zeros(2, 8) if spec.score_mode == SCORE_EXTERNAL else None
                decode.attend_score_sample_triton(q, kv, kv, pool, tables, ints, ints, ints, spec, layer=0, seed=0,
                                                  scale=0.1, new_score=new_score, block_keys=64, num_splits=splits,
                                                  rope=rope, q_pos=ints, ring=ring)
        print(f"decode  {name:10s} compiled ({time.time() - start:.0f} s)", flush=True)
    for dtype in dtypes if "prefill" in only else ():
        for top_m, obs_rows in ((0, 0), (8, 32)):
            for group in (1, 4, 8):
                pool, tables = pool_and_tables(1, 8, 16, 8, 128, 1, dtype)
                q = torch.zeros(100, 8 * group, 128, dtype=dtype)
                kv = torch.zeros(100, 8, 128, dtype=dtype)
                prefill.prefill_attention_triton(q, kv, kv, pool, tables[0], 100, torch.arange(100, 200), scale=0.1,
                                                 top_m=top_m, obs_rows=obs_rows,
                                                 block_q=max(1, 64 // triton.next_power_of_2(group)), block_k=64,
                                                 rope=rope, rope_pos=torch.arange(100, 200, dtype=torch.int32))
    if "prefill" in only:
        print(f"prefill compiled ({time.time() - start:.0f} s)")
    sampling = importlib.import_module("minikv.kernels.sampling")
    for dtype in (torch.float32, torch.bfloat16) if "sampling" in only else ():  # fp32 logits; any float works
        seeds = torch.zeros(2, dtype=torch.int64)
        sampling.gumbel_argmax_triton(torch.zeros(2, 49152, dtype=dtype), seeds, seeds, block=4096)
    if "sampling" in only:
        print(f"sampling compiled ({time.time() - start:.0f} s)")
    archive = importlib.import_module("minikv.kernels.archive_score")
    swap = importlib.import_module("minikv.kernels.archive_swap")
    for dim in (64, 128) if "archive" in only else ():  # recall (minikv.archive) at SmolLM2's and Llama's head_dim
        archive.block_bound_triton(torch.zeros(2, 3, dim), torch.zeros(2, 5, dim), torch.zeros(2, 5, dim))
        for dtype in dtypes + (torch.float32,):
            for top_m in (1, 8):  # policies without edges keep one
                pool, _ = pool_and_tables(1, 2, 16, 8, dim, top_m, dtype)
                n = 3
                swap.swap_triton(pool, torch.arange(n), torch.zeros(n, dtype=torch.int32),
                                 torch.zeros(n, dim, dtype=dtype), torch.zeros(n, dim, dtype=dtype),
                                 torch.zeros(n, dtype=torch.int32), torch.zeros(n))
    if "archive" in only:
        print(f"archive scoring and swap compiled ({time.time() - start:.0f} s)")
    print(f"{len(compiled)} launches compiled for sm_{args.arch} with Triton {triton.__version__}: "
          f"{', '.join(sorted(set(compiled)))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Decode throughput against the bandwidth roofline, through the paged Engine (GPU; `--device cpu` is a smoke run).

For a Qwen3-0.6B-shaped and a Llama-3.2-1B-shaped model with random weights (tools/random_model.py), one
Engine per model (one block pool, CUDA graphs unless --enforce-eager) grows its batch: first 1 request,
then 16, then 64 (`--batches`). Every prompt is `--budget` tokens long, so every ring is full and each
decode step runs the eviction path. Once every request of the batch has its first token, it times
`--steps` calls of `engine.step()` (graph replay, sampling and the host bookkeeping: what a caller gets),
then, with CUDA graphs, the graph replay alone (the forward pass: kernels without the host around them).

A decode step must read every weight once and every live KV slot once, so

    roofline step time = (weight bytes + live KV bytes) / copy bandwidth
    live KV bytes      = pool blocks the batch's rings hold x bytes per block (K, V, pos, score, edges)

and "% roofline" = roofline time / measured time. The bandwidth is measured here with a large
device-to-device copy (bytes read + written), the best a kernel can do on this card, not a datasheet figure.

    python tools/bench_decode.py [--budget 4096] [--batches 1,16,64] [--steps 32] [--policy nexus] [--enforce-eager]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from random_model import MODEL_SHAPES, random_loaded_model, weight_bytes  # noqa: E402

BLOCK_SIZE = 16


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_bandwidth(device, megabytes: int = 1024, repeats: int = 10) -> float:
    """Bytes/s of a large copy on `device` (bytes read + bytes written)."""
    device = torch.device(device)
    src = torch.empty(megabytes << 20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    synchronize(device)
    return 2 * src.numel() * repeats / (time.perf_counter() - start)


class _Driver:
    """Adds requests to an engine and steps it, failing loudly: an engine reports a broken forward pass as a
    request finished with "error", which a benchmark must not mistake for a fast step."""

    def __init__(self, engine, budget: int, max_tokens: int, seed: int):
        self.engine, self.budget, self.max_tokens = engine, budget, max_tokens
        self.gen = torch.Generator().manual_seed(seed)
        self.ids: list[str] = []
        self.started: set[str] = set()

    def add(self, count: int) -> None:
        from minikv.sampling import SamplingParams

        params = SamplingParams(max_tokens=self.max_tokens, ignore_eos=True)  # greedy, exact lengths
        vocab = self.engine.config.vocab_size
        for _ in range(count):
            prompt = torch.randint(3, vocab, (self.budget,), generator=self.gen).tolist()  # fills the ring
            self.ids.append(self.engine.add_request(prompt, params))

    def step(self) -> None:
        for out in self.engine.step():
            if out.finished:
                raise RuntimeError(f"request {out.request_id} finished early ({out.outputs[0].finish_reason}): "
                                   f"{out.error or 'max_tokens too small for the benchmark'}")
            if out.outputs[0].token_ids:
                self.started.add(out.request_id)

    def prefill_all(self) -> None:
        """Step until every request has its first token (later prompts prefill while earlier ones decode)."""
        while len(self.started) < len(self.ids):
            self.step()

    def abort_all(self) -> None:
        for rid in self.ids:
            self.engine.abort(rid)
        while self.engine.has_unfinished_requests():
            self.engine.step()


def _time_graph_replay(engine, device, steps: int) -> float | None:
    """Seconds per replay of the decode graph for the running requests, or None without graphs. The replay
    writes the same position again each time, which changes which slots hold what, not how much is read."""
    graphs = engine.runner.graphs
    if graphs is None:
        return None
    # the running requests' batch slots (engine internals: a benchmark may look, the API has no need to)
    slots = torch.tensor(sorted(r.slot for r in engine._requests.values()), dtype=torch.long, device=device)
    for _ in range(3):
        graphs.replay(slots)
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        graphs.replay(slots)
    stop.record()
    stop.synchronize()
    return start.elapsed_time(stop) / 1e3 / steps


def bench_model(name: str, loaded, *, batches, budget: int, bandwidth: float, policy: str = "nexus",
                steps: int = 32, warmup: int = 4, chunk: int = 2048, enforce_eager: bool = False, seed: int = 0,
                emit=None) -> list[dict]:
    """One engine over `loaded`, batch grown through `batches`; a row (dict) per batch, passed to `emit` as
    soon as it is measured."""
    from minikv.engine import Engine

    batches = sorted(batches)
    device = next(loaded.model.parameters()).device
    # the first request decodes through every later prompt's prefill and every timed stage
    max_tokens = batches[-1] * math.ceil(budget / chunk) + len(batches) * (warmup + 2 * steps + 8) + 64
    max_model_len = budget + max_tokens
    # The default pool holds max_num_seqs rings of `budget`; under full a ring is the whole request
    # (prompt + max_tokens), so size the pool by that or the last requests would wait for blocks forever.
    engine = Engine(loaded, budget=max_model_len if policy == "full" else budget, policy=policy,
                    max_num_seqs=batches[-1], chunk=chunk, max_model_len=max_model_len, block_size=BLOCK_SIZE,
                    enforce_eager=enforce_eager, seed=seed)
    driver = _Driver(engine, budget, max_tokens, seed)
    weights = weight_bytes(loaded.model)
    rows = []
    for batch in batches:
        driver.add(batch - len(driver.ids))
        driver.prefill_all()
        for _ in range(warmup):
            driver.step()
        synchronize(device)
        start = time.perf_counter()
        for _ in range(steps):
            driver.step()
        synchronize(device)
        step_s = (time.perf_counter() - start) / steps
        kv = engine.pool.num_used * engine.pool.bytes_per_block  # live rings: every slot is read each step
        graph_s = _time_graph_replay(engine, device, steps)
        roofline_s = (weights + kv) / bandwidth
        row = dict(model=name, policy=policy, batch=batch, budget=budget, step_ms=step_s * 1e3,
                   tok_s=batch / step_s, weight_gb=weights / 1e9, kv_gb=kv / 1e9,
                   gb_s=(weights + kv) / step_s / 1e9, roofline=roofline_s / step_s,
                   graph_ms=None if graph_s is None else graph_s * 1e3,
                   graph_roofline=None if graph_s is None else roofline_s / graph_s)
        rows.append(row)
        if emit:
            emit(row)
    driver.abort_all()
    return rows


TABLE_HEADER = ("| model | policy | batch | prompt | weights GB | live KV GB | step ms | tok/s | GB/s | % roofline "
                "| graph ms | graph % roofline |\n|---|---|---|---|---|---|---|---|---|---|---|---|")


def format_row(r: dict) -> str:
    graph = (f"{r['graph_ms']:.2f} | {100 * r['graph_roofline']:.0f}%" if r["graph_ms"] is not None
             else "– | –")
    return (f"| {r['model']} | {r['policy']} | {r['batch']} | {r['budget']} | {r['weight_gb']:.2f} | "
            f"{r['kv_gb']:.2f} | {r['step_ms']:.2f} | {r['tok_s']:.0f} | {r['gb_s']:.0f} | "
            f"{100 * r['roofline']:.0f}% | {graph} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=int, default=4096)
    parser.add_argument("--chunk", type=int, default=2048)
    parser.add_argument("--batches", default="1,16,64")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--policy", default="nexus")
    parser.add_argument("--models", default=",".join(MODEL_SHAPES))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_decode needs a CUDA GPU (or --device cpu for a smoke run); nothing to measure here.")
        return 0
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    bandwidth = peak_bandwidth(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device: {name}, measured copy bandwidth {bandwidth / 1e9:.0f} GB/s, policy {args.policy}, "
          f"graphs {'off' if args.enforce_eager or device.type != 'cuda' else 'on'}, {dtype}")
    print(TABLE_HEADER, flush=True)
    for model in args.models.split(","):
        loaded = random_loaded_model(MODEL_SHAPES[model], device=device, dtype=dtype)
        bench_model(model, loaded, batches=[int(b) for b in args.batches.split(",")], budget=args.budget,
                    bandwidth=bandwidth, policy=args.policy, steps=args.steps, chunk=args.chunk,
                    enforce_eager=args.enforce_eager, emit=lambda row: print(format_row(row), flush=True))
        del loaded
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())

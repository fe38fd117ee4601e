"""`minikv bench --url http://HOST:PORT`: load on a running server, measured as a client sees it.

The same synthetic requests as the in-process bench (random token ids, lengths drawn from --input-len and
--output-len, EOS ignored, so each request generates exactly its drawn length), sent as streaming
/v1/completions requests by concurrent clients: all at once (burst), or with Poisson arrivals at
--request-rate, at most --max-concurrency in flight. Each request may carry its own `kv_budget`, drawn
from --kv-budget MIN:MAX. Reported as vLLM's serving benchmark reports them:

- request throughput (req/s), output and total token throughput (tok/s), over the wall time of the run;
- TTFT: from sending the request to the first chunk with text;
- TPOT: (latency - TTFT) / (output tokens - 1), per request (excludes the first token);
- ITL: the gaps between successive chunks with text, pooled over requests;
- E2EL: from sending to the last byte;
- failed requests (HTTP errors, error events), with the first error message.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field

from ..errors import ConfigError
from ..workload import PERCENTILES, SyntheticRequest, make_requests, parse_range, percentile


@dataclass
class RequestResult:
    ok: bool
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft_s: float = 0.0
    latency_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    error: str | None = None


@dataclass
class ServingResult:
    duration_s: float
    results: list[RequestResult]
    max_concurrency: int | None
    request_rate: float

    @property
    def completed(self) -> list[RequestResult]:
        return [r for r in self.results if r.ok]

    def summary(self) -> dict:
        done = self.completed
        out = sum(r.output_tokens for r in done)
        total = out + sum(r.prompt_tokens for r in done)
        per_s = (lambda x: x / self.duration_s) if self.duration_s else (lambda x: 0.0)
        tpot = [(r.latency_s - r.ttft_s) / (r.output_tokens - 1) for r in done if r.output_tokens > 1]
        summary = {
            "completed": len(done), "failed": len(self.results) - len(done), "duration_s": self.duration_s,
            "request_rate": self.request_rate, "max_concurrency": self.max_concurrency,
            "total_input_tokens": total - out, "total_output_tokens": out,
            "request_throughput": per_s(len(done)), "output_throughput": per_s(out), "total_token_throughput": per_s(total),
        }
        for name, values in (("ttft", [r.ttft_s for r in done]), ("tpot", tpot),
                             ("itl", [gap for r in done for gap in r.itl_s]), ("e2el", [r.latency_s for r in done])):
            summary[f"mean_{name}_ms"] = sum(values) / len(values) * 1e3 if values else 0.0
            for p in PERCENTILES:
                summary[f"p{p}_{name}_ms"] = percentile(values, p) * 1e3
        errors = [r.error for r in self.results if r.error]
        summary["first_error"] = errors[0] if errors else None
        return summary


# --- the load --------------------------------------------------------------------------------------


async def run_load(url: str, requests: list[SyntheticRequest], *, model: str | None = None,
                   kv_budgets: list[int | None] | None = None, max_concurrency: int | None = None,
                   temperature: float = 0.0, request_rate: float = float("inf"),
                   timeout_s: float = 600.0) -> ServingResult:
    """Send `requests` to the server at `url` at their arrival times; measure each as a streaming client."""
    import httpx

    limits = httpx.Limits(max_connections=max_concurrency or len(requests) or 1)
    async with httpx.AsyncClient(base_url=url.rstrip("/"), timeout=timeout_s, limits=limits) as client:
        model = model or await served_model(client)
        gate = asyncio.Semaphore(max_concurrency) if max_concurrency else None
        kv_budgets = kv_budgets or [None] * len(requests)
        start = time.perf_counter()

        async def one(req: SyntheticRequest, kv_budget: int | None) -> RequestResult:
            await asyncio.sleep(max(0.0, start + req.arrival_s - time.perf_counter()))
            body = {"model": model, "prompt": req.prompt_ids, "max_tokens": req.max_tokens, "ignore_eos": True,
                    "temperature": temperature, "stream": True, "stream_options": {"include_usage": True}}
            if kv_budget is not None:
                body["kv_budget"] = kv_budget
            if gate is None:
                return await stream_one(client, body, len(req.prompt_ids))
            async with gate:
                return await stream_one(client, body, len(req.prompt_ids))

        results = await asyncio.gather(*(one(r, b) for r, b in zip(requests, kv_budgets)))
        duration = time.perf_counter() - start
    return ServingResult(duration, list(results), max_concurrency, request_rate)


async def served_model(client) -> str:
    """The first model the server lists."""
    response = await client.get("/v1/models")
    response.raise_for_status()
    return response.json()["data"][0]["id"]


async def stream_one(client, body: dict, prompt_tokens: int) -> RequestResult:
    """One streaming /v1/completions request, timed chunk by chunk."""
    sent = time.perf_counter()
    result = RequestResult(ok=False, prompt_tokens=prompt_tokens)
    last_text_at = None
    chunks_with_text = 0
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                result.error = f"HTTP {response.status_code}: {text[:200]}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                payload = json.loads(line[len("data: "):])
                now = time.perf_counter()
                if "error" in payload:
                    result.error = payload["error"].get("message")
                    return result
                if payload.get("usage"):
                    result.output_tokens = payload["usage"]["completion_tokens"]
                    result.prompt_tokens = payload["usage"]["prompt_tokens"]
                if any(choice.get("text") for choice in payload.get("choices", [])):
                    chunks_with_text += 1
                    if last_text_at is None:
                        result.ttft_s = now - sent
                    else:
                        result.itl_s.append(now - last_text_at)
                    last_text_at = now
    except Exception as err:  # the connection, a timeout: count it as a failed request
        result.error = f"{type(err).__name__}: {err}"
        return result
    result.latency_s = time.perf_counter() - sent
    result.output_tokens = result.output_tokens or chunks_with_text
    result.ok = True
    return result


# --- command line (options added to `minikv bench`) ------------------------------------------------


def add_arguments(parser) -> None:
    g = parser.add_argument_group("serving (with --url: load on a running `minikv serve` instead of in-process)")
    g.add_argument("--url", help="base URL of an OpenAI-compatible server, e.g. http://127.0.0.1:8000")
    g.add_argument("--served-model", help="the `model` field to send (default: the first of /v1/models)")
    g.add_argument("--max-concurrency", type=int, default=None,
                   help="most requests in flight at once (default: no limit)")
    g.add_argument("--kv-budget", default=None, metavar="MIN:MAX",
                   help="per-request kv_budget, drawn uniformly from the range (default: the server's budget)")


def run(args) -> int:
    vocab_size = asyncio.run(_vocab_size(args.url))
    requests = make_requests(args.num_requests, args.input_len, args.output_len, vocab_size,
                             seed=args.seed, request_rate=args.request_rate)
    budgets = None
    if args.kv_budget:
        low, high = parse_range(args.kv_budget)
        rng = random.Random(args.seed + 1)
        budgets = [rng.randint(low, high) for _ in requests]
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ConfigError(f"--max-concurrency must be >= 1, got {args.max_concurrency}")
    result = asyncio.run(run_load(args.url, requests, model=args.served_model, kv_budgets=budgets,
                                  max_concurrency=args.max_concurrency, temperature=args.temperature,
                                  request_rate=args.request_rate))
    summary = result.summary()
    print(json.dumps(summary) if args.json else format_table(summary))
    return 0 if summary["completed"] else 1


async def _vocab_size(url: str) -> int:
    """The served model's vocabulary (minikv lists it in /v1/models), to draw valid token ids."""
    import httpx

    async with httpx.AsyncClient(base_url=url.rstrip("/"), timeout=30) as client:
        try:
            response = await client.get("/v1/models")
            response.raise_for_status()
        except httpx.HTTPError as err:
            raise ConfigError(f"cannot reach {url}: {err}") from None
    card = response.json()["data"][0]
    if "vocab_size" not in card:
        raise ConfigError(f"{url} does not list vocab_size in /v1/models (is it a minikv server?)")
    return card["vocab_size"]


def format_table(s: dict) -> str:
    """The summary laid out like vLLM's serving benchmark."""
    width = 50
    rows = [("=" * 12 + " Serving Benchmark Result " + "=" * 12, None),
            ("Successful requests:", s["completed"]), ("Failed requests:", s["failed"]),
            ("Request rate (req/s):", "burst" if s["request_rate"] == float("inf") else s["request_rate"]),
            ("Max concurrency:", s["max_concurrency"] or "-"),
            ("Benchmark duration (s):", f"{s['duration_s']:.2f}"),
            ("Total input tokens:", s["total_input_tokens"]), ("Total generated tokens:", s["total_output_tokens"]),
            ("Request throughput (req/s):", f"{s['request_throughput']:.2f}"),
            ("Output token throughput (tok/s):", f"{s['output_throughput']:.2f}"),
            ("Total token throughput (tok/s):", f"{s['total_token_throughput']:.2f}")]
    for name, title in (("ttft", "Time to First Token"), ("tpot", "Time per Output Token (excl. 1st token)"),
                        ("itl", "Inter-token Latency"), ("e2el", "End-to-end Latency")):
        rows.append((f" {title} ".center(width, "-"), None))
        rows.append((f"Mean {name.upper()} (ms):", f"{s[f'mean_{name}_ms']:.2f}"))
        rows += [(f"P{p} {name.upper()} (ms):", f"{s[f'p{p}_{name}_ms']:.2f}") for p in PERCENTILES]
    rows.append(("=" * width, None))
    if s["first_error"]:
        rows.append((f"First error: {s['first_error']}", None))
    return "\n".join(label if value is None else f"{label:<40}{value:>10}" for label, value in rows)

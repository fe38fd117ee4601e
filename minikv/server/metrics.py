"""`/metrics`: Prometheus metrics of one server, in its own CollectorRegistry (several servers may share a
process, as in the tests).

Names are vLLM's where vLLM has the concept, under minikv's prefix: `vllm:num_requests_running` is
`minikv:num_requests_running` here, so a vLLM dashboard needs only the prefix changed, and a scrape never
mistakes minikv for vLLM. Every metric carries vLLM's `model_name` label. Two sources:

- the engine's own gauges and counters (EngineStats), read from the snapshot the engine thread publishes
  after each step, at scrape time (a custom collector: the engine's counters are the truth, nothing is
  double-counted);
- per-request histograms (TTFT, TPOT, end-to-end, queue time, lengths, evictions), observed by the engine
  thread when a request finishes, and the server's own counters (client disconnects, queue-full refusals).
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from ..engine import EngineStats
from ..outputs import RequestOutput
from .engine_loop import Observer

PREFIX = "minikv:"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Seconds buckets close to vLLM's: interactive latencies from milliseconds to minutes.
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                   10.0, 20.0, 40.0, 80.0, 160.0)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)


class ServerMetrics(Observer):
    """The registry behind /metrics; the engine loop reports steps and finished requests to it."""

    def __init__(self, stats, *, model_name: str, policy: str):
        """`stats` is a callable returning the latest EngineStats (EngineLoop.stats)."""
        # `*_created` series (one per counter and histogram) double the output for a number nobody graphs.
        disable_created_metrics()
        self.registry = CollectorRegistry()
        self.model_name = model_name
        labels = ["model_name"]

        def histogram(name: str, doc: str, buckets) -> Histogram:
            return Histogram(PREFIX + name, doc, labels, buckets=buckets, registry=self.registry).labels(model_name)

        self.time_to_first_token = histogram(
            "time_to_first_token_seconds", "Time from arrival to the first generated token.", LATENCY_BUCKETS)
        self.time_per_output_token = histogram(
            "time_per_output_token_seconds", "Mean time between a request's tokens after the first.", LATENCY_BUCKETS)
        self.e2e_request_latency = histogram(
            "e2e_request_latency_seconds", "Time from arrival to finish.", LATENCY_BUCKETS)
        self.request_queue_time = histogram(
            "request_queue_time_seconds", "Time from arrival to the first scheduled step.", LATENCY_BUCKETS)
        self.request_prompt_tokens = histogram("request_prompt_tokens", "Prompt tokens per request.", TOKEN_BUCKETS)
        self.request_generation_tokens = histogram(
            "request_generation_tokens", "Generated tokens per request.", TOKEN_BUCKETS)
        self.request_evicted_tokens = histogram(
            "request_evicted_tokens", "Tokens evicted from a request's KV (per layer and KV head).",
            (0,) + TOKEN_BUCKETS)
        self.iteration_tokens = histogram(
            "iteration_tokens_total", "Tokens (prompt + generated) processed per engine step.", TOKEN_BUCKETS)
        self.aborted_by_disconnect = Counter(
            PREFIX + "request_aborted_by_disconnect", "Requests aborted because their client went away.",
            labels, registry=self.registry).labels(model_name)
        self.rejected_queue_full = Counter(
            PREFIX + "request_rejected_queue_full", "Requests refused with 503: the waiting queue was full.",
            labels, registry=self.registry).labels(model_name)
        self.registry.register(_EngineStatsCollector(stats, model_name, policy))
        self._last_tokens = 0

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # --- Observer (engine thread) --------------------------------------------------------------------
    def on_step(self, stats: EngineStats) -> None:
        tokens = stats.prompt_tokens + stats.generation_tokens
        if tokens > self._last_tokens:
            self.iteration_tokens.observe(tokens - self._last_tokens)
        self._last_tokens = tokens

    def on_finished(self, output: RequestOutput) -> None:
        m = output.metrics
        finished = m.finished_time or time.monotonic()
        self.e2e_request_latency.observe(finished - m.arrival_time)
        if m.first_scheduled_time is not None:
            self.request_queue_time.observe(m.first_scheduled_time - m.arrival_time)
        if m.first_token_time is not None:
            self.time_to_first_token.observe(m.first_token_time - m.arrival_time)
        if m.num_generated_tokens > 1 and m.last_token_time is not None:
            self.time_per_output_token.observe(
                (m.last_token_time - m.first_token_time) / (m.num_generated_tokens - 1))
        self.request_prompt_tokens.observe(len(output.prompt_token_ids))
        self.request_generation_tokens.observe(m.num_generated_tokens)
        self.request_evicted_tokens.observe(m.num_evicted_tokens)


class _EngineStatsCollector(Collector):
    """The engine's gauges and counters, from the latest EngineStats snapshot, at scrape time."""

    def __init__(self, stats, model_name: str, policy: str):
        self._stats, self._model, self._policy = stats, model_name, policy

    def collect(self):
        s: EngineStats = self._stats()
        model = [self._model]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(PREFIX + name, doc, labels=["model_name"])
            family.add_metric(model, value)
            return family

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(PREFIX + name, doc, labels=["model_name"])
            family.add_metric(model, value)
            return family

        yield gauge("num_requests_running", "Requests running (holding KV) now.", s.num_running)
        yield gauge("num_requests_waiting", "Requests waiting to be admitted.", s.num_waiting)
        yield gauge("kv_cache_usage_perc", "Fraction of the KV pool in use (1 = full).", s.kv_usage)
        yield gauge("kv_blocks_used", "KV pool blocks held by running requests.", s.kv_blocks_used)
        yield gauge("kv_blocks_total", "KV pool blocks in all.", s.kv_blocks_total)
        yield gauge("num_requests_running_peak", "The most requests that ran in one engine step.", s.peak_running)
        yield gauge("kv_blocks_used_peak", "The most KV pool blocks rings held at once.", s.peak_kv_blocks_used)
        yield counter("prompt_tokens", "Prompt tokens processed.", s.prompt_tokens)
        yield counter("generation_tokens", "Tokens generated.", s.generation_tokens)
        yield counter("engine_steps", "Engine steps (forward passes) run.", s.num_steps)
        yield gauge("sessions", "Engine sessions kept (token histories).", s.num_sessions)
        yield gauge("sessions_parked", "Sessions with a parked ring in the KV pool.", s.num_parked_sessions)
        yield gauge("kv_blocks_parked", "KV pool blocks held by parked session rings.", s.parked_kv_blocks)
        yield counter("session_hits", "Requests that continued a parked ring.", s.session_hits)
        yield counter("session_misses", "Requests continuing a session that found no ring (prefilled its history).",
                      s.session_misses)
        yield counter("session_reused_tokens", "Prompt tokens not prefilled: a parked ring had read them.",
                      s.session_reused_tokens)
        yield counter("sessions_released_by_pressure", "Parked rings released because admission or a limit "
                      "needed their blocks.", s.sessions_released_by_pressure)
        yield counter("recalled_tokens", "Ring slots the KV archives' recall overwrote (summed over layers and KV "
                      "heads).", s.recalled_tokens)
        evicted = CounterMetricFamily(PREFIX + "evicted_tokens", "Tokens evicted from finished requests' KV "
                                      "(per layer and KV head), by eviction policy.", labels=["model_name", "policy"])
        evicted.add_metric([self._model, self._policy], s.evicted_tokens)
        yield evicted
        success = CounterMetricFamily(PREFIX + "request_success", "Finished requests, by finish reason.",
                                      labels=["model_name", "finished_reason"])
        for reason, count in sorted(s.finished.items()):
            success.add_metric([self._model, reason], count)
        yield success

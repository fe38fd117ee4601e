"""`minikv bench` on the tiny model: the load it makes, the numbers it reports, the command line."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from tiny_engine import tiny_checkpoint, tiny_loaded

from minikv import bench
from minikv.engine import Engine
from minikv.errors import ConfigError


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model on a busy 2-core machine: threads only hurt
    yield tiny_loaded(tmp_path_factory.mktemp("tiny"))
    torch.set_num_threads(threads)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser.parse_args(argv)


def test_parse_range():
    assert bench.parse_range("128:512") == (128, 512)
    assert bench.parse_range("64") == (64, 64)
    for bad in ("0:4", "9:3", "a:b", ""):
        with pytest.raises(ConfigError):
            bench.parse_range(bad)
    with pytest.raises(SystemExit):
        parse(["--input-len", "9:3"])


def test_make_requests_draws_lengths_in_range_reproducibly():
    reqs = bench.make_requests(50, (5, 9), (2, 4), vocab_size=20, seed=3, avoid={0, 1, 2})
    assert all(5 <= len(r.prompt_ids) <= 9 and 2 <= r.max_tokens <= 4 for r in reqs)
    assert all(t >= 3 for r in reqs for t in r.prompt_ids)
    assert {len(r.prompt_ids) for r in reqs} == set(range(5, 10))
    assert [r.prompt_ids for r in reqs] == [r.prompt_ids for r in bench.make_requests(50, (5, 9), (2, 4), 20, seed=3,
                                                                                       avoid={0, 1, 2})]
    assert all(r.arrival_s == 0 for r in reqs)
    spread = bench.make_requests(50, (5, 9), (2, 4), 20, request_rate=10.0)
    arrivals = [r.arrival_s for r in spread]
    assert arrivals == sorted(arrivals) and 2 < arrivals[-1] < 10  # about 49 / 10 s


def test_percentile_interpolates_like_numpy():
    values = [4.0, 1.0, 3.0, 2.0]
    assert bench.percentile(values, 50) == 2.5
    assert bench.percentile(values, 100) == 4.0 and bench.percentile(values, 0) == 1.0
    assert bench.percentile([], 90) == 0.0


def test_run_load_counts_every_token_and_times_every_request(loaded):
    engine = Engine(loaded, policy="nexus", budget=32, window=8, chunk=16, max_num_seqs=3, max_model_len=256)
    requests = bench.make_requests(7, (10, 80), (2, 6), loaded.config.vocab_size, seed=1, avoid={1, 2})
    ticks = iter(range(10**6))
    result = bench.run_load(engine, requests, clock=lambda: float(next(ticks)))  # a clock that ticks per call
    assert result.num_requests == 7 and result.errors == 0
    assert result.output_tokens == sum(r.max_tokens for r in requests)  # EOS ignored: exact lengths
    assert result.prompt_tokens == sum(len(r.prompt_ids) for r in requests)
    assert len(result.ttft_s) == 7 and all(t > 0 for t in result.ttft_s)
    assert len(result.tpot_s) == 7 and all(t > 0 for t in result.tpot_s)
    assert result.max_concurrent == 3 and 1 <= result.mean_concurrent <= 3
    # the default pool holds three full 32-slot rings (2 blocks of 16 each); rings take blocks as they fill
    assert result.allocated_kv_bytes == 3 * 2 * engine.pool.bytes_per_block
    assert result.peak_kv_bytes % engine.pool.bytes_per_block == 0
    assert 0 < result.mean_kv_bytes <= result.peak_kv_bytes <= result.allocated_kv_bytes
    assert result.evicted_tokens > 0  # prompts up to 80 tokens in 32-slot rings
    assert result.output_tok_s == result.output_tokens / result.duration_s
    assert all_rings_free(engine)


def all_rings_free(engine) -> bool:
    return engine.pool.num_used == engine.pool.num_reserved == 0 and not engine.has_unfinished_requests()


def test_compare_full_runs_the_same_load_side_by_side(loaded):
    args = parse(["-n", "5", "--input-len", "40:60", "--output-len", "3", "--budget", "24", "--window", "8",
                  "--chunk", "16", "--max-num-seqs", "2", "--compare-full"])
    results = bench.bench(loaded, args)
    assert [r.label for r in results] == ["nexus (budget 24)", "full (budget 63)"]
    nexus, full = results
    assert nexus.output_tokens == full.output_tokens == 15 and nexus.prompt_tokens == full.prompt_tokens
    assert full.evicted_tokens == 0 < nexus.evicted_tokens
    assert nexus.peak_kv_bytes < full.peak_kv_bytes
    table = bench.format_table(results)
    assert "output tok/s" in table and "TTFT p50/p90/p99 (ms)" in table and "nexus (budget 24)" in table


def test_main_prints_a_table_or_json(tmp_path, capsys):
    path = tiny_checkpoint(tmp_path / "tiny")
    argv = [str(path), "-n", "3", "--input-len", "8:12", "--output-len", "2", "--budget", "80", "--chunk", "16",
            "--max-num-seqs", "2", "--device", "cpu", "--dtype", "float32"]
    assert bench.main(argv) == 0
    assert "output tok/s" in capsys.readouterr().out
    assert bench.main(argv + ["--json"]) == 0
    line = json.loads(capsys.readouterr().out.strip())
    assert line["num_requests"] == 3 and line["output_tokens"] == 6 and "ttft_ms_p90" in line
    assert bench.main(argv[:1] + ["--budget", "10"]) == 2  # budget <= n_sink + window: a clear error, no trace
    assert "budget" in capsys.readouterr().err


def test_bench_takes_the_engine_flags_of_run_policy_options_included(tmp_path, capsys):
    """One definition of the engine flags: `--policy nexus:tau=0` used to fail here with "unknown policy"."""
    path = tiny_checkpoint(tmp_path / "tiny")
    argv = ["--model", str(path), "-n", "2", "--input-len", "8", "--output-len", "2", "--budget", "80", "--chunk",
            "16", "--window", "4", "--max-num-seqs", "2", "--threads", "1", "--policy", "nexus:tau=0", "--compare-full",
            "--json"]
    assert bench.main(argv) == 0
    labels = [json.loads(line)["label"] for line in capsys.readouterr().out.splitlines()]
    assert labels == ["nexus:tau=0 (budget 80)", "full (budget 10)"]
    assert bench.main(argv[:2] + ["--policy", "nexus:tau=abc"]) == 2
    err = capsys.readouterr().err
    assert "minikv: error:" in err and "tau" in err and "Traceback" not in err

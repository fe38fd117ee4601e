"""`minikv bench` on the tiny model: the load it makes, the numbers it reports, the command line."""

from __future__ import annotations

import argparse
import json
from types import SimpleNamespace

import pytest
import torch
from tiny_engine import tiny_checkpoint

from minikv import bench
from minikv.block_pool import bytes_per_block
from minikv.engine import Engine
from minikv.errors import ConfigError
from minikv.sampling import SamplingParams


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
    assert result.max_concurrent == engine.stats().peak_running  # counted during the step, as the engine does
    assert result.refused == 0 and result.policy == "nexus" and result.budget == 32
    assert all_rings_free(engine)


def all_rings_free(engine) -> bool:
    return engine.pool.num_used == engine.pool.num_reserved == 0 and not engine.has_unfinished_requests()


def test_compare_full_runs_the_same_load_side_by_side_at_the_same_pool(loaded):
    args = parse(["-n", "5", "--input-len", "40:60", "--output-len", "3", "--budget", "24", "--window", "8",
                  "--chunk", "16", "--max-num-seqs", "2", "--compare-full"])
    results = bench.bench(loaded, args)
    assert [r.label for r in results] == ["nexus@24", "full"]
    nexus, full = results
    assert nexus.output_tokens == full.output_tokens == 15 and nexus.prompt_tokens == full.prompt_tokens
    assert full.evicted_tokens == 0 < nexus.evicted_tokens
    assert full.max_concurrent == 1 < nexus.max_concurrent == 2  # a full ring of ~45 slots takes 3 of the 4 blocks
    # no --kv-memory: nexus's default pool (2 rings of 24 slots, 2 blocks each), in bytes, for both rows
    assert nexus.kv_memory == full.kv_memory == 2 * 2 * nexus.bytes_per_block == nexus.allocated_kv_bytes
    assert full.bytes_per_block == nexus.bytes_per_block  # the default nexus does not walk: no out-edges stored
    assert full.allocated_kv_bytes <= full.kv_memory < full.allocated_kv_bytes + full.bytes_per_block
    table = bench.format_table(results)
    assert "output tok/s" in table and "TTFT p50/p90/p99 (ms)" in table and "nexus@24" in table
    assert "concurrency (mean) vs full" in table and "output tok/s vs full" in table


def test_every_row_runs_the_same_load_on_a_pool_of_the_same_bytes(loaded):
    args = parse(["-n", "6", "--input-len", "20:40", "--output-len", "2:4", "--budget", "24", "--window", "8",
                  "--chunk", "16", "--max-num-seqs", "6", "--block-size", "8", "--kv-memory", "60000",
                  "--policies", "full,nexus,h2o:budget=16,streaming"])
    results = bench.bench(loaded, args)
    labels = ["full", "nexus@24", "h2o@16", "streaming@24"]
    assert [r.label for r in results] == labels
    assert [r.policy for r in results] == ["full", "nexus", "h2o", "streaming"]
    assert [r.budget for r in results] == [None, 24, 16, 24]
    assert {r.kv_memory for r in results} == {60000}
    for r in results:  # the asked bytes in whole blocks of this policy's size
        assert r.kv_blocks == 60000 // r.bytes_per_block and r.allocated_kv_bytes == r.kv_blocks * r.bytes_per_block
        assert r.num_requests == 6 and r.refused == r.errors == 0
        assert r.prompt_tokens == results[0].prompt_tokens and r.output_tokens == results[0].output_tokens
    table = bench.report(results, 60000)
    assert "one KV pool of 0.1 MiB (60000 bytes) for every row" in table
    header = table.splitlines()[1].split()
    assert header == labels
    lines = [json.loads(json.dumps(line)) for line in bench.summaries(results)]
    assert [line["label"] for line in lines] == labels
    for line in lines:
        for key in ("mean_concurrent", "max_concurrent", "output_tok_s", "total_tok_s", "ttft_ms_p50", "tpot_ms_p99",
                    "peak_kv_bytes", "mean_kv_bytes", "allocated_kv_bytes", "kv_memory", "evicted_tokens", "errors",
                    "refused", "concurrency_vs_full", "output_tok_s_vs_full"):
            assert key in line
    assert lines[0]["concurrency_vs_full"] == lines[0]["output_tok_s_vs_full"] == 1.0


def test_concurrency_and_kv_in_use_follow_the_pools_block_accounting(loaded):
    """Prompts of 56 and 4 output tokens, blocks of 8: a full ring is 60 slots (8 blocks), a nexus@16 ring 2
    blocks. A pool of 16 full blocks runs 2 full requests at once and as many nexus rings as its bytes hold."""
    full_block = bytes_per_block(loaded.config, 8, torch.float32, 0)
    args = parse(["-n", "10", "--input-len", "56", "--output-len", "4", "--budget", "16", "--window", "8",
                  "--chunk", "16", "--max-num-seqs", "10", "--block-size", "8", "--kv-memory", str(16 * full_block),
                  "--policies", "full,nexus"])
    full, nexus = bench.bench(loaded, args)
    assert full.kv_blocks == 16 and full.max_concurrent == 2
    assert nexus.kv_blocks == 16 * full_block // nexus.bytes_per_block  # 12 on the tiny model: 6 rings
    assert nexus.max_concurrent == min(10, nexus.kv_blocks // 2) >= 3 * full.max_concurrent
    for result, ring_blocks in ((full, 8), (nexus, 2)):
        assert 1 <= result.mean_concurrent <= result.max_concurrent
        assert result.peak_kv_bytes % result.bytes_per_block == 0
        assert 0 < result.mean_kv_bytes <= result.peak_kv_bytes <= result.allocated_kv_bytes
        # what rings hold never exceeds what the requests running at once can have reserved
        assert result.peak_kv_bytes <= result.max_concurrent * ring_blocks * result.bytes_per_block
    ratios = bench.ratios_vs_full([full, nexus])
    assert ratios[1]["concurrency_vs_full"] == nexus.mean_concurrent / full.mean_concurrent > 1
    assert ratios[1]["max_concurrency_vs_full"] == nexus.max_concurrent / 2


def test_a_request_that_can_never_fit_the_pool_is_refused_and_counted(loaded):
    engine = Engine(loaded, policy="full", max_num_seqs=4, chunk=16, block_size=8, max_model_len=256,
                    kv_memory=4 * bytes_per_block(loaded.config, 8, torch.float32, 0))  # 32 slots
    fits = [bench.SyntheticRequest([5] * 20, 4, 0.0), bench.SyntheticRequest([6] * 10, 2, 0.0)]
    too_long = bench.SyntheticRequest([7] * 40, 4, 0.0)
    result = bench.run_load(engine, [fits[0], too_long, fits[1]])
    assert result.refused == 1 and result.num_requests == 2 and result.errors == 0
    assert result.output_tokens == 6 and "never fit the KV pool" in result.first_refusal
    assert any("1 request(s) refused" in line for line in bench.notes([result]))
    only_refused = bench.run_load(engine, [too_long, too_long])  # nothing runs: no crash, nothing measured
    assert only_refused.refused == 2 and only_refused.num_requests == 0 and only_refused.max_concurrent == 0
    assert all_rings_free(engine)
    engine.generate([[5] * 8], SamplingParams(max_tokens=2), use_tqdm=False)  # and the engine still serves


def test_bench_counts_what_full_refuses_while_nexus_serves_it(loaded):
    ring = bytes_per_block(loaded.config, 16, torch.float32, 4)  # a nexus block
    args = parse(["-n", "4", "--input-len", "60:90", "--output-len", "2", "--budget", "32", "--window", "8",
                  "--chunk", "16", "--compare-full", "--kv-memory", str(4 * ring)])
    nexus, full = bench.bench(loaded, args)
    assert nexus.refused == 0 and nexus.num_requests == 4
    assert full.refused >= 1 and full.num_requests == 4 - full.refused  # its rings of 62..92 slots: some never fit


def test_the_long_preset_is_the_documented_load():
    args = bench.resolve_args(parse(["--preset", "long"]))
    assert (args.num_requests, args.input_len, args.output_len) == (24, (2048, 8064), (64, 128))
    assert args.budget == 512 and args.max_num_seqs == 24 and args.kv_memory is None
    assert [row.label(args.budget) for row in args.policies] == ["full", "nexus@512", "h2o@512", "streaming@512"]
    assert args.input_len[1] + args.output_len[1] == 8192  # within SmolLM2's trained positions
    assert bench.resolve_args(args) == args  # resolving twice changes nothing
    # flags given win over the preset, even when they equal the plain defaults (--max-num-seqs 8)
    given = bench.resolve_args(parse(["--preset", "long", "-n", "4", "--budget", "256", "--max-num-seqs", "8",
                                      "--policies", "full,nexus:tau=0", "--output-len", "16"]))
    assert (given.num_requests, given.budget, given.max_num_seqs, given.output_len) == (4, 256, 8, (16, 16))
    assert [row.label(given.budget) for row in given.policies] == ["full", "nexus:tau=0@256"]
    assert bench.resolve_args(parse(["--preset", "long", "-n", "4"])).max_num_seqs == 4  # room for every request
    with pytest.raises(ConfigError, match="--policies"):
        bench.resolve_args(parse(["--preset", "long", "--policy", "h2o"]))
    plain = bench.resolve_args(parse([]))
    assert (plain.num_requests, plain.input_len, plain.output_len, plain.budget, plain.max_num_seqs) == (
        32, (128, 512), (32, 128), 4096, 8)
    assert [row.label(plain.budget) for row in plain.policies] == ["nexus@4096"]


def test_the_long_presets_pool_holds_two_full_requests_of_8192_tokens(loaded):
    args = bench.resolve_args(parse(["--preset", "long"]))
    full_block = bytes_per_block(loaded.config, 16, torch.float32, 0)
    assert bench.pool_bytes(loaded, args) == 2 * (8192 // 16) * full_block
    assert bench.pool_bytes(loaded, bench.resolve_args(parse(["--preset", "long", "--kv-memory", "1MiB"]))) == 2**20
    # the help's figure for SmolLM2-135M (30 layers, 3 KV heads of 64) in fp32
    smollm2 = SimpleNamespace(num_layers=30, num_kv_heads=3, head_dim=64)
    assert round(2 * 512 * bytes_per_block(smollm2, 16, torch.float32, 0) / 2**20) == 755
    assert "755 MiB" in bench.PRESETS["long"].description


def hand_made(label: str, policy: str, mean: float, peak: int, output_tokens: int, duration: float):
    return bench.BenchResult(label=label, num_requests=4, duration_s=duration, prompt_tokens=100,
                             output_tokens=output_tokens, ttft_s=[0.1], tpot_s=[0.01], peak_kv_bytes=0,
                             mean_kv_bytes=0, allocated_kv_bytes=0, max_concurrent=peak, mean_concurrent=mean,
                             evicted_tokens=0, policy=policy)


def test_ratios_vs_full_and_the_issue_11_target_on_hand_made_results():
    full = hand_made("full", "full", 2.0, 3, 10, 2.0)  # 5 tok/s
    nexus = hand_made("nexus@512", "nexus", 9.0, 12, 40, 2.5)  # 16 tok/s
    h2o = hand_made("h2o@512", "h2o", 3.0, 3, 10, 1.0)  # 10 tok/s
    ratios = bench.ratios_vs_full([nexus, full, h2o])  # the full row need not come first
    assert ratios[0] == {"concurrency_vs_full": 4.5, "max_concurrency_vs_full": 4.0, "output_tok_s_vs_full": 3.2}
    assert ratios[1] == {"concurrency_vs_full": 1.0, "max_concurrency_vs_full": 1.0, "output_tok_s_vs_full": 1.0}
    assert ratios[2] == {"concurrency_vs_full": 1.5, "max_concurrency_vs_full": 1.0, "output_tok_s_vs_full": 2.0}
    (line,) = bench.target_lines([nexus, full, h2o])  # nexus rows only
    assert "concurrent sequences 4.50x (target >= 4x: met)" in line
    assert "output tok/s 3.20x (target >= 3x: met)" in line
    slow = hand_made("nexus@256", "nexus", 6.0, 8, 20, 2.0)  # 3x the concurrency, 2x the tok/s
    (line,) = bench.target_lines([full, slow])
    assert "3.00x (target >= 4x: NOT met)" in line and "2.00x (target >= 3x: NOT met)" in line
    table = bench.format_table([full, nexus])
    assert "4.50x" in table and "3.20x" in table
    assert bench.ratios_vs_full([nexus, h2o]) == [None, None] and bench.target_lines([nexus]) == []
    assert "vs full" not in bench.format_table([nexus, h2o])
    idle = hand_made("full", "full", 0.0, 0, 0, 0.0)
    assert bench.ratios_vs_full([idle, nexus])[1]["concurrency_vs_full"] is None
    assert "n/a" in bench.target_lines([idle, nexus])[0]
    summary = bench.summaries([full, nexus])[1]
    assert summary["label"] == "nexus@512" and summary["output_tok_s_vs_full"] == 3.2


def test_parse_rows():
    rows = bench.parse_rows("full,nexus:tau=0,gamma=0,h2o:budget=256,streaming")
    assert [(row.spec.label, row.budget) for row in rows] == [
        ("full", None), ("nexus:tau=0,gamma=0", None), ("h2o", 256), ("streaming", None)]
    assert [row.label(512) for row in rows] == ["full", "nexus:tau=0,gamma=0@512", "h2o@256", "streaming@512"]
    for bad, says in (("full:budget=64", "never evicts"), ("nexus:budget=x", "budget"), ("nexus,nexus", "twice"),
                      ("bogus", "unknown policy"), ("nexus:nope=1", "nope"), ("", "empty")):
        with pytest.raises(ConfigError, match=says):
            bench.parse_rows(bad)
    with pytest.raises(SystemExit):
        parse(["--policies", "full,bogus"])


def test_main_prints_a_table_or_json(tmp_path, capsys):
    path = tiny_checkpoint(tmp_path / "tiny")
    argv = [str(path), "-n", "3", "--input-len", "8:12", "--output-len", "2", "--budget", "80", "--chunk", "16",
            "--max-num-seqs", "2", "--device", "cpu", "--dtype", "float32"]
    assert bench.main(argv) == 0
    assert "output tok/s" in capsys.readouterr().out
    assert bench.main(argv + ["--json"]) == 0
    line = json.loads(capsys.readouterr().out.strip())
    assert line["num_requests"] == 3 and line["output_tokens"] == 6 and "ttft_ms_p90" in line
    assert bench.main(argv + ["--compare-full", "--kv-memory", "2MiB"]) == 0  # one table, one pool, the ratios
    out = capsys.readouterr().out
    assert "one KV pool of 2.0 MiB (2097152 bytes) for every row" in out and "output tok/s vs full" in out
    assert "issue 11 target, nexus@80 vs full" in out
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
    assert labels == ["nexus:tau=0@80", "full"]
    assert bench.main(argv[:2] + ["--policy", "nexus:tau=abc"]) == 2
    err = capsys.readouterr().err
    assert "minikv: error:" in err and "tau" in err and "Traceback" not in err

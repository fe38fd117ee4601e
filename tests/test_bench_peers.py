"""tools/bench_peers.py on the tiny model: its rows, prompts, minikv measurement, table and command line."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from minikv.errors import ConfigError

TOOL = Path(__file__).resolve().parent.parent / "tools" / "bench_peers.py"


@pytest.fixture(scope="module")
def peers():
    spec = importlib.util.spec_from_file_location("bench_peers", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_peers"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("bench_peers", None)


def test_policies_split_and_budgets_peeled(peers):
    assert peers.split_policies("full,nexus:budget=128,long_budget=512,tau=0,h2o") == [
        "full", "nexus:budget=128,long_budget=512,tau=0", "h2o"]
    full, nexus, h2o = peers.minikv_rows("full,nexus:budget=128,long_budget=512,tau=0,h2o", 256, 1024)
    assert (full.policy, full.budget, full.long_budget, full.label) == ("full", None, None, "minikv full")
    assert (nexus.policy, nexus.budget, nexus.long_budget) == ("nexus:tau=0", 128, 512)
    assert nexus.label == "minikv nexus:tau=0 (budget 128; 512 at long)"
    assert (h2o.budget, h2o.long_budget) == (256, 1024)
    with pytest.raises(ConfigError):
        peers.minikv_rows("nexus:no_such_option=1", 256, 512)


def test_dtype_is_a_row_option_of_the_tool(peers):
    fp32, bf16 = peers.minikv_rows("nexus,nexus:dtype=bfloat16,tau=0", 256, 512)
    assert (fp32.dtype, bf16.dtype, bf16.policy) == ("float32", "bfloat16", "nexus:tau=0")
    assert bf16.label == "minikv nexus:tau=0 (budget 256; 512 at long) bfloat16"
    with pytest.raises(ValueError, match="dtype must be one of"):
        peers.minikv_rows("nexus:dtype=int8", 256, 512)


def test_prompts_are_reproducible_ordinary_ids(peers, loaded):
    vocab_size, allowed = peers.ordinary_ids(loaded.path)
    assert vocab_size == 384 and allowed[0] == 3  # <unk>, <s>, </s> are special
    batch = peers.make_prompts(allowed, 20, 3, seed=1)
    assert batch == peers.make_prompts(allowed, 20, 3, seed=1) != peers.make_prompts(allowed, 20, 3, seed=2)
    assert peers.make_prompts(allowed, 20, 1, seed=1) == batch[:1]  # batch 1 decodes the batch's first prompt
    assert all(len(p) == 20 and min(p) >= 3 for p in batch)


def job(peers, loaded, policy, budget, **extra):
    _, allowed = peers.ordinary_ids(loaded.path)
    scenarios = [("short_b1", 12, 1), ("short_batch", 12, 3), ("long", 100, 2)]
    return dict(model_dir=str(loaded.path), threads=1, chunk=32, new_tokens=4, policy=policy, policy_options={},
                budget=budget, long_budget=budget,
                scenarios=[dict(key=k, prompts=peers.make_prompts(allowed, n, b, 0)) for k, n, b in scenarios],
                **extra)


def test_minikv_measures_decode_after_every_first_token(peers, loaded):
    results = peers.measure_minikv(job(peers, loaded, "nexus", 72), loaded)
    for key, batch in [("short_b1", 1), ("short_batch", 3), ("long", 2)]:
        r = results[key]
        assert "error" not in r, r
        assert r["decode_tokens"] == batch * 3 and len(r["first_tokens"]) == batch
        assert r["decode_tok_s"] > 0 and r["ttft_s"] > 0 and r["decode_s"] > 0
    # The same prompt leads the batch of 3 and is batch 1's: its greedy first token is the same.
    assert results["short_b1"]["first_tokens"][0] == results["short_batch"]["first_tokens"][0]


def test_full_cache_first_tokens_match_transformers(peers, loaded):
    """Same ids, same weights, greedy: minikv full and transformers pick the same first tokens."""
    spec = job(peers, loaded, "full", None)
    ours = peers.measure_minikv(spec, loaded)
    theirs = peers.measure_transformers(spec)
    for key in ours:
        assert "error" not in ours[key] and "error" not in theirs[key], (ours[key], theirs[key])
        assert ours[key]["first_tokens"] == theirs[key]["first_tokens"]
        assert theirs[key]["decode_tokens"] == ours[key]["decode_tokens"]


def test_table_cells_dashes_and_errors(peers):
    args = peers.parse_args(["--prompt-len", "64", "--batch", "2", "--long-prompt-len", "4000", "--long-batch", "4"])
    cols = peers.columns(args)
    assert [c[0] for c in cols] == ["decode tok/s, 64-token prompt, batch 1", "batch 2",
                                    "4,000-token prompts, batch 4: decode tok/s", "time to first token (4,000 × 4)"]
    ok = {"short_b1": {"decode_tok_s": 22.84, "first_tokens": [5]}, "short_batch": {"decode_tok_s": 67.8},
          "long": {"decode_tok_s": 14.8, "ttft_s": 158.66, "first_tokens": [1]}}
    partial = {"short_b1": {"decode_tok_s": 50.0, "first_tokens": [5]}, "short_batch": {"error": "MemoryError: "}}
    rows = [("minikv full", ok), ("llama.cpp", partial), ("transformers", {"error": "boom"})]
    table = peers.format_table("HEADER", cols, rows, ["a note"])
    lines = table.splitlines()
    assert lines[0] == "HEADER" and lines[-1] == "- a note"
    assert "| minikv full | 22.8 | 67.8 | 14.8 | 158.7 s |" in lines
    assert "| llama.cpp | 50.0 | error | – | – |" in lines
    assert "| transformers | error | error | error | error |" in lines
    assert peers.agreement_notes(rows) == ["llama.cpp: first generated tokens equal minikv full's in 1 of 1 measurements"]


def test_command_line_runs_minikv_in_a_subprocess(peers, loaded, tmp_path, capsys):
    out = tmp_path / "peers.json"
    code = peers.main(["--model", str(loaded.path), "--engines", "minikv", "--policies", "nexus:budget=72",
                       "--prompt-len", "8", "--batch", "2", "--long-prompt-len", "0", "--new-tokens", "3",
                       "--chunk", "32", "--json", str(out)])
    assert code == 0
    table = capsys.readouterr().out
    assert "| minikv nexus (budget 72) |" in table and "error" not in table
    report = json.loads(out.read_text())
    assert report["config"]["threads"] == 1 and report["commit"]
    (row,) = report["rows"]
    assert row["results"]["short_batch"]["decode_tokens"] == 2 * 2
    assert set(row["results"]) == {"short_b1", "short_batch"}


def test_full_long_rows_decode_together_past_the_default_budget(peers, loaded):
    """`full` at prompts longer than the engine's default budget (4096): every sequence still runs at once
    (its pool holds whole requests), so the long column measures them decoding together."""
    _, allowed = peers.ordinary_ids(loaded.path)
    long_job = dict(job(peers, loaded, "full", None), chunk=512,
                    scenarios=[dict(key="long", prompts=peers.make_prompts(allowed, 4100, 2, 0))])
    r = peers.measure_minikv(long_job, loaded)["long"]
    assert "error" not in r, r
    assert r["decode_tokens"] == 2 * 3 and len(r["first_tokens"]) == 2


# --- OpenVINO GenAI, with a fake module (the real one lives in a venv of its own) ----------------------


class FakeOpenVINOGenAI:
    """What bench_peers uses of openvino_genai: plain records of the configs, and a pipeline that emits one
    token per request per step (the first after a prefill step), as the continuous-batching pipeline does."""

    class SchedulerConfig:
        pass

    class GenerationConfig:
        pass

    class AggregationMode:
        NORM_SUM = "NORM_SUM"

    class CacheEvictionConfig:
        def __init__(self, start_size, recent_size, max_cache_size, aggregation_mode):
            self.sizes = (start_size, recent_size, max_cache_size, aggregation_mode)

    class ContinuousBatchingPipeline:
        def __init__(self, ir_dir, scheduler_config, device, properties):
            self.args = (ir_dir, scheduler_config, device, properties)
            self.requests = []

        def add_request(self, request_id, input_ids, config):
            handle = FakeHandle(config.max_new_tokens, len(input_ids.ids[0]))
            self.requests.append(handle)
            return handle

        def has_non_finished_requests(self):
            return any(not h.done for h in self.requests)

        def step(self):
            for h in self.requests:
                h.advance()


class FakeHandle:
    def __init__(self, max_new_tokens, prompt_len):
        self.max_new_tokens, self.token, self.pending, self.made, self.done = max_new_tokens, prompt_len, [], 0, False

    def advance(self):
        if not self.done:
            self.pending.append(self.token)
            self.token, self.made = self.token + 1, self.made + 1
            self.done = self.made >= self.max_new_tokens

    def can_read(self):
        return bool(self.pending)

    def read(self):
        out, self.pending = self.pending, []
        return {0: type("Out", (), {"generated_ids": out})()}

    def cancel(self):
        self.done = True


def test_openvino_configs_force_fp32_and_size_eviction_in_whole_blocks(peers):
    ovg = FakeOpenVINOGenAI
    assert peers.openvino_properties(1) == {"INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": "f32",
                                            "INFERENCE_NUM_THREADS": 1}
    plain = peers.openvino_scheduler_config(ovg, 8, 700, 512, None)
    assert (plain.max_num_seqs, plain.max_num_batched_tokens, plain.use_cache_eviction) == (8, 520, False)
    assert plain.num_kv_blocks == 8 * (22 + 1) and not hasattr(plain, "cache_eviction_config")
    evicting = peers.openvino_scheduler_config(ovg, 8, 700, 512, 250, n_sink=4, window=64)
    assert evicting.use_cache_eviction
    assert evicting.cache_eviction_config.sizes == (32, 64, 224, "NORM_SUM")  # blocks of 32, budget rounded down
    with pytest.raises(ValueError, match="no evictable block"):
        peers.openvino_scheduler_config(ovg, 1, 100, 512, 96)
    config = peers.openvino_generation_config(ovg, 7)
    assert (config.max_new_tokens, config.min_new_tokens, config.ignore_eos, config.do_sample) == (7, 7, True, False)


def test_openvino_worker_counts_decode_after_every_first_token(peers, monkeypatch):
    import types

    fake_ov = types.SimpleNamespace(Tensor=lambda array: types.SimpleNamespace(ids=array.tolist()))
    monkeypatch.setitem(sys.modules, "openvino", fake_ov)
    monkeypatch.setitem(sys.modules, "openvino_genai", FakeOpenVINOGenAI)
    job = dict(ir_dir="IR", threads=1, chunk=32, new_tokens=4, budget=256, long_budget=512,
               scenarios=[dict(key="short_b1", prompts=[[5] * 10]), dict(key="long", prompts=[[5] * 40] * 3)])
    results = peers.measure_openvino(job)
    for key, batch in (("short_b1", 1), ("long", 3)):
        r = results[key]
        assert "error" not in r, r
        assert r["decode_tokens"] == batch * 3 and r["decode_s"] >= 0 and r["ttft_s"] >= 0
    assert results["short_b1"]["first_tokens"] == [10] and results["long"]["first_tokens"] == [40] * 3


def test_openvino_rows_are_skipped_with_a_note_where_it_cannot_be_imported(peers, tmp_path):
    no_openvino = tmp_path / "python"  # a "Python" whose every import fails
    no_openvino.write_text("#!/bin/sh\nexit 1\n")
    no_openvino.chmod(0o755)
    args = peers.parse_args(["--engines", "openvino", "--openvino-python", str(no_openvino)])
    notes = []
    assert peers.plan_openvino_rows(args, notes) == ([], None)
    assert notes and notes[0].startswith("OpenVINO GenAI skipped")

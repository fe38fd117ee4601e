"""tools/kv_heatmap.py: the needle locator, and the tool end to end on the tiny model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from tiny_engine import tiny_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import kv_heatmap  # noqa: E402


def test_needle_span_covers_the_tokens_of_the_needle():
    words = ["Once", " upon", " a", " time", ", the", " key", " was", " 4", "21", ". The", " end"]
    ids = list(range(len(words)))
    decode = lambda t: "".join(words[i] for i in t)  # noqa: E731
    assert kv_heatmap.needle_span(decode, ids, "key was 421") == (5, 9)
    assert kv_heatmap.needle_span(decode, ids, "he key") == (4, 6)  # needles that start or end inside a token
    assert kv_heatmap.needle_span(decode, ids, "Once") == (0, 1)
    with pytest.raises(kv_heatmap.ConfigError, match="does not occur"):
        kv_heatmap.needle_span(decode, ids, "dragon")


def test_held_by_ring_and_bins():
    positions = torch.tensor([[[0, 2, 7, 5], [1, 2, 3, 9]]])  # 1 layer, 2 KV heads; 7 and 9 are generated
    held = kv_heatmap.held_by_ring(positions, prompt_len=6)
    assert held.tolist() == [[True, False, True, False, False, True], [False, True, True, True, False, False]]
    shares, width = kv_heatmap.binned(held, columns=4)
    assert width == 2 and shares.tolist() == [[0.5, 0.5, 0.5], [0.5, 1.0, 0.0]]


def test_tool_runs_end_to_end(tmp_path, one_torch_thread):
    model = tiny_checkpoint(tmp_path / "tiny")
    needle = "The secret number is 8141."
    prompt = "The cat sat on the mat. " * 6 + needle + " Dogs run in the park. " * 6
    (tmp_path / "prompt.txt").write_text(prompt)
    out, raw = tmp_path / "out" / "map.png", tmp_path / "out" / "map.json"
    result = kv_heatmap.main([str(model), "--policy", "nexus", "--budget", "96", "--chunk", "64", "--gen", "20",
                              "--prompt-file", str(tmp_path / "prompt.txt"), "--needle", needle,
                              "--output", str(out), "--json", str(raw), "--device", "cpu"])
    assert out.stat().st_size > 1000 and out.read_bytes()[:4] == b"\x89PNG"
    data = json.loads(raw.read_text())
    positions = torch.tensor(data["positions"])
    assert positions.shape[-1] == 96  # the ring is full: exactly the budget, in every (layer, KV head)
    assert all(len(set(row.tolist())) == 96 for row in positions.flatten(0, 1))
    assert int(positions.max()) == data["prompt_tokens"] + 20 - 1 and int(positions.min()) == 0
    start, end = data["needle_span"]
    assert 0 < start < end < data["prompt_tokens"]
    assert data["rings_holding_whole_needle"] <= data["rings"] == positions.shape[0] * positions.shape[1]
    assert 0 < data["prompt_share_kept"] < 1 and 0 <= data["needle_share_kept"] <= 1 and result["policy"] == "nexus"


def test_without_matplotlib_the_error_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    with pytest.raises(kv_heatmap.ConfigError, match=r"pip install minikv\[plot\]"):
        kv_heatmap.draw(torch.ones(2, 8, dtype=torch.bool), 1, None, 4, "t", tmp_path / "x.png")


def test_recalled_and_held_marks_recalled_positions_the_ring_still_holds():
    positions = torch.tensor([[[0, 2, 7, 5], [1, 2, 3, 9]]])  # 1 layer, 2 KV heads
    trace = [(0, torch.tensor([0, 1]), torch.tensor([2, 4])),  # head 1 recalled 4, then lost it again
             (0, torch.tensor([1, 1]), torch.tensor([3, 9]))]  # 9 is generated: not a prompt position
    marks = kv_heatmap.recalled_and_held(trace, positions, prompt_len=6)
    assert marks.tolist() == [[False, False, True, False, False, False], [False, False, False, True, False, False]]


def test_tool_marks_recalled_tokens_with_an_archive(tmp_path, one_torch_thread):
    model = tiny_checkpoint(tmp_path / "tiny")
    (tmp_path / "prompt.txt").write_text("The cat sat on the mat. " * 14)
    out, raw = tmp_path / "map.png", tmp_path / "map.json"
    result = kv_heatmap.main([str(model), "--budget", "96", "--chunk", "64", "--gen", "24", "--archive", "4",
                              "--recall-interval", "4", "--recall-rule", "0.005,1,1", "--prompt-file", str(tmp_path / "prompt.txt"),
                              "--output", str(out), "--json", str(raw), "--device", "cpu", "--positions", "ring"])
    assert out.read_bytes()[:4] == b"\x89PNG" and result["archive_budget"] == 384
    data = json.loads(raw.read_text())
    positions = torch.tensor(data["positions"]).flatten(0, 1)
    assert sum(len(r) for r in data["recalled"]) == result["recalled_held"] > 0
    for row, marked in zip(positions, data["recalled"]):
        assert set(marked) <= set(row.tolist())  # a mark is a position its ring holds at the end

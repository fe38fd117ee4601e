"""`minikv run` reports bad input as one clear line on stderr, exit code 2, and no traceback."""

import json
from types import SimpleNamespace

import pytest

from gguf_helpers import write_tiny_gguf
from helpers import make_tiny_checkpoint
from minikv.cli import main, split_model_and_prompt


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("cli"), "LlamaForCausalLM")


def run_cli(capsys, *argv):
    code = main(["run", "--max-tokens", "4", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_clean_error(code, err, *phrases):
    assert code == 2
    assert "Traceback" not in err
    assert "minikv: error: " in err
    for phrase in phrases:
        assert phrase in err, err


def test_path_that_does_not_exist(capsys, tmp_path):
    code, _, err = run_cli(capsys, tmp_path / "nope", "hi")
    assert_clean_error(code, err, "does not exist")


def test_directory_without_config(capsys, tmp_path):
    code, _, err = run_cli(capsys, tmp_path, "hi")
    assert_clean_error(code, err, "has no config.json")


def test_unsupported_architecture_names_supported_ones(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    code, _, err = run_cli(capsys, tmp_path, "hi")
    assert_clean_error(code, err, "GPT2LMHeadModel", "LlamaForCausalLM", "Qwen3ForCausalLM")


def test_truncated_safetensors(capsys, tmp_path, tiny_dir):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    code, _, err = run_cli(capsys, broken, "hi")
    assert_clean_error(code, err, "model.safetensors", "truncated or corrupt")


def test_missing_tokenizer(capsys, tmp_path, tiny_dir):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(tiny_dir, bare)
    (bare / "tokenizer.json").unlink()
    code, _, err = run_cli(capsys, bare, "hi")
    assert_clean_error(code, err, "tokenizer.json")


def test_gguf_with_unsupported_tensor_type(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("MINIKV_CACHE", str(tmp_path / "cache"))
    path = write_tiny_gguf(tmp_path / "i32.gguf", int32_tensor="model.layers.1.mlp.up_proj.weight")
    code, _, err = run_cli(capsys, path, "hi")
    assert_clean_error(code, err, "has type I32")


@pytest.mark.parametrize("flag,value,phrase", [("--max-tokens", 0, "max_tokens"), ("--max-tokens", -3, "max_tokens"),
                                               ("--temperature", -0.5, "temperature")])
def test_bad_sampling_flags(capsys, tiny_dir, flag, value, phrase):
    code, _, err = run_cli(capsys, tiny_dir, "hi", flag, value)
    assert_clean_error(code, err, phrase)


def test_bad_ring_settings(capsys, tiny_dir):
    code, _, err = run_cli(capsys, tiny_dir, "hi", "--budget", 60)
    assert_clean_error(code, err, "budget (60) must exceed n_sink + window")
    code, _, err = run_cli(capsys, tiny_dir, "hi", "--policy", "lru")
    assert_clean_error(code, err, "unknown policy 'lru'", "nexus")


def test_policy_options_on_the_command_line(capsys, tiny_dir):
    code, out, err = run_cli(capsys, tiny_dir, "hello", "--temperature", 0, "--budget", 80, "--window", 8,
                             "--max-tokens", 4, "--policy", "nexus:reserve=0,tau=1")
    assert code == 0, err
    assert "policy nexus:tau=1,reserve=0," in err  # the banner names the options that took effect
    code, _, err = run_cli(capsys, tiny_dir, "hi", "--policy", "nexus:reserve=2")
    assert_clean_error(code, err, "0 <= reserve <= 1")
    code, _, err = run_cli(capsys, tiny_dir, "hi", "--policy", "nexus:walk=off")
    assert_clean_error(code, err, "bad option for policy 'nexus'", "walk")


def test_tiny_model_answers_and_streams(capsys, tiny_dir):
    code, out, err = run_cli(capsys, tiny_dir, "hello", "--temperature", 0, "--budget", 128)
    assert code == 0, err
    assert out.endswith("\n") and len(out) > 1


def test_a_lone_argument_is_a_model_only_if_it_is_one_here(tiny_dir, tmp_path, monkeypatch):
    import huggingface_hub.constants

    hub = tmp_path / "hub"  # a Hugging Face cache holding one repo
    snapshot = hub / "models--Qwen--Qwen3-0.6B" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (hub / "models--Qwen--Qwen3-0.6B" / "refs").mkdir()
    (hub / "models--Qwen--Qwen3-0.6B" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    notes = tmp_path / "notes.txt"
    notes.write_text("a file, not a model")

    assert split_model_and_prompt(["What is 2+2?"], None) == (None, "What is 2+2?")
    assert split_model_and_prompt(["yes/no"], None) == (None, "yes/no")  # looks like a repo id, is not cached
    assert split_model_and_prompt([str(notes)], None) == (None, str(notes))  # an existing file, not a model
    assert split_model_and_prompt([str(tiny_dir)], None) == (str(tiny_dir), None)
    assert split_model_and_prompt(["Qwen/Qwen3-0.6B"], None) == ("Qwen/Qwen3-0.6B", None)  # in the cache
    assert split_model_and_prompt(["missing.gguf"], None) == ("missing.gguf", None)  # a typo says "does not exist"
    assert split_model_and_prompt(["m.gguf", "hi"], None) == ("m.gguf", "hi")
    assert split_model_and_prompt(["Org/Uncached", "hi"], None) == ("Org/Uncached", "hi")  # two: model, prompt
    assert split_model_and_prompt(["yes/no"], "Org/Model") == ("Org/Model", "yes/no")  # --model forces it


def test_each_chat_turn_samples_with_its_own_reproducible_seed(monkeypatch):
    """The same session seed gives the same conversation; its turns do not share a seed (they repeated)."""
    import minikv.cli as cli

    def session(seed: int) -> list[int]:
        lines = iter(["My name is Ada.", "/reset", "What is my name?", "", "Again?"])
        seeds = []

        def fake_input(prompt=""):
            try:
                return next(lines)
            except StopIteration:
                raise EOFError from None

        monkeypatch.setattr("builtins.input", fake_input)
        monkeypatch.setattr(cli.sys, "stdin", type("Tty", (), {"isatty": lambda self: True})())
        monkeypatch.setattr(cli, "build_engine", lambda args, model: SimpleNamespace(close_session=lambda sid: True))
        monkeypatch.setattr(cli, "_print_banner", lambda engine: None)
        monkeypatch.setattr(cli, "_answer",
                            lambda engine, messages, params, **kw: seeds.append(params.seed) or "reply")
        assert main(["run", "--seed", str(seed)]) == 0
        return seeds

    first = session(5)
    assert len(first) == 3 and len(set(first)) == 3
    assert session(5) == first
    assert session(6) != first
    assert first[0] == cli.turn_seed(5, 0)  # `minikv run --seed 5 "..."` answers like the chat's first turn


def test_a_request_that_fails_while_running_exits_1_with_one_line(tiny_dir):
    """Before: the engine's traceback on stderr, nothing on stdout, and exit status 0."""
    import os
    import subprocess
    import sys

    script = ("import sys, minikv.model_runner as m\n"
              "def broken(self, plan): raise RuntimeError('the kernel broke')\n"
              "m.ModelRunner.run = broken\n"
              "from minikv.cli import main\n"
              f"sys.exit(main(['run', {str(tiny_dir)!r}, 'hi', '--max-tokens', '2', '--budget', '128']))\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MINIKV_DEBUG": ""}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    errors = [line for line in done.stderr.splitlines() if line.startswith("minikv: error:")]
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert len(errors) == 1 and "the kernel broke" in errors[0], done.stderr


def test_threads_default_to_omp_num_threads_or_half_the_cpus(monkeypatch):
    import os

    import torch

    import minikv.cli as cli

    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert cli.default_threads() == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert cli.default_threads() == max(1, len(os.sched_getaffinity(0)) // 2)
    before = torch.get_num_threads()
    try:
        assert cli.set_threads(1) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_max_model_len_bounds_requests_and_says_when_it_is_past_the_trained_context(capsys, tiny_dir):
    original = ("--positions", "original")  # under "ring" (the default) max_model_len does not bound the ring
    code, _, err = run_cli(capsys, tiny_dir, "hello there", "--budget", 128, "--max-model-len", 8, *original)
    assert_clean_error(code, err, "max_model_len (8)")
    code, out, err = run_cli(capsys, tiny_dir, "hi", "--budget", 128, "--max-model-len", 40000, "--temperature", 0,
                             *original)
    assert code == 0, err
    assert "past the model's trained context (32768 tokens)" in err  # the tiny checkpoint's context


def test_positions_ring_lifts_max_model_len_and_full_refuses_it(capsys, tiny_dir):
    code, out, err = run_cli(capsys, tiny_dir, "hello there, a prompt longer than eight tokens", "--budget", 80,
                             "--window", 8, "--max-model-len", 8, "--positions", "ring", "--temperature", 0)
    assert code == 0, err
    assert out.strip()
    code, _, err = run_cli(capsys, tiny_dir, "hi", "--policy", "full", "--positions", "ring")
    assert_clean_error(code, err, "positions='ring' needs an evicting policy")
    # "ring" is the default for evicting policies: the same run without the flag, and no note about the context
    code, out, err = run_cli(capsys, tiny_dir, "hi", "--budget", 128, "--max-model-len", 40000, "--temperature", 0)
    assert code == 0, err
    assert out.strip() and "past the model's trained context" not in err

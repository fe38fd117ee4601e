"""`minikv run` reports bad input as one clear line on stderr, exit code 2, and no traceback."""

import json

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
                             "--max-tokens", 4, "--policy", "nexus:reserve=0,tau=0")
    assert code == 0, err
    assert "policy nexus:tau=0,reserve=0," in err  # the banner names the options that took effect
    code, _, err = run_cli(capsys, tiny_dir, "hi", "--policy", "nexus:reserve=2")
    assert_clean_error(code, err, "0 <= reserve <= 1")
    code, _, err = run_cli(capsys, tiny_dir, "hi", "--policy", "nexus:walk=off")
    assert_clean_error(code, err, "bad option for policy 'nexus'", "walk")


def test_tiny_model_answers_and_streams(capsys, tiny_dir):
    code, out, err = run_cli(capsys, tiny_dir, "hello", "--temperature", 0, "--budget", 128)
    assert code == 0, err
    assert out.endswith("\n") and len(out) > 1


def test_a_lone_argument_is_a_model_only_if_it_names_one(tiny_dir):
    assert split_model_and_prompt(["What is 2+2?"], None) == (None, "What is 2+2?")
    assert split_model_and_prompt([str(tiny_dir)], None) == (str(tiny_dir), None)
    assert split_model_and_prompt(["Qwen/Qwen3-0.6B"], None) == ("Qwen/Qwen3-0.6B", None)
    assert split_model_and_prompt(["m.gguf", "hi"], None) == ("m.gguf", "hi")

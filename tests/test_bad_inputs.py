"""Bad input, table by table: every case is refused with a minikv error that names what was wrong.

- CLI: `python -m minikv run ...` in a subprocess on a tiny checkpoint must exit 2 with exactly one
  `minikv: error: ...` line on stderr, the phrases listed (the field and the fix), and no traceback.
- Python API: a minikv exception (InvalidRequestError, ConfigError, ModelLoadError) whose message holds
  the phrases listed; then a good request on the same engine must still succeed.

Subprocesses cost an interpreter start each, so the CLI cases generate at most 2 tokens.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import torch

import minikv
from minikv.engine import Engine
from minikv.errors import ConfigError, InvalidRequestError, MiniKVError, ModelLoadError
from minikv.policies import POLICIES, make_policy
from minikv.sampling import SamplingParams

from tiny_engine import tiny_checkpoint

REPO_ROOT = Path(minikv.__file__).resolve().parents[1]
GOOD = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)


# --- the checkpoints the CLI cases break --------------------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """The tiny checkpoint and broken copies of it, by name."""
    root = tmp_path_factory.mktemp("bad-models")
    good = tiny_checkpoint(root / "good")

    def broken(name: str, edit) -> Path:
        path = root / name
        shutil.copytree(good, path)
        edit(path)
        return path

    def config_with(**fields):
        def edit(path: Path):
            config = json.loads((path / "config.json").read_text())
            (path / "config.json").write_text(json.dumps({**config, **fields}))
        return edit

    return {
        "good": good,
        "config-list": broken("config-list", lambda p: (p / "config.json").write_text("[1, 2, 3]")),
        "config-not-json": broken("config-not-json", lambda p: (p / "config.json").write_text("{oops")),
        "zero-heads": broken("zero-heads", config_with(num_attention_heads=0)),
        "heads-as-text": broken("heads-as-text", config_with(num_attention_heads="four")),
        "wider-hidden": broken("wider-hidden", config_with(hidden_size=80)),  # the weights are 64 wide
        "kv-heads-3": broken("kv-heads-3", config_with(num_key_value_heads=3)),  # 4 heads: not a multiple
        "gpt2": broken("gpt2", config_with(architectures=["GPT2LMHeadModel"])),
        "bad-index": broken("bad-index", lambda p: (p / "model.safetensors.index.json").write_text("{not json")),
    }


def run_minikv(*args, stdin: bytes = b"", cache: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1",
           "TRITON_INTERPRET": "1", "MINIKV_DEBUG": ""}
    if cache is not None:
        env["MINIKV_CACHE"] = str(cache)
    return subprocess.run([sys.executable, "-m", "minikv", "run", *args], input=stdin, capture_output=True,
                          env=env, timeout=300)


FAST = ["--max-tokens", "2", "--budget", "80", "--window", "8", "--chunk", "16", "--temperature", "0"]

# (case id, model name or None for the argument as given, extra argv, stdin, phrases the error must hold)
CLI_CASES = [
    ("config is a list", "config-list", ["hi"], b"", ["config.json must hold a JSON object", "list"]),
    ("config is not JSON", "config-not-json", ["hi"], b"", ["cannot read", "config.json"]),
    ("zero attention heads", "zero-heads", ["hi"], b"", ["num_attention_heads", "positive integer"]),
    ("heads as text", "heads-as-text", ["hi"], b"", ["num_attention_heads", "'four'"]),
    ("hidden_size contradicts weights", "wider-hidden", ["hi"], b"",
     ["model.embed_tokens.weight", "[384, 80]", "[384, 64]", "check hidden_size"]),
    ("kv heads not a divisor", "kv-heads-3", ["hi"], b"", ["num_key_value_heads (3)"]),
    ("unsupported architecture", "gpt2", ["hi"], b"", ["GPT2LMHeadModel", "LlamaForCausalLM"]),
    ("index is not JSON", "bad-index", ["hi"], b"", ["model.safetensors.index.json", "download it again"]),
    ("model path does not exist", None, ["/nonexistent/model-dir", "hi"], b"", ["does not exist"]),
    ("missing gguf", None, ["/nonexistent/model.gguf", "hi"], b"", ["GGUF file", "does not exist"]),
    ("device bogus", "good", ["hi", "--device", "bogus"], b"", ["--device", "unknown device 'bogus'", "cpu, cuda"]),
    ("device cuda without CUDA", "good", ["hi", "--device", "cuda"], b"", ["--device", "not available", "--device cpu"]),
    ("dtype unknown", "good", ["hi", "--dtype", "float8"], b"", ["--dtype", "invalid choice", "bfloat16"]),
    ("invalid UTF-8 in argv", "good", [b"caf\xe9 au lait"], b"", ["the prompt is not valid UTF-8", "0xe9", "iconv"]),
    ("invalid UTF-8 on stdin", "good", [], b"caf\xe9 au lait", ["standard input is not valid UTF-8", "0xe9", "offset 3"]),
    ("empty stdin", "good", [], b"  \n", ["no prompt"]),
    ("int option given a float", "good", ["hi", "--policy", "nexus:hops=1.5"], b"",
     ["hops=1.5", "an integer", "nexus's options", "decay (float"]),
    ("NaN option", "good", ["hi", "--policy", "nexus:gamma=nan"], b"", ["gamma=nan", "finite number", "nexus's options"]),
    ("text for a float option", "good", ["hi", "--policy", "nexus:tau=abc"], b"", ["tau='abc'", "finite number"]),
    ("unknown policy option", "good", ["hi", "--policy", "nexus:bogus=1"], b"", ["no option 'bogus'", "reserve (float"]),
    ("option out of range", "good", ["hi", "--policy", "nexus:decay=2"], b"", ["decay=2", "in [0, 1]"]),
    ("unknown policy", "good", ["hi", "--policy", "lru"], b"", ["unknown policy 'lru'", "nexus", "h2o"]),
    ("budget within the protected slots", "good", ["hi", "--budget", "60", "--window", "64"], b"",
     ["budget (60) must exceed n_sink + window", "raise --budget"]),
    ("budget zero", "good", ["hi", "--budget", "0"], b"", ["--budget", "positive integer"]),
    ("chunk not a number", "good", ["hi", "--chunk", "big"], b"", ["--chunk", "positive integer", "'big'"]),
    ("negative window", "good", ["hi", "--window", "-1"], b"", ["--window", "integer >= 0"]),
    ("threads zero", "good", ["hi", "--threads", "0"], b"", ["--threads", "positive integer"]),
    ("epikv budget below chunk", "good", ["hi", "--policy", "epikv", "--chunk", "256"], b"",
     ["epikv keeps a whole prefill chunk", "budget (80)"]),
    ("max_tokens zero", "good", ["hi", "--max-tokens", "0"], b"", ["max_tokens=0", "must be >= 1"]),
    ("top_p above 1", "good", ["hi", "--top-p", "1.5"], b"", ["top_p=1.5", "(0, 1]"]),
    ("prompt over max-model-len", "good", ["a prompt of many tokens", "--max-model-len", "10", "--positions",
                                           "original"], b"",
     ["exceeds max_model_len (10)", "lower max_tokens"]),
    ("too many positionals", "good", ["hi", "there"], b"", ["too many arguments", "quote the prompt"]),
]


@pytest.mark.parametrize("case, model, argv, stdin, phrases", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_refuses_with_one_clear_line(models, tmp_path, case, model, argv, stdin, phrases):
    if case == "device cuda without CUDA" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    # FAST first: a case's own options come later and win; the positionals stay together.
    done = run_minikv(*FAST, *([str(models[model])] if model else []), *argv, stdin=stdin, cache=tmp_path)
    stderr = done.stderr.decode("utf-8", "replace")
    errors = [line for line in stderr.splitlines() if line.startswith("minikv: error:")]
    assert done.returncode == 2, stderr
    assert "Traceback" not in stderr
    assert len(errors) == 1, stderr
    for phrase in phrases:
        assert phrase in errors[0], errors[0]


def test_cli_good_request_on_the_same_checkpoint(models):
    done = run_minikv(*FAST, str(models["good"]), "hello")
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.strip()


# --- the Python API ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(loaded):
    return Engine(loaded, policy="nexus", budget=48, window=8, chunk=16, max_num_seqs=2, max_model_len=256)


def replaced(**fields):
    """SamplingParams changed after construction (so __post_init__ has not seen the values): the engine
    validates its own copy when the request is added."""
    params = dataclasses.replace(GOOD)
    for name, value in fields.items():
        setattr(params, name, value)
    return params


LONE_SURROGATE = "caf\udce9"  # what Python makes of the byte 0xe9 in argv (surrogateescape)

# (case id, a function of the engine that must raise, the exception type, phrases of its message)
API_CASES = [
    ("stop is an int", lambda c: SamplingParams(stop=123), InvalidRequestError, ["stop=123", "list of strings"]),
    ("stop holds an empty string", lambda c: SamplingParams(stop=["ok", ""]), InvalidRequestError, ["stop", "non-empty"]),
    ("stop_token_ids is an int", lambda c: SamplingParams(stop_token_ids=5), InvalidRequestError,
     ["stop_token_ids=5", "list of token ids"]),
    ("max_tokens as text", lambda c: SamplingParams(max_tokens="3"), InvalidRequestError, ["max_tokens='3'", "integer"]),
    ("max_tokens a float", lambda c: SamplingParams(max_tokens=1.5), InvalidRequestError, ["max_tokens=1.5", "integer"]),
    ("temperature as text", lambda c: SamplingParams(temperature="hot"), InvalidRequestError, ["temperature", "number"]),
    ("temperature NaN", lambda c: SamplingParams(temperature=math.nan), InvalidRequestError, ["temperature", "number"]),
    ("top_p zero", lambda c: SamplingParams(top_p=0), InvalidRequestError, ["top_p=0", "(0, 1]"]),
    ("logprobs a float", lambda c: SamplingParams(logprobs=1.5), InvalidRequestError, ["logprobs=1.5", "integer"]),
    ("logprobs too many", lambda c: SamplingParams(logprobs=21), InvalidRequestError, ["logprobs=21", "[0, 20]"]),
    ("min_tokens above max_tokens", lambda c: SamplingParams(max_tokens=2, min_tokens=5), InvalidRequestError,
     ["min_tokens=5", "max_tokens=2"]),
    ("ignore_eos as text", lambda c: SamplingParams(ignore_eos="no"), InvalidRequestError, ["ignore_eos='no'", "True or False"]),
    ("seed as text", lambda c: SamplingParams(seed="x"), InvalidRequestError, ["seed='x'", "integer"]),
    ("params changed after construction", lambda c: c.engine.add_request("hi", replaced(top_k=-5)), InvalidRequestError,
     ["top_k=-5"]),
    ("params not SamplingParams", lambda c: c.engine.add_request("hi", {"max_tokens": 3}), InvalidRequestError,
     ["SamplingParams", "dict"]),
    ("lone surrogate in the prompt", lambda c: c.engine.add_request(LONE_SURROGATE, GOOD), InvalidRequestError,
     ["lone surrogate", "index 3", "errors='replace'"]),
    ("lone surrogate in a chat message", lambda c: c.engine.add_request([{"role": "user", "content": LONE_SURROGATE}], GOOD),
     InvalidRequestError, ["chat message", "lone surrogate"]),
    ("bare int to generate", lambda c: c.engine.generate(5, GOOD, use_tqdm=False), InvalidRequestError,
     ["prompts must be", "got int"]),
    ("a dict to generate", lambda c: c.engine.generate({"role": "user", "content": "hi"}, GOOD, use_tqdm=False),
     InvalidRequestError, ["prompts must be", "got dict"]),
    ("bare int to add_request", lambda c: c.engine.add_request(5, GOOD), InvalidRequestError, ["a prompt is a string"]),
    ("empty text prompt", lambda c: c.engine.add_request("", GOOD), InvalidRequestError, ["prompt is empty"]),
    ("empty token list", lambda c: c.engine.add_request([], GOOD), InvalidRequestError, ["a prompt is a string"]),
    ("token id out of vocabulary", lambda c: c.engine.add_request([1, 99999], GOOD), InvalidRequestError,
     ["token ids [99999]", "[0, 384)"]),
    ("negative token id", lambda c: c.engine.add_request([1, -4], GOOD), InvalidRequestError, ["token ids [-4]"]),
    ("stop token id out of vocabulary", lambda c: c.engine.add_request("hi", SamplingParams(stop_token_ids=[5000])),
     InvalidRequestError, ["stop_token_ids [5000]", "vocabulary"]),
    ("prompt + max_tokens over max_model_len",
     lambda c: c.engine.add_request([1] * 250, SamplingParams(max_tokens=10, positions="original")),
     InvalidRequestError, ["260 exceeds max_model_len (256)", "lower max_tokens"]),
    ("unknown chat role", lambda c: c.engine.add_request([{"role": "wizard", "content": "hi"}], GOOD), InvalidRequestError,
     ["role 'wizard'", "user"]),
    ("request_id an int", lambda c: c.engine.add_request("hi", GOOD, request_id=7), InvalidRequestError,
     ["request_id", "non-empty string"]),
    ("request_id empty", lambda c: c.engine.add_request("hi", GOOD, request_id=""), InvalidRequestError, ["request_id"]),
    ("wrong number of params", lambda c: c.engine.generate(["a", "b"], [GOOD], use_tqdm=False), InvalidRequestError,
     ["1 SamplingParams for 2 prompts"]),
    ("bad prompt in a batch", lambda c: c.engine.generate(["fine", ""], GOOD, use_tqdm=False), InvalidRequestError,
     ["prompt 1", "empty"]),
    # Engine settings: refused before anything is allocated; the engine of the table serves on.
    ("unknown policy", lambda c: Engine(c.loaded, policy="lru"), ConfigError, ["unknown policy 'lru'", "nexus"]),
    ("int policy option a float", lambda c: Engine(c.loaded, policy_options={"hops": 1.5}), ConfigError,
     ["hops=1.5", "an integer", "nexus's options"]),
    ("float policy option NaN", lambda c: Engine(c.loaded, policy_options={"gamma": math.nan}), ConfigError,
     ["gamma=nan", "finite number"]),
    ("unknown policy option", lambda c: Engine(c.loaded, policy_options={"bogus": 1}), ConfigError,
     ["no option 'bogus'", "decay (float"]),
    ("policy options not a dict", lambda c: Engine(c.loaded, policy_options=["tau", 0]), ConfigError,
     ["policy_options", "dict"]),
    ("budget within the protected slots", lambda c: Engine(c.loaded, budget=60, max_model_len=256), ConfigError,
     ["budget (60) must exceed n_sink + window (4 + 64"]),
    ("budget as text", lambda c: Engine(c.loaded, budget="4096"), ConfigError, ["budget='4096'", "integer >= 1"]),
    ("chunk zero", lambda c: Engine(c.loaded, chunk=0), ConfigError, ["chunk=0", "integer >= 1"]),
    ("chunk a float", lambda c: Engine(c.loaded, chunk=1.5), ConfigError, ["chunk=1.5"]),
    ("n_sink a float", lambda c: Engine(c.loaded, n_sink=1.5), ConfigError, ["n_sink=1.5"]),
    ("negative window", lambda c: Engine(c.loaded, window=-1), ConfigError, ["window=-1", ">= 0"]),
    ("no rings", lambda c: Engine(c.loaded, max_num_seqs=0), ConfigError, ["max_num_seqs=0"]),
    ("negative max_model_len", lambda c: Engine(c.loaded, max_model_len=-5), ConfigError, ["max_model_len=-5"]),
    ("epikv budget below chunk", lambda c: Engine(c.loaded, policy="epikv", budget=100, chunk=512),
     ConfigError, ["budget (100) must be >= n_sink + chunk"]),
    ("snapkv even pool kernel", lambda c: make_policy("snapkv", pool_kernel=4), ConfigError,
     ["pool_kernel=4", "odd number"]),
    ("epikv band reversed", lambda c: make_policy("epikv", lower_band=(0.5, 0.25)), ConfigError,
     ["lower_band", "start < end"]),
    ("NaN inside a tuple option", lambda c: make_policy("epikv", upper_band=(0.5, math.nan)), ConfigError,
     ["upper_band", "tuple of 2 finite numbers"]),
    ("nestedkv prior of two", lambda c: make_policy("nestedkv", prior=(0.5, 0.5)), ConfigError,
     ["prior", "tuple of 3 finite numbers"]),
    ("unknown dtype", lambda c: Engine(c.loaded.path, dtype="float8"), ConfigError, ["unknown dtype 'float8'"]),
    ("unknown device", lambda c: Engine(c.loaded.path, device="bogus"), ConfigError, ["unknown device 'bogus'"]),
    ("model path does not exist", lambda c: Engine("/nonexistent/model-dir"), ModelLoadError, ["does not exist"]),
]


@dataclasses.dataclass
class Context:
    """What a bad call may use: the table's engine and the model it runs (an Engine over it loads nothing)."""

    engine: Engine
    loaded: object


@pytest.mark.parametrize("case, bad, error, phrases", API_CASES, ids=[c[0] for c in API_CASES])
def test_api_refuses_and_the_engine_serves_on(loaded, engine, case, bad, error, phrases):
    with pytest.raises(error) as raised:
        bad(Context(engine, loaded))
    assert isinstance(raised.value, MiniKVError)
    for phrase in phrases:
        assert phrase in str(raised.value), str(raised.value)
    out = engine.generate(["a good request"], GOOD, use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 3
    assert engine.pool.num_used == engine.pool.num_reserved == 0 and engine.num_requests == 0


def test_the_tables_hold_at_least_40_cases():
    assert len(CLI_CASES) + len(API_CASES) >= 40


# --- every float option of every policy: finite only -----------------------------------------


FLOAT_OPTIONS = [(name, field.name) for name, cls in POLICIES.items() for field in dataclasses.fields(cls)
                 if typing.get_type_hints(cls)[field.name] is float]


@pytest.mark.parametrize("policy, option", FLOAT_OPTIONS, ids=[f"{p}:{o}" for p, o in FLOAT_OPTIONS])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_every_float_option_of_every_policy_refuses_nan_and_inf(policy, option, value):
    with pytest.raises(ConfigError, match=f"{option}=.*finite number"):
        make_policy(policy, **{option: value})
    make_policy(policy, **{option: getattr(POLICIES[policy](), option)})  # its default is fine


def test_float_options_exist_in_several_policies():
    assert {"nexus", "nestedkv"} <= {policy for policy, _ in FLOAT_OPTIONS}

"""The prepared GPU check (issue 15): one run on one H100/H200, one Markdown report.

    bash tools/gpu_check.sh              # everything, <= 8 minutes; report in $OUT/gpu_check.md
    bash tools/gpu_check.sh --quick      # a second, shorter run (at most 275 s)
    bash tools/gpu_check.sh --dry-run    # CPU only, tiny sizes: checks that the script itself works (CI)

Sections (each in its own process, with its own time limit, so a CUDA error, a hang or a crash in one
leaves the others and the report intact; a failing section writes its traceback into the report):

  env      the GPU, torch / Triton / Python versions, SM count, copy bandwidth, which packages exist
  tests    `pytest -m gpu tests/test_gpu_kernels.py`, compiled (TRITON_INTERPRET=0); without pytest, a
           plain runner of the same test functions
  engine   the whole engine on CUDA (Triton kernels, CUDA graphs) against the CPU reference engine on small
           random models: the same greedy tokens for full and nexus, fp32; bf16 agreement for information
  kernels  attend_score_sample vs SDPA over a dense copy of the same rings, split-K off and on
           (tools/bench_kernels.py)
  decode   decode tok/s and % of the bandwidth roofline at batch 1, 16, 64 with CUDA graphs on
           Qwen3-0.6B- and Llama-3.2-1B-shaped random models (tools/bench_decode.py)
  memory   full vs nexus at one KV pool on 8k-16k-token prompts: concurrency, tok/s, TTFT, TPOT
           (minikv.bench.make_requests / run_load)

Needs only torch, triton and tokenizers (pytest for the tests section, pytest-xdist to compile in
parallel): models are built in memory with random weights in the real shapes (tools/random_model.py); no
network, no checkpoint, no transformers / huggingface_hub / gguf / jinja2 / tqdm / fastapi.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib.metadata
import importlib.util
import itertools
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT / "tools"
REPORT_NAME = "gpu_check.md"
LOG_NAME = "gpu_check.log"


# --- sections and their time limits --------------------------------------------------------------


@dataclass(frozen=True)
class Section:
    name: str
    title: str
    limits: dict  # seconds, by mode: full / quick / dry


SECTIONS = [
    Section("env", "1. Environment", dict(full=20, quick=20, dry=120)),
    Section("tests", "2a. GPU tests: compiled kernels vs the reference", dict(full=125, quick=70, dry=180)),
    Section("engine", "2b. The engine on CUDA vs the CPU reference", dict(full=55, quick=40, dry=180)),
    Section("kernels", "3. Kernel benchmarks: attend_score_sample vs plain decode attention",
            dict(full=55, quick=35, dry=120)),
    Section("decode", "4. Decode throughput and the bandwidth roofline (CUDA graphs)",
            dict(full=105, quick=55, dry=180)),
    Section("memory", "5. Fixed KV memory: full vs nexus at one pool", dict(full=90, quick=50, dry=180)),
]
# Run only where more than one GPU is visible (then appended to a default run), or when named in --sections:
# with a dry run, on CPU ranks. Not in SECTIONS, whose limits must fit issue 15's 8 minutes on one GPU; on a
# machine of several GPUs, run it on its own (`bash tools/gpu_check.sh --sections tp`).
MULTI_GPU_SECTIONS = [
    Section("tp", "6. Tensor parallelism: tok/s at N = 1, 2, 4 ranks (several GPUs)", dict(full=420, quick=240, dry=240)),
]
# Sized without a GPU (none was lent while writing this): on a fresh machine much of each GPU section's
# time is Triton compiling the variants it launches (dozens per section), and long prefills run the fp32
# (IEEE-dot) prefill kernel: section 5's 8k-16k prompts are the heaviest work. The report's last table
# shows where the time went; resize here from it.
# The whole run's limit: issue 15 allows 8 minutes; the shell wrapper's `timeout` is the backstop above it.
TOTAL_LIMITS = dict(full=465, quick=275, dry=900)
SECTION_FUNCS = {}  # name -> function(ctx, out), filled by @section below


def section(name):
    def register(fn):
        SECTION_FUNCS[name] = fn
        return fn

    return register


class SectionFailed(Exception):
    """A section ran and found a problem (failed tests, different tokens); its report says which."""


class SectionSkipped(Exception):
    """A section that cannot run here (no CUDA outside a dry run)."""


@dataclass
class Context:
    mode: str  # full / quick / dry
    limit_s: float
    no_pytest: bool = False

    def __post_init__(self):
        self.started = time.monotonic()

    def pick(self, *, full, quick, dry):
        return {"full": full, "quick": quick, "dry": dry}[self.mode]

    def time_left(self) -> float:
        return self.limit_s - (time.monotonic() - self.started)

    @property
    def dry(self) -> bool:
        return self.mode == "dry"

    def device(self):
        """cuda in a GPU run; cpu in a dry run. A GPU run without CUDA skips the section."""
        import torch

        if self.dry:
            return torch.device("cpu")
        if not torch.cuda.is_available():
            raise SectionSkipped("no CUDA device here: this section measures the GPU path "
                                 "(run with --dry-run to check the script on a CPU)")
        return torch.device("cuda")


class Fragment:
    """A section's Markdown, appended and flushed line by line: a section stopped by its time limit still
    leaves in the report every row it measured."""

    def __init__(self, path: Path):
        self.path = path

    def write(self, text: str = "") -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(text + "\n")
        print(text, flush=True)


def free_device_memory(device) -> None:
    """Give the last model's / engine's memory back before the next one (CUDA graphs hold pools until
    collected)."""
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def size_text(num_bytes: float) -> str:
    return f"{num_bytes / 2**30:.2f} GiB" if num_bytes >= 2**30 else f"{num_bytes / 2**20:.1f} MiB"


def log(message: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {message}", flush=True)


def enough_time(ctx: Context, out: Fragment, needed_s: float, what: str) -> bool:
    """False (and a note in the report) when fewer than `needed_s` seconds of the section's limit remain."""
    if ctx.time_left() >= needed_s:
        return True
    out.write(f"\n_{what} skipped: {ctx.time_left():.0f} s of the section's {ctx.limit_s:.0f} s limit left, "
              f"about {needed_s:.0f} s needed._")
    return False


# --- 1. environment ------------------------------------------------------------------------------

# package -> what this check needs it for
PACKAGES = {
    "torch": "required", "triton": "required (the kernels)", "tokenizers": "required (tokenizer stand-in)",
    "numpy": "optional (torch uses it if present)", "pytest": "the tests section (else a plain runner)",
    "pytest-xdist": "optional: compiles the GPU tests' kernels in parallel",
    "safetensors": "not needed (models are built in memory)", "transformers": "not needed",
    "huggingface-hub": "not needed", "gguf": "not needed", "jinja2": "not needed", "tqdm": "not needed",
    "fastapi": "not needed",
}


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "missing"


def code_fingerprint() -> str:
    """The minikv commit if git knows it, and a hash of minikv/ and tools/ (the box's copy may lack .git)."""
    digest = hashlib.sha256()
    for path in sorted([*ROOT.glob("minikv/**/*.py"), *ROOT.glob("tools/*.py")]):
        digest.update(path.relative_to(ROOT).as_posix().encode())
        digest.update(path.read_bytes())
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "minikv", "tools"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "", ""
    commit = (commit + (" + local changes" if dirty else "")) if commit else "unknown (no git here)"
    return f"commit {commit}; sha256 of minikv/ + tools/ sources {digest.hexdigest()[:12]}"


def visible_gpus() -> int:
    """GPUs this run may use (nvidia-smi's list, narrowed by CUDA_VISIBLE_DEVICES), without importing torch."""
    try:
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    count = sum(1 for line in listed.splitlines() if line.startswith("GPU "))
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return count if visible is None else min(count, len([d for d in visible.split(",") if d.strip()]))


def nvidia_smi() -> str:
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                               "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        return done.stdout.strip() or done.stderr.strip() or "(no output)"
    except (OSError, subprocess.SubprocessError) as err:
        return f"(not available: {type(err).__name__})"


@section("env")
def run_env(ctx: Context, out: Fragment) -> None:
    import platform

    import torch

    rows = [("date (UTC)", datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")),
            ("minikv code", code_fingerprint()),
            ("python", f"{platform.python_version()} ({sys.executable})"),
            ("torch", f"{torch.__version__} (CUDA {torch.version.cuda})"),
            ("triton", package_version("triton")),
            ("CPU cores", str(os.cpu_count()))]
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        sys.path.insert(0, str(TOOLS))
        from bench_decode import peak_bandwidth

        rows += [("GPU", f"{props.name}, sm_{props.major}{props.minor}, {props.multi_processor_count} SMs, "
                         f"{props.total_memory / 2**30:.1f} GiB"),
                 ("nvidia-smi", nvidia_smi()),
                 ("device-to-device copy", f"{peak_bandwidth('cuda') / 1e9:.0f} GB/s (bytes read + written, "
                                           "1 GiB buffer; the roofline's bandwidth)")]
    else:
        rows.append(("GPU", "none: no CUDA device visible" + (" (dry run: CPU only)" if ctx.dry else "")))
    out.write("| | |\n|---|---|")
    for key, value in rows:
        out.write(f"| {key} | {value} |")
    out.write("\n| package | version | this check |\n|---|---|---|")
    for name, role in PACKAGES.items():
        out.write(f"| {name} | {package_version(name)} | {role} |")
    missing = [n for n, role in PACKAGES.items() if role.startswith("required") and package_version(n) == "missing"]
    if missing:
        raise SectionFailed(f"required packages missing: {', '.join(missing)}")


# --- 2a. the GPU tests ---------------------------------------------------------------------------

GPU_TESTS = "tests/test_gpu_kernels.py"
QUICK_TESTS = "nexus or h2o or streaming or capturable or prefill"  # -k for --quick: 3 of the 6 policies


@section("tests")
def run_tests(ctx: Context, out: Fragment) -> None:
    import torch

    if not torch.cuda.is_available():
        out.write("_No CUDA device: every GPU test is expected to be skipped here "
                  f"({'dry run' if ctx.dry else 'not a GPU run'})._\n")
    if ctx.no_pytest or importlib.util.find_spec("pytest") is None:
        results = run_tests_without_pytest(ctx, out)
    else:
        results = run_tests_with_pytest(ctx, out)
    failed = [name for name, status, _ in results if status in ("failed", "error")]
    counts = {s: sum(1 for _, status, _ in results if status == s) for s in ("passed", "failed", "error", "skipped")}
    out.write(f"\n**{counts['passed']} passed, {counts['failed']} failed, {counts['error']} errors, "
              f"{counts['skipped']} skipped** ({len(results)} collected)")
    if failed:
        out.write("\n| failed test | message |\n|---|---|")
        for name, status, message in results:
            if status in ("failed", "error"):
                out.write(f"| `{name}` | {_one_line(message)} |")
        raise SectionFailed(f"{len(failed)} GPU tests failed")
    if not results:
        raise SectionFailed("no test was collected")


def _one_line(text: str, width: int = 300) -> str:
    line = " ".join((text or "").split()).replace("|", "\\|")
    return line[:width] + ("…" if len(line) > width else "")


def run_tests_with_pytest(ctx: Context, out: Fragment) -> list[tuple[str, str, str]]:
    """pytest in a subprocess (compiled kernels: TRITON_INTERPRET=0), with xdist when it is there (the
    tests compile dozens of kernel variants; in parallel processes that takes a fraction of the time)."""
    import tempfile

    import torch

    junit = Path(tempfile.mkdtemp(prefix="gpu_check_")) / "junit.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", GPU_TESTS, "-q", "-rfE", "-p", "no:cacheprovider",
           f"--junitxml={junit}"]
    if ctx.mode == "quick":
        cmd += ["-k", QUICK_TESTS]
    if torch.cuda.is_available() and importlib.util.find_spec("xdist") is not None:
        cmd += ["-n", str(min(8, os.cpu_count() or 1))]
    env = {**os.environ, "TRITON_INTERPRET": "0"}  # conftest.py only sets it when it is unset
    out.write(f"`{' '.join(cmd[1:]).replace(str(junit), 'junit.xml')}` (TRITON_INTERPRET=0)")
    timeout = max(10.0, ctx.time_left() - 8)
    global _RUNNING
    # its own process group: at the time limit its xdist workers are stopped with it (and with this
    # process, should the parent end the section: run_section's SIGTERM handler)
    proc = _RUNNING = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       text=True, **own_process_group())
    try:
        output, _ = proc.communicate(timeout=timeout)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        output, _ = proc.communicate()
        shutil.rmtree(junit.parent, ignore_errors=True)
        out.write(f"\n**pytest stopped at the section's time limit ({timeout:.0f} s).** Its output's end:")
        out.write("```\n" + "\n".join(output.splitlines()[-40:]) + "\n```")
        raise SectionFailed("pytest ran out of time") from None
    print(output, flush=True)
    results = parse_junit(junit) if junit.is_file() else []
    shutil.rmtree(junit.parent, ignore_errors=True)
    if rc not in (0, 1, 5) or (rc == 1 and not any(s in ("failed", "error") for _, s, _ in results)):
        out.write(f"\npytest exited with {rc}. Its output's end:\n```\n" + "\n".join(output.splitlines()[-40:])
                  + "\n```")
        raise SectionFailed(f"pytest exited with {rc}")
    if any(s in ("failed", "error") for _, s, _ in results):
        out.write("\n<details><summary>pytest output (end)</summary>\n\n```\n"
                  + "\n".join(output.splitlines()[-60:]) + "\n```\n</details>")
    return results


def parse_junit(path: Path) -> list[tuple[str, str, str]]:
    """(test name, passed/failed/error/skipped, message) for each test case of a JUnit XML file."""
    import xml.etree.ElementTree as ET

    results = []
    for case in ET.parse(path).getroot().iter("testcase"):
        status, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                status = {"failure": "failed"}.get(tag, tag)
                message = node.get("message") or (node.text or "")
                break
        results.append((case.get("name", "?"), status, message))
    return results


# The plain runner: enough of pytest's surface for tests/test_gpu_kernels.py (marks, parametrize, skipif)
# when pytest itself is missing. It imports the test module with a stand-in `pytest` module.


class _Mark:
    def __init__(self, name, args=(), kwargs=None):
        self.name, self.args, self.kwargs = name, args, kwargs or {}

    def __call__(self, *args, **kwargs):
        if len(args) == 1 and callable(args[0]) and not kwargs and not self.args:  # @pytest.mark.gpu
            args[0].__dict__.setdefault("pytestmark", []).append(self)
            return args[0]
        if self.args:  # @pytest.mark.parametrize(...) applied to a function
            args[0].__dict__.setdefault("pytestmark", []).append(self)
            return args[0]
        return _Mark(self.name, args, kwargs)


class _Skip(Exception):
    pass


def _stub_pytest():
    import contextlib
    import types

    stub = types.ModuleType("pytest")

    class MarkFactory:
        def __getattr__(self, name):
            return _Mark(name)

    @contextlib.contextmanager
    def raises(expected, match=None):
        try:
            yield
        except expected:
            return
        raise AssertionError(f"did not raise {expected}")

    def skip(reason=""):
        raise _Skip(reason)

    stub.mark = MarkFactory()
    stub.raises, stub.skip = raises, skip
    stub.fixture = lambda *a, **k: (a[0] if a and callable(a[0]) else (lambda fn: fn))
    stub.param = lambda *values, **kwargs: values
    return stub


def _cases(fn) -> list[tuple[str, dict]]:
    """(id, kwargs) for every combination of a function's parametrize marks."""
    axes = []
    for mark in fn.__dict__.get("pytestmark", []):
        if mark.name != "parametrize":
            continue
        names, values = mark.args[0], mark.args[1]
        names = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
        axes.append([dict(zip(names, v if len(names) > 1 else (v,))) for v in values])
    cases = []
    for combo in itertools.product(*axes):
        kwargs = {k: v for part in combo for k, v in part.items()}
        ident = "-".join(str(v) for part in combo for v in part.values())
        cases.append((f"{fn.__name__}[{ident}]" if ident else fn.__name__, kwargs))
    return cases


def run_tests_without_pytest(ctx: Context, out: Fragment) -> list[tuple[str, str, str]]:
    import inspect

    out.write("pytest is not installed here (or --no-pytest): the test functions of "
              f"`{GPU_TESTS}` run through gpu_check's plain runner (marks, parametrize, skipif).")
    os.environ.setdefault("TRITON_INTERPRET", "0")
    sys.modules["pytest"] = _stub_pytest()
    sys.path.insert(0, str(ROOT / "tests"))
    module = importlib.import_module(Path(GPU_TESTS).stem)
    module_marks = getattr(module, "pytestmark", [])
    module_marks = module_marks if isinstance(module_marks, list) else [module_marks]
    results = []
    for name, fn in inspect.getmembers(module, inspect.isfunction):
        if not name.startswith("test_") or fn.__module__ != module.__name__:
            continue
        marks = module_marks + fn.__dict__.get("pytestmark", [])
        skip = next((m.kwargs.get("reason", "skipif") for m in marks if m.name == "skipif" and m.args[0]), None)
        for case_name, kwargs in _cases(fn):
            if ctx.mode == "quick" and not any(word in case_name for word in QUICK_TESTS.split(" or ")):
                continue
            results.append(_run_case(fn, case_name, kwargs, skip))
    return results


def _run_case(fn, name: str, kwargs: dict, skip: str | None) -> tuple[str, str, str]:
    if skip is not None:
        return name, "skipped", skip
    try:
        fn(**kwargs)
    except _Skip as why:
        return name, "skipped", str(why)
    except Exception as err:
        print(f"FAILED {name}\n{traceback.format_exc()}", flush=True)
        return name, "failed", f"{type(err).__name__}: {err}"
    print(f"PASSED {name}", flush=True)
    return name, "passed", ""


# --- 2b. the engine on CUDA vs the CPU reference -------------------------------------------------


def small_shapes(ctx: Context) -> dict:
    """Small random models with the real families' attention features: Llama with GQA 4, head_dim 64 and
    llama3 RoPE scaling; Qwen3 with q/k norm, GQA 2 and head_dim 128."""
    from random_model import MODEL_SHAPES

    common = dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=ctx.pick(full=2, quick=2, dry=1),
                  vocab_size=1024, bos_token_id=1, eos_token_id=2)
    shapes = {"llama, GQA 4, d 64": {**MODEL_SHAPES["llama-3.2-1b"], **common, "num_attention_heads": 8,
                                     "num_key_value_heads": 2},
              "qwen3, GQA 2, d 128": {**MODEL_SHAPES["qwen3-0.6b"], **common, "num_attention_heads": 8,
                                      "num_key_value_heads": 4, "tie_word_embeddings": False}}
    return shapes


def generate_all(engine, prompts: list[list[int]], max_tokens: int) -> list:
    """Greedy outputs of every prompt (with the top-2 logprobs), run through add_request / step; a request
    the engine failed raises (the engine reports a broken forward pass as finish_reason "error")."""
    from minikv.sampling import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, logprobs=2)
    ids = [engine.add_request(p, params) for p in prompts]
    final = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
    outs = [final[i] for i in ids]
    errors = [o.error for o in outs if o.outputs[0].finish_reason == "error"]
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed in the engine: {errors[0]}")
    return outs


def compare_outputs(ref: list, got: list) -> dict:
    """Token equality per request, the largest |logprob difference| of the chosen tokens where both agree,
    and where they part: the position and the reference's top-2 gap there (a gap near 0 is a near-tie)."""
    equal, max_diff, partings = 0, 0.0, []
    for r, g in zip(ref, got):
        rt, gt = r.outputs[0].token_ids, g.outputs[0].token_ids
        same = next((i for i, (a, b) in enumerate(zip(rt, gt)) if a != b), min(len(rt), len(gt)))
        for i in range(same):
            max_diff = max(max_diff, abs(r.outputs[0].logprobs[i][rt[i]].logprob - g.outputs[0].logprobs[i][gt[i]].logprob))
        if same == len(rt) == len(gt):
            equal += 1
        else:
            top = sorted((lp.logprob for lp in r.outputs[0].logprobs[same].values()), reverse=True)
            partings.append((same, top[0] - top[1] if len(top) > 1 else float("nan")))
    evicted = ([o.metrics.num_evicted_tokens for o in ref], [o.metrics.num_evicted_tokens for o in got])
    return dict(equal=equal, n=len(ref), max_diff=max_diff, partings=partings, evicted=evicted)


@section("engine")
def run_engine(ctx: Context, out: Fragment) -> None:
    import torch

    from minikv.config import ModelConfig
    from minikv.engine import Engine
    from minikv.policies.spec import parse_policy
    from random_model import random_loaded_model, random_state

    device = ctx.device()
    lengths = ctx.pick(full=[40, 600, 1100, 1500], quick=[40, 600, 1100, 1500], dry=[20, 150, 300])
    max_tokens = ctx.pick(full=24, quick=16, dry=3)
    settings = dict(budget=ctx.pick(full=512, quick=512, dry=128), chunk=ctx.pick(full=256, quick=256, dry=64),
                    window=ctx.pick(full=64, quick=64, dry=16), max_num_seqs=len(lengths), block_size=16,
                    max_model_len=max(lengths) + max_tokens)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 1024, (n,), generator=gen).tolist() for n in lengths]
    out.write(f"Random models (weights N(0, 0.06), fp32 on the CPU reference), {len(prompts)} prompts of "
              f"{lengths} tokens decoded together, {max_tokens} greedy tokens each; engine settings {settings}. "
              f"Device side: {device}, Triton kernels and CUDA graphs where the device is CUDA.\n")
    out.write("| model | policy | device dtype | requests with equal tokens | max abs Δ logprob (equal tokens) "
              "| where they part (token, ref top-2 gap) | evicted tokens ref / device |\n|---|---|---|---|---|---|---|")
    bad = []
    shapes = small_shapes(ctx)
    if ctx.mode == "quick":
        shapes = dict(list(shapes.items())[1:])  # qwen3 alone: q/k norm and head_dim 128
    for label, shape in shapes.items():
        state = random_state(ModelConfig.from_hf(shape), seed=1, std=0.06)
        ref_model = random_loaded_model(shape, device="cpu", dtype=torch.float32, state=state)
        # nexus as it runs by default, and with the walk and reservoir sampling on (the kernel's heaviest path)
        for policy in ("full", "nexus", "nexus:gamma=0.5,tau=1"):
            if not enough_time(ctx, out, 8, f"{label} / {policy}"):
                raise SectionFailed("ran out of time before every comparison ran")
            spec = parse_policy(policy)
            engine_policy = dict(policy=spec.name, policy_options=spec.options)
            ref = generate_all(Engine(ref_model, **engine_policy, **settings), prompts, max_tokens)
            # bf16 once, for information (every Triton variant compiled costs seconds of the section's limit)
            bf16 = ctx.mode != "quick" and policy == "nexus" and label.startswith("qwen3")
            for dtype in [torch.float32] + [torch.bfloat16] * bf16:
                on_device = random_loaded_model(shape, device=device, dtype=dtype,
                                                state={k: v.to(device) for k, v in state.items()})
                got = generate_all(Engine(on_device, **engine_policy, **settings), prompts, max_tokens)
                c = compare_outputs(ref, got)
                partings = ", ".join(f"{i} ({gap:.2g})" for i, gap in c["partings"]) or "–"
                out.write(f"| {label} | {policy} | {str(dtype).removeprefix('torch.')} | {c['equal']}/{c['n']} | "
                          f"{c['max_diff']:.2g} | {partings} | {c['evicted'][0]} / {c['evicted'][1]} |")
                if dtype == torch.float32:
                    bad += _fp32_problems(label, policy, c)
    out.write("\nfp32 must match: every token equal (a parting at a reference top-2 gap below 1e-3 counts as a "
              "near-tie), |Δ logprob| ≤ 1e-3, the same evicted counts. bf16 rows are for information: bf16 "
              "rounding parts greedy paths of a random model within a few tokens.")
    if bad:
        raise SectionFailed("; ".join(bad))


def _fp32_problems(label: str, policy: str, c: dict) -> list[str]:
    problems = [f"{label}/{policy}: tokens part at {i} with a top-2 gap of {gap:.2g}"
                for i, gap in c["partings"] if not gap < 1e-3]
    if c["max_diff"] > 1e-3:
        problems.append(f"{label}/{policy}: logprobs differ by {c['max_diff']:.2g}")
    if c["evicted"][0] != c["evicted"][1] and not c["partings"]:
        problems.append(f"{label}/{policy}: evicted counts differ")
    return problems


# --- 3. kernel benchmarks ------------------------------------------------------------------------


@section("kernels")
def run_kernels(ctx: Context, out: Fragment) -> None:
    import torch

    import bench_kernels

    device = ctx.device()
    issue4 = (4096, 64, 4)
    cases = ctx.pick(
        full=[issue4, (4096, 1, 4), (4096, 16, 4), (16384, 64, 4), (16384, 1, 4), (16384, 16, 4), (1024, 64, 4),
              (1024, 1, 4), (1024, 16, 4), (4096, 64, 8), (4096, 1, 8)],
        quick=[issue4, (4096, 1, 4), (4096, 16, 4)], dry=[(128, 1, 2)])
    dtype = torch.float32 if ctx.dry else torch.bfloat16
    warmup, repeats = ctx.pick(full=(3, 20), quick=(2, 10), dry=(0, 1))
    shape = ctx.pick(full={}, quick={}, dry=dict(head_dim=32, num_kv_heads=2, splits=2))
    out.write(f"{str(dtype).removeprefix('torch.')}, head_dim {shape.get('head_dim', bench_kernels.HEAD_DIM)}, "
              f"{shape.get('num_kv_heads', bench_kernels.NUM_KV_HEADS)} KV heads, full paged rings "
              f"(block_size {bench_kernels.BLOCK_SIZE}, blocks scattered), median of {repeats} runs after {warmup}; "
              "splits = the automatic split-K choice (1: split-K does not apply).\n")
    if ctx.dry:
        out.write("_Dry run: the Triton kernel under the interpreter on CPU, split-K forced to 2 programs, "
                  "wall-clock: not a GPU figure._\n")
    out.write(bench_kernels.TABLE_HEADER)
    measured = {}
    for budget, batch, group in cases:
        if not enough_time(ctx, out, 6 if measured else 0, f"budget {budget}, batch {batch}, GQA {group}"):
            break
        kv_bytes, splits, t = bench_kernels.bench_case(budget, batch, group, dtype, warmup, repeats, device=device,
                                                       **shape)
        measured[(budget, batch, group)] = t
        out.write(bench_kernels.format_row(budget, batch, group, kv_bytes, splits, t))
        free_device_memory(device)
    if issue4 in measured and not ctx.dry:
        t = measured[issue4]
        ratio = t["nexus"] / t["sdpa"]
        out.write(f"\nIssue 4 target: attend_score_sample ≤ 1.15× plain attention at budget 4096, batch 64 (GQA 4): "
                  f"nexus {ratio:.2f}× SDPA, plain kernel {t['plain'] / t['sdpa']:.2f}× — "
                  f"{'met' if ratio <= 1.15 else 'NOT met'}.")


# --- 4. decode throughput ------------------------------------------------------------------------


@section("decode")
def run_decode(ctx: Context, out: Fragment) -> None:
    import torch

    import bench_decode
    from random_model import MODEL_SHAPES, random_loaded_model, shrunk

    device = ctx.device()
    runs = ctx.pick(full=[("qwen3-0.6b", "nexus"), ("llama-3.2-1b", "nexus"), ("qwen3-0.6b", "full")],
                    quick=[("qwen3-0.6b", "nexus")],
                    dry=[("qwen3-0.6b", "nexus"), ("llama-3.2-1b", "nexus"), ("qwen3-0.6b", "full")])
    batches = ctx.pick(full=(1, 16, 64), quick=(1, 16, 64), dry=(1, 2))
    budget = ctx.pick(full=4096, quick=4096, dry=128)
    steps, warmup = ctx.pick(full=(32, 4), quick=(16, 3), dry=(2, 1))
    chunk = ctx.pick(full=2048, quick=2048, dry=64)
    dtype = torch.float32 if ctx.dry else torch.bfloat16
    bandwidth = bench_decode.peak_bandwidth(device, megabytes=ctx.pick(full=1024, quick=1024, dry=64))
    out.write(f"Random weights in the real shapes, {str(dtype).removeprefix('torch.')}, prompts of {budget} tokens "
              f"(every ring full: each step evicts), chunk {chunk}, block_size 16; the batch grows "
              f"{' → '.join(map(str, batches))} in one engine; {steps} timed `engine.step()` calls after {warmup} (step ms: what a caller gets, "
              "sampling and host bookkeeping included), then the CUDA graph replayed alone (graph ms). Roofline = "
              f"(weights + live KV bytes) / {bandwidth / 1e9:.0f} GB/s, the measured copy bandwidth. `full` holds "
              "the same context (prompt + generated) without eviction.\n")
    out.write(bench_decode.TABLE_HEADER)
    rows = []
    for name, policy in runs:
        if not enough_time(ctx, out, 0 if not rows else 25, f"{name} / {policy}"):
            break
        shape = shrunk(MODEL_SHAPES[name]) if ctx.dry else MODEL_SHAPES[name]
        loaded = random_loaded_model(shape, device=device, dtype=dtype)
        rows += bench_decode.bench_model(name, loaded, batches=batches, budget=budget, bandwidth=bandwidth,
                                         policy=policy, steps=steps, warmup=warmup, chunk=chunk,
                                         emit=lambda row: out.write(bench_decode.format_row(row)))
        del loaded
        free_device_memory(device)
    if not ctx.dry:
        _decode_targets(out, rows)


def _decode_targets(out: Fragment, rows: list[dict]) -> None:
    """Issue 4: >= 70% of the roofline at batch 1 and 64 with CUDA graphs; issue 13: nexus decode at an
    equal context <= 1.10x full's."""
    for row in rows:
        if row["policy"] == "nexus" and row["batch"] in (1, 64):
            verdict = "met" if row["roofline"] >= 0.70 else "NOT met"
            out.write(f"- issue 4 (≥ 70% of the roofline with CUDA graphs), {row['model']} batch {row['batch']}: "
                      f"{100 * row['roofline']:.0f}% per engine step, "
                      + (f"{100 * row['graph_roofline']:.0f}% per graph replay" if row["graph_ms"] else "no graph")
                      + f" — {verdict}")
    full = {(r["model"], r["batch"]): r for r in rows if r["policy"] == "full"}
    for row in rows:
        other = full.get((row["model"], row["batch"]))
        if row["policy"] == "nexus" and other:
            ratio = row["step_ms"] / other["step_ms"]
            out.write(f"- issue 13 (nexus decode ≤ 1.10× full's at an equal context), {row['model']} batch "
                      f"{row['batch']}: {ratio:.2f}× — {'met' if ratio <= 1.10 else 'NOT met'}")


# --- 6. tensor parallelism (several GPUs) ----------------------------------------------------------


@section("tp")
def run_tp(ctx: Context, out: Fragment) -> None:
    """Decode tok/s of one engine at N = 1, 2, 4 ranks (as many as the GPUs allow), Llama-3.2-1B-shaped."""
    import tempfile

    import torch

    from random_model import MODEL_SHAPES, shrunk, write_random_checkpoint

    from minikv.engine import Engine
    from minikv.sampling import SamplingParams

    device = ctx.device()
    gpus = torch.cuda.device_count() if device.type == "cuda" else 2
    if gpus < 2:
        raise SectionSkipped(f"{gpus} GPU visible: tensor parallelism needs at least 2")
    if importlib.util.find_spec("safetensors") is None:
        raise SectionSkipped("safetensors is not installed: each rank loads its shard from a checkpoint on disk")
    sizes = [n for n in (1, 2, 4) if n <= gpus]
    shape = shrunk(MODEL_SHAPES["llama-3.2-1b"], layers=2) if ctx.dry else MODEL_SHAPES["llama-3.2-1b"]
    dtype = torch.float32 if ctx.dry else torch.bfloat16
    batch, prompt, output = ctx.pick(full=(32, 1024, 128), quick=(16, 512, 64), dry=(2, 64, 8))
    budget = ctx.pick(full=512, quick=512, dry=48)
    out.write(f"Llama-3.2-1B-shaped random weights ({'shrunk, ' if ctx.dry else ''}{str(dtype).removeprefix('torch.')}), "
              f"written to disk once (each rank loads its shard); {batch} requests of {prompt} prompt tokens and "
              f"{output} output tokens, all at once, policy nexus at budget {budget}; decode tok/s = tokens of the "
              "decode-only steps / their time. Ranks exchange a pickled step message over gloo and all-reduce "
              f"over {'gloo (CPU)' if ctx.dry else 'NCCL'}; no CUDA graphs at N > 1.\n")
    out.write("| N | start s | prefill s | decode tok/s | decode step ms | vs N=1 |\n|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="tp_model_") as folder:
        path = write_random_checkpoint(shape, Path(folder) / "llama", dtype=dtype)
        base = None
        for n in sizes:
            if not enough_time(ctx, out, 0 if base is None else 60, f"N={n}"):
                break
            row = _tp_row(Engine, SamplingParams, path, n, device, dtype, batch, prompt, output, budget)
            base = base or row["tok_s"]
            out.write(f"| {n} | {row['start']:.1f} | {row['prefill']:.2f} | {row['tok_s']:.0f} | "
                      f"{1000 * row['step']:.1f} | {row['tok_s'] / base:.2f}x |")
            free_device_memory(device)


def _tp_row(Engine, SamplingParams, path, n, device, dtype, batch, prompt, output, budget) -> dict:
    started = time.perf_counter()
    engine = Engine(path, tensor_parallel_size=n, device=str(device), dtype=dtype, budget=budget, chunk=512,
                    max_num_seqs=batch, max_model_len=prompt + output + 8, window=32)
    start = time.perf_counter() - started
    try:
        _warm_up(engine, 2)
        params = SamplingParams(max_tokens=output, ignore_eos=True)
        for i in range(batch):
            engine.add_request([(7 * i + j) % 1000 + 3 for j in range(prompt)], params)
        prefill = decode = 0.0
        tokens = steps = 0
        while engine.has_unfinished_requests():
            before = engine.stats()
            t = time.perf_counter()
            engine.step()
            dt = time.perf_counter() - t
            after = engine.stats()
            if after.prompt_tokens > before.prompt_tokens:  # a step with prefill chunks in it
                prefill += dt
            else:
                decode, steps = decode + dt, steps + 1
                tokens += after.generation_tokens - before.generation_tokens
        return dict(start=start, prefill=prefill, tok_s=tokens / max(decode, 1e-9), step=decode / max(steps, 1))
    finally:
        engine.close()


# --- 5. fixed memory -----------------------------------------------------------------------------


def _warm_up(engine, count: int) -> None:
    """Short requests added one per step, each step a prefill beside 0..count-1 decodes: the eager mixed
    steps of the measured load launch the decode kernel at every such batch size, and each size band has
    its own split-K variant, which Triton compiles on first use. Compile them here, not inside the numbers.
    (Decode-only steps replay CUDA graphs, whose kernels compiled when the engine captured them.)"""
    from minikv.sampling import SamplingParams

    for i in range(count):
        engine.add_request([5 + i] * 32, SamplingParams(max_tokens=count - i + 2, ignore_eos=True))
        engine.step()
    while engine.has_unfinished_requests():
        engine.step()


@section("memory")
def run_memory(ctx: Context, out: Fragment) -> None:
    import torch

    from minikv import bench
    from minikv.block_pool import bytes_per_block
    from minikv.engine import Engine
    from random_model import MODEL_SHAPES, random_loaded_model, shrunk

    device = ctx.device()
    name = "qwen3-0.6b"
    num = ctx.pick(full=16, quick=8, dry=6)
    input_len = ctx.pick(full=(8192, 16384), quick=(8192, 12288), dry=(200, 300))
    output_len = ctx.pick(full=(64, 128), quick=(32, 64), dry=(3, 5))
    budget, chunk = ctx.pick(full=(2048, 2048), quick=(2048, 2048), dry=(96, 64))
    full_rings = ctx.pick(full=4, quick=4, dry=2)  # the pool holds this many of the longest requests under full
    dtype = torch.float32 if ctx.dry else torch.bfloat16
    loaded = random_loaded_model(shrunk(MODEL_SHAPES[name]) if ctx.dry else MODEL_SHAPES[name], device=device,
                                 dtype=dtype)
    longest = input_len[1] + output_len[1]
    kv_memory = full_rings * -(-longest // 16) * bytes_per_block(loaded.config, 16, dtype, 0)
    requests = bench.make_requests(num, input_len, output_len, loaded.config.vocab_size, seed=0, avoid={0, 1, 2})
    out.write(f"{name}-shaped random model, {str(dtype).removeprefix('torch.')}; {num} requests arriving at once, "
              f"prompts {input_len[0]}–{input_len[1]} tokens, {output_len[0]}–{output_len[1]} generated (EOS "
              f"ignored), chunk {chunk}; one KV pool of {size_text(kv_memory)} for both rows (room for "
              f"{full_rings} of the longest requests under full); nexus at budget {budget}; max_num_seqs {num}.\n")
    out.write(MEMORY_HEADER)
    results = []
    for policy in ("nexus", "full"):  # nexus first: the cheaper run, whose row stands if full meets the limit
        if not enough_time(ctx, out, 0 if not results else 20, policy):
            break
        engine = Engine(loaded, policy=policy, budget=budget, chunk=chunk, max_num_seqs=num, kv_memory=kv_memory,
                        max_model_len=longest, block_size=16)
        _warm_up(engine, num)
        results.append(bench.run_load(engine, requests, label=policy if policy == "full" else f"nexus@{budget}"))
        out.write(_memory_row(results[-1]))
        del engine
        free_device_memory(device)
    if len(results) == 2:
        _memory_ratios(out, *results)
    if any(r.errors for r in results):
        raise SectionFailed("requests failed in the engine")


MEMORY_HEADER = ("| policy | requests (errors) | concurrency mean / max | output tok/s | total tok/s "
                 "| TTFT p50 / p90 s | TPOT p50 / p90 ms | peak KV | evicted tokens | duration s |\n"
                 "|---|---|---|---|---|---|---|---|---|---|")


def _memory_row(r) -> str:
    from minikv.bench import percentile

    return (f"| {r.label} | {r.num_requests} ({r.errors}) | {r.mean_concurrent:.1f} / {r.max_concurrent} | "
            f"{r.output_tok_s:.1f} | {r.total_tok_s:.0f} | {percentile(r.ttft_s, 50):.2f} / "
            f"{percentile(r.ttft_s, 90):.2f} | {percentile(r.tpot_s, 50) * 1e3:.1f} / "
            f"{percentile(r.tpot_s, 90) * 1e3:.1f} | {size_text(r.peak_kv_bytes)} | {r.evicted_tokens} | "
            f"{r.duration_s:.1f} |")


def _memory_ratios(out: Fragment, nexus, full) -> None:
    conc = nexus.mean_concurrent / full.mean_concurrent if full.mean_concurrent else float("nan")
    speed = nexus.output_tok_s / full.output_tok_s if full.output_tok_s else float("nan")
    out.write(f"\nnexus / full at the same pool: {conc:.1f}× the mean concurrency, {speed:.1f}× the output tok/s "
              "(issue 11's target, on its CPU load of prompts 2k–8k at budget 512: ≥ 4× and ≥ 3×).")


# --- running one section (child process) ---------------------------------------------------------


class _Hidden:
    """A meta-path finder that does not see the hidden packages: to the import system and to
    `importlib.util.find_spec` they are simply not installed. The dry-run test proves with it that the
    check's code paths never need a package the GPU machine may lack."""

    def __init__(self, finder, names):
        self._finder, self._names = finder, names

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in self._names:
            return None
        return self._finder.find_spec(fullname, path, target)

    def __getattr__(self, name):  # find_distributions, invalidate_caches, ...
        return getattr(self._finder, name)


def hide_packages(names) -> None:
    names = set(names)
    sys.meta_path[:] = [_Hidden(finder, names) for finder in sys.meta_path]


def run_section(args) -> int:
    """Child: run one section, its Markdown into args.fragment; 0 ok, 1 failed, 3 skipped."""
    signal.signal(signal.SIGTERM, _stop_running_child)  # the parent ends this section: end what it started
    if args.hide_packages:
        hide_packages(args.hide_packages.split(","))
    sys.path.insert(0, str(TOOLS))
    sys.path.insert(0, str(ROOT))
    out = Fragment(Path(args.fragment))
    ctx = Context(mode=args.mode, limit_s=args.limit, no_pytest=args.no_pytest)
    try:
        SECTION_FUNCS[args.section](ctx, out)
        return 0
    except SectionSkipped as why:
        out.write(f"\n_Skipped: {why}_")
        return 3
    except SectionFailed as why:
        out.write(f"\n**FAILED: {why}**")
        return 1
    except SystemExit:  # SIGTERM from the parent: the section's time limit
        out.write("\n_Stopped here by SIGTERM (a time limit, or the whole run was ended)._")
        raise
    except BaseException:  # noqa: BLE001 - every failure goes into the report, whatever it is
        out.write("\n**FAILED with an exception:**\n```\n" + traceback.format_exc().rstrip() + "\n```")
        return 1


# --- the whole run (parent process) --------------------------------------------------------------


@dataclass
class Outcome:
    section: Section
    status: str = "not run"
    seconds: float = 0.0
    limit: float = 0.0
    body: str = ""
    tail: str = ""


def _stream(pipe, log_file, lines: list) -> None:
    for line in iter(pipe.readline, ""):
        sys.stdout.write(line)
        sys.stdout.flush()
        log_file.write(line)
        log_file.flush()
        lines.append(line)


def _child_env(mode: str, section: Section) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env["PYTHONUNBUFFERED"] = "1"
    env["HF_HUB_OFFLINE"] = "1"
    env["TOKENIZERS_PARALLELISM"] = "false"
    # Compiled kernels on the GPU. The dry run's kernel benchmark runs the Triton kernel on CPU tensors,
    # which needs the interpreter, switched on before minikv.kernels is imported.
    env["TRITON_INTERPRET"] = "1" if (mode == "dry" and section.name == "kernels") else "0"
    return env


def child_command(section: Section, args, limit: float, fragment: Path) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--section", section.name, "--fragment", str(fragment),
           "--mode", args.mode, "--limit", f"{limit:.0f}"]
    if args.no_pytest:
        cmd.append("--no-pytest")
    if args.hide_packages:
        cmd += ["--hide-packages", args.hide_packages]
    return cmd


def run_child(section: Section, cmd: list[str], env: dict, limit: float, fragment: Path, log_file) -> Outcome:
    """Run one section's process for at most `limit` seconds, its output streamed to stdout and the log."""
    global _RUNNING
    start = time.monotonic()
    # its own process group, so a timeout also ends what it started (pytest and its xdist workers)
    proc = _RUNNING = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       text=True, **own_process_group())
    log(f"section {section.name}: process {proc.pid}")
    lines: list[str] = []
    reader = threading.Thread(target=_stream, args=(proc.stdout, log_file, lines), daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=limit)
        status = {0: "ok", 1: "failed", 3: "skipped"}.get(rc, f"crashed (exit {rc})")
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        status = f"timed out at {limit:.0f} s"
    _RUNNING = None
    reader.join(timeout=5)
    body = fragment.read_text(encoding="utf-8") if fragment.is_file() else ""
    return Outcome(section, status, time.monotonic() - start, limit, body, "".join(lines[-40:]))


def own_process_group() -> dict:
    """Popen arguments that start a child in a process group of its own (not a new session: whoever runs
    this check can still end everything by ending its session)."""
    if sys.version_info >= (3, 11):
        return dict(process_group=0)
    return dict(preexec_fn=os.setpgrp)


_RUNNING = None  # the process this one runs now (a section, or the section's pytest), stopped with this one


def _stop_running_child(signum=None, frame=None) -> None:
    """On SIGTERM (the wrapper's `timeout` backstop, or the parent ending a section), Ctrl-C or any exit:
    stop the process running now and all it started, so nothing is left on the GPU."""
    if _RUNNING is not None and _RUNNING.poll() is None:
        _kill_group(_RUNNING, grace_s=1)  # quick: whoever sent the signal may SIGKILL this process in 5 s
    if signum is not None:
        raise SystemExit(128 + signum)


def _kill_group(proc, grace_s: float = 5) -> None:
    """Stop a child and all it started (it leads its own process group): SIGTERM, then SIGKILL to whatever
    of the group is left, e.g. workers that outlive their parent."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:  # nothing of the group is left
            return
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass


def render_report(args, outcomes: list[Outcome], started: float, finished: bool) -> str:
    mode = {"full": "full", "quick": "quick (--quick)", "dry": "dry run (--dry-run): CPU only, tiny sizes — "
            "no figure below is a GPU measurement"}[args.mode]
    lines = ["# minikv GPU check", "",
             f"Mode: {mode}. Command: `{' '.join(args.argv)}`. Started "
             f"{datetime.datetime.fromtimestamp(started, datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"
             + ("" if finished else " — **still running or stopped early: sections below are what ran**") + ".", ""]
    for o in outcomes:
        lines += [f"## {o.section.title}", ""]
        if o.status == "not run":
            lines += ["_Not run yet._", ""]
            continue
        lines.append(o.body.rstrip() or "_(no output)_")
        if o.status.startswith(("timed out", "crashed")):
            lines += ["", f"**{o.status}.** The section's last output:", "```", o.tail.rstrip(), "```"]
        lines.append("")
    lines += ["## Time per section", "", "| section | status | seconds | limit |", "|---|---|---|---|"]
    for o in outcomes:
        lines.append(f"| {o.section.name} | {o.status} | {o.seconds:.0f} | {o.limit:.0f} |")
    total = sum(o.seconds for o in outcomes)
    lines += [f"| total | | {total:.0f} | {args.total_limit:.0f} |", ""]
    return "\n".join(lines)


def run_all(args) -> int:
    import tempfile

    out_dir = Path(args.out or os.environ.get("OUT") or "gpu_check_out").resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    report, scratch = out_dir / REPORT_NAME, Path(tempfile.mkdtemp(prefix="gpu_check_"))
    every = SECTIONS + MULTI_GPU_SECTIONS
    wanted = args.sections.split(",") if args.sections else [s.name for s in SECTIONS]
    if not args.sections and args.mode != "dry" and visible_gpus() > 1:
        wanted += [s.name for s in MULTI_GPU_SECTIONS]
    unknown = set(wanted) - {s.name for s in every}
    if unknown:
        raise SystemExit(f"unknown sections {sorted(unknown)}; choose from {[s.name for s in every]}")
    outcomes = [Outcome(s) for s in every if s.name in wanted]
    started, deadline = time.time(), time.monotonic() + args.total_limit
    signal.signal(signal.SIGTERM, _stop_running_child)
    finished = False
    try:
        run_sections(args, outcomes, started, deadline, out_dir, scratch)
        finished = True
    finally:
        _stop_running_child()
        report.write_text(render_report(args, outcomes, started, finished=finished), encoding="utf-8")
        shutil.rmtree(scratch, ignore_errors=True)
        log(f"report: {report}")
    bad = [o for o in outcomes if o.status not in ("ok", "skipped") and not o.status.startswith("skipped")]
    return 1 if bad else 0


def run_sections(args, outcomes: list[Outcome], started: float, deadline: float, out_dir: Path,
                 scratch: Path) -> None:
    report = out_dir / REPORT_NAME
    with open(out_dir / LOG_NAME, "w", encoding="utf-8") as log_file:
        for outcome in outcomes:
            limit = min(outcome.section.limits[args.mode], deadline - time.monotonic() - 2)
            if limit < 5:
                outcome.status, outcome.body = "skipped (whole run's time limit spent)", "_Not run: no time left._"
            else:
                log(f"section {outcome.section.name}: limit {limit:.0f} s")
                fragment = scratch / f"{outcome.section.name}.md"
                outcome.limit, begun = limit, time.monotonic()
                try:
                    result = run_child(outcome.section, child_command(outcome.section, args, limit, fragment),
                                       _child_env(args.mode, outcome.section), limit, fragment, log_file)
                except BaseException:  # SIGTERM or Ctrl-C: report what the section wrote so far
                    outcome.status = "stopped: the whole run was ended while it ran"
                    outcome.seconds = time.monotonic() - begun
                    outcome.body = fragment.read_text(encoding="utf-8") if fragment.is_file() else ""
                    raise
                outcome.__dict__.update({k: v for k, v in result.__dict__.items() if k != "section"})
                log(f"section {outcome.section.name}: {outcome.status} in {outcome.seconds:.0f} s")
            report.write_text(render_report(args, outcomes, started, finished=False), encoding="utf-8")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    modes = parser.add_mutually_exclusive_group()
    modes.add_argument("--quick", dest="mode", action="store_const", const="quick", help="a shorter second run")
    modes.add_argument("--dry-run", dest="mode", action="store_const", const="dry",
                       help="CPU only, tiny sizes: check that the script works")
    modes.add_argument("--mode", choices=("full", "quick", "dry"), help=argparse.SUPPRESS)
    parser.add_argument("--out", help="report folder (default: $OUT, else ./gpu_check_out)")
    parser.add_argument("--sections", help=f"comma-separated subset of {','.join(s.name for s in SECTIONS)}")
    parser.add_argument("--total-limit", type=float, help="seconds for the whole run (default: by mode)")
    parser.add_argument("--no-pytest", action="store_true", help="run the GPU tests with the plain runner")
    parser.add_argument("--hide-packages", help="comma-separated packages to treat as not installed (testing)")
    parser.add_argument("--section", help=argparse.SUPPRESS)  # child: run this one section
    parser.add_argument("--fragment", help=argparse.SUPPRESS)
    parser.add_argument("--limit", type=float, default=60.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.mode = args.mode or "full"
    args.total_limit = args.total_limit or TOTAL_LIMITS[args.mode]
    args.argv = ["tools/gpu_check.py", *argv]
    return args


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    return run_section(args) if args.section else run_all(args)


if __name__ == "__main__":
    sys.exit(main())

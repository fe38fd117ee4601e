"""tools/gpu_check.py, the prepared GPU check: its dry run (every section's CPU part at tiny sizes) writes a
report with every section, without the packages the GPU machine may lack; failures, crashes and timeouts of
a section land in the report and the run goes on; the plain test runner collects what pytest collects.

No GPU is needed: on a GPU machine the same sections measure (bash tools/gpu_check.sh)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import gpu_check  # noqa: E402

# Packages minikv can use elsewhere that the check must never need (the GPU machine has no network and
# may lack any of them): the dry run's sections run as if these were not installed.
NOT_NEEDED = "transformers,huggingface_hub,gguf,jinja2,tqdm,fastapi,uvicorn,httpx,prometheus_client,pydantic,safetensors"


def run_check(out: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable, "OUT": str(out)}
    env.pop("TRITON_INTERPRET", None)  # conftest.py sets it for this process; the wrapper sets its own
    return subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def section_text(report: str, title: str) -> str:
    start = report.index(f"## {title}")
    end = report.find("\n## ", start + 1)
    return report[start: end if end >= 0 else None]


def collected(text: str) -> int:
    return int(re.search(r"\((\d+) collected\)", text).group(1))


@pytest.fixture(scope="module")
def dry_report(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("gpu_check")
    done = run_check(out, "--dry-run", "--hide-packages", NOT_NEEDED)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert (out / "gpu_check.log").is_file()
    return (out / "gpu_check.md").read_text()


def test_dry_run_report_has_every_section(dry_report):
    for s in gpu_check.SECTIONS:
        assert f"## {s.title}" in dry_report
        assert re.search(rf"^\| {s.name} \| ok \| \d+ \| \d+ \|$", dry_report, re.M), f"section {s.name} not ok"
    assert "dry run" in dry_report and "no figure below is a GPU measurement" in dry_report
    assert "FAILED" not in dry_report


def test_dry_run_sections_ran_their_cpu_parts(dry_report):
    env = section_text(dry_report, "1. Environment")
    assert "| torch |" in env and "| triton |" in env and "GPU | none" in env
    tests = section_text(dry_report, gpu_check.SECTIONS[1].title)
    assert "TRITON_INTERPRET=0" in tests and collected(tests) > 20 and "0 failed" in tests
    engine = section_text(dry_report, gpu_check.SECTIONS[2].title)
    for policy in ("full", "nexus", "nexus:gamma=0.5,tau=1"):  # the CPU engine against itself: tokens equal
        assert re.search(rf"\| {re.escape(policy)} \| float32 \| 3/3 \| 0 \|", engine)
    kernels = section_text(dry_report, gpu_check.SECTIONS[3].title)
    assert re.search(r"^\| 128 \| 1 \| 2:1 \| 2 \| [\d.]+ \|", kernels, re.M)  # interpreted, split-K forced on
    decode = section_text(dry_report, gpu_check.SECTIONS[4].title)
    for model, policy in (("qwen3-0.6b", "nexus"), ("llama-3.2-1b", "nexus"), ("qwen3-0.6b", "full")):
        for batch in (1, 2):
            assert re.search(rf"^\| {model} \| {policy} \| {batch} \| 128 \|", decode, re.M)
    memory = section_text(dry_report, gpu_check.SECTIONS[5].title)
    assert re.search(r"^\| full \| 6 \(0\) \|", memory, re.M) and re.search(r"^\| nexus@96 \| 6 \(0\) \|", memory, re.M)
    assert "× the mean concurrency" in memory


def test_plain_runner_collects_what_pytest_collects(dry_report, tmp_path):
    done = run_check(tmp_path, "--dry-run", "--sections", "tests", "--no-pytest")
    assert done.returncode == 0, done.stdout[-4000:]
    plain = section_text((tmp_path / "gpu_check.md").read_text(), gpu_check.SECTIONS[1].title)
    assert "plain runner" in plain
    assert collected(plain) == collected(section_text(dry_report, gpu_check.SECTIONS[1].title))


def test_a_failing_section_writes_its_traceback_and_the_run_goes_on(tmp_path):
    done = run_check(tmp_path, "--dry-run", "--sections", "env,kernels", "--hide-packages", "torch")
    assert done.returncode == 1
    report = (tmp_path / "gpu_check.md").read_text()
    for s in ("env", "kernels"):
        assert re.search(rf"^\| {s} \| failed \|", report, re.M)
    kernels = section_text(report, gpu_check.SECTIONS[3].title)
    assert "FAILED with an exception" in kernels and "No module named 'torch'" in kernels


def test_a_section_past_its_limit_is_stopped_and_reported(tmp_path):
    slow = [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"]
    with open(tmp_path / "log", "w") as log:
        outcome = gpu_check.run_child(gpu_check.SECTIONS[0], slow, dict(os.environ), 2, tmp_path / "f.md", log)
    assert outcome.status == "timed out at 2 s" and outcome.seconds < 15
    assert "started" in outcome.tail
    crash = [sys.executable, "-c", "import os; os.abort()"]
    with open(tmp_path / "log", "w") as log:
        outcome = gpu_check.run_child(gpu_check.SECTIONS[0], crash, dict(os.environ), 30, tmp_path / "f.md", log)
    assert outcome.status.startswith("crashed")


def test_parametrize_cases_expand_like_pytest():
    def fn(a, b):
        pass

    gpu_check._Mark("parametrize")("a", [1, 2])(fn)
    gpu_check._Mark("parametrize")("b", ["x", "y", "z"])(fn)
    cases = gpu_check._cases(fn)
    assert len(cases) == 6 and ("fn[1-x]", {"a": 1, "b": "x"}) in cases
    assert gpu_check._run_case(fn, "fn", {"a": 1, "b": 2}, None)[1] == "passed"
    assert gpu_check._run_case(lambda: 1 / 0, "boom", {}, None)[1] == "failed"
    assert gpu_check._run_case(fn, "fn", {}, "needs CUDA") == ("fn", "skipped", "needs CUDA")


def test_section_limits_fit_issue_15s_eight_minutes():
    for mode in ("full", "quick"):
        assert sum(s.limits[mode] for s in gpu_check.SECTIONS) <= gpu_check.TOTAL_LIMITS[mode]
    assert gpu_check.TOTAL_LIMITS["full"] <= 8 * 60 - 15  # the wrapper's backstop is 480 s


def test_ending_the_run_stops_the_running_section(tmp_path):
    """The wrapper's `timeout` backstop sends SIGTERM: the section running then (in its own process group)
    must end with the parent, and the report must say the run was stopped."""
    import signal
    import time

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("TRITON_INTERPRET", None)
    parent = subprocess.Popen([sys.executable, str(ROOT / "tools" / "gpu_check.py"), "--dry-run", "--sections",
                               "tests", "--out", str(tmp_path)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    child = None
    for line in parent.stdout:
        found = re.search(r"section tests: process (\d+)", line)
        if found:
            child = int(found.group(1))
            break
    assert child is not None
    time.sleep(0.5)
    parent.send_signal(signal.SIGTERM)
    parent.communicate(timeout=30)
    assert parent.returncode != 0
    with pytest.raises(ProcessLookupError):
        os.killpg(child, 0)  # no process of the section's group is left
    report = (tmp_path / "gpu_check.md").read_text()
    assert "stopped: the whole run was ended" in report and "stopped early" in report

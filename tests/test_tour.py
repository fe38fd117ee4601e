"""docs/tour.md: every code link names a function that exists, at the line of its definition, and the tour
stops at every layer of the stack. When code moves, `python tools/tour_links.py --fix` updates the anchors."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import tour_links  # noqa: E402


def test_every_tour_link_names_a_definition_that_exists():
    # Lines drift as code changes elsewhere; names must not. Refresh the anchors: tools/tour_links.py --fix.
    assert tour_links.check(exact=False) == [], "a linked function was renamed or removed: fix docs/tour.md"
    assert len(list(tour_links.LINK.finditer(tour_links.TOUR.read_text()))) >= 40


def test_the_tour_stops_at_every_layer_and_the_readme_links_it():
    text = tour_links.TOUR.read_text()
    targets = {m["path"] for m in tour_links.LINK.finditer(text)}
    for stop in ("cli.py", "engine.py", "scheduler.py", "model_runner.py", "models/llama.py", "attention.py",
                 "kernels/reference.py", "policies/nexus.py", "sampling.py", "tokenizer.py"):
        assert f"../minikv/{stop}" in targets, stop
    assert "docs/tour.md" in (ROOT / "README.md").read_text()


def test_fix_rewrites_drifted_anchors_and_check_reports_unknown_names(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (tmp_path / "minikv").mkdir()
    (tmp_path / "minikv" / "m.py").write_text("class A:\n    x = 1\n\n    def f(self):\n        pass\n\n\ndef g():\n    pass\n")
    tour = docs / "tour.md"
    tour.write_text("[`A.f`](../minikv/m.py#L1) and [`m.g`](../minikv/m.py) and [`h`](../minikv/m.py#L2)\n")
    problems = tour_links.check(tour)
    assert len(problems) == 3 and "`h` is not defined" in problems[2]
    assert tour_links.fix(tour) == 2
    assert tour.read_text() == "[`A.f`](../minikv/m.py#L4) and [`m.g`](../minikv/m.py#L8) and [`h`](../minikv/m.py#L2)\n"
    assert tour_links.check(tour) == ["`h` is not defined in ../minikv/m.py"]
    tour.write_text("[`A.f`](../minikv/m.py#L2)\n")  # drifted, but a line of the file: only exact checks fail
    assert tour_links.check(tour, exact=False) == [] and len(tour_links.check(tour)) == 1

"""Keep the code links of docs/tour.md pointing at the functions they name.

A stop of the tour links a function as [`Engine.stream`](../minikv/engine.py#L529): the link text names a
function or class of that file (its qualified name; leading module names such as `reference.` are allowed),
the anchor is the line of its `def`. Code moves, so the anchors drift: `--check` lists every link whose name
no longer exists or whose line is not its definition's, and `--fix` rewrites the line numbers from the names
(a renamed function still needs a human). The test fails only on names that no longer exist, so a merge that
moves lines does not break the suite; run `--fix` after one.

    python tools/tour_links.py --check
    python tools/tour_links.py --fix
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOUR = ROOT / "docs" / "tour.md"
LINK = re.compile(r"\[`(?P<name>[A-Za-z_][\w.]*)`\]\((?P<path>[^)#\s]+\.py)(?:#L(?P<line>\d+))?\)")


def definitions(path: Path) -> dict[str, int]:
    """Qualified name -> line of the `def` / `class` of every function and class in a Python file."""
    found: dict[str, int] = {}

    def visit(node, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                found.setdefault(name, child.lineno)
                visit(child, name + ".")

    visit(ast.parse(path.read_text()), "")
    return found


def resolve(name: str, defs: dict[str, int]) -> int | None:
    """The line of `name`, or of what remains of it after dropping leading module names."""
    parts = name.split(".")
    for start in range(len(parts)):
        line = defs.get(".".join(parts[start:]))
        if line is not None:
            return line
    return None


def links(text: str, base: Path, exact: bool = True):
    """(match, expected line or None, problem or None) for every code link of the text. Not `exact`: a link
    whose name exists and whose anchor is any line of its file passes (line drift is not a problem)."""
    cache: dict[Path, dict[str, int]] = {}
    for match in LINK.finditer(text):
        path = (base / match["path"]).resolve()
        if not path.is_file():
            yield match, None, f"{match['path']} does not exist"
            continue
        defs = cache.setdefault(path, definitions(path))
        line = resolve(match["name"], defs)
        if line is None:
            yield match, None, f"`{match['name']}` is not defined in {match['path']}"
        elif match["line"] is None or not (int(match["line"]) == line or not exact and
                                           1 <= int(match["line"]) <= len(path.read_text().splitlines())):
            yield match, line, f"`{match['name']}` is at {match['path']}#L{line}, the link says #L{match['line']}"
        else:
            yield match, line, None


def check(tour: Path = TOUR, exact: bool = True) -> list[str]:
    return [problem for _, _, problem in links(tour.read_text(), tour.parent, exact) if problem]


def fix(tour: Path = TOUR) -> int:
    """Rewrite every resolvable link's anchor; return how many changed."""
    text = tour.read_text()
    changed, pieces, last = 0, [], 0
    for match, line, problem in links(text, tour.parent):
        if line is None:
            continue
        pieces.append(text[last:match.start()])
        pieces.append(f"[`{match['name']}`]({match['path']}#L{line})")
        last = match.end()
        changed += problem is not None
    tour.write_text("".join(pieces) + text[last:])
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fix", action="store_true", help="rewrite the line anchors from the names")
    parser.add_argument("--check", action="store_true", help="list broken links (the default)")
    args = parser.parse_args(argv)
    if args.fix:
        print(f"{fix()} anchors rewritten")
    problems = check()
    for problem in problems:
        print(problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

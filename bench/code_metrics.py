"""Code-health numbers for a checkout: modules, largest file and function, import cycles,
``duplicates`` pairs, ruff findings, README length.

Refactors are judged by these (issue 14 asks for their before/after), so they come from one
command anyone can rerun on any commit::

    python bench/code_metrics.py                 # this checkout
    python bench/code_metrics.py --repo /tmp/old # e.g. a `git worktree add /tmp/old <rev>`

``duplicates`` (the workplace's clone finder) and ``ruff`` are optional: a missing tool is
reported as ``n/a``, not guessed.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path


def import_graph(src: Path, pkg: str) -> dict[str, set[str]]:
    """Static import graph of ``pkg`` (every import statement, also inside functions)."""
    mods: dict[str, Path] = {}
    for p in (src / pkg).rglob("*.py"):
        rel = p.relative_to(src).with_suffix("")
        mods[".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)] = p
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        is_pkg = p.name == "__init__.py"
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                mod = node.module or ""
                if node.level:
                    base = m.split(".") if is_pkg else m.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    mod = ".".join(base + ([node.module] if node.module else []))
                targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
            graph[m] |= {t for t in targets if t in mods and t != m}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def largest_function(files: list[Path], root: Path) -> tuple[str, int]:
    best = ("", 0)
    for p in files:
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > best[1]:
                    best = (f"{p.relative_to(root)}:{node.name}", n)
    return best


# The rules of pyproject.toml, passed explicitly so that a commit from before the config existed
# is measured the same way (B008 off: typer's Option() defaults are its documented style).
RUFF_RULES = ("--isolated", "--line-length", "120", "--select", "E,W,F,I,B", "--extend-ignore", "B008")


def _run(cmd: list[str], cwd: Path) -> str | None:
    if shutil.which(cmd[0]) is None and not Path(cmd[0]).exists():
        return None
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True).stdout


def metrics(repo: Path, ruff: str) -> dict:
    src = repo / "src"
    files = sorted((src / "tlops").rglob("*.py"))
    sizes = {str(p.relative_to(repo)): len(p.read_text(encoding="utf-8").splitlines()) for p in files}
    biggest = max(sizes.items(), key=lambda kv: kv[1])
    fn, fn_lines = largest_function(files, repo)
    dup = _run(["duplicates", "--repo", str(src), "--most", "200", "--seconds", "60"], repo)
    m = re.match(r"(\d+) pairs", dup or "")
    dup_pairs = 0 if dup and dup.startswith("no duplicates") else (int(m.group(1)) if m else None)
    lint_paths = [p for p in ("src", "tests", "bench", "components", "pipelines") if (repo / p).exists()]
    out = _run([ruff, "check", *RUFF_RULES, "--output-format", "concise", *lint_paths], repo)
    findings = None if out is None else len([ln for ln in out.splitlines() if re.search(r":\d+:\d+: ", ln)])
    readme = repo / "README.md"
    return {
        "modules": len(files),
        "largest_file": f"{biggest[0]} ({biggest[1]} lines)",
        "largest_function": f"{fn} ({fn_lines} lines)",
        "import_cycles": len(cycles(import_graph(src, "tlops"))),
        "duplicates_pairs_src": dup_pairs if dup_pairs is not None else "n/a",
        "ruff_findings": findings if findings is not None else "n/a",
        "readme_lines": len(readme.read_text(encoding="utf-8").splitlines()) if readme.exists() else 0,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repo", type=Path, default=Path(__file__).resolve().parents[1])
    ap.add_argument("--ruff", default=str(Path(sys.executable).with_name("ruff")))
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    a = ap.parse_args()
    m = metrics(a.repo.resolve(), a.ruff)
    if a.json:
        print(json.dumps(m, indent=2))
    else:
        for k, v in m.items():
            print(f"{k:22} {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

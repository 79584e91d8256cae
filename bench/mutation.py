"""Mutation-testing report (``make mutation``): what mutmut left in ``mutants/`` as a table.

``mutmut run`` (configured in pyproject.toml's ``[tool.mutmut]``) records one exit code per
mutant in ``mutants/**/<module>.py.meta`` (gitignored, so a fresh clone has none); this folds them
into bench/results/mutation.json, the committed per-module record (a module's new result replaces
its recorded one unless it ran fewer of the module's mutants, so ``MUTANTS=...`` runs of some
modules keep the others' earlier full runs), and renders that record as bench/results/mutation.md:
per module the mutants total / killed / survived / timeout / not covered, the score
(killed + timeout over the mutants that were run), and every surviving mutant with its diff
line and the reason it survives, taken from bench/mutation_reasons.yaml (mutant name ->
one line). A survivor without a reason is listed as ``(no reason recorded)``: that is a test to
write or a reason to give.

    python bench/mutation.py                       # after `mutmut run` (make mutation runs both)
    python bench/mutation.py --out bench/results/mutation.md
    python bench/mutation.py --recheck tests/test_x.py --recheck-mutants 'tlops.data.splits*'  # see below

``--recheck`` runs each surviving mutant (and each one no selected test reached) against the given
test files directly (mutmut's own switch, ``MUTANT_UNDER_TEST``, in its ``mutants/`` copy, with the
files copied there first) and
reports which of them those tests kill, so tests written after a long run are credited without
rerunning it; ``make mutation`` later checks them the ordinary way.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
REASONS = ROOT / "bench" / "mutation_reasons.yaml"
RECORD = ROOT / "bench" / "results" / "mutation.json"
COLS = ["killed", "survived", "timeout", "no tests", "not run"]
#: mutmut's exit codes (mutmut.stats.status_by_exit_code), folded into the columns reported
STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", 34: "skipped", 37: "killed"}
STATUS |= {c: "timeout" for c in (36, -24, 24, 152, 255)}


def _status(code: int | None) -> str:
    return "not run" if code is None else STATUS.get(code, "suspicious")


def _diff(name: str, path: Path) -> str:
    """The changed source line(s) of one mutant, via mutmut's own diff (run inside mutants/'s parent)."""
    from mutmut.mutation.diff_apply import get_diff_for_mutant

    try:
        diff = get_diff_for_mutant(name, path=path)
    except Exception as err:  # noqa: BLE001  (a report must not die on one mutant)
        return f"(no diff: {type(err).__name__})"
    plus = [ln[1:].strip() for ln in diff.splitlines() if ln.startswith("+") and not ln.startswith("+++")]
    minus = [ln[1:].strip() for ln in diff.splitlines() if ln.startswith("-") and not ln.startswith("---")]
    return f"`{' / '.join(minus)}` -> `{' / '.join(plus)}`"


def collect(root: Path) -> dict[str, dict[str, int | None]]:
    out = {}
    for meta in sorted((root / "mutants").rglob("*.py.meta")):
        rel = meta.relative_to(root / "mutants").with_suffix("")  # src/tlops/storage.py
        out[str(rel)] = json.loads(meta.read_text())["exit_code_by_key"]
    return out


def recheck(names: list[str], tests: list[str], root: Path, jobs: int = 1) -> dict[str, bool]:
    """Mutant name -> whether ``tests`` (files or pytest node ids) kill it (pytest fails with the
    mutant switched on); ``jobs`` mutants at a time."""
    from concurrent.futures import ThreadPoolExecutor

    for t in {t.split("::")[0] for t in tests}:
        shutil.copy2(root / t, root / "mutants" / t)
    base = dict(os.environ, PYTHONPATH=f"{root / 'mutants' / 'src'}{os.pathsep}{root / 'mutants'}")

    def one(name: str) -> bool:
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
            cwd=root / "mutants",
            env=dict(base, MUTANT_UNDER_TEST=name),
            capture_output=True,
            timeout=600,
        )
        return proc.returncode == 1

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        return dict(zip(names, pool.map(one, names), strict=True))


def summarise(results: dict[str, dict[str, int | None]], stamp: str) -> dict[str, dict]:
    """Per module: the counts by status and every survivor with its change, as the record keeps them
    (the change from mutmut's own diff, read relative to the working directory: the repo root)."""
    out = {}
    for module, codes in results.items():
        c = Counter(_status(v) for v in codes.values())
        c["not run"] += c.pop("skipped", 0)
        out[module] = {
            "run": stamp,
            "mutants": len(codes),
            "counts": {k: c[k] for k in COLS},
            "survivors": {
                k: {"status": _status(v), "change": _diff(k, Path(module)), "killed_by_recheck": False}
                for k, v in codes.items()
                if _status(v) in ("survived", "no tests")
            },
        }
    return out


def merge(carried: dict[str, dict], fresh: dict[str, dict]) -> dict[str, dict]:
    """A module's fresh result replaces the carried one unless it ran fewer of its mutants (a
    ``make mutation MUTANTS=...`` of other modules leaves this one's earlier full run standing)."""
    out = dict(carried)
    for module, rec in fresh.items():
        old = carried.get(module)
        if old is None or rec["counts"]["not run"] <= old["counts"]["not run"]:
            for name, s in rec["survivors"].items():  # a recheck's verdict stays with the same mutant
                before = (old or {}).get("survivors", {}).get(name)
                if before is not None and before["change"] == s["change"]:
                    s["killed_by_recheck"] = s["killed_by_recheck"] or before["killed_by_recheck"]
            if old is not None and (old["counts"], set(old["survivors"])) == (rec["counts"], set(rec["survivors"])):
                rec["run"] = old["run"]  # the same results rendered again: they still date from that run
            out[module] = rec
    return dict(sorted(out.items()))


def render(record: dict[str, Any], reasons: dict[str, str]) -> str:
    modules = record["modules"]
    lines = [
        "# Mutation testing: core modules",
        "",
        "Generated by `python bench/mutation.py` from the `mutants/` of `make mutation` (mutmut, configured",
        "in pyproject.toml `[tool.mutmut]`; each mutant runs the fast tests that reach the mutated",
        "function) and the record of earlier runs in bench/results/mutation.json: a module keeps its last",
        "run that left the fewest mutants unrun (column `run`). Score = (killed + timeout) / mutants run.",
        "Machine: 2-core Xeon shared with other jobs.",
        "",
        "| module | mutants | " + " | ".join(COLS) + " | score | run |",
        "|---|---:|" + "---:|" * len(COLS) + "---:|---|",
    ]
    total: Counter = Counter()
    survivors: list[tuple[str, dict]] = []
    for module, rec in modules.items():
        c = Counter(rec["counts"])
        total.update(c)
        total["mutants"] += rec["mutants"]
        ran = rec["mutants"] - c["not run"]
        score = f"{100 * (c['killed'] + c['timeout']) / ran:.1f} %" if ran else "n/a"
        counts = " | ".join(str(c[k]) for k in COLS)
        lines.append(f"| `{module}` | {rec['mutants']} | {counts} | {score} | {rec['run']} |")
        survivors += sorted(rec["survivors"].items())
    ran = total["mutants"] - total["not run"]
    score = f"{100 * (total['killed'] + total['timeout']) / ran:.1f} %" if ran else "n/a"
    counts = " | ".join(str(total[k]) for k in COLS)
    lines.append(f"| **all** | {total['mutants']} | {counts} | **{score}** | |")
    lines += ["", f"## Surviving mutants ({len(survivors)})", ""]
    n = sum(s["killed_by_recheck"] for _, s in survivors)
    if n:
        lines += [
            f"{n} of these {len(survivors)} survivors are killed by tests added after their run "
            f"({', '.join(record.get('recheck_tests', []))}; `python bench/mutation.py --recheck ...`), marked below;",
            f"counting them, the score is {100 * (total['killed'] + total['timeout'] + n) / ran:.1f} %.",
            "",
        ]
    if survivors:
        lines += ["| mutant | change | why it survives |", "|---|---|---|"]
    for name, s in survivors:
        why = reasons.get(name) or reasons.get(name.split("__mutmut_")[0] + "__mutmut_*") or "(no reason recorded)"
        if s["killed_by_recheck"]:
            why = "**killed by the tests added after the run** (listed above)"
        if s["status"] == "no tests":
            why = f"no fast test reaches it; {why}"
        lines.append(f"| `{name}` | {s['change'].replace('|', chr(92) + '|')} | {why} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "mutation.md")
    ap.add_argument("--record", type=Path, default=RECORD, help="the per-module record read and updated")
    ap.add_argument("--recheck", nargs="*", default=[], help="test files or node ids to run each survivor against")
    ap.add_argument("--recheck-mutants", default="*", help="only survivors whose name matches this glob")
    ap.add_argument("--jobs", type=int, default=2, help="rechecks run at a time")
    args = ap.parse_args()
    os.chdir(ROOT)  # mutmut reads its config and mutants/ relative to the working directory
    record = json.loads(args.record.read_text()) if args.record.exists() else {"recheck_tests": [], "modules": {}}
    results = collect(ROOT)
    if not results and not record["modules"]:
        print("no mutants/ here and no record: run `make mutation` (mutmut run) first", file=sys.stderr)
        return 1
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    stamp = f"{time.strftime('%Y-%m-%d', time.gmtime())}, rendered at {commit}"
    record["modules"] = merge(record["modules"], summarise(results, stamp))
    if args.recheck:
        here = {k for codes in results.values() for k in codes}  # a recheck needs the mutant in mutants/
        survivors = {k: s for rec in record["modules"].values() for k, s in rec["survivors"].items()}
        names = [k for k in survivors if k in here and fnmatch.fnmatch(k, args.recheck_mutants)]
        for name, killed in recheck(names, args.recheck, ROOT, args.jobs).items():
            survivors[name]["killed_by_recheck"] |= killed
        record["recheck_tests"] = sorted(set(record.get("recheck_tests", [])) | set(args.recheck))
    reasons = yaml.safe_load(REASONS.read_text()) if REASONS.exists() else {}
    text = render(record, reasons or {})
    args.record.write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

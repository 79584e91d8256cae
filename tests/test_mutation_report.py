"""bench/mutation.py: mutmut's exit codes folded into the committed per-module record, and the report.

A module's new result replaces its recorded one only when it ran at least as many of the module's
mutants, so a ``make mutation MUTANTS=...`` run of some modules cannot wipe out another module's
earlier full run; the report's totals and score are the record's."""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import mutation  # noqa: E402


def _meta(root: Path, module: str, codes: dict) -> None:
    meta = root / "mutants" / f"{module}.meta"
    meta.parent.mkdir(parents=True, exist_ok=True)
    meta.write_text(json.dumps({"exit_code_by_key": codes}))


def _record(run: str, mutants: int, not_run: int, survivors: dict) -> dict:
    killed = mutants - not_run - len(survivors)
    counts = {"killed": killed, "survived": len(survivors), "timeout": 0, "no tests": 0, "not run": not_run}
    return {"run": run, "mutants": mutants, "counts": counts, "survivors": survivors}


def test_a_partial_run_keeps_a_module_s_earlier_full_run_and_a_fuller_one_replaces_it(tmp_path):
    _meta(tmp_path, "src/tlops/a.py", {"tlops.a.x_f__mutmut_1": 1, "tlops.a.x_f__mutmut_2": 0})
    _meta(tmp_path, "src/tlops/b.py", {"tlops.b.x_g__mutmut_1": None, "tlops.b.x_g__mutmut_2": 34})
    fresh = mutation.summarise(mutation.collect(tmp_path), "today")
    assert fresh["src/tlops/a.py"]["counts"] == {"killed": 1, "survived": 1, "timeout": 0, "no tests": 0, "not run": 0}
    assert fresh["src/tlops/b.py"]["counts"]["not run"] == 2  # unrun and skipped alike
    assert list(fresh["src/tlops/a.py"]["survivors"]) == ["tlops.a.x_f__mutmut_2"]

    survivor = {"tlops.b.x_g__mutmut_2": {"status": "survived", "change": "`a | b` -> `a`", "killed_by_recheck": True}}
    carried = {
        "src/tlops/a.py": _record("earlier", 2, 2, {}),  # never run before: today's replaces it
        "src/tlops/b.py": _record("earlier", 2, 0, survivor),  # a full run: today's (none run) does not
    }
    merged = mutation.merge(carried, fresh)
    assert merged["src/tlops/a.py"]["run"] == "today" and merged["src/tlops/b.py"]["run"] == "earlier"
    # the same full run rendered again keeps what a recheck found about its survivors
    merged["src/tlops/a.py"]["survivors"]["tlops.a.x_f__mutmut_2"]["killed_by_recheck"] = True
    again = mutation.merge(merged, mutation.summarise(mutation.collect(tmp_path), "tomorrow"))
    assert again["src/tlops/a.py"]["survivors"]["tlops.a.x_f__mutmut_2"]["killed_by_recheck"] is True
    assert again["src/tlops/a.py"]["run"] == "today"  # unchanged results keep the date of their run
    merged["src/tlops/a.py"]["survivors"]["tlops.a.x_f__mutmut_2"]["killed_by_recheck"] = False

    text = mutation.render({"recheck_tests": ["tests/test_b.py"], "modules": merged}, {"tlops.a.x_f__mutmut_*": "why"})
    assert "| `src/tlops/a.py` | 2 | 1 | 1 | 0 | 0 | 0 | 50.0 % | today |" in text
    assert "| `src/tlops/b.py` | 2 | 1 | 1 | 0 | 0 | 0 | 50.0 % | earlier |" in text
    assert "| **all** | 4 | 2 | 2 | 0 | 0 | 0 | **50.0 %** | |" in text
    assert "1 of these 2 survivors are killed by tests added after their run (tests/test_b.py;" in text
    assert "counting them, the score is 75.0 %." in text
    assert "| `tlops.a.x_f__mutmut_2` | (no diff: " in text  # no mutants/ copy to diff here
    assert text.rstrip().endswith("| **killed by the tests added after the run** (listed above) |")
    assert "`a \\| b` -> `a`" in text  # a pipe in a change does not split the table's cell
    assert "| `tlops.a.x_f__mutmut_2` |" in text and "| why |" in text


def test_the_committed_record_renders_to_the_committed_report():
    """bench/results/mutation.md is what bench/mutation.py renders from bench/results/mutation.json."""
    import yaml

    record = json.loads((REPO / "bench" / "results" / "mutation.json").read_text())
    reasons = yaml.safe_load((REPO / "bench" / "mutation_reasons.yaml").read_text())
    assert mutation.render(record, reasons) == (REPO / "bench" / "results" / "mutation.md").read_text()

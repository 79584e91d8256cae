"""The benchmarks' negative-transfer flag: a mean below the source-only / frozen-probe row as the
table prints it, and never on a tie (today's bug: ``81.7 < 81.7`` was flagged)."""

from __future__ import annotations

import sys

import pytest

from tests.conftest import REPO


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import common
        import transfer_text_report

        yield common, transfer_text_report
    finally:
        sys.path.remove(str(REPO / "bench"))


def test_below_compares_what_the_table_prints(bench):
    common, _ = bench
    assert not common.below(0.8170000000000001, 0.817)  # float noise: a tie
    assert not common.below(0.8166, 0.8174)  # both print 81.7
    assert not common.below(0.817, 0.817)
    assert common.below(0.816, 0.8174)  # 81.6 < 81.7
    assert not common.below(0.9, 0.8)


def _results(accs: list[float]) -> list[dict]:
    return [{"acc": a, "seconds": 1.0, "cpu_seconds": 1.0} for a in accs]


def test_table_flags_a_real_drop_and_not_a_tie(bench):
    common, report = bench
    tasks = {
        "t": {
            "frozen-probe": _results([0.816, 0.818, 0.817]),
            "tie": _results([0.8166, 0.8168, 0.8170]),  # 81.68 prints as 81.7: was flagged "81.7 < 81.7"
            "drop": _results([0.80, 0.81, 0.80]),
        }
    }
    summary = common.summarise(tasks)
    flags: list[str] = []
    lines = report._table(tasks, summary, {}, "frozen-probe", flags)
    row = {ln.split(" | ")[0][2:]: ln for ln in lines if ln.startswith("| ") and " | " in ln}
    assert "negative transfer" not in row["tie"]
    assert "⚠ negative transfer" in row["drop"]
    assert flags == ["t: drop 80.3 < frozen-probe 81.7"]

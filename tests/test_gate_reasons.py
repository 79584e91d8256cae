"""The gate verdicts word for word: the reasons are what a reviewer reads (register's version
description, the run summary, ``tlops promote``'s refusal), so each branch of ``decide`` is pinned
with its exact text and the order of the checks, not only which gate failed (tests/test_gates.py).
"""

from __future__ import annotations

import pytest

from tlops.config import GatesConfig
from tlops.evaluation.gates import decide

CH = {"version": "4", "accuracy": 0.8, "comparable": True}


def _checks(gates: dict, accuracy: float, gain, champion, **kw) -> list[tuple[str, bool, str]]:
    d = decide(GatesConfig(**gates), accuracy, gain, champion, **kw)
    checks = [(c["gate"], c["passed"], c["reason"]) for c in d["checks"]]
    failed = [r for _, ok, r in checks if not ok]
    assert d["passed"] is (not failed)
    assert d["reasons"] == (failed or (["all gates passed"] if checks else ["no gates configured"]))
    return checks


@pytest.mark.parametrize(
    ("gates", "accuracy", "gain", "champion", "kw", "want"),
    [
        ({}, 0.5, None, None, {}, []),
        ({"min_accuracy": 0.9}, 0.9, None, None, {}, [("min_accuracy", True, "accuracy 0.9000 >= 0.9")]),
        ({"min_accuracy": 0.9}, 0.89991, None, None, {}, [("min_accuracy", False, "accuracy 0.8999 < 0.9")]),
        (
            {"min_gain_over_scratch": 0.05},
            0.9,
            0.05,
            None,
            {},
            [("min_gain_over_scratch", True, "gain over scratch +0.0500 >= +0.05")],
        ),
        (
            {"min_gain_over_scratch": 0.05},
            0.9,
            -0.01,
            None,
            {},
            [("min_gain_over_scratch", False, "gain over scratch -0.0100 < +0.05")],
        ),
        (
            {"min_gain_over_scratch": 0.05},
            0.9,
            None,
            None,
            {},
            [
                (
                    "min_gain_over_scratch",
                    False,
                    "scratch baseline is off (evaluate.scratch_baseline=false), gain unknown",
                )
            ],
        ),
        (
            {"min_gain_over_scratch": 0.02, "gain_bound": "lower"},
            0.9,
            0.08,
            None,
            {},
            [("min_gain_over_scratch", False, "gates.gain_bound=lower but the gain over scratch has no interval")],
        ),
        (
            {"min_gain_over_scratch": 0.02, "gain_bound": "lower"},
            0.9,
            0.08,
            None,
            {"gain_ci": [0.02, 0.1], "confidence": 0.9},
            [("min_gain_over_scratch", True, "lower 90% bound of the gain over scratch +0.0200 >= +0.02")],
        ),
        ({"must_beat_champion": True}, 0.5, None, None, {}, [("must_beat_champion", True, "no champion yet")]),
        (
            {"must_beat_champion": True},
            0.5,
            None,
            {"version": "4", "same_model": True, "accuracy": 0.9, "comparable": True},
            {},
            [("must_beat_champion", True, "champion v4 is this model")],
        ),
        (
            {"must_beat_champion": True},
            0.9,
            None,
            {"version": "4", "comparable": False, "reason": "other classes"},
            {},
            [("must_beat_champion", False, "champion v4 not comparable: other classes")],
        ),
        (
            {"must_beat_champion": True},
            0.8,
            None,
            CH,
            {},
            [("must_beat_champion", False, "accuracy 0.8000 <= champion v4 0.8000")],
        ),
        (
            {"must_beat_champion": True},
            0.81,
            None,
            CH,
            {},
            [("must_beat_champion", True, "accuracy 0.8100 > champion v4 0.8000")],
        ),
        (
            {"must_beat_champion": True, "gain_bound": "lower"},
            0.9,
            None,
            {**CH, "gain_ci": [0.01, 0.2]},
            {},
            [("must_beat_champion", True, "lower 95% bound of the gain over champion v4 +0.0100 > 0")],
        ),
        (
            {"must_beat_champion": True, "gain_bound": "lower"},
            0.9,
            None,
            {**CH, "gain_ci": [0.0, 0.2]},
            {},
            [("must_beat_champion", False, "lower 95% bound of the gain over champion v4 +0.0000 <= 0")],
        ),
        (
            {"must_beat_champion": True, "gain_bound": "lower"},
            0.9,
            None,
            CH,
            {},
            [("must_beat_champion", False, "lower 95% bound of the gain over champion v4 unknown (no interval)")],
        ),
    ],
)
def test_each_gate_branch_word_for_word(gates, accuracy, gain, champion, kw, want):
    assert _checks(gates, accuracy, gain, champion, **kw) == want


def test_all_gates_in_order_and_every_failure_is_a_reason():
    got = _checks({"min_accuracy": 0.95, "min_gain_over_scratch": 0.1, "must_beat_champion": True}, 0.9, 0.0, CH)
    assert got == [
        ("min_accuracy", False, "accuracy 0.9000 < 0.95"),
        ("min_gain_over_scratch", False, "gain over scratch +0.0000 < +0.1"),
        ("must_beat_champion", True, "accuracy 0.9000 > champion v4 0.8000"),
    ]
    d = decide(GatesConfig(min_accuracy=0.5, must_beat_champion=True), 0.9, None, CH)
    assert d == {
        "passed": True,
        "checks": [
            {"gate": "min_accuracy", "passed": True, "reason": "accuracy 0.9000 >= 0.5"},
            {"gate": "must_beat_champion", "passed": True, "reason": "accuracy 0.9000 > champion v4 0.8000"},
        ],
        "reasons": ["all gates passed"],
    }

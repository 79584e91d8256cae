"""Promotion gates: pass/fail with the reason for each gate."""

from __future__ import annotations

from typing import Any

from tlops.config import GatesConfig


def decide(gates: GatesConfig, accuracy: float, gain: float | None, champion: dict[str, Any] | None) -> dict[str, Any]:
    checks: list[dict[str, Any]] = []
    if gates.min_accuracy is not None:
        ok = accuracy >= gates.min_accuracy
        checks.append(
            {
                "gate": "min_accuracy",
                "passed": ok,
                "reason": f"accuracy {accuracy:.4f} {'>=' if ok else '<'} {gates.min_accuracy}",
            }
        )
    if gates.min_gain_over_scratch is not None:
        if gain is None:
            checks.append(
                {
                    "gate": "min_gain_over_scratch",
                    "passed": False,
                    "reason": "scratch baseline is off (evaluate.scratch_baseline=false), gain unknown",
                }
            )
        else:
            ok = gain >= gates.min_gain_over_scratch
            checks.append(
                {
                    "gate": "min_gain_over_scratch",
                    "passed": ok,
                    "reason": f"gain over scratch {gain:+.4f} {'>=' if ok else '<'} {gates.min_gain_over_scratch:+}",
                }
            )
    if gates.must_beat_champion:
        if champion is None:
            checks.append({"gate": "must_beat_champion", "passed": True, "reason": "no champion yet"})
        elif champion.get("same_model"):
            checks.append(
                {
                    "gate": "must_beat_champion",
                    "passed": True,
                    "reason": f"champion v{champion['version']} is this model",
                }
            )
        elif not champion.get("comparable"):
            checks.append(
                {
                    "gate": "must_beat_champion",
                    "passed": False,
                    "reason": f"champion v{champion['version']} not comparable: {champion.get('reason')}",
                }
            )
        else:
            ok = accuracy > champion["accuracy"]
            checks.append(
                {
                    "gate": "must_beat_champion",
                    "passed": ok,
                    "reason": f"accuracy {accuracy:.4f} {'>' if ok else '<='} "
                    f"champion v{champion['version']} {champion['accuracy']:.4f}",
                }
            )
    failed = [c for c in checks if not c["passed"]]
    return {
        "passed": not failed,
        "checks": checks,
        "reasons": [c["reason"] for c in failed] or ["all gates passed" if checks else "no gates configured"],
    }

"""Promotion gates: pass/fail with the reason for each gate."""

from __future__ import annotations

from typing import Any

from tlops.config import GatesConfig


def decide(
    gates: GatesConfig,
    accuracy: float,
    gain: float | None,
    champion: dict[str, Any] | None,
    *,
    gain_ci: list[float] | None = None,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """Each configured gate with its verdict and reason. With ``gates.gain_bound: lower`` the gain
    gates compare the lower end of the paired bootstrap interval (``gain_ci`` for the gain over
    scratch, ``champion['gain_ci']`` for the gain over the champion) instead of the point estimate:
    a gain that may be noise does not pass."""
    lower = gates.gain_bound == "lower"
    bound = f"lower {confidence:.0%} bound of the "
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
        elif lower and gain_ci is None:
            checks.append(
                {
                    "gate": "min_gain_over_scratch",
                    "passed": False,
                    "reason": "gates.gain_bound=lower but the gain over scratch has no interval",
                }
            )
        else:
            value = gain_ci[0] if lower else gain
            ok = value >= gates.min_gain_over_scratch
            what = f"{bound}gain over scratch" if lower else "gain over scratch"
            checks.append(
                {
                    "gate": "min_gain_over_scratch",
                    "passed": ok,
                    "reason": f"{what} {value:+.4f} {'>=' if ok else '<'} {gates.min_gain_over_scratch:+}",
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
        elif lower:
            ci = champion.get("gain_ci")
            ok = ci is not None and ci[0] > 0
            checks.append(
                {
                    "gate": "must_beat_champion",
                    "passed": ok,
                    "reason": f"{bound}gain over champion v{champion['version']} "
                    + (f"{ci[0]:+.4f} {'>' if ok else '<='} 0" if ci is not None else "unknown (no interval)"),
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

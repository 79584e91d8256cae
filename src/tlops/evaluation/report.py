"""Human-readable evaluation report (also used as the MLflow model-version description)."""

from __future__ import annotations

from typing import Any


def metrics_table(report: dict[str, Any]) -> str:
    rows = ["| model | accuracy | macro-F1 | ECE | train s |", "|---|---|---|---|---|"]
    for name, m in report["models"].items():
        mark = " (selected)" if name == report["selected"] else ""
        rows.append(
            f"| {name}{mark} | {m['accuracy']:.4f} | {m['macro_f1']:.4f} | {m['ece']:.4f} | {m['train_seconds']:.1f} |"
        )
    maj = report["baselines"]["majority"]
    rows.append(f"| majority class ({maj['class']}) | {maj['accuracy']:.4f} | | | |")
    ch = report.get("champion")
    if ch and ch.get("comparable"):
        rows.append(
            f"| current champion v{ch['version']} | {ch['accuracy']:.4f} | {ch['macro_f1']:.4f} | {ch['ece']:.4f} | |"
        )
    return "\n".join(rows)


def render_markdown(report: dict[str, Any]) -> str:
    m = report["metrics"]
    g = report["gates"]
    ch = report.get("champion")
    gain = (
        f"{m['gain_over_scratch']:+.4f}"
        if m["gain_over_scratch"] is not None
        else f"n/a ({report['scratch_baseline']})"
    )
    if ch is None:
        champ = "none yet"
    elif ch.get("same_model"):
        champ = f"v{ch['version']} is this model (same weights digest), accuracy {ch['accuracy']:.4f}"
    elif ch.get("comparable"):
        champ = f"v{ch['version']}, accuracy {ch['accuracy']:.4f} on this test split"
    else:
        champ = f"v{ch['version']} (not comparable: {ch.get('reason')})"
    lines = [
        f"# Evaluation: {report['pipeline']}",
        "",
        f"Selected strategy: **{report['selected']}** (chosen on the validation split); "
        f"test split: {report['test_size']} samples.",
        "",
        metrics_table(report),
        "",
        f"- gain over from-scratch: {gain}",
        f"- gain over majority class: {m['gain_over_majority']:+.4f}",
        f"- champion: {champ}",
        f"- gates: **{'passed' if g['passed'] else 'failed'}**: " + "; ".join(g["reasons"]),
        f"- data hash: `{report['data_hash'][:16]}`",
        "",
        "## Per-class (selected model)",
        "",
        "| class | precision | recall | f1 | support |",
        "|---|---|---|---|---|",
    ]
    for c, v in m["per_class"].items():
        lines.append(f"| {c} | {v['precision']:.3f} | {v['recall']:.3f} | {v['f1']:.3f} | {v['support']} |")
    return "\n".join(lines) + "\n"

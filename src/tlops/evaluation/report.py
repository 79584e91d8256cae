"""Human-readable evaluation report (also used as the MLflow model-version description)."""

from __future__ import annotations

from typing import Any


def with_ci(value: float | None, ci: list[float] | None, *, signed: bool = False, digits: int = 4) -> str:
    """``0.8220 [0.7770, 0.8625]``: a number with its interval (the bare number when it has none)."""
    if value is None:
        return ""
    f = f"{{:+.{digits}f}}" if signed else f"{{:.{digits}f}}"
    return f.format(value) + (f" [{f.format(ci[0])}, {f.format(ci[1])}]" if ci else "")


def confidence_note(report: dict[str, Any]) -> str:
    """What the bracketed intervals are (one sentence for the tables' readers)."""
    iv = report.get("intervals")
    if not iv:
        return ""
    return (
        f"In brackets: {iv['confidence']:.0%} percentile bootstrap intervals over the {report['test_size']} test "
        f"samples ({iv['resamples']} resamples, seed {iv['seed']}); gains are paired (both models scored on the "
        "same resampled samples)."
    )


def label_budget(dataset: dict[str, Any], trained: dict[str, Any]) -> dict[str, Any]:
    """The labels the run actually spent: on training (the train split) and on choosing the
    strategy (the validation split the fine-tune step selected on: the target's ``val`` or, with
    domain adaptation, the source domain's ``source_val``), from the dataset's per-split counts."""
    counts, per_class = dataset.get("counts", {}), dataset.get("per_class", {})
    criterion = trained.get("criterion", "")
    sel_split = "source_val" if "source-domain" in criterion else "val"

    def used(split: str) -> dict[str, Any]:
        pc = per_class.get(split)
        return {
            "split": split,
            "labels": int(counts.get(split, 0)),
            "per_class": [min(pc.values()), max(pc.values())] if pc else None,
        }

    return {
        "training": used("train"),
        "selection": used(sel_split) | {"criterion": criterion},
        "config": dataset.get("label_budget"),
    }


def _budget_line(b: dict[str, Any]) -> str:
    def one(u: dict[str, Any]) -> str:
        pc = u.get("per_class")
        per = "" if not pc else f", {pc[0]} per class" if pc[0] == pc[1] else f", {pc[0]}-{pc[1]} per class"
        return f"{u['labels']} labels ({u['split']} split{per})"

    sel = b["selection"]
    return (
        f"- label budget: training {one(b['training'])}; selection {one(sel)}"
        + (f": {sel['criterion']}" if sel.get("criterion") else "")
        + (f"; {b['config']['rule']}" if (b.get("config") or {}).get("rule") else "")
    )


def metrics_table(report: dict[str, Any]) -> str:
    rows = ["| model | accuracy | macro-F1 | ECE | gain over scratch | train s |", "|---|---|---|---|---|---|"]
    for name, m in report["models"].items():
        mark = " (selected)" if name == report["selected"] else ""
        gain = with_ci(m.get("gain_over_scratch"), m.get("gain_over_scratch_ci"), signed=True)
        rows.append(
            f"| {name}{mark} | {with_ci(m['accuracy'], m.get('accuracy_ci'))} | "
            f"{with_ci(m['macro_f1'], m.get('macro_f1_ci'))} | {m['ece']:.4f} | {gain} | {m['train_seconds']:.1f} |"
        )
    maj = report["baselines"]["majority"]
    rows.append(f"| majority class ({maj['class']}) | {maj['accuracy']:.4f} | | | | |")
    ch = report.get("champion")
    if ch and ch.get("comparable"):
        rows.append(
            f"| current champion v{ch['version']} | {with_ci(ch['accuracy'], ch.get('accuracy_ci'))} | "
            f"{with_ci(ch['macro_f1'], ch.get('macro_f1_ci'))} | {ch['ece']:.4f} | | |"
        )
    note = confidence_note(report)
    return "\n".join(rows) + (f"\n\n{note}" if note else "")


def render_markdown(report: dict[str, Any]) -> str:
    m = report["metrics"]
    g = report["gates"]
    ch = report.get("champion")
    gain = (
        with_ci(m["gain_over_scratch"], m.get("gain_over_scratch_ci"), signed=True)
        if m["gain_over_scratch"] is not None
        else f"n/a ({report['scratch_baseline']})"
    )
    if ch is None:
        champ = "none yet"
    elif ch.get("same_model"):
        champ = f"v{ch['version']} is this model (same weights digest), accuracy {ch['accuracy']:.4f}"
    elif ch.get("comparable"):
        champ = f"v{ch['version']}, accuracy {ch['accuracy']:.4f} on this test split" + (
            f"; gain over it {with_ci(ch['gain'], ch.get('gain_ci'), signed=True)}" if "gain" in ch else ""
        )
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
        *([_budget_line(report["label_budget"])] if report.get("label_budget") else []),
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

"""Terminal summaries of pipeline runs."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from pathlib import Path

    from tlops.config import PipelineConfig
    from tlops.runners.local import PipelineResult

console = Console(stderr=False, highlight=False)


def summary_rows(result: "PipelineResult") -> list[dict[str, Any]]:
    ev = result.artifact("evaluate")
    meta = ev.meta
    scratch = meta["summary"].get("scratch", {}).get("accuracy")
    rows = []
    for name, m in meta["summary"].items():
        rows.append(
            {
                "strategy": name + (" *" if name == meta["selected"] else ""),
                "accuracy": m["accuracy"],
                "accuracy_ci": m.get("accuracy_ci"),
                "gain": None if scratch is None or name == "scratch" else m["accuracy"] - scratch,
                "gain_ci": m.get("gain_over_scratch_ci"),
                "seconds": m["train_seconds"],
            }
        )
    return rows


def _ci(ci: list[float] | None, fmt: str) -> str:
    return f" [{ci[0]:{fmt}}, {ci[1]:{fmt}}]" if ci else ""


def rows_table(title: str, rows: list[dict[str, Any]], confidence: float | None = None) -> Table:
    """Strategies with test accuracy and gain over scratch, each with its bootstrap interval in
    brackets (the gain's is paired: both models scored on the same resampled test samples)."""
    t = Table(
        title=title,
        title_justify="left",
        caption=f"in brackets: {confidence:.0%} bootstrap interval; gains paired" if confidence else None,
        caption_justify="left",
    )
    t.add_column("strategy")
    t.add_column("test accuracy", justify="right")
    t.add_column("gain over scratch", justify="right")
    t.add_column("train time", justify="right")
    for r in rows:
        t.add_row(
            r["strategy"],
            f"{r['accuracy']:.3f}" + _ci(r.get("accuracy_ci"), ".3f"),
            "-" if r["gain"] is None else f"{r['gain']:+.3f}" + _ci(r.get("gain_ci"), "+.3f"),
            f"{r['seconds']:.2f}s" if r["seconds"] < 10 else f"{r['seconds']:.0f}s",
        )
    return t


def print_run_summary(cfg: "PipelineConfig", result: "PipelineResult") -> None:
    from tlops.tracking.setup import tracking_uri

    confidence = result.artifact("evaluate").meta.get("confidence")
    title = f"{cfg.name} ({result.run_id}), * = selected on validation"
    console.print(rows_table(title, summary_rows(result), confidence))
    reg = result.artifact("register").meta
    ev = result.artifact("evaluate").meta
    reused = [n for n, s in result.steps.items() if s.reused]
    console.print(
        f"gates: {'passed' if ev['gates_passed'] else 'FAILED'}; registered [bold]{reg['model_name']}[/bold] "
        f"v{reg['version']} as {', '.join(reg['aliases'])}"
        + (f"; pipeline {result.seconds:.1f}s" if result.seconds else "")
        + (f" (reused: {', '.join(reused)})" if reused else "")
    )
    console.print(f"artifacts: {result.run_dir}")
    from tlops.redact import safe_url

    uri = tracking_uri(cfg)
    console.print(
        f"look: mlflow ui --backend-store-uri {uri}" if uri.startswith("sqlite") else f"tracking: {safe_url(uri)}"
    )


def load_result(run_dir: "Path") -> "PipelineResult":
    """A finished run from its step directories (``<run-dir>/<step>/``), e.g. a compose run."""
    from pathlib import Path

    from tlops.artifacts import read_artifact
    from tlops.dag import DAG
    from tlops.errors import ArtifactError
    from tlops.runners.local import PipelineResult, StepResult

    run_dir = Path(run_dir)
    result = PipelineResult(run_dir.name, run_dir)
    for spec in DAG:
        if not (run_dir / spec.name).is_dir():
            raise ArtifactError(f"{run_dir} has no finished {spec.name} artifact: did the {spec.name} step run?")
        result.steps[spec.name] = StepResult(read_artifact(run_dir / spec.name, spec.output), 0.0, False)
    return result

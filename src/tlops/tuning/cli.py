"""The body of ``tlops tune`` (the command's declaration stays in ``tlops.cli``; heavy imports here)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def tune_command(
    cfg,
    *,
    trials: Optional[int],
    minutes: Optional[float],
    out: Path,
    run: bool,
    katib_manifest: Optional[Path],
    trial: bool,
    namespace: Optional[str],
) -> int:
    """Katib manifest, one Katib trial, or the local Optuna study (+ the pipeline with the best
    config); the exit code."""
    from tlops.errors import ConfigError

    if sum([katib_manifest is not None, trial]) > 1:
        raise ConfigError("--katib-manifest and --trial exclude each other")
    if katib_manifest is not None:
        from tlops.tuning import katib
        from tlops.tuning.study import budget

        n, m = budget(cfg, trials, minutes)
        cfg = cfg.model_copy(update={"tune": cfg.tune.model_copy(update={"trials": n, "minutes": m})})
        exp = katib.experiment(cfg, namespace=namespace)
        katib.write(exp, katib_manifest)
        spec = exp["spec"]
        typer.echo(
            f"wrote {katib_manifest}: Experiment/{exp['metadata']['name']} ({len(spec['parameters'])} parameters, "
            f"{spec['algorithm']['algorithmName']}, {spec['maxTrialCount']} trials, objective "
            f"{spec['objective']['objectiveMetricName']})"
        )
        return 0
    if trial:
        from tlops.tuning.study import single_trial

        single_trial(cfg, echo=typer.echo)
        return 0
    from tlops.tuning.study import tune

    res = tune(cfg, trials=trials, minutes=minutes, out=out, echo=lambda s: typer.echo(s, err=True))
    b = res.best
    typer.echo(
        f"best: trial {b.number} {res.objective} {b.value:.4f} "
        f"({res.count('COMPLETE')} complete, {res.count('PRUNED')} pruned, {res.count('FAIL')} failed, "
        f"{res.seconds:.1f}s) -> {res.out}"
    )
    if not run:
        return 0
    from tlops.report import print_run_summary
    from tlops.runners.local import run_pipeline

    result = run_pipeline(res.best_config)
    print_run_summary(res.best_config, result)
    if not result.artifact("evaluate").meta["gates_passed"]:
        typer.echo("gates failed: exit code 3", err=True)
        return 3
    return 0

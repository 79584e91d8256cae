"""``tlops tune``: an Optuna study over ``train.*`` that reuses the pipeline's cached steps.

ingest, pull-model and extract-features run once (or are reused: the runner's step keys and the
content-addressed feature cache), because no search key changes what they compute (of ``train.*``,
extract-features reads only whether ``stacking`` is among the strategies; config validation keeps
every ``train.strategies`` choice of the space on the config's side of that). Each trial then
runs only the fine-tune step's body with the sampled values: strategies that train a head on the
cached features cost milliseconds, strategies that train the backbone report every epoch's
validation value to Optuna through the training runtime's progress callback
(:attr:`tlops.training.runtime.Runtime.progress`), so the median pruner can stop a poor trial
between epochs without a fork of the training loop.

A trial is scored on what the fine-tune step itself selects on: the selected strategy's
validation accuracy (``val_acc``) or, with ``data.adapt_from``, its source-domain validation
accuracy (``source_val_acc``, no target labels). The test split belongs to the evaluate step,
which no trial runs, so selection cannot look at test labels.

Tracking: one MLflow parent run for the study, one nested run per trial (its values, the
objective, the per-epoch values and ``state`` COMPLETE / PRUNED / FAIL).
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from tlops.config import PipelineConfig, TuneConfig, int_field, save_config, validate_config, with_train_params
from tlops.errors import ConfigError, TlopsError

log = logging.getLogger(__name__)

UPSTREAM = ("ingest", "pull-model", "extract-features")  # run once per study: no search key changes them
# Optuna's median pruner: prune only once this many trials have finished (Katib's medianstop default, 3)
MIN_TRIALS_BEFORE_PRUNING = 3


@dataclass
class TrialRecord:
    number: int
    params: dict[str, Any]
    state: str  # COMPLETE, PRUNED, FAIL
    value: float | None
    seconds: float
    error: str | None = None


@dataclass
class TuneResult:
    objective: str
    direction: str
    trials: list[TrialRecord] = field(default_factory=list)
    best: TrialRecord | None = None
    best_config: PipelineConfig | None = None
    out: Path | None = None
    mlflow_run_id: str | None = None
    seconds: float = 0.0

    def count(self, state: str) -> int:
        return sum(t.state == state for t in self.trials)


def objective_key(cfg: PipelineConfig) -> str:
    """``tune.objective`` resolved: auto = what the fine-tune step selects on by default."""
    tc = _tune(cfg)
    if tc.objective != "auto":
        return tc.objective
    return "source_val_acc" if cfg.data.adapt_from is not None else "val_acc"


def budget(cfg: PipelineConfig, trials: int | None, minutes: float | None) -> tuple[int, float | None]:
    """(trials, minutes): the command line's, else the config's; a budget of 0 is an error."""
    tc = _tune(cfg)
    n = tc.trials if trials is None else trials
    m = tc.minutes if minutes is None else minutes
    if n < 1:
        raise ConfigError(f"--trials: got {n}; the budget must allow at least 1 trial")
    if m is not None and not m > 0:
        raise ConfigError(f"--minutes: got {m}; the budget must be > 0 minutes")
    return n, m


def _tune(cfg: PipelineConfig) -> TuneConfig:
    if cfg.tune is None:
        raise ConfigError(
            "the config has no tune: section; add one, e.g.\n"
            "tune:\n  space:\n    train.lr: {low: 1.0e-5, high: 1.0e-3, log: true}\n  trials: 20"
        )
    return cfg.tune


def sample(trial: Any, tc: TuneConfig) -> dict[str, Any]:
    """The trial's values, one per search key (int or float as the train.* field is)."""
    out: dict[str, Any] = {}
    for key, p in tc.space.items():
        if p.choices is not None:
            out[key] = trial.suggest_categorical(key, p.choices)
        elif int_field(key):
            out[key] = trial.suggest_int(key, int(p.low), int(p.high), log=p.log)
        else:
            out[key] = trial.suggest_float(key, p.low, p.high, log=p.log)
    return out


def trial_config(cfg: PipelineConfig, params: dict[str, Any]) -> PipelineConfig:
    """The pipeline config with a trial's ``train.*`` values applied (validated again)."""
    d = cfg.to_dict()
    d["train"] = with_train_params(cfg.train, params).model_dump(mode="json")
    return validate_config(d, "<trial>")


def _fmt(params: dict[str, Any]) -> str:
    return " ".join(
        f"{k.removeprefix('train.')}={v:.4g}" if isinstance(v, float) else f"{k.removeprefix('train.')}={v}"
        for k, v in params.items()
    )


def run_upstream(cfg: PipelineConfig, run_dir: Path) -> dict[str, Any]:
    """ingest, pull-model, extract-features into ``run_dir`` (reused when finished before)."""
    from tlops.dag import get
    from tlops.runners.local import execute_step
    from tlops.tracking.steplog import log_step

    arts: dict[str, Any] = {}
    for name in UPSTREAM:
        spec = get(name)
        ins = {k: arts[p] for k, p in spec.inputs.items()}
        res = execute_step(spec, cfg, ins, run_dir / name)
        log_step(name, res.artifact, res.seconds, res.reused)
        log.info("tune: %s %s (%.1fs)", name, "reused" if res.reused else "ran", res.seconds)
        arts[name] = res.artifact
    return {"dataset": arts["ingest"], "model": arts["pull-model"], "features": arts["extract-features"]}


def train_trial(
    cfg: PipelineConfig, inputs: dict[str, Any], out: Path, key: str, on_epoch: Callable[[dict], None] | None = None
) -> float:
    """Run the fine-tune step's body for one trial config into ``out``; the objective value.

    ``on_epoch`` gets every epoch record of every training loop (the runtime's progress callback);
    raising from it (``optuna.TrialPruned``) stops the trial there."""
    from tlops import runtime_env
    from tlops.steps.fine_tune import _run
    from tlops.training.runtime import Runtime

    runtime_env.apply(cfg, "fine-tune")
    art = _run(cfg, inputs, out, Runtime.from_config(cfg.train, progress=on_epoch), keep_models=False)
    meta = art.meta
    value = meta["models"][meta["selected"]].get(key)
    if value is None:
        raise TlopsError(
            f"tune.objective {key}: the trial has no {key} (no validation split? see data.split.val"
            + (", data.adapt_from.val" if key == "source_val_acc" else "")
            + ")"
        )
    return float(value)


def is_epoch(rec: dict, key: str) -> bool:
    """Whether a training record is an epoch carrying the objective: a probe fit (a record with
    ``selected_by``, from :func:`tlops.training.probe.train_probe`) is not one."""
    return rec.get(key) is not None and "selected_by" not in rec


def _sampler(tc: TuneConfig):
    import optuna

    if tc.algorithm == "random":
        return optuna.samplers.RandomSampler(seed=tc.seed)
    return optuna.samplers.TPESampler(seed=tc.seed)


def _pruner(tc: TuneConfig, cfg: PipelineConfig):
    """Median pruning when asked and when some strategy trains by epochs (a head on cached features
    has one record: nothing to stop early)."""
    import optuna

    from tlops.training import strategies

    searched = tc.space["train.strategies"].choices if "train.strategies" in tc.space else []
    if tc.pruning and any(strategies.get(s).trains_backbone for s in [*cfg.train.strategies, *searched]):
        return optuna.pruners.MedianPruner(n_startup_trials=MIN_TRIALS_BEFORE_PRUNING, n_warmup_steps=0)
    return optuna.pruners.NopPruner()


def tune(
    cfg: PipelineConfig,
    *,
    trials: int | None = None,
    minutes: float | None = None,
    out: Path | None = None,
    echo: Callable[[str], None] = print,
) -> TuneResult:
    """Run the study (see the module docstring); write the best config to ``out`` when given."""
    import mlflow
    import optuna

    from tlops.runners.local import new_run_id
    from tlops.tracking.setup import pipeline_run
    from tlops.workdir import Workdir

    tc = _tune(cfg)
    n_trials, budget_min = budget(cfg, trials, minutes)
    key = objective_key(cfg)
    base = cfg.model_copy(update={"evaluate": cfg.evaluate.model_copy(update={"scratch_baseline": False})})
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction=tc.direction, sampler=_sampler(tc), pruner=_pruner(tc, cfg))
    result = TuneResult(key, tc.direction)
    run_id = "tune-" + new_run_id(cfg)
    run_dir = Workdir.at(cfg.workdir_path).run_dir(run_id)
    run_dir.mkdir(parents=True)
    t0 = time.perf_counter()
    try:
        with pipeline_run(cfg, run_name=run_id) as parent:
            result.mlflow_run_id = parent.info.run_id
            mlflow.set_tags({"tlops.tune": "study", "tlops.tune.objective": key})
            mlflow.log_params({"tune.budget_trials": n_trials, "tune.budget_minutes": budget_min})
            inputs = run_upstream(cfg, run_dir)
            for i in range(n_trials):
                if budget_min is not None and time.perf_counter() - t0 >= budget_min * 60:
                    echo(f"tune: time budget of {budget_min:g} min used after {i} trials")
                    break
                rec = _one_trial(study, base, tc, inputs, run_dir, key, i, n_trials)
                result.trials.append(rec)
                _progress(echo, rec, n_trials, study, key, time.perf_counter() - t0)
            completed = [t for t in result.trials if t.state == "COMPLETE"]
            if not completed:
                errs = "; ".join(sorted({t.error for t in result.trials if t.error})) or "every trial was pruned"
                raise TlopsError(f"tune: no trial completed ({errs})")
            best = study.best_trial
            result.best = next(t for t in result.trials if t.number == best.number)
            result.best_config = trial_config(cfg, result.best.params)
            mlflow.log_metric(f"best_{key}", best.value)
            mlflow.log_params({f"best.{k}": v for k, v in result.best.params.items()})
            mlflow.set_tag("tlops.tune.best_trial", str(best.number))
            if out is not None:
                result.out = write_best(result.best_config, out, result)
                mlflow.log_artifact(str(result.out))
    finally:
        shutil.rmtree(run_dir / "trials", ignore_errors=True)
    result.seconds = time.perf_counter() - t0
    return result


def _one_trial(study, base, tc, inputs, run_dir: Path, key: str, i: int, n: int) -> TrialRecord:
    import mlflow
    import optuna

    trial = study.ask()
    params = sample(trial, tc)
    t1 = time.perf_counter()
    steps = [0]
    pruner_on = not isinstance(study.pruner, optuna.pruners.NopPruner)

    def on_epoch(rec: dict) -> None:
        # A probe fit (the shared linear probe the training strategies start from, or SetFit's head
        # on its tuned encoder) is not an epoch (is_epoch). The shared probe's value
        # is alike in every trial, and Optuna's median pruner compares a trial's best value so far,
        # so reporting it would hide every later epoch from the pruner; SetFit's head is its last
        # record, so pruning there would save nothing and throw away a finished trial's value.
        if not is_epoch(rec, key):
            return
        steps[0] += 1
        mlflow.log_metric(f"epoch_{key}", rec[key], step=steps[0])
        trial.report(float(rec[key]), steps[0])
        if pruner_on and trial.should_prune():
            raise optuna.TrialPruned(f"{key} {rec[key]:.4f} at step {steps[0]} is below the median")

    state, value, error = "COMPLETE", None, None
    with mlflow.start_run(run_name=f"trial-{trial.number}", nested=True):
        mlflow.log_params(params)
        mlflow.set_tags({"tlops.tune": "trial", "trial_number": str(trial.number)})
        tmp = Path(tempfile.mkdtemp(prefix=f"trial-{trial.number}-", dir=run_dir))
        try:
            value = train_trial(trial_config(base, params), inputs, tmp / "fine-tune", key, on_epoch)
        except optuna.TrialPruned:
            state = "PRUNED"
        except (TlopsError, ValueError, RuntimeError) as e:  # a value the model cannot take: next trial
            state, error = "FAIL", f"{type(e).__name__}: {e}".splitlines()[0][:300]
            log.warning("tune: trial %d failed: %s", trial.number, error)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if state == "COMPLETE" and not math.isfinite(value):
            state, error = "FAIL", f"{key} is {value}"
        mlflow.set_tag("state", state)
        if value is not None and state == "COMPLETE":
            mlflow.log_metric(key, value)
        if error:
            mlflow.set_tag("error", error)
    if state == "COMPLETE":
        study.tell(trial, value)
    else:
        study.tell(trial, state=getattr(optuna.trial.TrialState, state))
    return TrialRecord(trial.number, params, state, value, time.perf_counter() - t1, error)


def _progress(echo, rec: TrialRecord, n: int, study, key: str, elapsed: float) -> None:
    try:
        best = f"best {study.best_value:.4f} (#{study.best_trial.number})"
    except ValueError:
        best = "best -"
    what = {"COMPLETE": f"{key} {rec.value:.4f}" if rec.value is not None else "", "PRUNED": "pruned"}.get(
        rec.state, f"failed: {rec.error}"
    )
    echo(f"trial {rec.number + 1}/{n}: {_fmt(rec.params)} -> {what}; {best}; {elapsed:.1f}s elapsed")


def write_best(cfg: PipelineConfig, out: Path, result: TuneResult) -> Path:
    """The full config with the best values, headed by where they came from (a valid tlops config)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    b = result.best
    assert b is not None
    head = [
        f"# written by tlops tune: trial {b.number} of {len(result.trials)} ({result.count('PRUNED')} pruned), "
        f"{result.objective} {b.value:.4f} ({result.direction})",
        f"# searched: {_fmt(b.params)}",
        f"# MLflow study run: {result.mlflow_run_id}",
    ]
    tmp = out.with_name(f".{out.name}.tmp")
    save_config(cfg, tmp)
    tmp.write_text("\n".join(head) + "\n" + tmp.read_text())
    yaml.safe_load(tmp.read_text())
    tmp.replace(out)
    return out


def single_trial(cfg: PipelineConfig, echo: Callable[[str], None] = print) -> float:
    """One trial with the config as given (``--set`` carries the trial's values): what a Katib
    trial runs. Prints ``<objective>=<value>`` after every epoch and, last, the trial's value, the
    lines Katib's StdOut metrics collector reads (``name=value``, ``metricStrategies: latest``)."""
    from tlops.runners.local import new_run_id
    from tlops.tracking.setup import pipeline_run
    from tlops.workdir import Workdir

    _tune(cfg)
    key = objective_key(cfg)
    base = cfg.model_copy(update={"evaluate": cfg.evaluate.model_copy(update={"scratch_baseline": False})})
    run_id = "tune-trial-" + new_run_id(cfg)
    run_dir = Workdir.at(cfg.workdir_path).run_dir(run_id)
    run_dir.mkdir(parents=True)

    def on_epoch(rec: dict) -> None:
        if is_epoch(rec, key):  # as for Optuna's pruner
            echo(f"{key}={float(rec[key]):.6f}")

    try:
        with pipeline_run(cfg, run_name=run_id):
            inputs = run_upstream(cfg, run_dir)
            value = train_trial(base, inputs, run_dir / "fine-tune", key, on_epoch)
    finally:
        shutil.rmtree(run_dir / "fine-tune", ignore_errors=True)
    echo(f"{key}={value:.6f}")
    return value

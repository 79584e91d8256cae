"""In-process runner: the six steps in DAG order, one MLflow run, reuse of finished artifacts.

Artifacts go to ``<workdir>/runs/<run-id>/<step>/`` (the layout is ``tlops.workdir.Workdir``).
Before running a step, the runner computes its key (``tlops.contract.step_key``: the config
fields the step reads, its inputs' content hashes, cheap stamps of outside state, versions); if
a finished artifact made under the same key exists, it is hard-linked into the run instead.
Every artifact's manifest records the key it was made under (``step_key``).

The pipeline's MLflow run is opened when the first step has to run (the steps reused before it
are logged then). When none has to, ``register`` checks, from the registry answers remembered
while the store is unchanged (:mod:`tlops.tracking.memo`), that the registry already holds what it
would write; then the run opens no MLflow run and imports no MLflow. After a run that used MLflow
(its MLflow run closed), the memo is refreshed.

Concurrency and crashes:

- A reusable step runs under ``<workdir>/locks/<step>/<key>.lock``: two runs
  that need the same step at the same time do not both compute it; the second waits, then
  reuses the first one's artifact. A killed holder releases the lock (kernel ``flock``).
- A reused artifact is linked into a hidden temp dir and renamed into place, so a copy that
  fails half-way (e.g. ``tlops gc`` removed the source meanwhile) is never trusted; the step
  then simply runs, and so does one whose manifest names another key. The reuse index is
  pointed at the newest copy, so pruning old runs keeps reuse working.
- A step that keeps resumable checkpoints (its ``run`` takes ``checkpoint_dir``: fine-tune) gets
  ``<workdir>/checkpoints/<key>`` (the step's own output dir is a temp dir that vanishes with a
  crash). A rerun with the same key resumes from them; they are removed once the step has
  succeeded.
- The run dir holds ``.lock`` while the pipeline runs (``tlops gc`` never prunes a locked run).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from tlops import interrupt, runtime_env
from tlops.artifacts import Artifact, copy_artifact, is_finished, read_artifact, set_step_key
from tlops.config import PipelineConfig, save_config
from tlops.contract import step_key
from tlops.dag import DAG, StepSpec
from tlops.errors import TlopsError
from tlops.runners import torchrun
from tlops.steps import get_step
from tlops.storage import file_lock
from tlops.workdir import RUN_LOCK, Workdir

log = logging.getLogger(__name__)


@dataclass
class StepResult:
    artifact: Artifact
    seconds: float
    reused: bool


@dataclass
class PipelineResult:
    run_id: str
    run_dir: Path
    steps: dict[str, StepResult] = field(default_factory=dict)
    mlflow_run_id: str | None = None

    @property
    def seconds(self) -> float:
        return sum(s.seconds for s in self.steps.values())

    def artifact(self, step: str) -> Artifact:
        return self.steps[step].artifact


def _secondary_rank() -> bool:
    """A non-zero rank of a multi-process torchrun job running one step together: rank 0 holds
    the step lock for the job (a rank waiting on it would deadlock the job's collectives)."""
    return torchrun.secondary_rank()


def _record(prev: Path, out: Path) -> None:
    prev.parent.mkdir(parents=True, exist_ok=True)
    tmp = prev.with_name(f".{prev.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(str(out.resolve()))
    tmp.replace(prev)


def _reusable(prev: Path, key: str, out: Path) -> Path | None:
    """The finished artifact the index points at for ``key``, if it is one made under that key
    (a pointer to a deleted, half-written or foreign artifact is ignored) and is not ``out``."""
    if not prev.is_file():
        return None
    src = Path(prev.read_text().strip())
    if not is_finished(src) or src.resolve() == out.resolve():
        return None
    try:
        made_under = read_artifact(src).manifest.get("step_key")
    except (OSError, ValueError, TlopsError):
        return None
    if made_under != key:
        log.info("%s: index points at an artifact made under another key; not reused", src)
        return None
    return src


def execute_step(
    spec: StepSpec,
    cfg: PipelineConfig,
    inputs: dict[str, Artifact],
    out: Path,
    *,
    reuse: bool = True,
    record: bool = True,
    image_digest: str | None = None,
    before_run: Callable[[], None] | None = None,
) -> StepResult:
    """Run one step into ``out``, or reuse a finished artifact made under the same step key.

    ``record=False`` keeps ``out`` out of the reuse index (a temp dir that will not survive).
    ``before_run`` is called when the step is about to run (not when it is reused)."""
    t0 = time.perf_counter()
    wd = Workdir.at(cfg.workdir_path)
    key = step_key(spec, cfg, inputs, image_digest)  # image_digest: a KFP task's pinned image
    fp = key if spec.reusable else None
    prev = wd.index_entry(spec.name, fp) if fp else None
    lock = (
        file_lock(wd.step_lock(spec.name, fp), what=f"{spec.name} (another run is computing it)")
        if fp and not _secondary_rank()
        else contextlib.nullcontext(True)
    )
    with lock:
        src = _reusable(prev, key, out) if reuse and prev is not None else None
        if src is not None:
            try:
                copy_artifact(src, out)
            except (OSError, shutil.Error, TlopsError) as e:
                log.warning("%s: could not reuse %s (%s); running the step", spec.name, src, type(e).__name__)
            else:
                if record and wd.in_runs(out):
                    _record(prev, out)  # the newest run's copy: older runs can be pruned without losing reuse
                log.info("%s: inputs unchanged, reusing finished artifact %s", spec.name, src)
                return StepResult(read_artifact(out, spec.output), time.perf_counter() - t0, True)
        if before_run is not None:
            before_run()
        ckpt = wd.checkpoint(fp) if fp else None
        log.info("%s: running (key %s)", spec.name, key[:16])
        interrupt.note(step=spec.name, checkpoints=ckpt)  # what a Ctrl-C / SIGTERM report names
        runtime_env.apply(cfg, spec.name)  # threads: set here, before the step's first torch work
        run = get_step(spec.name).run
        resumable = ckpt is not None and "checkpoint_dir" in inspect.signature(run).parameters
        artifact = run(cfg, inputs, out, **({"checkpoint_dir": ckpt} if resumable else {}))
        if not _secondary_rank():
            set_step_key(artifact, key, runtime_env.record(cfg.seed))
        if prev is not None and record:
            _record(prev, out)
        if ckpt is not None:
            shutil.rmtree(ckpt, ignore_errors=True)  # succeeded: nothing left to resume
    return StepResult(artifact, time.perf_counter() - t0, False)


def new_run_id(cfg: PipelineConfig) -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.name}-{uuid.uuid4().hex[:6]}"


def run_pipeline(cfg: PipelineConfig, *, run_id: str | None = None, reuse: bool = True) -> PipelineResult:
    run_id = run_id or new_run_id(cfg)
    run_dir = Workdir.at(cfg.workdir_path).run_dir(run_id)
    run_dir.mkdir(parents=True, exist_ok=False)
    with file_lock(run_dir / RUN_LOCK):  # held while the run is in progress (tlops gc skips it)
        return _run(cfg, run_id, run_dir, reuse)


class _Tracking:
    """The pipeline's MLflow run, opened only when a step has to run (then the steps reused before
    it are logged first, as they would have been): a fully reused run opens none."""

    def __init__(self, cfg: PipelineConfig, result: PipelineResult, stack: contextlib.ExitStack):
        self.cfg, self.result, self.stack = cfg, result, stack
        self.run = None

    def open(self) -> None:
        if self.run is not None:
            return
        import mlflow

        from tlops.tracking.setup import pipeline_run

        res = self.result
        self.run = self.stack.enter_context(
            pipeline_run(self.cfg, run_name=res.run_id, config_file=res.run_dir / "config.yaml")
        )
        res.mlflow_run_id = self.run.info.run_id
        interrupt.note(mlflow_run_id=self.run.info.run_id)
        mlflow.set_tag("tlops.run_dir", str(res.run_dir))
        for name, step in res.steps.items():
            self.log(name, step)

    def log(self, name: str, step: StepResult) -> None:
        if self.run is not None:
            from tlops.tracking.steplog import log_step

            log_step(name, step.artifact, step.seconds, step.reused)

    def close(self) -> None:
        if self.run is not None:
            from tlops.tracking.setup import log_environment

            log_environment({name: s.artifact.manifest for name, s in self.result.steps.items()})


def _unchanged(spec: StepSpec, cfg: PipelineConfig, inputs: dict[str, Artifact], out: Path) -> StepResult | None:
    """A step that is not reusable but whose outside effects are all in place already (``register``:
    ``unchanged(cfg, inputs, out)`` in its module) writes its artifact without running."""
    check = getattr(get_step(spec.name), "unchanged", None)
    t0 = time.perf_counter()
    artifact = check(cfg, inputs, out) if check is not None else None
    if artifact is None:
        return None
    set_step_key(artifact, step_key(spec, cfg, inputs), runtime_env.record(cfg.seed))
    return StepResult(artifact, time.perf_counter() - t0, False)


def _run(cfg: PipelineConfig, run_id: str, run_dir: Path, reuse: bool) -> PipelineResult:
    from tlops.tracking import memo

    save_config(cfg, run_dir / "config.yaml")
    result = PipelineResult(run_id, run_dir)
    log.info("pipeline %s: run %s in %s", cfg.name, run_id, run_dir)
    interrupt.note(run_id=run_id, run_dir=run_dir, mlflow_run_id=None)  # set when one is opened
    with contextlib.ExitStack() as stack:
        tracking = _Tracking(cfg, result, stack)
        if not reuse:
            tracking.open()
        for spec in DAG:
            inputs = {name: result.artifact(producer) for name, producer in spec.inputs.items()}
            out = run_dir / spec.name
            # nothing ran so far (no MLflow run open): register may find its work done already
            res = _unchanged(spec, cfg, inputs, out) if tracking.run is None and not spec.reusable else None
            if res is None:
                res = execute_step(spec, cfg, inputs, out, reuse=reuse, before_run=tracking.open)
            result.steps[spec.name] = res
            tracking.log(spec.name, res)
        tracking.close()
    if tracking.run is not None or memo.asked(cfg):  # after the MLflow run is closed: its last write
        memo.save(cfg)
    log.info(
        "pipeline %s: done in %.1fs (%s reused)",
        cfg.name,
        result.seconds,
        ", ".join(n for n, s in result.steps.items() if s.reused) or "nothing",
    )
    return result

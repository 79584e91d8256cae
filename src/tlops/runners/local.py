"""In-process runner: the six steps in DAG order, one MLflow run, reuse of finished artifacts.

Artifacts go to ``<workdir>/runs/<run-id>/<step>/``. Before running a step, the runner
computes its fingerprint (config section + input content hashes + cheap source stamps); if a
finished artifact with the same fingerprint exists, it is hard-linked into the run instead.

Concurrency and crashes:

- A step with a fingerprint runs under ``<workdir>/locks/<step>/<fingerprint>.lock``: two runs
  that need the same step at the same time do not both compute it; the second waits, then
  reuses the first one's artifact. A killed holder releases the lock (kernel ``flock``).
- A reused artifact is linked into a hidden temp dir and renamed into place, so a copy that
  fails half-way (e.g. ``tlops gc`` removed the source meanwhile) is never trusted; the step
  then simply runs. The reuse index is pointed at the newest copy, so pruning old runs keeps
  reuse working.
- ``TLOPS_CHECKPOINT_DIR`` is set to ``<workdir>/checkpoints/<fingerprint>`` while a step runs:
  the fine-tune step keeps resumable checkpoints there (the step's own output dir is a temp
  dir that vanishes with a crash). A rerun with the same fingerprint resumes from them; they
  are removed once the step has succeeded.
- The run dir holds ``.lock`` while the pipeline runs (``tlops gc`` never prunes a locked run).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from tlops import __version__
from tlops.artifacts import Artifact, is_finished, link_or_copy_tree, read_artifact
from tlops.config import PipelineConfig, save_config
from tlops.dag import DAG, StepSpec
from tlops.errors import TlopsError
from tlops.hashing import hash_json
from tlops.steps import get_step
from tlops.storage import file_lock

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


def step_fingerprint(spec: StepSpec, cfg: PipelineConfig, inputs: dict[str, Artifact]) -> str:
    return hash_json([spec.name, __version__, get_step(spec.name).fingerprint(cfg, inputs)])


RUN_LOCK = ".lock"
CHECKPOINT_ENV = "TLOPS_CHECKPOINT_DIR"  # read by tlops.training.finetune.checkpoint_dir


def step_lock_path(workdir: Path, step: str, fp: str) -> Path:
    return workdir / "locks" / step / f"{fp}.lock"


def checkpoint_path(workdir: Path, fp: str) -> Path:
    return workdir / "checkpoints" / fp


@contextlib.contextmanager
def _env(name: str, value: str | None) -> Iterator[None]:
    saved = os.environ.get(name)
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved


def _secondary_rank() -> bool:
    """A non-zero rank of a multi-process torchrun job running one step together: rank 0 holds
    the step lock for the job (a rank waiting on it would deadlock the job's collectives)."""
    return (
        "LOCAL_RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1 and os.environ.get("RANK", "0") != "0"
    )


def _record(prev: Path, out: Path) -> None:
    prev.parent.mkdir(parents=True, exist_ok=True)
    tmp = prev.with_name(f".{prev.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(str(out.resolve()))
    tmp.replace(prev)


def _copy_artifact(src: Path, out: Path) -> None:
    """Link ``src`` into a temp sibling of ``out``, check it is finished, rename it into place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.reuse-{uuid.uuid4().hex[:8]}"
    try:
        link_or_copy_tree(src, tmp)
        read_artifact(tmp)
        if out.exists():
            trash = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(out, trash)
            os.rename(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def execute_step(
    spec: StepSpec,
    cfg: PipelineConfig,
    inputs: dict[str, Artifact],
    out: Path,
    *,
    reuse: bool = True,
    record: bool = True,
) -> StepResult:
    """Run one step into ``out``, or reuse a finished artifact with the same fingerprint.

    ``record=False`` keeps ``out`` out of the reuse index (a temp dir that will not survive)."""
    t0 = time.perf_counter()
    workdir = cfg.workdir_path
    fp = step_fingerprint(spec, cfg, inputs) if spec.reusable else None
    prev = workdir / "index" / spec.name / fp if fp else None
    lock = (
        file_lock(step_lock_path(workdir, spec.name, fp), what=f"{spec.name} (another run is computing it)")
        if fp and not _secondary_rank()
        else contextlib.nullcontext(True)
    )
    with lock:
        if reuse and prev is not None and prev.is_file():
            src = Path(prev.read_text().strip())
            if is_finished(src) and src.resolve() != out.resolve():
                try:
                    _copy_artifact(src, out)
                except (OSError, shutil.Error, TlopsError) as e:
                    log.warning("%s: could not reuse %s (%s); running the step", spec.name, src, type(e).__name__)
                else:
                    if record and (workdir / "runs").resolve() in out.resolve().parents:
                        _record(prev, out)  # the newest run's copy: older runs can be pruned without losing reuse
                    log.info("%s: inputs unchanged, reusing finished artifact %s", spec.name, src)
                    return StepResult(read_artifact(out, spec.output), time.perf_counter() - t0, True)
        ckpt = checkpoint_path(workdir, fp) if fp else None
        log.info("%s: running", spec.name)
        with _env(CHECKPOINT_ENV, str(ckpt) if ckpt else None):
            artifact = get_step(spec.name).run(cfg, inputs, out)
        if prev is not None and record:
            _record(prev, out)
        if ckpt is not None:
            shutil.rmtree(ckpt, ignore_errors=True)  # succeeded: nothing left to resume
    return StepResult(artifact, time.perf_counter() - t0, False)


def new_run_id(cfg: PipelineConfig) -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.name}-{uuid.uuid4().hex[:6]}"


def run_pipeline(cfg: PipelineConfig, *, run_id: str | None = None, reuse: bool = True) -> PipelineResult:
    run_id = run_id or new_run_id(cfg)
    run_dir = cfg.workdir_path / "runs" / run_id
    run_dir.mkdir(parents=True, exist_ok=False)
    with file_lock(run_dir / RUN_LOCK):  # held while the run is in progress (tlops gc skips it)
        return _run(cfg, run_id, run_dir, reuse)


def _run(cfg: PipelineConfig, run_id: str, run_dir: Path, reuse: bool) -> PipelineResult:
    import mlflow

    from tlops.tracking.setup import pipeline_run
    from tlops.tracking.steplog import log_step

    save_config(cfg, run_dir / "config.yaml")
    result = PipelineResult(run_id, run_dir)
    log.info("pipeline %s: run %s in %s", cfg.name, run_id, run_dir)
    with pipeline_run(cfg, run_name=run_id, config_file=run_dir / "config.yaml") as mlrun:
        result.mlflow_run_id = mlrun.info.run_id
        mlflow.set_tag("tlops.run_dir", str(run_dir))
        for spec in DAG:
            inputs = {name: result.artifact(producer) for name, producer in spec.inputs.items()}
            res = execute_step(spec, cfg, inputs, run_dir / spec.name, reuse=reuse)
            result.steps[spec.name] = res
            log_step(spec.name, res.artifact, res.seconds, res.reused)
    log.info(
        "pipeline %s: done in %.1fs (%s reused)",
        cfg.name,
        result.seconds,
        ", ".join(n for n, s in result.steps.items() if s.reused) or "nothing",
    )
    return result

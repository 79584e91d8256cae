"""In-process runner: the six steps in DAG order, one MLflow run, reuse of finished artifacts.

Artifacts go to ``<workdir>/runs/<run-id>/<step>/``. Before running a step, the runner
computes its fingerprint (config section + input content hashes + cheap source stamps); if a
finished artifact with the same fingerprint exists, it is hard-linked into the run instead.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from tlops import __version__
from tlops.artifacts import Artifact, is_finished, link_or_copy_tree, read_artifact
from tlops.config import PipelineConfig, save_config
from tlops.dag import DAG, StepSpec
from tlops.hashing import hash_json
from tlops.steps import get_step

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


def execute_step(
    spec: StepSpec, cfg: PipelineConfig, inputs: dict[str, Artifact], out: Path, *, reuse: bool = True,
    record: bool = True,
) -> StepResult:
    """Run one step into ``out``, or reuse a finished artifact with the same fingerprint.

    ``record=False`` keeps ``out`` out of the reuse index (a temp dir that will not survive)."""
    t0 = time.perf_counter()
    index = cfg.workdir_path / "index" / spec.name
    fp = step_fingerprint(spec, cfg, inputs) if spec.reusable else None
    prev = index / fp if fp else None
    if reuse and prev is not None and prev.is_file():
        src = Path(prev.read_text().strip())
        if is_finished(src) and src.resolve() != out.resolve():
            link_or_copy_tree(src, out)
            log.info("%s: inputs unchanged, reusing finished artifact %s", spec.name, src)
            return StepResult(read_artifact(out, spec.output), time.perf_counter() - t0, True)
    log.info("%s: running", spec.name)
    artifact = get_step(spec.name).run(cfg, inputs, out)
    if prev is not None and record:
        index.mkdir(parents=True, exist_ok=True)
        tmp = prev.with_suffix(".tmp")
        tmp.write_text(str(out.resolve()))
        tmp.replace(prev)
    return StepResult(artifact, time.perf_counter() - t0, False)


def new_run_id(cfg: PipelineConfig) -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.name}-{uuid.uuid4().hex[:6]}"


def run_pipeline(cfg: PipelineConfig, *, run_id: str | None = None, reuse: bool = True) -> PipelineResult:
    import mlflow

    from tlops.tracking.setup import pipeline_run
    from tlops.tracking.steplog import log_step

    run_id = run_id or new_run_id(cfg)
    run_dir = cfg.workdir_path / "runs" / run_id
    run_dir.mkdir(parents=True, exist_ok=False)
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
    log.info("pipeline %s: done in %.1fs (%s reused)", cfg.name, result.seconds,
             ", ".join(n for n, s in result.steps.items() if s.reused) or "nothing")
    return result

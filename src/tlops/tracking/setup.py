"""Point MLflow at the right store: env ``MLFLOW_TRACKING_URI``, else config, else embedded sqlite."""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
from pathlib import Path
from typing import Any, Iterator

from tlops.config import PipelineConfig

log = logging.getLogger(__name__)


def embedded_uri(workdir: Path) -> str:
    return f"sqlite:///{workdir / 'mlflow.db'}"


def tracking_uri(cfg: PipelineConfig) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking.uri or embedded_uri(cfg.workdir_path)


def use_store(uri: str) -> None:
    """Point this process's MLflow client at ``uri`` (tracking and registry).

    ``mlflow.set_tracking_uri`` also exports ``MLFLOW_TRACKING_URI`` (and the registry twin) to
    the environment; since a user's env var wins over the config here, that would pin every
    later pipeline in this process to the first store. Restore what the user had.
    """
    import mlflow

    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def configure(cfg: PipelineConfig) -> str:
    """Set tracking + registry URI and the experiment (created with a local artifact root if embedded)."""
    import mlflow

    logging.getLogger("alembic").setLevel(logging.WARNING)
    uri = tracking_uri(cfg)
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    use_store(uri)
    client = mlflow.MlflowClient()
    if client.get_experiment_by_name(cfg.tracking.experiment) is None:
        location = cfg.tracking.artifact_location
        if location is None and (uri.startswith("sqlite:") or uri.startswith("file:")):
            location = (cfg.workdir_path / "mlartifacts").as_uri()
        with contextlib.suppress(Exception):  # a concurrent run may create it first
            client.create_experiment(cfg.tracking.experiment, artifact_location=location)
    mlflow.set_experiment(cfg.tracking.experiment)
    return uri


def git_commit() -> str:
    env = os.environ.get("TLOPS_GIT_COMMIT")
    if env:
        return env
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out |= flatten(v, key + ".")
        else:
            out[key] = v
    return out


@contextlib.contextmanager
def pipeline_run(cfg: PipelineConfig, run_name: str, config_file: Path | None = None) -> Iterator[Any]:
    """One MLflow run per pipeline run; resumes ``MLFLOW_RUN_ID`` when a step runs alone."""
    import mlflow

    configure(cfg)
    active = mlflow.active_run()
    if active is not None:
        yield active
        return
    with mlflow.start_run(run_name=run_name) as run:
        mlflow.log_params({k: str(v)[:500] for k, v in flatten(cfg.to_dict()).items()})
        mlflow.set_tags({"tlops.pipeline": cfg.name, "tlops.config_hash": cfg.config_hash, "tlops.git_commit": git_commit()})
        if config_file is not None:
            mlflow.log_artifact(str(config_file))
        yield run

"""Point MLflow at the right store: env ``MLFLOW_TRACKING_URI``, else config, else embedded sqlite.

A tracking *server* that is down or failing must not hang a pipeline for minutes nor dump a
traceback: for ``http(s)://`` URIs the MLflow client's retry settings get bounded defaults
when unset (:data:`HTTP_DEFAULTS`: 3 retries, backoff factor 1 s, i.e. waits of about 0, 2
and 4 s, 30 s per request), and a connection failure, timeout or 5xx that survives the
retries becomes a :class:`TrackingError` naming the endpoint (without credentials) instead.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
from pathlib import Path
from typing import Any, Iterator

from tlops.config import PipelineConfig
from tlops.errors import TlopsError
from tlops.interrupt import Interrupted

log = logging.getLogger(__name__)


def embedded_uri(workdir: Path) -> str:
    return f"sqlite:///{workdir / 'mlflow.db'}"


def tracking_uri(cfg: PipelineConfig) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking.uri or embedded_uri(cfg.workdir_path)


#: MLflow client retry settings used for tracking servers unless the environment sets them
#: (MLflow's own defaults are 7 retries with a 2 s factor and 120 s per request: minutes).
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}


class TrackingError(TlopsError):
    """The MLflow tracking server is unreachable or keeps failing (names the endpoint)."""


def bound_http_retries(uri: str) -> None:
    """Give MLflow's HTTP client bounded retry/timeout defaults (env vars it reads per request)."""
    if uri.startswith(("http://", "https://")):
        for k, v in HTTP_DEFAULTS.items():
            os.environ.setdefault(k, v)


def _tracking_failure(e: BaseException) -> str | None:
    """'unreachable', 'HTTP <code>' or None (not a transport/server failure)."""
    import re

    try:
        import requests
        from mlflow.exceptions import MlflowException
    except ImportError:  # pragma: no cover
        return None
    if isinstance(e, (requests.exceptions.ConnectionError, requests.exceptions.Timeout, ConnectionError, TimeoutError)):
        return "unreachable"
    if not isinstance(e, MlflowException):
        return None
    text = str(e)
    m = re.search(r"too many (\d{3}) error responses", text)
    if m:
        return f"HTTP {m.group(1)}"
    if text.startswith("API request to") and ("failed with" in text):
        return "timing out" if "timeout" in text.lower() else "unreachable"
    with contextlib.suppress(Exception):
        code = int(e.get_http_status_code())
        if code >= 500:
            return f"HTTP {code}"
    return None


def _transport_error(e: BaseException) -> bool:
    """An error from the HTTP stack under MLflow (what MLflow wraps), or one of ours about tracking."""
    import requests
    import urllib3

    return isinstance(e, (TrackingError, requests.exceptions.RequestException, urllib3.exceptions.HTTPError))


@contextlib.contextmanager
def tracking_errors(uri: str, what: str) -> Iterator[None]:
    """Turn a tracking-server failure that survived MLflow's retries into a :class:`TrackingError`
    that names the endpoint and how often it was tried, with credentials redacted."""
    from tlops.redact import redact, safe_url

    try:
        yield
    except TlopsError:
        raise
    except Exception as e:  # noqa: BLE001 - classified below
        state = _tracking_failure(e)
        if state is None:
            raise
        ctx = e.__context__
        if ctx is not None and not _transport_error(ctx) and _tracking_failure(ctx) is None:
            # the run failed for its own reason and closing the MLflow run then failed too: keep the real error
            log.warning("%s", redact(f"MLflow tracking server {safe_url(uri)} {state} while closing the run"))
            raise ctx from None
        if not uri.startswith(("http://", "https://")):
            raise
        retries = os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "?")
        attempts = int(retries) + 1 if retries.isdigit() else "several"
        detail = " ".join(str(e).split())
        if len(detail) > 300:
            detail = detail[:300] + "..."
        how = "returned " + state if state.startswith("HTTP") else state
        raise TrackingError(
            redact(
                f"MLflow tracking server {safe_url(uri)} {how} after {attempts} attempts while {what} "
                f"({type(e).__name__}: {detail}). Check that the server is up and reachable, or unset "
                "MLFLOW_TRACKING_URI / tracking.uri to use the embedded store; retries are tuned with "
                "MLFLOW_HTTP_REQUEST_MAX_RETRIES, MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR and MLFLOW_HTTP_REQUEST_TIMEOUT"
            )
        ) from None


def warn_insecure_tls(uri: str) -> bool:
    """MLflow verifies the tracking server's TLS certificate unless MLFLOW_TRACKING_INSECURE_TLS is
    set explicitly; say so loudly when it is. Returns whether verification is off."""
    flag = os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").strip().lower()
    insecure = flag in ("1", "true", "yes", "on")
    if insecure and uri.startswith(("http://", "https://")):
        from tlops.redact import safe_url

        log.warning(
            "TLS certificate verification is OFF for the MLflow tracking server %s "
            "(MLFLOW_TRACKING_INSECURE_TLS=%s); credentials and models travel unverified",
            safe_url(uri),
            flag,
        )
    return insecure


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
    warn_insecure_tls(uri)
    init_lock: contextlib.AbstractContextManager = contextlib.nullcontext()
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        db.parent.mkdir(parents=True, exist_ok=True)
        from tlops.storage import file_lock

        # two runs starting at once on a fresh store would both run MLflow's schema migrations
        init_lock = file_lock(db.with_name(db.name + ".lock"), what=f"the MLflow store {db.name} (being initialised)")
    use_store(uri)
    bound_http_retries(uri)
    with (
        init_lock,
        tracking_errors(uri, f"looking up experiment {cfg.tracking.experiment!r}"),
    ):  # the first tracking call
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

    uri = configure(cfg)
    active = mlflow.active_run()
    if active is not None:
        yield active
        return
    with tracking_errors(uri, f"tracking run {run_name}"), mlflow.start_run(run_name=run_name) as run:
        mlflow.log_params({k: str(v)[:500] for k, v in flatten(cfg.to_dict()).items()})
        mlflow.set_tags(
            {"tlops.pipeline": cfg.name, "tlops.config_hash": cfg.config_hash, "tlops.git_commit": git_commit()}
        )
        if config_file is not None:
            mlflow.log_artifact(str(config_file))
        try:
            yield run
        except (KeyboardInterrupt, Interrupted):
            mlflow.end_run(status="KILLED")  # not FAILED: stopped by Ctrl-C / SIGTERM, resumable
            raise


def environment_tags(env: dict[str, Any] | None) -> dict[str, str]:
    """MLflow tags for the environment a model was made in (``tlops.runtime_env.record``)."""
    if not env:
        return {}
    t = env.get("torch") or {}
    tags = {"tlops.env.cpu": env.get("cpu"), "tlops.seed": env.get("seed")}
    tags |= {f"tlops.env.{k}": v for k, v in (env.get("env") or {}).items() if v is not None}
    if t:
        cudnn, cuda = t.get("cudnn") or {}, t.get("cuda") or {}
        tags |= {
            "tlops.env.isa": t.get("cpu_capability"),
            "tlops.env.torch": t.get("version"),
            "tlops.env.torch_threads": t.get("intra_op_threads"),
            "tlops.env.interop_threads": t.get("inter_op_threads"),
            "tlops.env.deterministic_algorithms": t.get("deterministic_algorithms"),
            "tlops.env.cudnn_deterministic": cudnn.get("deterministic"),
            "tlops.env.cudnn_benchmark": cudnn.get("benchmark"),
            "tlops.env.gpu": cuda.get("device", "none"),
            "tlops.env.gpu_driver": cuda.get("driver", "none"),
        }
    return {k: str(v) for k, v in tags.items() if v is not None}


def log_environment(manifests: dict[str, dict[str, Any]]) -> None:
    """Record in the active MLflow run what the steps recorded about their environment: every
    step's record as ``environment.json``, and the model-making step's (fine-tune) as tags, so
    runs can be compared by ISA, threads and GPU in the UI. Reads manifests only: no torch."""
    import mlflow

    envs = {step: m.get("environment") for step, m in manifests.items() if m.get("environment")}
    if not envs:
        return
    mlflow.log_dict(envs, "environment.json")
    model_env = envs.get("fine-tune") or next(reversed(envs.values()))
    mlflow.set_tags(environment_tags(model_env))

"""``tlops submit``, ``tlops schedule`` and ``tlops runs list|get``: the pipeline on a Kubeflow
Pipelines server.

``add_commands(app, compile_fn)`` registers them on a Typer app; ``compile_fn(cfg, out_path)``
compiles a validated pipeline config to a KFP v2 IR YAML file and returns its path; with
``--pipeline batch-predict`` or ``monitor-and-adapt``, submit and schedule compile
``tlops.kfp.batch_predict`` or ``tlops.kfp.monitor_adapt`` instead. Errors are
raised as ``TlopsError`` and printed by ``tlops.cli.main`` as ``error: <message>``.

Credentials: ``$KFP_TOKEN``, else ``--token-file``, else the in-cluster token file
``/var/run/secrets/kubeflow/pipelines/token`` if present. There is deliberately no ``--token``
option: a token on the command line ends up in shell history and ``ps``.
"""

from __future__ import annotations

import datetime as _dt
import tempfile
from pathlib import Path
from typing import Callable, List, Optional

import typer

CompileFn = Callable[[object, Path], Optional[Path]]

HOST = typer.Option(
    ..., "--host", help="KFP API URL, e.g. http://localhost:8080 or https://kubeflow.example.com/pipeline"
)
CONFIG = typer.Option(..., "--config", "-c", help="pipeline YAML config")
SET = typer.Option(None, "--set", "-s", help="override a config value, e.g. --set train.epochs=3 (repeatable)")
EXPERIMENT = typer.Option("tlops", "--experiment", help="KFP experiment (created if missing)")
PARAM = typer.Option(None, "--param", help="pipeline parameter as name=value (repeatable)")
TOKEN_FILE = typer.Option(
    None, "--token-file", help="file holding the API bearer token (default: $KFP_TOKEN, else the in-cluster token file)"
)
NAMESPACE = typer.Option(
    "kubeflow", "--namespace", help="multi-user KFP: your profile namespace ('kubeflow' = single-user default)"
)
NO_VERIFY_SSL = typer.Option(False, "--no-verify-ssl", help="do not verify the server's TLS certificate")
PIPELINE = typer.Option(
    "transfer-learning",
    "--pipeline",
    help="transfer-learning (the DAG), batch-predict (tlops predict as one task; --param data_uri=...) or "
    "monitor-and-adapt (tlops monitor, then the DAG on an adaptation config on a shift; --param data_uri=...)",
)
PIPELINES = ("transfer-learning", "batch-predict", "monitor-and-adapt")


def check_pipeline(pipeline: str) -> str:
    from tlops.errors import ConfigError

    if pipeline not in PIPELINES:
        raise ConfigError(f"--pipeline: got {pipeline!r}; allowed: {', '.join(PIPELINES)}")
    return pipeline


def _connect(host: str, token_file: Optional[Path], namespace: str, no_verify_ssl: bool):
    from tlops.kfp import client as kfp_client

    return kfp_client.connect(host, token_file=token_file, namespace=namespace, verify_ssl=not no_verify_ssl)


def compile_other(cfg, out: Path, pipeline: str) -> Optional[Path]:
    """Compile the pipelines other than transfer-learning; None for transfer-learning."""
    if pipeline == "batch-predict":
        from tlops.kfp.batch_predict import compile_batch_predict

        return compile_batch_predict(cfg, out)
    if pipeline == "monitor-and-adapt":
        from tlops.kfp.monitor_adapt import compile_monitor_adapt

        return compile_monitor_adapt(cfg, out)
    return None


def _compile(compile_fn: CompileFn, cfg, tmpdir: str, pipeline: str = "transfer-learning") -> Path:
    out = Path(tmpdir) / "pipeline.yaml"
    other = compile_other(cfg, out, pipeline)
    if other is not None:
        return other
    produced = compile_fn(cfg, out)
    return Path(produced) if produced else out


def add_commands(app: typer.Typer, compile_fn: CompileFn) -> None:
    """Register ``submit``, ``schedule`` and the ``runs`` group on ``app``."""

    @app.command()
    def submit(
        host: str = HOST,
        config: Path = CONFIG,
        set_: Optional[List[str]] = SET,
        experiment: str = EXPERIMENT,
        run_name: Optional[str] = typer.Option(None, "--run-name", help="run name (default: '<config name> <time>')"),
        param: Optional[List[str]] = PARAM,
        token_file: Optional[Path] = TOKEN_FILE,
        namespace: str = NAMESPACE,
        no_verify_ssl: bool = NO_VERIFY_SSL,
        pipeline: str = PIPELINE,
    ) -> None:
        """Compile the pipeline and start one run of it on Kubeflow Pipelines."""
        from tlops.config import load_config
        from tlops.kfp import client as kfp_client

        check_pipeline(pipeline)
        kfp_client.validate_host(host)
        params = kfp_client.parse_params(param)
        cfg = load_config(config, set_ or [])
        name = run_name or f"{cfg.name} {_dt.datetime.now().strftime('%Y-%m-%d %H-%M-%S')}"
        with tempfile.TemporaryDirectory(prefix="tlops-kfp-") as tmp:
            package = _compile(compile_fn, cfg, tmp, pipeline)
            params = kfp_client.prepare_params(package, params)  # fail before any network call
            client = _connect(host, token_file, namespace, no_verify_ssl)
            res = kfp_client.submit(client, package, experiment=experiment, run_name=name, params=params)
        typer.echo(f"submitted run {res['run_id']} in experiment {experiment}: {res['url']}")

    @app.command()
    def schedule(
        host: str = HOST,
        config: Path = CONFIG,
        cron: str = typer.Option(
            ..., "--cron", help="6 fields, seconds first: '0 0 3 * * *' = 03:00 daily (KFP's robfig/cron format)"
        ),
        set_: Optional[List[str]] = SET,
        job_name: Optional[str] = typer.Option(
            None, "--job-name", help="recurring run name (default: the config name)"
        ),
        experiment: str = EXPERIMENT,
        max_concurrency: int = typer.Option(1, "--max-concurrency", min=1, help="runs of this job allowed at once"),
        catchup: bool = typer.Option(
            False, "--catchup/--no-catchup", help="backfill intervals missed while paused (default: no catch-up)"
        ),
        param: Optional[List[str]] = PARAM,
        token_file: Optional[Path] = TOKEN_FILE,
        namespace: str = NAMESPACE,
        no_verify_ssl: bool = NO_VERIFY_SSL,
        pipeline: str = PIPELINE,
    ) -> None:
        """Compile the pipeline and create a recurring run of it on a cron schedule."""
        from tlops.config import load_config
        from tlops.kfp import client as kfp_client

        check_pipeline(pipeline)
        kfp_client.validate_cron(cron)
        kfp_client.validate_host(host)
        params = kfp_client.parse_params(param)
        cfg = load_config(config, set_ or [])
        job = job_name or (cfg.name if pipeline == "transfer-learning" else f"{cfg.name} {pipeline}")
        with tempfile.TemporaryDirectory(prefix="tlops-kfp-") as tmp:
            package = _compile(compile_fn, cfg, tmp, pipeline)
            params = kfp_client.prepare_params(package, params)
            client = _connect(host, token_file, namespace, no_verify_ssl)
            res = kfp_client.schedule(
                client,
                package,
                experiment=experiment,
                job_name=job,
                cron=cron,
                params=params,
                max_concurrency=max_concurrency,
                catchup=catchup,
            )
        typer.echo(
            f"scheduled {job} ({res['recurring_run_id']}): cron '{cron}', "
            f"max concurrency {res['max_concurrency']}, catch-up {'on' if res['catchup'] else 'off'}"
        )

    # the parent app's class: its commands report usage errors the same way
    runs = type(app)(no_args_is_help=True, help="Runs on a Kubeflow Pipelines server.")

    @runs.command("list")
    def runs_list(
        host: str = HOST,
        experiment: Optional[str] = typer.Option(None, "--experiment", help="only runs of this experiment"),
        limit: int = typer.Option(20, "--limit", min=1, help="show at most this many runs, newest first"),
        token_file: Optional[Path] = TOKEN_FILE,
        namespace: str = NAMESPACE,
        no_verify_ssl: bool = NO_VERIFY_SSL,
    ) -> None:
        """List the newest runs: id, name, state, created."""
        from tlops.kfp import client as kfp_client

        client = _connect(host, token_file, namespace, no_verify_ssl)
        rows = kfp_client.list_runs(client, experiment, limit)
        if not rows:
            typer.echo("no runs" + (f" in experiment {experiment}" if experiment else ""))
            return
        table = [("RUN ID", "NAME", "STATE", "CREATED")] + [
            (r["id"] or "", r["name"] or "", r["state"] or "", r["created_at"] or "-") for r in rows
        ]
        widths = [max(len(row[i]) for row in table) for i in range(3)]
        for row in table:
            typer.echo("  ".join(c.ljust(w) for c, w in zip(row[:3], widths, strict=True)) + "  " + row[3])

    @runs.command("get")
    def runs_get(
        run_id: str = typer.Argument(..., help="run id"),
        host: str = HOST,
        token_file: Optional[Path] = TOKEN_FILE,
        namespace: str = NAMESPACE,
        no_verify_ssl: bool = NO_VERIFY_SSL,
    ) -> None:
        """Show one run: id, name, state, times, error, parameters, link."""
        from tlops.kfp import client as kfp_client

        client = _connect(host, token_file, namespace, no_verify_ssl)
        run = kfp_client.get_run(client, run_id)
        for key in ("id", "name", "state", "experiment_id", "created_at", "finished_at", "error", "parameters", "url"):
            value = run.get(key)
            if key == "error" and not value:
                continue
            if key == "parameters":
                value = ", ".join(f"{k}={v}" for k, v in sorted(value.items())) or "-"
            typer.echo(f"{key + ':':14} {value if value not in (None, '') else '-'}")

    app.add_typer(runs, name="runs")

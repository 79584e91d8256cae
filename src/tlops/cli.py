"""The ``tlops`` command line."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

import typer
from typer.core import TyperCommand

from tlops.errors import ConfigError, TlopsError
from tlops.kfp.cli import PIPELINE as KFP_PIPELINE
from tlops.kfp.cli import add_commands as add_kfp_commands


class _UsageCommand(TyperCommand):
    """A command whose every parse error is a usage error with the command's usage line.

    The option parser raises "Option '--x' requires an argument" without a context, so typer
    would print the error alone, without "Usage: ..."; the context is attached here."""

    def parse_args(self, ctx, args):
        try:
            return super().parse_args(ctx, args)
        except Exception as e:  # typer's bundled click UsageError: exit code 2, .ctx and .cmd
            if getattr(e, "exit_code", None) == 2 and hasattr(e, "ctx") and e.ctx is None:
                e.ctx, e.cmd = ctx, self
            raise


class _Typer(typer.Typer):
    """``typer.Typer`` whose commands are ``_UsageCommand`` unless a command names its own class."""

    def command(self, *args, **kwargs):
        kwargs.setdefault("cls", _UsageCommand)
        return super().command(*args, **kwargs)


app = _Typer(add_completion=False, no_args_is_help=True, help="tlops: transfer-learning pipelines (ingest → register).")

CONFIG = typer.Option(..., "--config", "-c", help="pipeline YAML config")
SET = typer.Option(None, "--set", "-s", help="override a config value, e.g. --set train.epochs=3 (repeatable)")
EXIT_GATES_FAILED = 3
OFFLINE = typer.Option(False, "--offline", help="pre-flight: skip the network checks (tracking server, S3)")
CFG_WORKDIR = typer.Option(
    None, "--workdir", help="workdir (runs, feature cache, embedded MLflow store); default: the config's workdir"
)

#: libraries whose versions decide what a run computes (``tlops --version`` prints them)
KEY_LIBRARIES = ("torch", "mlflow", "kfp", "transformers", "timm", "dvc")


def version_text() -> str:
    """The tlops version, the git commit it runs from and the key library versions (no imports:
    ``importlib.metadata`` reads the installed distributions, so this stays fast)."""
    from importlib import metadata
    from platform import python_version

    import tlops

    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "not installed"

    commit = source_commit()
    lines = [
        f"tlops {tlops.__version__}" + (f" (git {commit})" if commit else ""),
        f"python {python_version()}",
        *(f"{lib} {version(lib)}" for lib in KEY_LIBRARIES),
    ]
    return "\n".join(lines)


def source_commit() -> Optional[str]:
    """The commit tlops runs from: ``TLOPS_GIT_COMMIT`` (set when an image is built), else the git
    checkout holding this package (an editable install), with ``-dirty`` for uncommitted changes;
    None for an installed wheel outside a checkout."""
    import subprocess

    env = os.environ.get("TLOPS_GIT_COMMIT")
    if env and env != "unknown":
        return env
    root = Path(__file__).resolve().parents[2]  # <checkout>/src/tlops/cli.py
    if not (root / ".git").exists() or not (root / "pyproject.toml").is_file():
        return None
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("-dirty" if dirty else "")


def _print_version(value: bool) -> None:
    if value:
        typer.echo(version_text())
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False,
        "--version",
        "-V",
        is_eager=True,
        callback=_print_version,
        help="print the tlops version, git commit and key library versions, then exit",
    ),
    quiet: bool = typer.Option(
        False, "--quiet", "-q", help="warnings and errors only (and the final summary); no progress"
    ),
    verbose: bool = typer.Option(
        False, "--verbose", "-v", help="debug lines, third-party ones included (MLflow, KFP driver/launcher)"
    ),
) -> None:
    """tlops: transfer-learning pipelines (ingest → register)."""
    if quiet and verbose:
        raise typer.BadParameter("--quiet and --verbose exclude each other")
    if quiet or verbose:
        from tlops import logs

        logs.setup("quiet" if quiet else "verbose")


def _with_workdir(overrides: Optional[List[str]], workdir: Optional[Path]) -> List[str]:
    """``--workdir X`` is ``--set workdir=X`` (given last, so it wins); the path is quoted as a YAML
    string so a name like ``yes`` or ``123`` stays a path."""
    import json

    return [*(overrides or []), *([f"workdir={json.dumps(str(workdir))}"] if workdir is not None else [])]


def _load(config: Path, overrides: Optional[List[str]], workdir: Optional[Path] = None):
    from tlops.config import load_config

    return load_config(config, _with_workdir(overrides, workdir))


@app.command()
def run(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="pipeline YAML config (not with --reproduce)"),
    set_: Optional[List[str]] = SET,
    run_id: Optional[str] = typer.Option(None, help="run id (default: timestamp-name-random)"),
    no_reuse: bool = typer.Option(False, "--no-reuse", help="rerun every step even if its inputs are unchanged"),
    runner: str = typer.Option("local", help="local (in-process) or kfp-local (the compiled KFP DAG via kfp.local)"),
    task_processes: str = typer.Option(
        "forked",
        help="kfp-local: each task forked from a process that imported the steps' libraries once (forked), or a "
        "new interpreter per task, as kfp.local starts them (fresh: seconds of imports per task)",
    ),
    workdir: Optional[Path] = CFG_WORKDIR,
    offline: bool = OFFLINE,
    fail_on_gates: bool = typer.Option(
        True,
        "--fail-on-gates/--no-fail-on-gates",
        help="exit 3 when the run finished but its gates failed (a scheduler sees it); --no-fail-on-gates: exit 0",
    ),
    reproduce: Optional[str] = typer.Option(
        None,
        "--reproduce",
        metavar="RUN_ID",
        help="rerun a past run (its recorded config, seed and threads; no reuse) up to fine-tune and compare "
        "the model digests: exit 0 when they match (or differ on another ISA), 4 when they differ",
    ),
) -> None:
    """Run the whole pipeline: ingest → pull-model → extract-features → fine-tune → evaluate → register.

    The pre-flight checks of `tlops validate` run first: a config that cannot work fails at once
    (exit 2) and leaves no run directory and no MLflow run."""
    from tlops.preflight import preflight
    from tlops.report import print_run_summary

    if reproduce is not None:
        if config is not None or set_:
            raise typer.BadParameter("uses the run's recorded config: drop --config/--set", param_hint="'--reproduce'")
        from tlops.reproduce import reproduce as reproduce_run

        rep = reproduce_run(reproduce, workdir or Path(".tlops"))
        typer.echo("\n".join(rep.lines()))
        raise typer.Exit(rep.exit_code)
    if config is None:
        raise typer.BadParameter("missing: pass --config FILE (or --reproduce RUN_ID)", param_hint="'--config'")
    cfg = _load(config, set_, workdir)
    if runner not in ("local", "kfp-local"):
        raise ConfigError(f"--runner: got {runner!r}; allowed: local, kfp-local")
    if task_processes not in ("forked", "fresh"):
        raise ConfigError(f"--task-processes: got {task_processes!r}; allowed: forked, fresh")
    preflight(cfg, offline=offline)
    if runner == "local":
        from tlops.runners.local import run_pipeline

        result = run_pipeline(cfg, run_id=run_id, reuse=not no_reuse)
    else:
        from tlops.kfp.pipeline import run_kfp_local

        result = run_kfp_local(cfg, fork=task_processes == "forked")
    print_run_summary(cfg, result)
    if fail_on_gates and not result.artifact("evaluate").meta["gates_passed"]:
        typer.echo(f"gates failed: exit code {EXIT_GATES_FAILED} (--no-fail-on-gates to exit 0)", err=True)
        raise typer.Exit(EXIT_GATES_FAILED)


@app.command("compile")
def compile_(
    config: Path = CONFIG,
    set_: Optional[List[str]] = SET,
    out: Path = typer.Option(Path("pipeline.yaml"), "--out", "-o", help="where to write the KFP IR YAML"),
    pipeline: str = KFP_PIPELINE,
) -> None:
    """Compile the pipeline for Kubeflow Pipelines v2 (IR YAML) from a config."""
    from tlops.kfp.cli import check_pipeline
    from tlops.kfp.pipeline import compile_pipeline, image_for

    cfg = _load(config, set_)
    if check_pipeline(pipeline) != "transfer-learning":
        from tlops.kfp.cli import compile_other

        compile_other(cfg, out, pipeline)
        typer.echo(
            f"wrote {out} (image {image_for(cfg)}, {pipeline}, default model {cfg.register.model_name}@champion)"
        )
        return
    compile_pipeline(cfg, out)
    gpu = cfg.kubernetes.gpu
    typer.echo(f"wrote {out} (image {image_for(cfg)}, fine-tune on {'GPU: ' + gpu.accelerator_type if gpu else 'CPU'})")


export_app = _Typer(no_args_is_help=True, help="Generate runner files from the DAG.")
app.add_typer(export_app, name="export")


@export_app.command("dvc")
def export_dvc(
    config: Path = CONFIG,
    set_: Optional[List[str]] = SET,
    out_dir: Path = typer.Option(Path("."), "--out-dir", help="where to write dvc.yaml and params.yaml"),
    workdir: Optional[Path] = CFG_WORKDIR,
) -> None:
    """Write dvc.yaml (one stage per step) and params.yaml (the resolved config) for `dvc repro`."""
    from tlops.runners.dvc import export

    dvc_yaml, params = export(_load(config, set_, workdir), out_dir)
    typer.echo(f"wrote {dvc_yaml} and {params}")


@app.command()
def step(
    name: str = typer.Argument(
        ..., help="step name: ingest, pull-model, extract-features, fine-tune, evaluate, register"
    ),
    config: Path = CONFIG,
    set_: Optional[List[str]] = SET,
    inputs: Optional[List[str]] = typer.Option(
        None, "--in", help="input artifact as name=path or name=s3://... (repeatable)"
    ),
    out: str = typer.Option(..., "--out", "-o", help="where the step's artifact goes: a directory or an s3:// prefix"),
    no_reuse: bool = typer.Option(False, "--no-reuse", help="do not reuse a finished artifact with the same inputs"),
    workdir: Optional[Path] = CFG_WORKDIR,
) -> None:
    """Run one step (what KFP components, compose services and DVC stages call)."""
    from tlops import dag
    from tlops.runners.step_io import run_step

    try:
        spec = dag.get(name)
    except KeyError as e:
        raise ConfigError(str(e.args[0])) from None
    cfg = _load(config, set_, workdir)
    given = {}
    for item in inputs or []:
        if "=" not in item:
            raise ConfigError(f"--in {item!r} must look like name=path")
        k, v = item.split("=", 1)
        given[k] = v
    missing = sorted(set(spec.inputs) - set(given))
    extra = sorted(set(given) - set(spec.inputs))
    if missing or extra:
        raise ConfigError(
            f"step {name} takes inputs {', '.join(spec.inputs) or 'none'}; "
            + (f"missing: {', '.join(missing)} " if missing else "")
            + (f"unexpected: {', '.join(extra)}" if extra else "")
        )
    res = run_step(spec, cfg, given, out, reuse=not no_reuse)
    typer.echo(f"{name}: {'reused' if res.reused else 'wrote'} {out} ({res.artifact.kind}, {res.seconds:.1f}s)")


@app.command()
def validate(
    config: Path = CONFIG,
    set_: Optional[List[str]] = SET,
    workdir: Optional[Path] = CFG_WORKDIR,
    offline: bool = OFFLINE,
) -> None:
    """Validate a config, run the pre-flight checks and print the config fully resolved (defaults filled in).

    Pre-flight: data files exist and hold the configured columns, source models resolve (local
    dirs, timm names, registry names and aliases), the tracking server and S3 buckets answer.
    Any problem: exit 2, every problem listed, nothing printed on stdout."""
    import yaml

    from tlops.preflight import preflight

    cfg = _load(config, set_, workdir)
    seconds = preflight(cfg, offline=offline)
    typer.echo(yaml.safe_dump(cfg.to_dict(), sort_keys=False), nl=False)
    skipped = " (network checks skipped: --offline)" if offline else ""
    typer.echo(f"pre-flight: ok in {seconds:.2f}s{skipped}", err=True)


@app.command()
def steps() -> None:
    """List the pipeline steps in DAG order with their inputs."""
    from tlops.dag import DAG

    for s in DAG:
        ins = ", ".join(f"{k}<-{v}" for k, v in s.inputs.items()) or "-"
        typer.echo(f"{s.name:17} {s.resources:3}  in: {ins:60} {s.help}")


@app.command()
def strategies() -> None:
    """List the training strategies (train.strategies): modalities, what each needs, what it does."""
    from tlops.training.strategies import REGISTRY

    for s in REGISTRY.values():
        typer.echo(f"{s.name:17} {'/'.join(s.modalities):10}  needs: {', '.join(s.needs()) or '-':17}  {s.summary}")


@export_app.command("compose")
def export_compose(
    out: Path = typer.Option(Path("docker/compose.yaml"), "--out", "-o", help="where to write the compose file"),
    host_network: bool = typer.Option(False, "--host-network", help="network_mode: host for every service"),
) -> None:
    """Write the docker-compose file (mlflow + one service per step + summary); config-independent."""
    from tlops.runners.compose import export

    typer.echo(f"wrote {export(out, host_network=host_network)}")


@app.command()
def summary(
    config: Path = CONFIG,
    set_: Optional[List[str]] = SET,
    run_dir: Path = typer.Option(..., "--run-dir", help="directory holding one finished artifact per step"),
) -> None:
    """Print a finished run's summary (what `tlops run` prints), e.g. after a compose run."""
    from tlops.report import load_result, print_run_summary

    print_run_summary(_load(config, set_), load_result(run_dir))


data_app = _Typer(no_args_is_help=True, help="Version datasets with DVC (for data.dvc references).")
app.add_typer(data_app, name="data")


@data_app.command("version")
def data_version(
    path: Path = typer.Argument(..., help="file or directory inside a git + DVC repo"),
    message: Optional[str] = typer.Option(None, "--message", "-m", help="git commit message"),
    push: bool = typer.Option(True, "--push/--no-push", help="dvc push the data to the remote"),
    remote: Optional[str] = typer.Option(None, "--remote", "-r", help="DVC remote (default: the repo's default)"),
) -> None:
    """dvc add + git commit + dvc push, then print the data.dvc reference for a config."""
    import yaml

    from tlops.data.versioning import version_data

    v = version_data(path, message, push=push, remote=remote)
    ref = {"repo": v.repo, "rev": v.rev, "path": v.path, **({"remote": remote} if remote else {})}
    size = f", {v.nfiles} files" if v.nfiles else ""
    typer.echo(f"{v.path}: md5 {v.md5}{size} at git rev {v.rev}{' (pushed)' if push else ''}")
    typer.echo("config:\n" + yaml.safe_dump({"data": {"dvc": ref}}, sort_keys=False), nl=False)


TRACKING_URI = typer.Option(None, envvar="MLFLOW_TRACKING_URI", help="MLflow tracking URI")
WORKDIR = typer.Option(Path(".tlops"), help="workdir of the embedded MLflow store (if no tracking URI)")


def _use_registry(tracking_uri: Optional[str], workdir: Path) -> None:
    from tlops.tracking.setup import embedded_uri, use_store

    if not tracking_uri and not (workdir / "mlflow.db").is_file():
        raise TlopsError(
            f"no MLflow store at {workdir.resolve() / 'mlflow.db'}: pass --workdir (the pipeline's workdir) "
            "or set MLFLOW_TRACKING_URI"
        )
    use_store(tracking_uri or embedded_uri(workdir.resolve()))


@app.command()
def promote(
    model: str = typer.Argument(..., help="registered model name"),
    version: str = typer.Argument(..., help="version to make champion"),
    reason: Optional[str] = typer.Option(None, help="why (stored with who and when as tag tlops.promoted)"),
    force: bool = typer.Option(
        False, "--force", help="promote even if the version's gates failed (validation_status not 'passed')"
    ),
    tracking_uri: Optional[str] = TRACKING_URI,
    workdir: Path = WORKDIR,
) -> None:
    """Move the 'champion' alias to a version (the old one stays as 'previous-champion').

    Refuses a version whose validation_status tag is not 'passed' unless --force.
    """
    from tlops.tracking.registry import promote as do_promote

    _use_registry(tracking_uri, workdir)
    res = do_promote(model, version, reason=reason, force=force)
    if res["changed"]:
        prev = f" (previous champion: v{res['previous']})" if res["previous"] else ""
        forced = " [forced: gates failed]" if res["forced"] else ""
        typer.echo(f"{model}: champion -> v{res['champion']}{prev}{forced}")
    else:
        typer.echo(f"{model}: v{res['champion']} is already champion")


@app.command()
def rollback(
    model: str = typer.Argument(..., help="registered model name"),
    reason: Optional[str] = typer.Option(None, help="why (stored with who and when as tag tlops.rolled_back)"),
    tracking_uri: Optional[str] = TRACKING_URI,
    workdir: Path = WORKDIR,
) -> None:
    """Swap 'champion' and 'previous-champion' (undo the last promotion)."""
    from tlops.tracking.registry import rollback as do_rollback

    _use_registry(tracking_uri, workdir)
    res = do_rollback(model, reason=reason)
    prev = f" (previous champion: v{res['previous']})" if res["previous"] else ""
    typer.echo(f"{model}: rolled back, champion -> v{res['champion']}{prev}")


@app.command()
def predict(
    model: str = typer.Argument(..., help="NAME@ALIAS (e.g. digits-target@champion) or NAME/VERSION"),
    data: str = typer.Option(..., "--data", help="any source ingest reads: path, s3:// URI, sklearn:digits"),
    out: Path = typer.Option(..., "--out", help="result file: .parquet or .jsonl"),
    data_format: str = typer.Option("auto", "--format", help="data format, as data.format"),
    shard_size: int = typer.Option(1024, min=1, help="rows per resumable shard"),
    tracking_uri: Optional[str] = TRACKING_URI,
    workdir: Path = WORKDIR,
) -> None:
    """Batch prediction with a registered model; resumes after a kill without redoing finished shards."""
    from tlops.serving.predict import predict as do_predict

    _use_registry(tracking_uri, workdir)
    res = do_predict(
        model,
        data,
        out,
        shard_size=shard_size,
        data_options={"format": data_format},
        progress=lambda k, n: typer.echo(f"shard {k}/{n}", err=True),
    )
    typer.echo(
        f"{res['model_name']} v{res['model_version']}: {res['rows']} rows -> {res['out']} "
        f"({res['reused_shards']} of {res['shards']} shards reused)"
    )


@app.command()
def monitor(
    model: str = typer.Argument(..., help="NAME@ALIAS (e.g. digits-target@champion) or NAME/VERSION"),
    data: str = typer.Option(..., "--data", help="new inputs, any source ingest reads (labels, if any, are ignored)"),
    out: Path = typer.Option(Path("monitor"), "--out", help="directory for monitor.json, report.md, monitor.png"),
    data_format: str = typer.Option("auto", "--format", help="data format, as data.format"),
    alpha: float = typer.Option(0.05, min=1e-6, max=0.5, help="false-alarm rate of the three shift tests together"),
    severe_drop: float = typer.Option(0.10, min=0.0, help="estimated accuracy drop that makes a shift 'severe'"),
    permutations: int = typer.Option(500, min=20, help="MMD permutation-test permutations"),
    seed: int = typer.Option(0, help="seed of subsampling, permutations and bootstraps"),
    no_log: bool = typer.Option(False, "--no-log", help="do not log the report to the model version's MLflow run"),
    tracking_uri: Optional[str] = TRACKING_URI,
    workdir: Path = WORKDIR,
) -> None:
    """Shift monitor: new inputs vs the model's training reference, label-free accuracy estimate, verdict."""
    from tlops.errors import DataError
    from tlops.monitoring.monitor import Thresholds
    from tlops.monitoring.monitor import monitor as do_monitor
    from tlops.workdir import Workdir

    _use_registry(tracking_uri, workdir)
    opts = {} if data_format == "auto" else {"format": data_format}
    th = Thresholds(alpha=alpha, severe_drop=severe_drop, permutations=permutations, seed=seed)
    try:
        res = do_monitor(
            model,
            data,
            out,
            cache_dir=Workdir.at(workdir).feature_cache,
            data_options=opts,
            thresholds=th,
            log_to_mlflow=not no_log,
        )
    except DataError as e:  # a usage error: the --data argument
        typer.echo(f"error: --data: {e}", err=True)
        raise typer.Exit(2) from None
    acc = res["accuracy"]
    typer.echo(
        f"{res['model_name']} v{res['model_version']}: {res['verdict']} on {res['n']} inputs; "
        f"MMD p={res['covariate_shift']['mmd']['p_value']:.3g}, "
        f"domain AUC {res['covariate_shift']['c2st']['auc']:.3f} (p={res['covariate_shift']['c2st']['p_value']:.3g}), "
        f"label p={res['label_shift']['test']['p_value']:.3g}; "
        f"estimated accuracy {acc['estimate']:.3f} [{acc['low']:.3f}, {acc['high']:.3f}] "
        f"(held-out {acc['held_out_accuracy']:.3f}) -> {out}"
    )


@app.command()
def adapt(
    model: str = typer.Argument(..., help="NAME@ALIAS (e.g. digits-target@champion) or NAME/VERSION"),
    data: str = typer.Option(..., "--data", help="the new inputs (the target domain), any source ingest reads"),
    out: Path = typer.Option(Path("adapt.yaml"), "--out", help="where to write the adaptation pipeline config"),
    data_format: str = typer.Option("auto", "--format", help="data format of --data, as data.format"),
    strategies: Optional[str] = typer.Option(
        None, help="comma-separated adaptation strategies (default: source-only,coral,dann,adabn)"
    ),
    set_: Optional[List[str]] = SET,
    run_it: bool = typer.Option(False, "--run", help="run the config, then monitor the adapted version"),
    force: bool = typer.Option(False, "--force", help="with --run: adapt even when the monitor's verdict is ok"),
    tracking_uri: Optional[str] = TRACKING_URI,
    workdir: Path = WORKDIR,
) -> None:
    """Adapt a registered model to new inputs: its training data becomes data.adapt_from, the new
    inputs the unlabelled target; the adapted model registers as the challenger (docs/monitoring.md)."""
    import yaml

    from tlops.errors import DataError
    from tlops.monitoring.adapt import plan, run_adapted
    from tlops.workdir import Workdir

    _use_registry(tracking_uri, workdir)
    opts = {} if data_format == "auto" else {"format": data_format}
    cache = Workdir.at(workdir).feature_cache
    chosen = [s.strip() for s in strategies.split(",") if s.strip()] if strategies else None
    try:
        cfg, before = plan(
            model, data, cache_dir=cache, strategies=chosen, data_options=opts, workdir=str(workdir), overrides=set_
        )
    except DataError as e:  # a usage error: the --data argument
        typer.echo(f"error: --data: {e}", err=True)
        raise typer.Exit(2) from None
    acc = before["accuracy"]
    typer.echo(
        f"{before['model_name']} v{before['model_version']}: {before['verdict']} on {before['n']} inputs; "
        f"estimated accuracy {acc['estimate']:.3f} [{acc['low']:.3f}, {acc['high']:.3f}] "
        f"(held-out {acc['held_out_accuracy']:.3f})"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(cfg, sort_keys=False))
    typer.echo(f"adaptation config -> {out} (strategies: {', '.join(cfg['train']['strategies'])})")
    if not run_it:
        typer.echo(f"run it with: tlops run --config {out}")
        return
    if before["verdict"] == "ok" and not force:
        typer.echo("verdict ok: no shift to adapt to; not running (--force to run anyway)")
        return
    res = run_adapted(cfg, before, data, cache_dir=cache, data_options=opts)
    role = "challenger" if "challenger" in res["aliases"] else "not challenger: gates failed"
    typer.echo(
        f"{res['model_name']} v{res['version']} ({role}): estimated accuracy {res['before']:.3f} -> "
        f"{res['after']:.3f} ({res['verdict_before']} -> {res['verdict_after']})"
    )
    if res["champion_test_accuracy"] is not None:
        typer.echo(
            f"test accuracy on the labelled test rows of --data: champion v{res['champion_version']} "
            f"{res['champion_test_accuracy']:.3f}, adapted {res['test_accuracy']:.3f}"
        )


@app.command()
def serve(
    model: str = typer.Argument(..., help="NAME@ALIAS (followed as it moves) or NAME/VERSION (pinned)"),
    host: str = typer.Option("127.0.0.1", help="address to bind (0.0.0.0 to listen on every interface)"),
    port: int = typer.Option(8080, min=0, max=65535, help="port (0: any free port; the URL is printed)"),
    poll_interval: float = typer.Option(5.0, min=0.1, help="seconds between registry polls for the alias"),
    max_batch_size: int = typer.Option(32, min=1, help="most inputs in one forward pass"),
    max_batch_wait_ms: float = typer.Option(5.0, min=0, help="longest a request waits for others to batch with"),
    max_request_bytes: int = typer.Option(16 * 2**20, min=1, help="larger request bodies get 413"),
    max_request_items: int = typer.Option(256, min=1, help="requests with more inputs get 413"),
    access_log: bool = typer.Option(False, help="log every request"),
    monitor_window: int = typer.Option(
        0, min=0, help="shift monitor on the last N served inputs (GET /monitor, /metrics); 0: off"
    ),
    monitor_every: float = typer.Option(60.0, min=0.1, help="seconds between checks of the window"),
    monitor_min_inputs: int = typer.Option(100, min=10, help="the first check waits for this many inputs"),
    tracking_uri: Optional[str] = TRACKING_URI,
    workdir: Path = WORKDIR,
) -> None:
    """Serve a registered model: Open Inference Protocol (V2) and MLflow's /invocations, on KServe's ModelServer."""
    from tlops.monitoring.window import WindowOptions
    from tlops.serving.server import ServeOptions
    from tlops.serving.server import serve as do_serve

    _use_registry(tracking_uri, workdir)
    opts = ServeOptions(
        host=host,
        port=port,
        poll_s=poll_interval,
        max_batch_size=max_batch_size,
        max_wait_ms=max_batch_wait_ms,
        max_request_bytes=max_request_bytes,
        max_request_items=max_request_items,
        access_log=access_log,
        monitor=WindowOptions(
            size=monitor_window, every_s=monitor_every, min_inputs=min(monitor_min_inputs, monitor_window or 10**9)
        ),
    )
    do_serve(model, opts, on_ready=lambda url, v: typer.echo(f"tlops serve: {model} (v{v}) on {url}", err=True))


deploy_app = _Typer(no_args_is_help=True, help="Generate deployment manifests for a registered model.")
app.add_typer(deploy_app, name="deploy")


@deploy_app.command("kserve")
def deploy_kserve(
    model: str = typer.Argument(..., help="NAME@ALIAS (followed by the running server) or NAME/VERSION"),
    out: Path = typer.Option(..., "--out", "-o", help="where to write the InferenceService YAML"),
    image: str = typer.Option("tlops:0.1.0", help="the tlops image (with the serve extra)"),
    name: Optional[str] = typer.Option(None, help="InferenceService name (default: the model name)"),
    namespace: Optional[str] = typer.Option(None, help="namespace (default: none, e.g. set by a kustomize overlay)"),
    deployment_mode: str = typer.Option("Standard", help="KServe deployment mode: Standard or Knative"),
    min_replicas: int = typer.Option(1, min=0),
    max_replicas: int = typer.Option(1, min=1),
    cpu_request: str = typer.Option("1"),
    memory_request: str = typer.Option("2Gi"),
    cpu_limit: str = typer.Option("2"),
    memory_limit: str = typer.Option("4Gi"),
    gpus: int = typer.Option(0, min=0, help="GPUs per replica (nodeSelector/tolerations of kubernetes.gpu)"),
    tracking_uri: Optional[str] = typer.Option(
        None, help="MLflow tracking URI in the cluster (default: MLFLOW_TRACKING_URI of ConfigMap tlops-settings)"
    ),
    mlflow_secret: Optional[str] = typer.Option(
        None, help="Secret with keys username/password: the MLflow identity that reads the registry"
    ),
    poll_interval: float = typer.Option(30.0, min=0.1, help="seconds between registry polls for the alias"),
) -> None:
    """Write a KServe InferenceService whose predictor runs `tlops serve MODEL` (restricted pod security)."""
    from tlops.serving.deploy import gpu_defaults, inference_service, write

    resource, selector, tolerations = gpu_defaults()
    manifest = inference_service(
        model,
        image=image,
        name=name,
        namespace=namespace,
        deployment_mode=deployment_mode,
        min_replicas=min_replicas,
        max_replicas=max_replicas,
        cpu_request=cpu_request,
        memory_request=memory_request,
        cpu_limit=cpu_limit,
        memory_limit=memory_limit,
        gpus=gpus,
        gpu_resource=resource,
        gpu_node_selector=selector,
        gpu_tolerations=tolerations,
        tracking_uri=tracking_uri,
        mlflow_secret=mlflow_secret,
        poll_interval=poll_interval,
    )
    write(manifest, out)
    typer.echo(f"wrote {out}: InferenceService/{manifest['metadata']['name']} serving {model}")


@app.command()
def compare(
    model: str = typer.Argument(..., help="registered model name"),
    version_a: str = typer.Argument(..., help="first version"),
    version_b: str = typer.Argument(..., help="second version"),
    out: Optional[Path] = typer.Option(
        None, "--out", "-o", help="HTML report path (default: compare-<model>-<a>-<b>.html)"
    ),
    tracking_uri: Optional[str] = TRACKING_URI,
    workdir: Path = WORKDIR,
) -> None:
    """Compare two versions side by side (metrics, strategy, source, data, gates, aliases) + an HTML report."""
    from tlops.tracking.compare import compare as do_compare

    _use_registry(tracking_uri, workdir)
    text, path = do_compare(model, version_a, version_b, out or Path(f"compare-{model}-{version_a}-{version_b}.html"))
    typer.echo(text)
    typer.echo(f"wrote {path}")


@app.command()
def demo(
    source_config: Path = typer.Option(Path("configs/digits_source.yaml"), help="source-task pipeline config"),
    target_config: Path = typer.Option(Path("configs/digits_target.yaml"), help="target-task pipeline config"),
    set_: Optional[List[str]] = SET,
    workdir: Optional[Path] = CFG_WORKDIR,
) -> None:
    """The offline demo: train + register a source model on digits 0-4, transfer to 5-9 with 10 labels/class."""
    from tlops.demo import run_demo

    run_demo(source_config, target_config, _with_workdir(set_, workdir))


@app.command()
def gc(
    keep: int = typer.Option(
        ..., "--keep", "-k", help="how many of the newest runs to keep (runs in progress are always kept)"
    ),
    workdir: Path = typer.Option(Path(".tlops"), "--workdir", help="the tlops workdir to prune"),
    cache_dir: Optional[Path] = typer.Option(
        None, "--cache-dir", help="local feature cache root (default: <workdir>/cache/features)"
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="print what would be deleted, delete nothing"),
) -> None:
    """Prune old runs, their step outputs, and the feature cache entries and exported backbones no kept run uses.

    Never deletes what a running pipeline holds."""
    from tlops.gc import collect

    for line in collect(workdir, keep, cache_dir=cache_dir, dry_run=dry_run).lines():
        typer.echo(line)


@app.command()
def tune(
    config: Path = typer.Argument(..., help="pipeline YAML config with a tune: section"),
    set_: Optional[List[str]] = SET,
    trials: Optional[int] = typer.Option(None, "--trials", help="budget: most trials (default: tune.trials)"),
    minutes: Optional[float] = typer.Option(
        None, "--minutes", help="budget: no new trial after this many minutes (default: tune.minutes)"
    ),
    out: Path = typer.Option(Path("best.yaml"), "--out", "-o", help="where to write the config with the best values"),
    run_best: bool = typer.Option(False, "--run", help="then run the whole pipeline with the best config"),
    katib_manifest: Optional[Path] = typer.Option(
        None, "--katib-manifest", help="write the Katib Experiment for a cluster instead of searching here"
    ),
    namespace: Optional[str] = typer.Option(None, help="--katib-manifest: the Experiment's namespace"),
    trial: bool = typer.Option(
        False, "--trial", help="run one trial with the config as given and print objective=value (a Katib trial)"
    ),
    workdir: Optional[Path] = CFG_WORKDIR,
) -> None:
    """Hyper-parameter search over train.* (the tune: section): Optuna here, or a Katib Experiment.

    Each trial trains on the cached features and is scored on validation only; the best config
    goes to --out (docs/scaling.md)."""
    from tlops.tuning.cli import tune_command

    code = tune_command(
        _load(config, set_, workdir),
        trials=trials,
        minutes=minutes,
        out=out,
        run=run_best,
        katib_manifest=katib_manifest,
        trial=trial,
        namespace=namespace,
    )
    if code:
        raise typer.Exit(code)


def _compile_pipeline(cfg, out: Path) -> Path:
    from tlops.kfp.pipeline import compile_pipeline  # imported late: keeps `tlops --help` fast

    return compile_pipeline(cfg, out)


add_kfp_commands(app, _compile_pipeline)


def main() -> None:
    """Exit codes (docs/exit-codes.md): 0 success, 1 run failed, 2 usage, config or pre-flight
    error, 3 gates failed, 4 reproduction mismatch (run --reproduce), 130 interrupted (SIGINT), 143
    terminated (SIGTERM)."""
    from tlops import logs
    from tlops.interrupt import Interrupted, report, signals_raise

    logs.setup()  # TLOPS_LOG_LEVEL / TLOPS_DEBUG=1; tlops --quiet / --verbose set it again
    try:
        # Standalone mode: typer itself prints usage errors (unknown option, missing value, bad
        # type) with the command's usage line and exits 2; they are instances of typer's bundled
        # click, which an `except click.ClickException` here would not catch.
        with signals_raise():
            app(prog_name="tlops", standalone_mode=True)
    except Interrupted as e:
        typer.echo(report(e), err=True)
        sys.exit(e.exit_code)
    except ConfigError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except TlopsError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(1)
    finally:  # the `tlops` command (or python -m tlops) ends here: a fast shut-down, not in a test calling main()
        from tlops.process_exit import freeze_for_exit

        freeze_for_exit(("tlops", "tlops.__main__", "tlops.cli"), scripts=("tlops",))


if __name__ == "__main__":
    main()

"""Kubeflow Pipelines: build the pipeline from the DAG, compile it, run it with ``kfp.local``.

Everything comes from the installed package: the components are generated from ``tlops.dag``
(``tlops.kfp.components``), the Kubernetes settings from the config. ``tlops compile`` works
the same from a checkout and from an installed wheel.
"""

# no `from __future__ import annotations`: KFP reads the pipeline function's annotations as types
import contextlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

from tlops import __version__
from tlops.artifacts import read_artifact
from tlops.config import KubernetesConfig, PipelineConfig
from tlops.dag import DAG, StepSpec
from tlops.errors import ConfigError, TlopsError
from tlops.kfp import RUN_AS
from tlops.kfp.task import image_digest
from tlops.logs import strip_ansi
from tlops.runners.local import PipelineResult, StepResult
from tlops.storage import is_s3

log = logging.getLogger(__name__)


def image_for(cfg: PipelineConfig) -> str:
    return cfg.kubernetes.image or os.environ.get("TLOPS_IMAGE") or f"tlops:{__version__}"


def cache_key(cfg: PipelineConfig, step: str) -> str:
    """The KFP cache key of a step's task: the config, the data version and, when the image is
    pinned by digest, the digest (a new image then misses the cache instead of reusing results)."""
    key = f"tlops-{step}-{cfg.config_hash[:16]}-{cfg.kubernetes.data_version or 'unpinned'}"
    digest = image_digest(image_for(cfg))
    return f"{key}-{digest}" if digest else key


def warn_if_cached_by_tag(cfg: PipelineConfig) -> None:
    """With caching on, an image named by a tag lets KFP serve results of whatever image the tag
    named when they were cached; say so once per compile, with how to pin it."""
    image = image_for(cfg)
    if cfg.kubernetes.caching and image_digest(image) is None:
        repo = image.rsplit(":", 1)[0] if ":" in image.rsplit("/", 1)[-1] else image
        log.warning(
            "image %s is a tag, not a digest: KFP caches steps by config and data version, so after the tag "
            "moves to a new image a cached step can return results of the old one. Pin it: "
            "kubernetes.image: %s@sha256:<digest> (docker buildx imagetools inspect %s, or crane digest %s), "
            "or set kubernetes.caching: false",
            image,
            repo,
            image,
            image,
        )


POD_LABELS = {"app.kubernetes.io/part-of": "tlops", "tlops.dev/role": "pipeline"}


def task_configurer(cfg: PipelineConfig):
    """Apply resources, GPU pool, secrets, retries and caching from ``cfg.kubernetes`` to a task."""
    from kfp import kubernetes

    k: KubernetesConfig = cfg.kubernetes

    def configure(task: Any, spec: StepSpec) -> None:
        # Pod Security "restricted": run as the image's non-root user (uid/gid 1000). The KFP
        # backend adds allowPrivilegeEscalation=false, drop ALL and RuntimeDefault seccomp itself;
        # kfp-kubernetes cannot set readOnlyRootFilesystem (docs/security.md).
        kubernetes.set_security_context(task, run_as_user=RUN_AS, run_as_group=RUN_AS, run_as_non_root=True)
        # the label the NetworkPolicies in k8s/base/network-policies.yaml select pipeline pods by
        for key, value in POD_LABELS.items():
            kubernetes.add_pod_label(task, label_key=key, label_value=value)
        # train.nodes > 1: the fine-tune task only submits and watches the job (tlops.kfp.trainjob),
        # whose pods get the GPU settings; the task itself stays on the CPU pool
        gpu = k.gpu if spec.resources == "gpu" and not cfg.train.multinode else None
        r = gpu or k.resources  # the GPU step has its own requests/limits
        if r.cpu_request:
            task.set_cpu_request(r.cpu_request)
        if r.memory_request:
            task.set_memory_request(r.memory_request)
        if r.cpu_limit:
            task.set_cpu_limit(r.cpu_limit)
        if r.memory_limit:
            task.set_memory_limit(r.memory_limit)
        if gpu is not None:
            task.set_accelerator_type(gpu.accelerator_type)
            task.set_accelerator_limit(gpu.accelerator_limit)
            for key, value in gpu.node_selector.items():
                kubernetes.add_node_selector(task, label_key=key, label_value=value)
            for t in gpu.tolerations:
                kubernetes.add_toleration(task, key=t.key, operator=t.operator, value=t.value, effect=t.effect)
            if gpu.shm_size:
                kubernetes.empty_dir_mount(
                    task, volume_name="dshm", mount_path="/dev/shm", medium="Memory", size_limit=gpu.shm_size
                )
        for secret in k.secrets:
            kubernetes.use_secret_as_env(
                task, secret_name=secret.name, secret_key_to_env={key: env for env, key in secret.env.items()}
            )
        if spec.network and k.retries.count:
            task.set_retry(
                num_retries=k.retries.count,
                backoff_duration=k.retries.backoff,
                backoff_factor=k.retries.factor,
                backoff_max_duration=k.retries.max_backoff,
            )
        # KFP keys its cache on parameters and artifact names, not on data content: ingest may only
        # be cached when the data version is pinned, and register (side effects) never.
        cacheable = k.caching and spec.name != "register" and (spec.name != "ingest" or k.data_version is not None)
        task.set_caching_options(enable_caching=cacheable, cache_key=cache_key(cfg, spec.name) if cacheable else None)

    return configure


def pipeline_name(cfg: PipelineConfig) -> str:
    return "tlops-" + "".join(c if c.isalnum() else "-" for c in cfg.name.lower()).strip("-")


def build(
    cfg: PipelineConfig,
    components: dict[str, Any],
    configure_task: Callable[[Any, StepSpec], None],
    image: str,
    shard_op: Any = None,
):
    """Return the ``@dsl.pipeline`` function for one resolved tlops config: one task per step, each
    told the ``image`` its component runs in. With ``features.shards: N > 1``, a ParallelFor of N
    ``shard_op`` tasks (one feature-cache entry each) runs before extract-features, which merges them."""
    from kfp import dsl

    # One line of JSON (valid YAML): KFP copies defaults into a header comment, line by line.
    config_yaml = json.dumps(cfg.to_dict())

    @dsl.pipeline(
        name=pipeline_name(cfg),
        description=f"tlops transfer learning ({cfg.name}): " + " -> ".join(s.name for s in DAG),
    )
    def transfer_learning(config: str = config_yaml, data_uri: str = "", source_model: str = "", model_name: str = ""):
        tasks: dict[str, Any] = {}
        for spec in DAG:
            upstream = {name: tasks[producer].outputs[name] for name, producer in spec.inputs.items()}
            shard_task = None
            if spec.name == "extract-features" and cfg.features.shards > 1:
                with dsl.ParallelFor(list(range(cfg.features.shards))) as shard:
                    shard_task = shard_op(
                        config=config,
                        data_uri=data_uri,
                        source_model=source_model,
                        model_name=model_name,
                        image=image,
                        shard=shard,
                        **upstream,
                    )
                    shard_task.set_display_name("extract-features-shard")
                    configure_task(shard_task, spec)
                    # the feature cache makes a retried shard cheap; KFP's cache key would be the
                    # same for every shard (it is the step's) and serve shard 0 for all of them
                    shard_task.set_caching_options(enable_caching=False)
            task = components[spec.name](
                config=config,
                data_uri=data_uri,
                source_model=source_model,
                model_name=model_name,
                image=image,
                **upstream,
            )
            task.set_display_name(spec.name)
            configure_task(task, spec)
            if shard_task is not None:
                task.after(shard_task)
            tasks[spec.name] = task

    return transfer_learning


def check_shards(cfg: PipelineConfig) -> None:
    """On a cluster the shard tasks are separate pods: they and the merging extract-features task
    must see one feature cache, which a pod-local directory is not."""
    f = cfg.features
    if f.shards > 1 and not (f.cache and is_s3(f.cache_dir or "")):
        where = f"features.cache_dir: {f.cache_dir or '(default: pod-local)'}" if f.cache else "features.cache: false"
        raise ConfigError(
            f"features.shards: {f.shards} on a cluster runs each shard in its own pod, and the extract-features task "
            f"merges them from the feature cache, so the cache must be shared; {where} is not. Set "
            "features.cache_dir: s3://<bucket>/<prefix> (with features.cache: true), or features.shards: 1 "
            "(kfp.local, tlops run: any cache dir works)"
        )


def build_pipeline(cfg: PipelineConfig, *, local: bool = False):
    """The pipeline for a cluster, or with ``local=True`` for kfp.local (where a local feature
    cache is shared by every task)."""
    from tlops.kfp.components import components, shard_component

    if not local:
        check_shards(cfg)
    image = image_for(cfg)
    shard_op = shard_component(image) if cfg.features.shards > 1 else None
    return build(cfg, components(image), task_configurer(cfg), image, shard_op)


def compile_pipeline(cfg: PipelineConfig, out: Path) -> Path:
    from kfp import compiler

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    pipeline = build_pipeline(cfg)
    warn_if_cached_by_tag(cfg)
    compiler.Compiler().compile(pipeline, str(out))
    return out


TASK_LOG = "task.log"  # a kfp.local task's whole output, next to its executor_output.json
# The last line of a task's log, written by the process that started it: when the task process started
# and exited (wall clock), its exit code. Not a tlops log line: only --verbose echoes it.
PROCESS_PREFIX = "[tlops kfp-local] "


def init_kfp_local(cfg: PipelineConfig) -> Path:
    """Point ``kfp.local`` at ``<workdir>/kfp-local`` with a subprocess per task running the
    installed tlops (every tlops pipeline runs locally this way); returns that root."""
    from kfp import local

    root = cfg.workdir_path / "kfp-local"
    root.mkdir(parents=True, exist_ok=True)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True)
    return root


def run_kfp_local(cfg: PipelineConfig, *, fork: bool = True) -> PipelineResult:
    """Run the KFP DAG with ``kfp.local.SubprocessRunner(use_venv=False)`` (one subprocess per task).

    With ``fork`` each task process is forked from a forkserver that imported the steps' libraries
    once (:mod:`tlops.kfp.local_fork`); otherwise each is a new interpreter, as kfp.local starts it.

    Kubernetes-only settings (GPU, node selector, secrets) are ignored by kfp.local.

    What it prints is what ``tlops run`` prints in-process: each task's tlops log lines (step,
    epoch and progress lines, warnings). The rest of a task's output (the KFP executor's input
    dump, its driver/launcher lines) goes to ``<run>/<step>/task.log`` only, and kfp.local's own
    banners, artifact listings and warnings about ignored Kubernetes settings are DEBUG lines:
    ``tlops --verbose`` shows all of it. A failed task's error names its log.

    A step's seconds are its task process's (start-up, imports and exit included), so the run
    summary shows what each task cost; each task log ends with the process's start and exit times.
    """
    from tlops.kfp import local_fork

    if fork:  # start the task processes' forkserver now: its imports overlap with compiling the pipeline
        local_fork.start()
    root = init_kfp_local(cfg)
    before = set(root.iterdir())
    pipeline = build_pipeline(cfg, local=True)
    log.info("pipeline %s: kfp.local run under %s (each task's full output: <run>/<step>/%s)", cfg.name, root, TASK_LOG)
    tasks: list[tuple[Path, int, float]] = []  # (log file, exit code, seconds) per task subprocess, in order
    t0 = time.perf_counter()
    try:
        with _kfp_local_output(tasks, root, fork=fork):
            pipeline()
    except RuntimeError as e:
        failed = [path for path, rc, _ in tasks if rc != 0]
        where = f"; its log: {failed[-1]}" + _last_line(failed[-1]) if failed else ""
        raise TlopsError(f"kfp-local run failed: {strip_ansi(str(e))}{where}") from None
    wall = time.perf_counter() - t0
    new = sorted(set(root.iterdir()) - before, key=lambda p: p.stat().st_mtime)
    if not new:
        raise TlopsError(f"kfp.local wrote no run under {root}")
    run_dir = new[-1]
    result = PipelineResult(run_dir.name, run_dir)
    seconds = {path.parent.name: secs for path, _, secs in tasks}  # a task's dir is named after its step
    for spec in DAG:
        art = read_artifact(run_dir / spec.name / spec.output_name, spec.output)
        # each step's time is its task process's, start-up and exit included
        result.steps[spec.name] = StepResult(art, seconds.get(spec.name, 0.0), False)
    log.info("pipeline %s: done in %.1fs (kfp.local run %s)", cfg.name, wall, run_dir)
    return result


def _last_line(path: Path) -> str:
    """`` (<the log's last line>)``: for a Python failure, the exception and its message."""
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return f" ({lines[-1].strip()})" if lines else ""


def _task_log(full_command: list[str], root: Path) -> Path:
    """``<run>/<step>/task.log``: the task dir is where the executor input puts its output file."""
    try:
        executor_input = json.loads(full_command[full_command.index("--executor_input") + 1])
        return Path(executor_input["outputs"]["outputFile"]).parent / TASK_LOG
    except (ValueError, IndexError, KeyError, TypeError):
        return root / "logs" / f"task-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"


def _run_task_subprocess(
    full_command: list[str], env_vars: dict[str, str] | None, *, tasks, root: Path, fork: bool = True
) -> int:
    """Replaces ``kfp.local.subprocess_task_handler.run_local_subprocess``: the task's output goes
    to its log file; its tlops log lines (the lines in ``tlops.logs`` format) also go to stderr;
    with ``--verbose`` every line does. The task logs as this process does (``--quiet``...)."""
    import subprocess
    import sys

    from tlops import logs
    from tlops.kfp import local_fork

    path = _task_log(full_command, root)
    path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **(env_vars or {}), **logs.subprocess_env()}
    verbose = logs.verbosity() == "verbose"
    started, t0 = time.time(), time.perf_counter()
    with open(path, "w", encoding="utf-8") as out:

        def on_line(line: str) -> None:
            out.write(line)
            if verbose or logs.LINE_RE.match(line):
                sys.stderr.write(line)

        rc = local_fork.run(full_command, env, on_line) if fork else None  # forked from the preloaded forkserver
        forked = rc is not None
        if rc is None:  # not kfp's launcher as this tlops knows it: the command itself, as kfp.local runs it
            with subprocess.Popen(
                full_command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=env
            ) as proc:
                assert proc.stdout is not None
                for line in iter(proc.stdout.readline, ""):
                    on_line(line)
                rc = proc.wait()
        record = {"started": started, "exited": time.time(), "rc": rc, "forked": forked}
        out.write(PROCESS_PREFIX + json.dumps(record) + "\n")
    tasks.append((path, rc, time.perf_counter() - t0))
    return rc


@contextlib.contextmanager
def _kfp_local_output(tasks: list[tuple[Path, int, float]], root: Path, *, fork: bool = True):
    """While kfp.local runs: task output through ``_run_task_subprocess``; kfp.local's own lines
    (it swaps the root logger's handler for one of its own on stdout, prints separators and
    indents prints) through tlops's handler as lines of logger ``kfp.local``, DEBUG except a failed
    task's ERROR line (one per attempt when KFP retries a task); its warnings
    that Kubernetes settings and the image are ignored locally, only with ``--verbose``."""
    import functools
    import logging
    import warnings

    from kfp.local import logging_utils, subprocess_task_handler

    from tlops import logs

    kfp_log = logging.getLogger("kfp.local")

    @contextlib.contextmanager
    def as_debug():  # kfp.local's root-logger calls: INFO becomes DEBUG, all of them logger ``kfp.local``
        saved = logging.info, logging.warning, logging.error
        logging.info, logging.warning, logging.error = kfp_log.debug, kfp_log.warning, kfp_log.error
        try:
            yield
        finally:
            logging.info, logging.warning, logging.error = saved

    patches = {
        (logging_utils, "local_logger_context"): as_debug,
        (logging_utils, "indented_print"): lambda num_spaces=4: contextlib.nullcontext(),
        (logging_utils, "print_horizontal_line"): lambda: None,
        (subprocess_task_handler, "run_local_subprocess"): functools.partial(
            _run_task_subprocess, tasks=tasks, root=root, fork=fork
        ),
    }
    saved = {key: getattr(*key) for key in patches}
    try:
        for (module, name), value in patches.items():
            setattr(module, name, value)
        with warnings.catch_warnings():
            if logs.verbosity() != "verbose":
                warnings.filterwarnings("ignore", module=r"kfp\.local\.")
            yield
    finally:
        for (module, name), value in saved.items():
            setattr(module, name, value)

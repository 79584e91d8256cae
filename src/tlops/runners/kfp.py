"""Kubeflow Pipelines: build the pipeline from the DAG, compile it, run it with ``kfp.local``.

The component shells live in ``components/<step>/component.py`` and the pipeline in
``pipelines/transfer_learning/pipeline.py`` (the design card's layout); this module loads
them from the repository, applies the Kubernetes settings from the config, and compiles.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from tlops import __version__
from tlops.artifacts import read_artifact
from tlops.config import KubernetesConfig, PipelineConfig
from tlops.dag import DAG, StepSpec
from tlops.errors import TlopsError
from tlops.runners.local import PipelineResult, StepResult

log = logging.getLogger(__name__)


def repo_root() -> Path:
    """The checkout holding components/ and pipelines/ (env TLOPS_REPO, the package's checkout, or cwd)."""
    candidates = [os.environ.get("TLOPS_REPO"), Path(__file__).resolve().parents[3], Path.cwd()]
    for c in candidates:
        if c and (Path(c) / "components").is_dir() and (Path(c) / "pipelines").is_dir():
            return Path(c)
    raise TlopsError("cannot find the tlops checkout (components/ and pipelines/); run from it or set TLOPS_REPO")


def _load(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"tlops_kfp_{path.parent.name}_{path.stem}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def image_for(cfg: PipelineConfig) -> str:
    return cfg.kubernetes.image or os.environ.get("TLOPS_IMAGE") or f"tlops:{__version__}"


def load_components(image: str) -> dict[str, Any]:
    root = repo_root() / "components"
    return {s.name: _load(root / s.name.replace("-", "_") / "component.py").make(image) for s in DAG}


def cache_key(cfg: PipelineConfig, step: str) -> str:
    return f"tlops-{step}-{cfg.config_hash[:16]}-{cfg.kubernetes.data_version or 'unpinned'}"


def task_configurer(cfg: PipelineConfig):
    """Apply resources, GPU pool, secrets, retries and caching from ``cfg.kubernetes`` to a task."""
    from kfp import kubernetes

    k: KubernetesConfig = cfg.kubernetes

    def configure(task: Any, spec: StepSpec) -> None:
        gpu = k.gpu if spec.resources == "gpu" else None
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


def build_pipeline(cfg: PipelineConfig):
    mod = _load(repo_root() / "pipelines" / "transfer_learning" / "pipeline.py")
    return mod.build(cfg, load_components(image_for(cfg)), task_configurer(cfg))


def compile_pipeline(cfg: PipelineConfig, out: Path) -> Path:
    from kfp import compiler

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(build_pipeline(cfg), str(out))
    return out


def run_kfp_local(cfg: PipelineConfig) -> PipelineResult:
    """Run the KFP DAG with ``kfp.local.SubprocessRunner(use_venv=False)`` (one subprocess per task).

    Kubernetes-only settings (GPU, node selector, secrets) are ignored by kfp.local.
    """
    from kfp import local

    root = cfg.workdir_path / "kfp-local"
    root.mkdir(parents=True, exist_ok=True)
    before = set(root.iterdir())
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True)
    pipeline = build_pipeline(cfg)
    t0 = time.perf_counter()
    try:
        pipeline()
    except RuntimeError as e:
        raise TlopsError(f"kfp-local run failed: {e}") from None
    wall = time.perf_counter() - t0
    new = sorted(set(root.iterdir()) - before, key=lambda p: p.stat().st_mtime)
    if not new:
        raise TlopsError(f"kfp.local wrote no run under {root}")
    run_dir = new[-1]
    result = PipelineResult(run_dir.name, run_dir)
    for spec in DAG:
        art = read_artifact(run_dir / spec.name / spec.output_name, spec.output)
        result.steps[spec.name] = StepResult(art, wall / len(DAG), False)
    return result

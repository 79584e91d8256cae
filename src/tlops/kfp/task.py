"""What a KFP component runs inside its container: one step, with KFP artifacts as I/O.

The generated component functions (``tlops.kfp.components``) pass all their arguments to
``run_task``; the work is the same ``execute_step`` that ``tlops run`` and ``tlops step`` use.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from tlops import dag
from tlops.artifacts import Artifact, read_artifact
from tlops.config import PipelineConfig, apply_overrides, validate_config
from tlops.errors import TlopsError

# Pipeline parameters that override config fields when not empty.
PARAM_FIELDS = {"data_uri": "data.source", "source_model": "source.model", "model_name": "register.model_name"}
# A constant each task gets at compile time: the image it runs in (its digest joins the step key).
IMAGE_PARAM = "image"

# The task's timing line in its log (kfp.local: <run>/<step>/task.log): not a tlops log line, so only
# ``--verbose`` echoes it; bench/runner_overhead.py reads it.
TIMING_PREFIX = "[tlops task] "

# name[:tag]@<algorithm>:<hex>, as in the OCI image spec (sha256 / sha512)
_DIGEST = re.compile(r"@(?P<digest>sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128})$")


def image_digest(image: str) -> str | None:
    """The digest an image reference is pinned by (``repo@sha256:...``), or None for a tag."""
    m = _DIGEST.search(image or "")
    if m is None and "@" in (image or ""):
        raise TlopsError(
            f"image {image!r}: a digest must look like @sha256:<64 hex digits> (or @sha512:<128 hex digits>)"
        )
    return m.group("digest") if m else None


def config_from_params(config_yaml: str, params: dict[str, str]) -> PipelineConfig:
    raw = yaml.safe_load(config_yaml) or {}
    overrides = [f"{PARAM_FIELDS[k]}={v}" for k, v in params.items() if v]
    if params.get("data_uri"):
        overrides.append("data.dvc=null")  # a data_uri replaces a DVC reference in the config
    return validate_config(apply_overrides(raw, overrides), "(pipeline parameter 'config')")


def provenance(art: Artifact) -> dict[str, Any]:
    m = art.meta
    keys = (
        "data_hash",
        "model_digest",
        "cache_key",
        "cache",
        "selected",
        "accuracy",
        "gates_passed",
        "model_name",
        "version",
    )
    out = {"tlops_kind": art.kind, "content_hash": art.content_hash}
    out.update({k: m[k] for k in keys if k in m and m[k] is not None})
    return out


def run_task(step: str, args: dict[str, Any]) -> Artifact:
    """Run ``step`` with a component's arguments: the pipeline parameters, the task's image, the KFP
    input artifacts (named as in ``StepSpec.inputs``), its output artifact and any KFP-only extra
    outputs. An image pinned by digest is part of the step key: an artifact made by another image
    is not reused."""
    entered = time.time()
    from tlops import logs
    from tlops.kfp import trainjob
    from tlops.runners.local import execute_step

    logs.setup()  # the task's log in tlops's format, at the verbosity of the tlops that started it
    spec = dag.get(step)
    cfg = config_from_params(args["config"], {k: args[k] for k in PARAM_FIELDS})
    arts = {name: read_artifact(args[name].path, dag.get(producer).output) for name, producer in spec.inputs.items()}
    output = args[spec.output_name]
    image = args.get(IMAGE_PARAM) or ""
    started = time.time()
    seconds = reused = None
    if step == "fine-tune" and cfg.train.multinode and trainjob.in_cluster():
        # multi-node: a TrainJob / PyTorchJob runs the step on train.nodes pods (tlops.kfp.trainjob)
        trainjob.run_fine_tune(cfg, image, {name: args[name] for name in spec.inputs}, output)
        artifact = read_artifact(Path(output.path), spec.output)
    else:
        res = execute_step(spec, cfg, arts, Path(output.path), image_digest=image_digest(image))
        artifact, seconds, reused = res.artifact, res.seconds, res.reused
    output.metadata.update(provenance(artifact))
    if image:
        output.metadata["image"] = image
    if step == "evaluate":
        log_evaluation(artifact, args["metrics"], args["classification"])
    timing = {"step": step, "entered": entered, "step_started": started, "step_seconds": seconds, "reused": reused}
    print(TIMING_PREFIX + json.dumps(timing | {"left": time.time()}), file=sys.stderr, flush=True)
    freeze_for_exit()
    return artifact


def freeze_for_exit() -> None:
    """In KFP's executor process, which exits once it has written the task's outputs, skip the
    shut-down's walk over every object (:mod:`tlops.process_exit`)."""
    from tlops.process_exit import freeze_for_exit as freeze

    freeze(("kfp.dsl.executor_main",))


def run_shard_task(args: dict[str, Any]) -> None:
    """The ParallelFor task of ``features.shards``: one shard of extract-features into the shared
    feature cache (``tlops.steps.extract_features.run_shard``)."""
    from tlops import logs
    from tlops.steps import extract_features

    logs.setup()
    spec = dag.get("extract-features")
    cfg = config_from_params(args["config"], {k: args[k] for k in PARAM_FIELDS})
    arts = {name: read_artifact(args[name].path, dag.get(producer).output) for name, producer in spec.inputs.items()}
    extract_features.run_shard(cfg, arts, int(args["shard"]))
    freeze_for_exit()


def log_evaluation(evaluation: Artifact, metrics: Any, classification: Any) -> None:
    """Fill KFP Metrics / ClassificationMetrics outputs from an evaluation artifact."""
    import json

    report = json.loads((evaluation.path / "report.json").read_text())
    sel = report["metrics"]
    metrics.log_metric("accuracy", sel["accuracy"])
    metrics.log_metric("macro_f1", sel["macro_f1"])
    metrics.log_metric("ece", sel["ece"])
    if sel.get("gain_over_scratch") is not None:
        metrics.log_metric("gain_over_scratch", sel["gain_over_scratch"])
    metrics.log_metric("gates_passed", float(report["gates"]["passed"]))
    classification.log_confusion_matrix(report["classes"], sel["confusion_matrix"])

"""register: log the selected model as an MLflow pyfunc, register a version, set aliases.

Idempotent: a model whose digest is already registered under the same name is not
registered again; the existing version is reused (and re-aliased).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from tlops import __version__
from tlops.artifacts import Artifact, write_artifact
from tlops.config import PipelineConfig
from tlops.data.dataset import Dataset
from tlops.evaluation.report import metrics_table
from tlops.hashing import hash_json
from tlops.tracking import registry
from tlops.tracking.setup import configure, git_commit, pipeline_run
from tlops.tracking.steplog import data_tags, log_step

log = logging.getLogger(__name__)


def fingerprint(cfg: PipelineConfig, inputs: dict[str, Artifact]) -> str:
    return hash_json([cfg.section_hash("register"), *(inputs[k].content_hash for k in ("dataset", "model", "trained", "evaluation"))])


def _requirements() -> list[str]:
    from importlib import metadata

    pins = [f"tlops=={__version__}"]
    for pkg in ("torch", "timm", "transformers", "safetensors", "numpy", "pandas", "pillow"):
        try:
            pins.append(f"{pkg}=={metadata.version(pkg)}")
        except metadata.PackageNotFoundError:
            pass
    return pins


def _dvc_line(version: dict[str, Any]) -> list[str]:
    if not version.get("git_rev"):
        return []
    return [f"DVC: `{version['dvc_path']}` md5 `{version['dvc_md5']}` at git rev `{version['git_rev']}` of {version['dvc_repo']}"]


def _source_used(source: Artifact, trained: Artifact) -> tuple[str, str]:
    """The source model the trained models came from (the selected one, with candidates)."""
    return trained.meta.get("source", source.meta["source"]), trained.meta.get("source_digest", source.meta["model_digest"])


def _description(cfg: PipelineConfig, report: dict[str, Any], ds: Dataset, source: Artifact, strategy: str,
                 trained: Artifact) -> str:
    gates = report["gates"]
    src, digest = _source_used(source, trained)
    return "\n".join([
        f"**{cfg.name}**: strategy `{strategy}` on source `{src}` (digest `{digest[:12]}`).",
        "",
        metrics_table(report),
        "",
        f"Gain over from-scratch: {report['metrics']['gain_over_scratch']:+.4f}" if report["metrics"]["gain_over_scratch"] is not None
        else f"Gain over from-scratch: not measured ({report['scratch_baseline']})",
        f"Validation: **{'passed' if gates['passed'] else 'failed'}**: {'; '.join(gates['reasons'])}",
        f"Data: `{ds.data_hash[:16]}` ({ds.artifact.meta['source']}, splits {ds.artifact.meta['counts']})",
        *_dvc_line(ds.artifact.meta.get("data_version") or {}),
        "Artifacts: `evaluation/report.md`, `evaluation/confusion_matrix.png` in this version's run.",
    ])


def run(cfg: PipelineConfig, inputs: dict[str, Artifact], out: Path) -> Artifact:
    import mlflow
    import pandas as pd
    from mlflow.models import infer_signature

    from tlops.models.bundle import load_classifier
    from tlops.tracking import pyfunc_model
    from tlops.tracking.pyfunc import predict_frame

    source, trained, evaluation = (inputs[k] for k in ("model", "trained", "evaluation"))
    ds = Dataset(inputs["dataset"])
    report = json.loads((evaluation.path / "report.json").read_text())
    strategy = trained.meta["selected"]
    bundle = trained.path / "models" / strategy
    digest = trained.meta["models"][strategy]["digest"]
    name = cfg.register.model_name
    configure(cfg)
    tags = {
        "tlops.model_digest": digest,
        **data_tags(ds.artifact.meta),
        "tlops.source_model": _source_used(source, trained)[0],
        "tlops.source_digest": _source_used(source, trained)[1],
        "tlops.config_hash": cfg.config_hash,
        "tlops.git_commit": git_commit(),
        "tlops.strategy": strategy,
        "validation_status": "passed" if report["gates"]["passed"] else "failed: " + "; ".join(report["gates"]["reasons"]),
    }
    existing = registry.find_version_by_tag(name, "tlops.model_digest", digest)
    standalone = mlflow.active_run() is None and not os.environ.get("MLFLOW_RUN_ID")
    with pipeline_run(cfg, run_name=f"{cfg.name}-register") as run:
        if standalone:  # run as its own process (KFP, compose, DVC): record the lineage here
            for step, art in (("ingest", ds.artifact), ("pull-model", source), ("fine-tune", trained), ("evaluate", evaluation)):
                log_step(step, art)
        if existing is not None:
            version, reused = str(existing.version), True
            log.info("register: %s version %s already holds this model (digest %s): not registering again", name, version, digest[:12])
        else:
            clf = load_classifier(bundle)
            test = ds.load("test")
            raw = test.x[:2] if ds.kind == "image" else list(test.x[:2])
            example = raw if ds.kind == "image" else pd.DataFrame({"text": raw})
            signature = infer_signature(example, predict_frame(clf, raw))
            mlflow.log_artifacts(str(evaluation.path), artifact_path="evaluation")
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(Path(pyfunc_model.__file__)),  # models-from-code: nothing pickled
                artifacts={"bundle": str(bundle)},
                signature=signature,
                input_example=example,
                pip_requirements=_requirements(),
                registered_model_name=name,
            )
            version, reused = str(info.registered_model_version), False
        c = registry.client()
        for k, v in tags.items():
            c.set_model_version_tag(name, version, k, v)
        c.update_model_version(name, version, description=_description(cfg, report, ds, source, strategy, trained))
        c.set_registered_model_alias(name, registry.CHALLENGER, version)
        promoted = False
        if cfg.register.auto_promote and report["gates"]["passed"]:
            registry.promote(name, version, reason="auto_promote: gates passed")
            promoted = True
        elif cfg.register.auto_promote:
            log.warning("register: not promoting %s v%s: gates failed: %s", name, version, "; ".join(report["gates"]["reasons"]))
        run_id = run.info.run_id
    aliases = [registry.CHALLENGER] + ([registry.CHAMPION] if promoted else [])
    log.info("register: %s version %s -> aliases %s", name, version, ", ".join(aliases))
    with write_artifact(out, "registration", config=cfg.register.model_dump(mode="json"), inputs=inputs) as w:
        rec = {"model_name": name, "version": version, "aliases": aliases, "reused": reused, "run_id": run_id,
               "model_uri": f"models:/{name}/{version}", "tags": tags}
        (w.path / "registration.json").write_text(json.dumps(rec, indent=2))
        w.metadata = rec
    return Artifact(Path(out), w.manifest)

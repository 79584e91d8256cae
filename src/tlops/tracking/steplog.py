"""What each step contributes to the pipeline's MLflow run (tags, metrics, artifacts)."""

from __future__ import annotations

from tlops.artifacts import Artifact

LINEAGE_TAGS = {
    "dvc_repo": "tlops.data.repo",
    "git_rev": "tlops.data.git_rev",
    "dvc_path": "tlops.data.path",
    "dvc_md5": "tlops.data.dvc_md5",
}


def data_tags(dataset_meta: dict) -> dict[str, str]:
    """The data lineage of a dataset artifact as MLflow tags (run and model version)."""
    version = dataset_meta.get("data_version") or {}
    tags = {"tlops.data_hash": dataset_meta["data_hash"], "tlops.data_source": dataset_meta.get("source", "")}
    tags |= {tag: str(version[k]) for k, tag in LINEAGE_TAGS.items() if version.get(k)}
    return tags


def log_step(step: str, artifact: Artifact, seconds: float | None = None, reused: bool | None = None) -> None:
    import mlflow

    meta = artifact.meta
    if seconds is not None:
        mlflow.log_metric(f"step_seconds.{step}", seconds)
    if reused is not None:
        mlflow.set_tag(f"tlops.reused.{step}", str(reused).lower())
    if step == "ingest":
        mlflow.set_tags(data_tags(meta) | {"tlops.dataset_hash": artifact.content_hash})
        for split, n in meta["counts"].items():
            mlflow.log_metric(f"data.{split}_count", n)
    elif step == "pull-model":
        mlflow.set_tags({"tlops.source_model": meta["source"], "tlops.source_digest": meta["model_digest"]})
    elif step == "extract-features":
        mlflow.set_tags({"tlops.feature_cache_key": meta["cache_key"], "tlops.feature_cache": meta["cache"]})
        for c in meta.get("source_ranking") or []:  # every score (artifacts from before selection_score: LogME)
            for name, value in c.get("scores", {"logme": c["score"]}).items():
                mlflow.log_metric(f"{name}.candidate{c['index']}", value)
        if meta.get("source_ranking"):
            mlflow.set_tag("tlops.selected_source", meta["source"])
    elif step == "fine-tune":
        mlflow.set_tag("tlops.selected_strategy", meta["selected"])
        for name, m in meta["models"].items():
            if m.get("val_acc") is not None:
                mlflow.log_metric(f"{name}.val_accuracy", m["val_acc"])
            mlflow.log_metric(f"{name}.train_seconds", m["seconds"])
    elif step == "evaluate":
        for name, m in meta["summary"].items():
            mlflow.log_metric(f"{name}.test_accuracy", m["accuracy"])
        mlflow.log_metrics(
            {"test_accuracy": meta["accuracy"], "test_macro_f1": meta["macro_f1"], "test_ece": meta["ece"]}
        )
        if meta["gain_over_scratch"] is not None:
            mlflow.log_metric("gain_over_scratch", meta["gain_over_scratch"])
        mlflow.set_tag("tlops.gates", "passed" if meta["gates_passed"] else "failed")
    elif step == "register":
        mlflow.set_tags({"tlops.registered_model": meta["model_name"], "tlops.registered_version": meta["version"]})

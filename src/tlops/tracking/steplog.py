"""What each step contributes to the pipeline's MLflow run (tags, metrics, artifacts)."""

from __future__ import annotations

from tlops.artifacts import Artifact


def log_step(step: str, artifact: Artifact, seconds: float | None = None, reused: bool | None = None) -> None:
    import mlflow

    meta = artifact.meta
    if seconds is not None:
        mlflow.log_metric(f"step_seconds.{step}", seconds)
    if reused is not None:
        mlflow.set_tag(f"tlops.reused.{step}", str(reused).lower())
    if step == "ingest":
        mlflow.set_tags({"tlops.data_hash": meta["data_hash"], "tlops.dataset_hash": artifact.content_hash})
        for split, n in meta["counts"].items():
            mlflow.log_metric(f"data.{split}_count", n)
    elif step == "pull-model":
        mlflow.set_tags({"tlops.source_model": meta["source"], "tlops.source_digest": meta["model_digest"]})
    elif step == "extract-features":
        mlflow.set_tags({"tlops.feature_cache_key": meta["cache_key"], "tlops.feature_cache": meta["cache"]})
    elif step == "fine-tune":
        mlflow.set_tag("tlops.selected_strategy", meta["selected"])
        for name, m in meta["models"].items():
            if m.get("val_acc") is not None:
                mlflow.log_metric(f"{name}.val_accuracy", m["val_acc"])
            mlflow.log_metric(f"{name}.train_seconds", m["seconds"])
    elif step == "evaluate":
        for name, m in meta["summary"].items():
            mlflow.log_metric(f"{name}.test_accuracy", m["accuracy"])
        mlflow.log_metrics({"test_accuracy": meta["accuracy"], "test_macro_f1": meta["macro_f1"], "test_ece": meta["ece"]})
        if meta["gain_over_scratch"] is not None:
            mlflow.log_metric("gain_over_scratch", meta["gain_over_scratch"])
        mlflow.set_tag("tlops.gates", "passed" if meta["gates_passed"] else "failed")
    elif step == "register":
        mlflow.set_tags({"tlops.registered_model": meta["model_name"], "tlops.registered_version": meta["version"]})

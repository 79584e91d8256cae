"""evaluate: test-split metrics for every trained model, baselines, champion, and the gates.

Writes ``report.json``, ``report.md`` and ``confusion_matrix.png`` (selected model), plus
``confusion_<model>.png`` for the others. The gate decision lives in ``report.json``.
``metrics.json`` holds the headline numbers only (flat, numeric: what ``dvc metrics`` and
``dvc exp show`` read).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from tlops.artifacts import Artifact, write_artifact
from tlops.config import PipelineConfig
from tlops.data.dataset import Dataset
from tlops.evaluation.gates import decide
from tlops.evaluation.metrics import classification_metrics, plot_confusion
from tlops.evaluation.report import label_budget, render_markdown
from tlops.evaluation.uncertainty import describe, metric_intervals, paired_difference_interval

log = logging.getLogger(__name__)


def stamp(cfg: PipelineConfig, inputs: dict[str, Artifact]) -> list | None:
    """The report compares with the current champion, so a new champion means a new report; a
    champion that is the very model under evaluation (e.g. this pipeline's last run) counts as
    none: there is nothing new to compare with. The champion is remembered while the store is
    unchanged (:mod:`tlops.tracking.memo`): an unchanged rerun imports no MLflow."""
    from tlops.tracking import memo

    mv = memo.lookup(cfg, ("alias", cfg.register.model_name, "champion"))
    if mv is None or _is_this_model(mv["digest"], inputs["trained"]):
        return None
    return [mv["version"], mv["run_id"]]


def run(cfg: PipelineConfig, inputs: dict[str, Artifact], out: Path) -> Artifact:
    from tlops.models.bundle import load_classifier  # torch: imported when the step runs, not for its fingerprint

    ds = Dataset(inputs["dataset"])
    trained = inputs["trained"]
    test = ds.load("test")
    selected = trained.meta["selected"]
    bins = cfg.evaluate.ece_bins
    boot = cfg.evaluate.bootstrap
    resample = boot.model_dump()  # resamples, confidence, seed
    models: dict[str, Any] = {}
    correct: dict[str, np.ndarray] = {}
    with write_artifact(out, "evaluation", config=cfg.evaluate.model_dump(mode="json"), inputs=inputs) as w:
        for name in trained.meta["models"]:
            clf = load_classifier(trained.path / "models" / name)
            probs = clf.predict_proba(test.x)
            m = classification_metrics(probs, test.y, ds.classes, bins)
            ci = metric_intervals(test.y, probs.argmax(1), len(ds.classes), **resample)
            m |= {"accuracy_ci": ci["accuracy"], "macro_f1_ci": ci["macro_f1"]}
            correct[name] = probs.argmax(1) == test.y
            m["train_seconds"] = trained.meta["models"][name]["seconds"]
            models[name] = m
            png = "confusion_matrix.png" if name == selected else f"confusion_{name}.png"
            plot_confusion(m["confusion_matrix"], ds.classes, w.path / png, f"{cfg.name}: {name}")
            log.info(
                "evaluate: %-12s test accuracy %.4f [%.4f, %.4f]  macro-F1 %.4f [%.4f, %.4f]  ECE %.4f",
                name,
                m["accuracy"],
                *m["accuracy_ci"],
                m["macro_f1"],
                *m["macro_f1_ci"],
                m["ece"],
            )
        train_y = ds.load("train").y
        majority = int(np.bincount(train_y, minlength=len(ds.classes)).argmax())
        baselines = {"majority": {"class": ds.classes[majority], "accuracy": float((test.y == majority).mean())}}
        if "scratch" in models:
            baselines["scratch"] = {"accuracy": models["scratch"]["accuracy"]}
            for name, m in models.items():  # paired: the same resampled test samples for both models
                if name != "scratch":
                    m["gain_over_scratch"] = m["accuracy"] - models["scratch"]["accuracy"]
                    m["gain_over_scratch_ci"] = paired_difference_interval(
                        correct[name], correct["scratch"], **resample
                    )
        champion, champion_correct = _champion_metrics(cfg, ds, test, trained)
        sel = models[selected]
        if champion_correct is not None:
            champion["gain"] = sel["accuracy"] - champion["accuracy"]
            champion["gain_ci"] = paired_difference_interval(correct[selected], champion_correct, **resample)
        gain = sel["accuracy"] - baselines["scratch"]["accuracy"] if "scratch" in baselines else None
        gain_ci = sel.get("gain_over_scratch_ci")
        gates = decide(cfg.evaluate.gates, sel["accuracy"], gain, champion, gain_ci=gain_ci, confidence=boot.confidence)
        report = {
            "pipeline": cfg.name,
            "selected": selected,
            "classes": ds.classes,
            "test_size": int(len(test)),
            "metrics": sel
            | {
                "gain_over_scratch": gain,
                "gain_over_scratch_ci": gain_ci,
                "gain_over_majority": sel["accuracy"] - baselines["majority"]["accuracy"],
            },
            "intervals": describe(**resample),
            "label_budget": label_budget(ds.artifact.meta, trained.meta),
            "models": models,
            "baselines": baselines,
            "scratch_baseline": "on"
            if "scratch" in models
            else "off (evaluate.scratch_baseline=false): transfer gain over random init not measured",
            "champion": champion,
            "gates": gates,
            "data_hash": ds.data_hash,
        }
        (w.path / "report.json").write_text(json.dumps(report, indent=2))
        (w.path / "report.md").write_text(render_markdown(report))
        (w.path / METRICS_FILE).write_text(json.dumps(headline_metrics(report), indent=2))
        w.metadata = {
            "selected": selected,
            "accuracy": sel["accuracy"],
            "macro_f1": sel["macro_f1"],
            "ece": sel["ece"],
            "gain_over_scratch": gain,
            "gates_passed": gates["passed"],
            "gain_over_scratch_ci": gain_ci,
            "confidence": boot.confidence,
            "summary": {
                n: {"accuracy": m["accuracy"], "train_seconds": m["train_seconds"]}
                | {k: m[k] for k in ("accuracy_ci", "gain_over_scratch_ci") if k in m}
                for n, m in models.items()
            },
        }
    log.info(
        "evaluate: gates %s%s",
        "PASSED" if gates["passed"] else "FAILED",
        "" if gates["passed"] else ": " + "; ".join(gates["reasons"]),
    )
    return Artifact(Path(out), w.manifest)


METRICS_FILE = "metrics.json"


def headline_metrics(report: dict[str, Any]) -> dict[str, Any]:
    """The selected model's test metrics, each model's test accuracy and the gate decision, as the
    flat numbers DVC compares across experiments (no lists, no strings)."""
    m = report["metrics"]
    out: dict[str, Any] = {k: m[k] for k in ("accuracy", "macro_f1", "ece", "gain_over_majority")}
    if m.get("gain_over_scratch") is not None:
        out["gain_over_scratch"] = m["gain_over_scratch"]
    out["gates_passed"] = bool(report["gates"]["passed"])
    out["models"] = {name: {"accuracy": mm["accuracy"]} for name, mm in report["models"].items()}
    return out


def _is_this_model(version_digest: str | None, trained: Artifact) -> bool:
    """Whether a registry version whose model digest tag is ``version_digest`` holds the selected
    model of ``trained`` (same weights digest)."""
    digest = trained.meta.get("models", {}).get(trained.meta.get("selected"), {}).get("digest")
    return bool(digest) and version_digest == digest


def _champion_metrics(
    cfg: PipelineConfig, ds: Dataset, test, trained: Artifact
) -> tuple[dict[str, Any] | None, np.ndarray | None]:
    """The current champion of the target model, scored on this run's test split (``same_model``
    when the champion is the model under evaluation: the gates do not ask a model to beat itself),
    and which test samples it got right. The champion is re-scored here rather than read from its
    own evaluation, so the paired interval of the gain over it uses the very same test samples
    (its stored accuracy may come from another split); ``None`` for the latter when it is not
    comparable."""
    from tlops.models.bundle import load_classifier, read_spec
    from tlops.tracking.integrity import champion_bundle
    from tlops.tracking.setup import configure

    configure(cfg)
    with champion_bundle(cfg.register.model_name) as found:
        if found is None:
            return None, None
        mv, bundle = found
        spec = read_spec(bundle)
        if spec.get("classes") != ds.classes:
            reason = f"classes differ: {spec.get('classes')}"
            return {"version": str(mv.version), "comparable": False, "reason": reason}, None
        probs = load_classifier(bundle).predict_proba(test.x)
        m = classification_metrics(probs, test.y, ds.classes, cfg.evaluate.ece_bins)
        boot = cfg.evaluate.bootstrap.model_dump()
        ci = metric_intervals(test.y, probs.argmax(1), len(ds.classes), **boot)
        out = {
            "version": str(mv.version),
            "comparable": True,
            "accuracy": m["accuracy"],
            "macro_f1": m["macro_f1"],
            "ece": m["ece"],
            "accuracy_ci": ci["accuracy"],
            "macro_f1_ci": ci["macro_f1"],
        }
        from tlops.tracking.registry import DIGEST_TAG

        if _is_this_model((getattr(mv, "tags", None) or {}).get(DIGEST_TAG), trained):
            out["same_model"] = True
        return out, probs.argmax(1) == test.y

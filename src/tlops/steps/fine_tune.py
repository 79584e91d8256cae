"""fine-tune: train each configured strategy (and the from-scratch baseline), select on val.

Output layout::

    models/<strategy>/   a trained model bundle (+ history.json, curves.png, checkpoints/)
    models/scratch/      same architecture from random init, same budget (baseline)
    selection.json       validation scores and the selected strategy
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tlops.artifacts import Artifact, write_artifact
from tlops.config import PipelineConfig
from tlops.data.dataset import Dataset
from tlops.errors import ConfigError

if TYPE_CHECKING:  # torch-heavy: imported by the functions that train (a reused step imports no torch)
    from tlops.models.bundle import Classifier
    from tlops.training import strategies
    from tlops.training.runtime import Runtime

log = logging.getLogger(__name__)


def run(cfg: PipelineConfig, inputs: dict[str, Artifact], out: Path, *, checkpoint_dir: Path | None = None) -> Artifact:
    """Train the strategies into ``out``. ``checkpoint_dir``: where resumable checkpoints go (the
    runner's stable dir under the workdir; None: inside ``out``, gone with a killed step).
    ``train.distributed: ddp``: relaunched under torchrun (rank 0 writes ``out``); else in-process."""
    from tlops.runners import torchrun

    return torchrun.run_step(cfg, inputs, out, _run, checkpoint_dir=checkpoint_dir)


def _run(
    cfg: PipelineConfig, inputs: dict[str, Artifact], out: Path, runtime: Runtime, *, keep_models: bool = True
) -> Artifact:
    """The step's body. ``keep_models=False`` (a ``tlops tune`` trial, discarded once its scores are
    read): no model bundles and no curve plots, which would otherwise be most of a head-only trial."""
    from tlops.models.bundle import Classifier, load_backbone
    from tlops.training import strategies
    from tlops.training.common import seed_everything
    from tlops.training.finetune import evaluate_split, fine_tune

    feat_meta = inputs["features"].meta
    chosen = [strategies.get(s) for s in cfg.train.strategies]
    job = load_job(cfg, inputs, runtime)
    _check_fit(cfg, job.source, feat_meta.get("source", inputs["model"].meta["source"]))  # before any training
    ds, train, val = job.dataset, job.train, job.val
    src = job.source
    domain_val = ds.load("source_val") if "source_val" in ds.splits() else None
    tcfg = cfg.train
    results: dict[str, Any] = {}
    with write_artifact(out, "trained-models", config=cfg.train.model_dump(mode="json"), inputs=inputs) as w:
        if any(s.uses_probe for s in chosen):
            job.probe = probe(job)
        for strategy in chosen:
            d = w.path / "models" / strategy.name
            t0 = time.perf_counter()
            res = strategy.train(job, d)
            secs = time.perf_counter() - t0 + (job.probe.seconds if strategy.uses_probe else 0.0)
            clf = res.classifier
            results[strategy.name] = (
                _save(d, clf, res.history, strategy.name, secs, ds.classes, keep_models) | res.extra
            )
            if results[strategy.name]["val_acc"] is None and val is not None and len(val):
                # reported, not used for selection under DA
                results[strategy.name]["val_acc"] = evaluate_split(clf, val, tcfg.batch_size * 2)["val_acc"]
            if domain_val is not None:
                acc = evaluate_split(clf, domain_val, tcfg.batch_size * 2)["val_acc"]
                results[strategy.name]["source_val_acc"] = acc
        if cfg.evaluate.scratch_baseline:
            d = w.path / "models" / "scratch"
            t0 = time.perf_counter()
            seed_everything(cfg.seed)
            clf = Classifier(load_backbone(src, random_init=True), len(ds.classes), ds.classes)
            plain = tcfg.model_copy(update={"l2sp": 0.0, "layer_decay": None, "gradual_unfreeze": False})
            hist = fine_tune(clf, train, val, plain, cfg.seed, d, frozen_k=0, name="scratch", runtime=runtime)
            results["scratch"] = _save(d, clf, hist, "scratch", time.perf_counter() - t0, ds.classes)
        candidates = {s: results[s] for s in tcfg.strategies}
        on = tcfg.select_on or ("source_val" if domain_val is not None else "val")
        key = "source_val_acc" if on == "source_val" else "val_acc"
        selected = max(candidates, key=lambda s: (candidates[s][key] or 0.0, -tcfg.strategies.index(s)))
        criterion = (
            "best source-domain validation accuracy (no target labels; ties: earlier strategy)"
            if on == "source_val"
            else "best validation accuracy (ties: earlier strategy)"
        )
        selection = {"selected": selected, "criterion": criterion, "models": results}
        (w.path / "selection.json").write_text(json.dumps(selection, indent=2))
        w.metadata = {
            "selected": selected,
            "criterion": criterion,
            "models": results,
            "classes": ds.classes,
            "source": feat_meta.get("source", inputs["model"].meta["source"]),
            "source_digest": feat_meta.get("model_digest", inputs["model"].meta["model_digest"]),
        }
    best = candidates[selected][key] or 0.0  # the split and score the choice was made on
    tied = [s for s in candidates if s != selected and (candidates[s][key] or 0.0) == best]
    log.info(
        "fine-tune: selected %s (%s accuracy %.4f)%s",
        selected,
        on,
        best,
        f"; a tie with {', '.join(tied)} (equal {on} accuracy): the earlier strategy in train.strategies is kept"
        if tied
        else "",
    )
    return Artifact(Path(out), w.manifest)


def _check_fit(cfg: PipelineConfig, src: Path, source: str) -> None:
    """The strategies fit the pulled source model (its modality is known now, e.g. for an MLflow
    model or a bundle directory, where validation could not know it)."""
    from tlops.models.bundle_files import read_spec
    from tlops.training import strategies

    modality = read_spec(src).get("preprocessing", {}).get("modality")
    errors = strategies.problems(cfg, modality=modality, model=f"the source model {source}")
    if errors:
        raise ConfigError("\n".join(errors))


def load_job(cfg: PipelineConfig, inputs: dict[str, Artifact], runtime: Runtime) -> strategies.Job:
    """What every strategy trains from: the splits, the cached features, the selected source model."""
    from tlops.training import strategies

    ds = Dataset(inputs["dataset"])
    src = inputs["model"].path / inputs["features"].meta.get("source_bundle", "model")  # the selected candidate
    with np.load(inputs["features"].path / "features.npz", allow_pickle=False) as z:
        feats = {k: z[k] for k in z.files}
    train, val = ds.load("train"), ds.load("val") if "val" in ds.splits() else None
    return strategies.Job(cfg, ds, train, val, feats, inputs["model"], src, runtime)


def probe(job: strategies.Job) -> strategies.Probe:
    """The linear probe on the cached features, shared by the strategies that start from it."""
    from tlops.training import strategies
    from tlops.training.common import seed_everything
    from tlops.training.probe import train_probe

    cfg, val = job.cfg, job.val
    seed_everything(cfg.seed)
    t0 = time.perf_counter()
    head, hist = train_probe(
        job.features["train"],
        job.train.y,
        job.features.get("val"),
        val.y if val is not None else None,
        len(job.classes),
        cfg.train,
        cfg.seed,
        runtime=job.runtime,
    )
    return strategies.Probe(head, hist, time.perf_counter() - t0)


def _save(
    d: Path, clf: Classifier, hist: list[dict], strategy: str, secs: float, classes: list[str], keep: bool = True
) -> dict[str, Any]:
    from tlops.models.bundle import save_bundle
    from tlops.training.common import save_history

    if keep:
        spec = save_bundle(d, clf.backbone, head=clf.head, classes=classes, extra={"strategy": strategy})
        save_history(d, hist, strategy)
    else:  # a tune trial: the scores only
        d.mkdir(parents=True, exist_ok=True)
        (d / "history.json").write_text(json.dumps(hist, indent=2))
        spec = {"digest": None}
    scored = [e for h in hist for e in [*h.get("evals", []), h] if "val_acc" in e]  # train.eval_every adds evals
    best = max(scored, key=lambda h: (h["val_acc"], -h["val_loss"]), default=None)
    return {
        "val_acc": best["val_acc"] if best else None,
        "epochs": len(hist),
        "seconds": round(secs, 3),
        "digest": spec["digest"],
    }

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
from tlops.config import ADAPT_STRATEGIES, PipelineConfig
from tlops.data.dataset import Dataset, Split

if (
    TYPE_CHECKING
):  # torch-heavy: imported by the functions that train, not for fingerprint() (a reused step imports no torch)
    from tlops.models.bundle import Classifier

log = logging.getLogger(__name__)


def run(cfg: PipelineConfig, inputs: dict[str, Artifact], out: Path) -> Artifact:
    """``train.distributed: ddp``: relaunched under torchrun (rank 0 writes ``out``); else in-process."""
    from tlops.training import distributed

    return distributed.run_step(cfg, inputs, out, _run)


def _run(cfg: PipelineConfig, inputs: dict[str, Artifact], out: Path) -> Artifact:
    from tlops.models.bundle import Classifier, load_backbone
    from tlops.training.common import seed_everything
    from tlops.training.finetune import evaluate_split, fine_tune
    from tlops.training.probe import train_probe

    ds = Dataset(inputs["dataset"])
    feat_meta = inputs["features"].meta
    src = inputs["model"].path / feat_meta.get("source_bundle", "model")  # the selected source candidate
    with np.load(inputs["features"].path / "features.npz", allow_pickle=False) as z:
        feats = {k: z[k] for k in z.files}
    train, val = ds.load("train"), ds.load("val") if "val" in ds.splits() else None
    n_cls = len(ds.classes)
    domain_val = ds.load("source_val") if "source_val" in ds.splits() else None
    tcfg = cfg.train
    results: dict[str, Any] = {}
    with write_artifact(out, "trained-models", config=cfg.train.model_dump(mode="json"), inputs=inputs) as w:
        seed_everything(cfg.seed, tcfg.threads)
        t0 = time.perf_counter()
        head, probe_hist = train_probe(
            feats["train"], train.y, feats.get("val"), val.y if val is not None else None, n_cls, tcfg, cfg.seed
        )
        probe_secs = time.perf_counter() - t0
        for strategy in tcfg.strategies:
            d = w.path / "models" / strategy
            t0 = time.perf_counter()
            extra: dict[str, Any] = {}
            if strategy == "stacking":
                clf, hist, secs = _stacking(inputs["model"], feats, train, val, ds.classes, cfg)
                extra = {"stacked": [c["source"] for c in inputs["model"].meta["candidates"]]}
            elif strategy in ADAPT_STRATEGIES:
                clf, hist, extra = _adapt(strategy, src, ds, cfg)
                secs = time.perf_counter() - t0
            elif strategy == "setfit":
                clf, hist, extra = _setfit(src, train, val, ds.classes, cfg)
                secs = time.perf_counter() - t0
            elif strategy == "linear-probe":
                backbone, hist, secs = load_backbone(src), probe_hist, probe_secs
                clf = Classifier(backbone, n_cls, ds.classes)
                clf.head.load_state_dict(head.state_dict())
            else:
                seed_everything(cfg.seed, tcfg.threads)
                clf = Classifier(load_backbone(src), n_cls, ds.classes)
                clf.head.load_state_dict(head.state_dict())  # LP-FT: start from the probe's head
                if strategy == "lora":
                    from tlops.training.lora import apply_lora, merge_lora

                    extra = apply_lora(clf, tcfg.lora)
                    lora_cfg = tcfg.model_copy(update={"lr": tcfg.lora.lr, "l2sp": 0.0, "gradual_unfreeze": False})
                    hist = fine_tune(clf, train, val, lora_cfg, cfg.seed, d, frozen_k=0, name=strategy)
                    if tcfg.lora.merge:
                        merge_lora(clf)
                else:
                    k, extra = _freeze_for(strategy, clf, train, val, cfg)
                    hist = fine_tune(clf, train, val, tcfg, cfg.seed, d, frozen_k=k, name=strategy)
                secs = probe_secs + time.perf_counter() - t0
            results[strategy] = _save(d, clf, hist, strategy, secs, ds.classes) | extra
            if results[strategy]["val_acc"] is None and val is not None and len(val):
                # reported, not used for selection under DA
                results[strategy]["val_acc"] = evaluate_split(clf, val, tcfg.batch_size * 2)["val_acc"]
            if domain_val is not None:
                results[strategy]["source_val_acc"] = evaluate_split(clf, domain_val, tcfg.batch_size * 2)["val_acc"]
        if cfg.evaluate.scratch_baseline:
            d = w.path / "models" / "scratch"
            t0 = time.perf_counter()
            seed_everything(cfg.seed, tcfg.threads)
            clf = Classifier(load_backbone(src, random_init=True), n_cls, ds.classes)
            plain = tcfg.model_copy(update={"l2sp": 0.0, "layer_decay": None, "gradual_unfreeze": False})
            hist = fine_tune(clf, train, val, plain, cfg.seed, d, frozen_k=0, name="scratch")
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
    log.info("fine-tune: selected %s (val acc %.4f)", selected, results[selected]["val_acc"])
    return Artifact(Path(out), w.manifest)


def _adapt(strategy: str, src: Path, ds: Dataset, cfg: PipelineConfig) -> tuple[Classifier, list[dict], dict]:
    """Unsupervised domain adaptation: labelled ``source_train`` + unlabelled target data
    (the ``unlabelled`` split, else the target train inputs without their labels); epochs are
    selected on ``source_val``, never on target labels. ``adabn`` = source-only, then target
    BatchNorm statistics."""
    from tlops.models.bundle import Classifier, load_backbone
    from tlops.training.adaptation import adabn, adapt, random_shift
    from tlops.training.common import seed_everything

    a = cfg.train.adapt
    seed_everything(cfg.seed, cfg.train.threads)
    clf = Classifier(load_backbone(src), len(ds.classes), ds.classes)
    st, sv = ds.load("source_train"), ds.load("source_val")
    target = ds.load("unlabelled") if "unlabelled" in ds.splits() else ds.load("train")
    method = "source-only" if strategy == "adabn" else strategy
    image = clf.backbone.modality == "image"
    hist = adapt(
        clf,
        method,
        (st.x, st.y),
        target.x,
        epochs=a.epochs,
        batch_size=a.batch_size,
        lr=a.lr,
        optimizer=a.optimizer,
        trade_off=a.trade_off,
        seed=cfg.seed,
        source_val=(sv.x, sv.y),
        select=a.select,
        prepare=clf.backbone.prepare,
        augment=random_shift() if image and cfg.train.augment else None,
        log=lambda r: log.info(
            "%s epoch %d: %s", strategy, r["epoch"], {k: v for k, v in r.items() if k.endswith(("acc", "loss"))}
        ),
    )
    extra = {
        "adaptation": {
            "method": method,
            "target_samples": len(target),
            "source_samples": len(st),
            "selection": hist.meta.get("selection"),
        }
    }
    if strategy == "adabn":
        from tlops.features.extract import batches_for

        x = target.x
        batches = (
            x[idx] if isinstance(x, np.ndarray) else [x[i] for i in idx] for idx in batches_for(clf.backbone, x, 128)
        )
        extra["adaptation"]["adabn_samples"] = adabn(clf, batches, prepare=clf.backbone.prepare)
    clf.eval()
    records = [
        {
            "epoch": r["epoch"],
            "train_loss": r.get("cls_loss", 0.0),
            "train_acc": r.get("train_acc", 0.0),
            **{k: r[k] for k in ("transfer_loss", "source_val_acc", "source_val_loss", "selected") if k in r},
        }
        for r in hist
    ]
    return clf, records, extra


def _setfit(
    src: Path, train: Split, val: Split | None, classes: list[str], cfg: PipelineConfig
) -> tuple[Classifier, list[dict], dict]:
    """Contrastive pair tuning of the encoder, then the probe head on the tuned embeddings."""
    from tlops.features.extract import extract
    from tlops.models.bundle import Classifier, load_backbone
    from tlops.training.common import seed_everything
    from tlops.training.probe import train_probe
    from tlops.training.setfit import contrastive_tune

    seed_everything(cfg.seed, cfg.train.threads)
    clf = Classifier(load_backbone(src), len(classes), classes)
    pair_hist = contrastive_tune(clf, train, cfg.train.setfit, cfg.seed)
    bs = cfg.features.batch_size
    f_val = extract(clf.backbone, val.x, bs, desc="setfit val") if val is not None and len(val) else None
    head, hist = train_probe(
        extract(clf.backbone, train.x, bs, desc="setfit train"),
        train.y,
        f_val,
        val.y if f_val is not None else None,
        len(classes),
        cfg.train,
        cfg.seed,
    )
    clf.head.load_state_dict(head.state_dict())
    return clf, hist, {"setfit": {"pairs": pair_hist[-1]["pairs"], "pair_loss": [h["pair_loss"] for h in pair_hist]}}


def _stacking(
    model: Artifact,
    feats: dict[str, np.ndarray],
    train: Split,
    val: Split | None,
    classes: list[str],
    cfg: PipelineConfig,
) -> tuple[Classifier, list[dict], float]:
    """One head on the concatenated features of every source candidate (cached per model)."""
    from tlops.models.bundle import Classifier, load_backbone
    from tlops.models.stack import StackBackbone
    from tlops.training.probe import train_probe

    t0 = time.perf_counter()
    head, hist = train_probe(
        feats["stack_train"],
        train.y,
        feats.get("stack_val"),
        val.y if val is not None else None,
        len(classes),
        cfg.train,
        cfg.seed,
    )
    members = [load_backbone(model.path / c["path"]) for c in model.meta["candidates"]]
    clf = Classifier(StackBackbone(members), len(classes), classes)
    clf.head.load_state_dict(head.state_dict())
    return clf, hist, time.perf_counter() - t0


def _freeze_for(
    strategy: str, clf: Classifier, train: Split, val: Split | None, cfg: PipelineConfig
) -> tuple[int, dict[str, Any]]:
    """How many blocks to freeze: ``fine-tune`` takes ``freeze_blocks`` as given;
    ``partial-fine-tune`` picks the cut by probing each block when it is ``auto`` or 0."""
    k = cfg.train.freeze_blocks
    if k == "auto" or (strategy == "partial-fine-tune" and k == 0):
        from tlops.training.partial import choose_freeze_blocks

        k, scores = choose_freeze_blocks(clf, train, val, cfg.train, cfg.seed)
        return k, {"freeze_blocks": k, "freeze_choice": "auto", "block_probe": scores}
    return int(k), {"freeze_blocks": int(k)}


def _save(d: Path, clf: Classifier, hist: list[dict], strategy: str, secs: float, classes: list[str]) -> dict[str, Any]:
    from tlops.models.bundle import save_bundle
    from tlops.training.common import save_history

    spec = save_bundle(d, clf.backbone, head=clf.head, classes=classes, extra={"strategy": strategy})
    save_history(d, hist, strategy)
    best = max((h for h in hist if "val_acc" in h), key=lambda h: (h["val_acc"], -h["val_loss"]), default=None)
    return {
        "val_acc": best["val_acc"] if best else None,
        "epochs": len(hist),
        "seconds": round(secs, 3),
        "digest": spec["digest"],
    }

"""Shared by the domain-adaptation strategies: labelled ``source_train`` (from ``data.adapt_from``)
plus unlabelled target data (the ``unlabelled`` split, else the target train inputs without their
labels); epochs are selected on ``source_val``, never on target labels (``train.adapt``)."""

from __future__ import annotations

import logging
from pathlib import Path

from tlops.training.strategies.base import Job, Strategy, Trained

log = logging.getLogger("tlops.steps.fine_tune")


def train(job: Job, name: str, method: str) -> tuple[Trained, object]:
    """Adapt a classifier on the source model with ``method``; returns it and the target split."""
    from tlops.models.bundle import Classifier, load_backbone
    from tlops.training.adaptation import adapt, random_shift
    from tlops.training.common import seed_everything

    cfg, ds = job.cfg, job.dataset
    a = cfg.train.adapt
    seed_everything(cfg.seed, cfg.train.threads)
    clf = Classifier(load_backbone(job.source), len(ds.classes), ds.classes)
    st, sv = ds.load("source_train"), ds.load("source_val")
    target = ds.load("unlabelled") if "unlabelled" in ds.splits() else ds.load("train")
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
            "%s epoch %d: %s", name, r["epoch"], {k: v for k, v in r.items() if k.endswith(("acc", "loss"))}
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
    return Trained(clf, records, extra), target


def strategy(name: str, summary: str, order: int) -> Strategy:
    """A strategy that trains with the adaptation method of the same name."""

    def run(job: Job, out: Path) -> Trained:
        return train(job, name, name)[0]

    return Strategy(name, summary, run, order=order, needs_adapt_from=True)

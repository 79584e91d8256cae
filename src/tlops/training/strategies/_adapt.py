"""Shared by the domain-adaptation strategies: labelled ``source_train`` (from ``data.adapt_from``)
plus unlabelled target data (the ``unlabelled`` split, else the target train inputs without their
labels); epochs are selected on ``source_val``, never on target labels (``train.adapt``)."""

from __future__ import annotations

import logging
from pathlib import Path

from tlops.training.strategies.base import Job, Strategy, Trained

log = logging.getLogger("tlops.steps.fine_tune")


def train(job: Job, out: Path, name: str, method: str, **settings: object) -> tuple[Trained, object]:
    """Adapt a classifier on the source model with ``method``; returns it (on the runtime's device)
    and the target split. Checkpoints (resumable) only when the runtime has a checkpoint dir.
    ``settings``: more :class:`~tlops.training.adaptation.AdaptSettings` fields (e.g. SHOT's
    source training sets ``label_smoothing``)."""
    from tlops.models.bundle import Classifier, load_backbone
    from tlops.training.adaptation import adapt, random_shift
    from tlops.training.checkpoints import Checkpoints
    from tlops.training.common import seed_everything

    cfg, ds, rt = job.cfg, job.dataset, job.runtime
    a = cfg.train.adapt
    seed_everything(cfg.seed)
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
        runtime=rt,
        checkpoints=Checkpoints(rt, out, name, a.epochs) if rt.checkpoint_dir is not None else None,
        **settings,
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
        trained = train(job, out, name, name)[0]
        trained.classifier.to("cpu")
        return trained

    return Strategy(name, summary, run, order=order, needs_adapt_from=True)

"""Shared by the ``*-self-train`` strategies: an adversarial adaptation (DANN/CDAN, as the strategy
of that name trains it), then ``train.adapt.self_train_rounds`` rounds of pseudo-label
self-training: the target samples the model predicts with probability at least
``train.adapt.self_train_threshold`` get that prediction as their label, and the model trains
``train.adapt.self_train_epochs`` epochs on the labelled source plus them, starting from its
current weights; each round relabels with the improved model. No target labels anywhere; each
round keeps its epoch by ``train.adapt.select`` (source validation by default)."""

from __future__ import annotations

import logging
from pathlib import Path

from tlops.training.strategies import _adapt
from tlops.training.strategies.base import Job, Strategy, Trained

log = logging.getLogger("tlops.steps.fine_tune")


def train(job: Job, out: Path, name: str, method: str) -> Trained:
    from tlops.training.adaptation import random_shift, self_train
    from tlops.training.checkpoints import Checkpoints

    cfg, ds, rt = job.cfg, job.dataset, job.runtime
    a = cfg.train.adapt
    trained, target = _adapt.train(job, out, name, method)
    clf = trained.classifier
    st, sv = ds.load("source_train"), ds.load("source_val")

    def checkpoints(r: int) -> Checkpoints | None:
        if rt.checkpoint_dir is None:
            return None
        return Checkpoints(rt, out / f"round{r}", f"{name}-round{r}", a.self_train_epochs)

    hist = self_train(
        clf,
        (st.x, st.y),
        target.x,
        rounds=a.self_train_rounds,
        threshold=a.self_train_threshold,
        epochs=a.self_train_epochs,
        batch_size=a.batch_size,
        lr=a.lr,
        optimizer=a.optimizer,
        select=a.select,
        seed=cfg.seed,
        source_val=(sv.x, sv.y),
        prepare=clf.backbone.prepare,
        augment=random_shift() if clf.backbone.modality == "image" and cfg.train.augment else None,
        log=lambda r: log.info(
            "%s self-training round %d epoch %d: %s",
            name,
            r.get("round", 0),
            r["epoch"],
            {k: v for k, v in r.items() if k.endswith(("acc", "loss"))},
        ),
        runtime=rt,
        checkpoints=checkpoints,
    )
    first = len(trained.history)
    trained.history += [
        {
            "epoch": first + i,
            "phase": f"self-train round {r['round']}",
            "train_loss": r["cls_loss"],
            "train_acc": r["train_acc"],
            **{k: r[k] for k in ("source_val_acc", "source_val_loss", "selected", "pseudo_labelled") if k in r},
        }
        for i, r in enumerate(hist, 1)
    ]
    trained.extra["adaptation"] |= {
        "method": f"{method}+self-train",
        "self_train": {"threshold": a.self_train_threshold, "rounds": hist.meta["rounds"]},
    }
    clf.to("cpu")
    return trained


def strategy(method: str, summary: str, order: int) -> Strategy:
    """``<method>-self-train``: the adaptation ``method``, then pseudo-label self-training."""
    name = f"{method}-self-train"
    return Strategy(name, summary, lambda job, out: train(job, out, name, method), order=order, needs_adapt_from=True)

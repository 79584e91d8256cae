"""shot: source hypothesis transfer (SHOT, Liang et al., ICML 2020). The classifier is trained on
the labelled source with label smoothing, then only its backbone adapts to the unlabelled target,
without the source data: the head (the source hypothesis) stays frozen while information
maximisation (confident and diverse target predictions) and ``train.adapt.shot_beta`` x
cross-entropy to self-supervised pseudo-labels (cosine-distance class centroids of the target
features, recomputed every epoch) pull the target features onto it. No target labels anywhere;
the target phase keeps its last epoch, as published (the source validation split measures the
source hypothesis SHOT moves away from: recorded, never used to select)."""

from __future__ import annotations

import logging
from pathlib import Path

from tlops.training.strategies import _adapt
from tlops.training.strategies.base import Job, Strategy, Trained, register

log = logging.getLogger("tlops.steps.fine_tune")

# SHOT's target-phase optimiser (tim-learn/SHOT uda_digit.py / image_target.py): SGD with Nesterov
# momentum 0.9 and weight decay 1e-3
WEIGHT_DECAY = 1e-3


def train(job: Job, out: Path) -> Trained:
    from tlops.training.adaptation import shot
    from tlops.training.checkpoints import Checkpoints

    cfg, rt = job.cfg, job.runtime
    a = cfg.train.adapt
    trained, target = _adapt.train(job, out, "shot", "source-only", label_smoothing=a.shot_label_smoothing)
    clf = trained.classifier
    sv = job.dataset.load("source_val")
    epochs = a.shot_epochs or a.epochs
    hist = shot(
        clf,
        target.x,
        beta=a.shot_beta,
        epochs=epochs,
        batch_size=a.batch_size,
        lr=a.lr,
        optimizer=a.optimizer,
        weight_decay=WEIGHT_DECAY,
        nesterov=True,
        seed=cfg.seed,
        source_val=(sv.x, sv.y),
        prepare=clf.backbone.prepare,
        log=lambda r: log.info(
            "shot target epoch %d: %s", r["epoch"], {k: v for k, v in r.items() if k.endswith(("acc", "loss"))}
        ),
        runtime=rt,
        checkpoints=Checkpoints(rt, out / "target", "shot-target", epochs) if rt.checkpoint_dir is not None else None,
    )
    first = len(trained.history)
    trained.history += [
        {
            "epoch": first + r["epoch"],
            "phase": "target",
            "train_loss": r["cls_loss"],  # shot_beta x cross-entropy to the pseudo-labels
            "train_acc": r["train_acc"],  # agreement with the pseudo-labels
            "transfer_loss": r["transfer_loss"],  # information maximisation
            **{k: r[k] for k in ("source_val_acc", "source_val_loss", "selected") if k in r},
        }
        for r in hist
    ]
    trained.extra["adaptation"] |= {
        "method": "shot",
        "source_label_smoothing": a.shot_label_smoothing,
        "shot_beta": a.shot_beta,
        "shot_epochs": epochs,
        "selection": hist.meta["selection"],
    }
    clf.to("cpu")
    return trained


STRATEGY = register(
    Strategy(
        "shot",
        "source-only with label smoothing, then the backbone adapted on the target alone with the head frozen: "
        "information maximisation + self-supervised pseudo-labels (SHOT)",
        train,
        order=125,
        needs_adapt_from=True,
    )
)

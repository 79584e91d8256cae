"""self-train-probe: the linear probe, refit on its own confident predictions for unlabelled target inputs.

Self-training (pseudo-labelling) is the cheapest way to use unlabelled target data: a probe trained on the
labelled data labels the target pool, the confident part of the pool joins the labelled data, the probe is
refit, and this repeats. On cached frozen features a round is one more scikit-learn fit, so it costs
seconds where adapting the encoder costs minutes per epoch on a CPU.

Two rules keep it from confirming its own mistakes:

* a per-class budget that grows with the rounds (round ``r`` of ``R`` keeps at most ``r/R`` of the pool's even
  share per class, most confident first): early rounds add only the easiest inputs, and no class can swamp the
  others even when the probe leans towards it on the new domain;
* optionally a floor on the predicted class's probability (``threshold``). It is off by default
  (``THRESHOLD = 0``) because the probe's probabilities depend on the regularisation chosen on a handful of
  labels: on 16 yelp sentences with mpnet features, C = 100 puts most of the pool above 0.8, C = 3.2 (an equally
  good choice on validation) puts none there. The rank within a class does not move with C.

Which data: with ``data.adapt_from`` the labels are the source domain's (``source_train``, validated on
``source_val``) and the pool is the target's ``unlabelled`` split, else its train inputs without their
labels (like the adaptation strategies: no target label is used). Without it, the labels are the target's
train split (few-shot: ``data.labels_per_class``) and the pool is the ``unlabelled`` split
(``data.unlabelled``); without either there is nothing to pseudo-label and it is the linear probe (with a
warning). The (scaling, C) choice is the probe's (validation, else k-fold CV on train), made
once on the labelled data and kept for every round: pseudo-labels must not select hyper-parameters.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from tlops.training.strategies.base import Job, Strategy, Trained, register

log = logging.getLogger("tlops.steps.fine_tune")

THRESHOLD = 0.0  # predicted-class probability a pseudo-label needs (off: the per-class rank budget decides)
ROUNDS = 3


def self_train(
    f_lab: np.ndarray,
    y_lab: np.ndarray,
    f_pool: np.ndarray,
    f_val: np.ndarray | None,
    y_val: np.ndarray | None,
    num_classes: int,
    cfg: Any,
    seed: int,
    *,
    threshold: float = THRESHOLD,
    rounds: int = ROUNDS,
    runtime: Any = None,
) -> tuple[Any, list[dict[str, Any]]]:
    """(head, history): the probe on ``f_lab``, then ``rounds`` refits on ``f_lab`` + confident pseudo-labelled
    ``f_pool``. ``cfg`` is a TrainConfig (its probe picks C once, on the labelled data)."""
    import torch

    from tlops.training.probe import train_probe

    head, hist = train_probe(
        f_lab, y_lab, f_val, y_val, num_classes, cfg, seed, runtime=runtime, name="self-train-probe"
    )
    fixed = cfg.model_copy(
        update={"probe_c": [hist[0]["C"]], "probe_scaling": hist[0]["scaling"]}
    )  # no search on pseudo-labels
    history = [{**hist[0], "round": 0, "pseudo_labelled": 0, "of": len(f_pool)}]
    share = len(f_pool) / num_classes
    for r in range(1, rounds + 1):
        with torch.no_grad():
            proba = torch.softmax(head(torch.as_tensor(f_pool, dtype=torch.float32)), 1).numpy()
        pred, conf = proba.argmax(1), proba.max(1)
        budget = math.ceil(share * r / rounds)
        keep = np.concatenate(
            [
                idx[np.argsort(-conf[idx], kind="stable")][:budget]
                for k in range(num_classes)
                if len(idx := np.flatnonzero((pred == k) & (conf >= threshold)))
            ]
            or [np.empty(0, dtype=np.int64)]
        )
        x = np.concatenate([f_lab, f_pool[keep]])
        y = np.concatenate([y_lab, pred[keep]])
        head, h = train_probe(x, y, f_val, y_val, num_classes, fixed, seed, runtime=runtime, name="self-train-probe")
        rec = {**h[0], "round": r, "pseudo_labelled": int(len(keep)), "of": len(f_pool)}
        rec["per_class"] = [int((pred[keep] == k).sum()) for k in range(num_classes)]
        history.append(rec)
        log.info(
            "self-train-probe round %d: %d of %d pool inputs pseudo-labelled (per class %s)%s",
            r,
            len(keep),
            len(f_pool),
            rec["per_class"],
            f"; val acc {rec['val_acc']:.4f}" if "val_acc" in rec else "",
        )
    for i, rec in enumerate(history, 1):
        rec["epoch"] = i
    return head, history


def _data(job: Job) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None, str]:
    ds, f = job.dataset, job.features
    if "source_train" in ds.splits():
        pool = "unlabelled" if "unlabelled" in f else "train"
        sv = ds.load("source_val").y if "source_val" in f else None
        return f["source_train"], ds.load("source_train").y, f[pool], f.get("source_val"), sv, pool
    val = job.val.y if job.val is not None else None
    if "unlabelled" not in f:
        log.warning(
            "self-train-probe: no unlabelled target inputs, so nothing to pseudo-label: this is the linear probe. "
            "Set data.unlabelled (a fraction of the train pool kept unlabelled) or data.adapt_from (labelled "
            "source data; the target train inputs are then the pool)"
        )
        return f["train"], job.train.y, f["train"][:0], f.get("val"), val, "none"
    return f["train"], job.train.y, f["unlabelled"], f.get("val"), val, "unlabelled"


def train(job: Job, out: Path) -> Trained:
    from tlops.models.bundle import Classifier, load_backbone
    from tlops.training.common import seed_everything

    cfg = job.cfg
    seed_everything(cfg.seed)
    f_lab, y_lab, pool, f_val, y_val, pool_name = _data(job)
    rounds = ROUNDS if len(pool) else 0
    head, hist = self_train(
        f_lab, y_lab, pool, f_val, y_val, len(job.classes), cfg.train, cfg.seed, rounds=rounds, runtime=job.runtime
    )
    clf = Classifier(load_backbone(job.source), len(job.classes), job.classes)
    clf.head.load_state_dict(head.state_dict())
    extra = {
        "self_training": {
            "pool": pool_name,
            "threshold": THRESHOLD,
            "rounds": rounds,
            "pseudo_labelled": [h["pseudo_labelled"] for h in hist],
        }
    }
    return Trained(clf, hist, extra)


STRATEGY = register(
    Strategy(
        "self-train-probe",
        "the linear probe refit on its most confident, class-balanced pseudo-labels for unlabelled target inputs "
        "(frozen features; data.unlabelled or data.adapt_from)",
        train,
        order=15,
        trains_backbone=False,
    )
)

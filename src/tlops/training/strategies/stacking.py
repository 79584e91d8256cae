"""stacking: one linear head on the concatenated cached features of every source model
(``source.model`` + ``source.candidates``); served as one model (``StackBackbone``)."""

from __future__ import annotations

from pathlib import Path

from tlops.training.strategies.base import Job, Strategy, Trained, register


def train(job: Job, out: Path) -> Trained:
    from tlops.models.bundle import Classifier, load_backbone
    from tlops.models.stack import StackBackbone
    from tlops.training.probe import train_probe

    val = job.val
    head, hist = train_probe(
        job.features["stack_train"],
        job.train.y,
        job.features.get("stack_val"),
        val.y if val is not None else None,
        len(job.classes),
        job.cfg.train,
        job.cfg.seed,
        runtime=job.runtime,
        name="stacking",
    )
    candidates = job.model.meta["candidates"]
    clf = Classifier(
        StackBackbone([load_backbone(job.model.path / c["path"]) for c in candidates]), len(job.classes), job.classes
    )
    clf.head.load_state_dict(head.state_dict())
    return Trained(clf, hist, {"stacked": [c["source"] for c in candidates]})


STRATEGY = register(
    Strategy(
        "stacking",
        "one linear head on the concatenated features of source.model and source.candidates",
        train,
        order=50,
        needs_candidates=True,
        trains_backbone=False,
    )
)

"""Shared by fine-tune, partial-fine-tune and lora: the classifier starts from the linear probe's
head (LP-FT: the head is already good when the backbone starts moving)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from tlops.training.strategies.base import Job, Trained

if TYPE_CHECKING:
    from tlops.models.bundle import Classifier


def from_probe(job: Job) -> Classifier:
    from tlops.models.bundle import Classifier, load_backbone
    from tlops.training.common import seed_everything

    assert job.probe is not None, "a strategy with uses_probe=True gets the probe"
    seed_everything(job.cfg.seed)
    clf = Classifier(load_backbone(job.source), len(job.classes), job.classes)
    clf.head.load_state_dict(job.probe.head.state_dict())
    return clf


def freeze_for(job: Job, clf: Classifier, *, auto_when_zero: bool) -> tuple[int, dict[str, Any]]:
    """How many blocks to freeze: ``train.freeze_blocks`` as given; ``auto`` (and 0 when
    ``auto_when_zero``) picks the cut by probing each block."""
    k = job.cfg.train.freeze_blocks
    if k == "auto" or (auto_when_zero and k == 0):
        from tlops.training.partial import choose_freeze_blocks

        k, scores = choose_freeze_blocks(clf, job.train, job.val, job.cfg.train, job.cfg.seed, runtime=job.runtime)
        return k, {"freeze_blocks": k, "freeze_choice": "auto", "block_probe": scores}
    return int(k), {"freeze_blocks": int(k)}


def fine_tune_from_probe(job: Job, out: Path, name: str, *, auto_when_zero: bool) -> Trained:
    from tlops.training.finetune import fine_tune

    clf = from_probe(job)
    k, extra = freeze_for(job, clf, auto_when_zero=auto_when_zero)
    hist = fine_tune(
        clf, job.train, job.val, job.cfg.train, job.cfg.seed, out, frozen_k=k, name=name, runtime=job.runtime
    )
    return Trained(clf, hist, extra)

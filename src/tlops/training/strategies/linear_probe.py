"""linear-probe: the source model stays as it is; a linear head on its cached features."""

from __future__ import annotations

from pathlib import Path

from tlops.training.strategies.base import Job, Strategy, Trained, register


def train(job: Job, out: Path) -> Trained:
    from tlops.models.bundle import Classifier, load_backbone

    assert job.probe is not None
    clf = Classifier(load_backbone(job.source), len(job.classes), job.classes)
    clf.head.load_state_dict(job.probe.head.state_dict())
    return Trained(clf, job.probe.history)


STRATEGY = register(
    Strategy(
        "linear-probe",
        "a linear head on the cached features of the frozen source model",
        train,
        order=10,
        trains_backbone=False,
        uses_probe=True,
    )
)

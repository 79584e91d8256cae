"""fine-tune: all backbone blocks but the first ``train.freeze_blocks`` train with the head,
starting from the linear probe's head (``train.layer_decay``, ``l2sp``, ``gradual_unfreeze``)."""

from __future__ import annotations

from pathlib import Path

from tlops.training.strategies._lpft import fine_tune_from_probe
from tlops.training.strategies.base import Job, Strategy, Trained, register


def train(job: Job, out: Path) -> Trained:
    return fine_tune_from_probe(job, out, "fine-tune", auto_when_zero=False)


STRATEGY = register(
    Strategy(
        "fine-tune",
        "backbone and head train together, from the probe's head (train.freeze_blocks keeps the first blocks)",
        train,
        order=20,
        uses_probe=True,
    )
)

"""partial-fine-tune: like fine-tune, but the cut is chosen by probing each block when
``train.freeze_blocks`` is ``auto`` or 0."""

from __future__ import annotations

from pathlib import Path

from tlops.training.strategies._lpft import fine_tune_from_probe
from tlops.training.strategies.base import Job, Strategy, Trained, register


def train(job: Job, out: Path) -> Trained:
    return fine_tune_from_probe(job, out, "partial-fine-tune", auto_when_zero=True)


STRATEGY = register(
    Strategy(
        "partial-fine-tune",
        "fine-tune above a cut chosen by probing each block (train.freeze_blocks: auto or 0)",
        train,
        order=30,
        uses_probe=True,
    )
)

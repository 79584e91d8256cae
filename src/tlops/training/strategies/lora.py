"""lora: low-rank adapters on a transformer's attention projections (``train.lora``); only the
adapters and the head train, from the linear probe's head."""

from __future__ import annotations

from pathlib import Path

from tlops.training.strategies._lpft import from_probe
from tlops.training.strategies.base import Job, Strategy, Trained, register


def train(job: Job, out: Path) -> Trained:
    from tlops.training.finetune import fine_tune
    from tlops.training.lora import apply_lora, merge_lora

    tcfg = job.cfg.train
    clf = from_probe(job)
    extra = apply_lora(clf, tcfg.lora)
    lora_cfg = tcfg.model_copy(update={"lr": tcfg.lora.lr, "l2sp": 0.0, "gradual_unfreeze": False})
    hist = fine_tune(clf, job.train, job.val, lora_cfg, job.cfg.seed, out, frozen_k=0, name="lora", runtime=job.runtime)
    if tcfg.lora.merge:
        merge_lora(clf)
    return Trained(clf, hist, extra)


STRATEGY = register(
    Strategy(
        "lora",
        "low-rank adapters on the attention projections of a transformer (train.lora)",
        train,
        order=40,
        modalities=("text",),
        uses_probe=True,
    )
)

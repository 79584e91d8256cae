"""Fine-tuning of backbone + head: full, or with the first K backbone blocks frozen.

Frozen blocks have ``requires_grad=False`` *and* are kept in eval mode during training, so
BatchNorm running statistics in them do not move. A checkpoint is written after every
epoch (the newest two are kept) and the epoch with the best validation accuracy wins.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tlops.config import TrainConfig
from tlops.data.dataset import Split
from tlops.features.extract import batches_for
from tlops.models.bundle import Classifier

log = logging.getLogger(__name__)
KEEP_CHECKPOINTS = 2


def freeze_blocks(clf: Classifier, k: int) -> list[nn.Module]:
    blocks = clf.backbone.blocks()
    if k > len(blocks):
        from tlops.errors import ConfigError

        raise ConfigError(f"train.freeze_blocks: got {k}, but the backbone has only {len(blocks)} blocks (allowed: 0..{len(blocks)})")
    frozen = blocks[:k]
    for m in frozen:
        for p in m.parameters():
            p.requires_grad_(False)
    return frozen


def set_train_mode(clf: Classifier, frozen: list[nn.Module]) -> None:
    clf.train()
    for m in frozen:
        m.eval()


def _take(x: Any, idx: np.ndarray) -> Any:
    return x[idx] if isinstance(x, np.ndarray) else [x[i] for i in idx]


def _shift(pixels: torch.Tensor, g: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Random translation by up to ``max_shift`` pixels (zero padding), per batch."""
    dx, dy = (int(v) for v in torch.randint(-max_shift, max_shift + 1, (2,), generator=g))
    padded = F.pad(pixels, (max_shift,) * 4)
    h, w = pixels.shape[-2:]
    return padded[..., max_shift + dy : max_shift + dy + h, max_shift + dx : max_shift + dx + w]


@torch.no_grad()
def evaluate_split(clf: Classifier, split: Split, batch_size: int) -> dict[str, float]:
    clf.eval()
    loss, correct = 0.0, 0
    for idx in batches_for(clf.backbone, split.x, batch_size):
        logits = clf(**clf.backbone.prepare(_take(split.x, idx)))
        y = torch.from_numpy(split.y[idx])
        loss += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
    n = max(len(split), 1)
    return {"val_loss": loss / n, "val_acc": correct / n}


def fine_tune(
    clf: Classifier, train: Split, val: Split | None, cfg: TrainConfig, seed: int, out_dir: Path, *, frozen_k: int, name: str,
) -> list[dict[str, Any]]:
    from tlops.training.partial import L2SP, param_groups, unfreeze_plan

    g = torch.Generator().manual_seed(seed)
    frozen = freeze_blocks(clf, frozen_k)
    l2sp = L2SP(clf.backbone, cfg.l2sp) if cfg.l2sp else None
    opt = torch.optim.AdamW(param_groups(clf, cfg))  # explicit per-group lr (layer decay) and weight decay
    trainable = clf.backbone.blocks()[frozen_k:]
    plan = unfreeze_plan(trainable, cfg.epochs) if cfg.gradual_unfreeze else {}
    locked = [b for blocks in plan.values() for b in blocks]  # not yet unfrozen (gradual unfreezing)
    for b in locked:
        b.requires_grad_(False)
    steps_per_epoch = max(1, -(-len(train) // cfg.batch_size))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs * steps_per_epoch)
    ckpt_dir = out_dir / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    history: list[dict[str, Any]] = []
    best: tuple[float, float] | None = None
    best_state = None
    image = clf.backbone.modality == "image"
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        for b in plan.get(epoch, []):
            b.requires_grad_(True)
            locked.remove(b)
        set_train_mode(clf, frozen + locked)
        perm = torch.randperm(len(train), generator=g).numpy()
        tot_loss, tot_correct = 0.0, 0
        for i in range(0, len(perm), cfg.batch_size):
            idx = perm[i : i + cfg.batch_size]
            inputs = clf.backbone.prepare(_take(train.x, idx))
            if image and cfg.augment:
                inputs["pixel_values"] = _shift(inputs["pixel_values"], g)
            y = torch.from_numpy(train.y[idx])
            logits = clf(**inputs)
            loss = F.cross_entropy(logits, y)
            if l2sp is not None:
                loss = loss + l2sp.penalty()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot_loss += loss.item() * len(idx)
            tot_correct += int((logits.argmax(1) == y).sum())
        rec: dict[str, Any] = {"epoch": epoch, "train_loss": tot_loss / len(train), "train_acc": tot_correct / len(train)}
        if val is not None and len(val):
            rec |= evaluate_split(clf, val, cfg.batch_size * 2)
        rec["seconds"] = round(time.perf_counter() - t0, 3)
        history.append(rec)
        score = (rec.get("val_acc", rec["train_acc"]), -rec.get("val_loss", rec["train_loss"]))
        if best is None or score > best:
            best = score
            best_state = {k: v.detach().clone() for k, v in clf.state_dict().items()}
        _checkpoint(ckpt_dir, epoch, clf, opt)
        log.info(
            "%s epoch %d/%d: loss %.4f acc %.3f%s (%.1fs)", name, epoch, cfg.epochs, rec["train_loss"], rec["train_acc"],
            f" val_acc {rec['val_acc']:.3f}" if "val_acc" in rec else "", rec["seconds"],
        )
    clf.load_state_dict(best_state)
    clf.eval()
    return history


def _checkpoint(d: Path, epoch: int, clf: Classifier, opt: torch.optim.Optimizer) -> None:
    path = d / f"epoch_{epoch:03d}.pt"
    tmp = path.with_suffix(".pt.tmp")
    torch.save({"epoch": epoch, "model": clf.state_dict(), "optimizer": opt.state_dict()}, tmp)
    os.replace(tmp, path)
    for old in sorted(d.glob("epoch_*.pt"))[:-KEEP_CHECKPOINTS]:
        old.unlink()

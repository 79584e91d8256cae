"""Fine-tuning of backbone + head: full, or with the first K backbone blocks frozen.

Frozen blocks have ``requires_grad=False`` *and* are kept in eval mode during training, so
BatchNorm running statistics in them do not move. A checkpoint is written after every
epoch (the newest two are kept) and the epoch with the best validation accuracy wins.

Crash and resume: when ``TLOPS_CHECKPOINT_DIR`` is set (the runner sets it to
``<workdir>/checkpoints/<step fingerprint>`` for the fine-tune step, and removes that dir
once the step has succeeded), checkpoints go to ``$TLOPS_CHECKPOINT_DIR/<strategy>/``, a
location that survives a killed step, and a rerun resumes from the newest readable one. A
checkpoint holds everything the rest of the run depends on (model, optimizer, scheduler,
the shuffling/augmentation generator, the global RNGs, history, best score and best
weights), so a resumed run ends with the same weights as an uninterrupted one. The kept
checkpoints are also linked into the artifact's ``checkpoints/``.
"""

from __future__ import annotations

import logging
import os
import random
import time
import uuid
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
from tlops.training import distributed

log = logging.getLogger(__name__)
KEEP_CHECKPOINTS = 2


def freeze_blocks(clf: Classifier, k: int) -> list[nn.Module]:
    blocks = clf.backbone.blocks()
    if k > len(blocks):
        from tlops.errors import ConfigError

        raise ConfigError(
            f"train.freeze_blocks: got {k}, but the backbone has only {len(blocks)} blocks (allowed: 0..{len(blocks)})"
        )
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


@torch.inference_mode()
def evaluate_split(clf: Classifier, split: Split, batch_size: int) -> dict[str, float]:
    clf.eval()
    dev = next(clf.parameters()).device
    loss, correct = torch.zeros((), device=dev), torch.zeros((), dtype=torch.long, device=dev)  # no per-batch sync
    for idx in batches_for(clf.backbone, split.x, batch_size):
        logits = clf(**distributed.to_device(clf.backbone.prepare(_take(split.x, idx)), dev)).float()
        y = torch.from_numpy(split.y[idx]).to(dev)
        loss += F.cross_entropy(logits, y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
    n = max(len(split), 1)
    return {"val_loss": float(loss) / n, "val_acc": int(correct) / n}


def fine_tune(
    clf: Classifier,
    train: Split,
    val: Split | None,
    cfg: TrainConfig,
    seed: int,
    out_dir: Path,
    *,
    frozen_k: int,
    name: str,
) -> list[dict[str, Any]]:
    from tlops.training.partial import L2SP, param_groups, unfreeze_plan

    g = torch.Generator().manual_seed(seed)
    ctx = distributed.current()  # device; rank/world under DDP (train.distributed: ddp)
    ctx.set_threads(cfg.threads)  # unset: the free CPUs (torch's all-cores default collapses on busy cores)
    ctx.prepare(clf)
    frozen = freeze_blocks(clf, frozen_k)
    l2sp = L2SP(clf.backbone, cfg.l2sp) if cfg.l2sp else None
    # explicit per-group lr (layer decay) and weight decay; fused kernel where available (much faster step on CPU)
    opt = torch.optim.AdamW(param_groups(clf, cfg), **ctx.adamw_kwargs())
    trainable = clf.backbone.blocks()[frozen_k:]
    plan = unfreeze_plan(trainable, cfg.epochs) if cfg.gradual_unfreeze else {}
    locked = [b for blocks in plan.values() for b in blocks]  # not yet unfrozen (gradual unfreezing)
    for b in locked:
        b.requires_grad_(False)
    steps_per_epoch = max(1, -(-len(train) // cfg.batch_size))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs * steps_per_epoch)
    ckpt_dir, resumable = checkpoint_dir(out_dir, name)
    history: list[dict[str, Any]] = []
    best: tuple[float, float] | None = None
    best_state, best_epoch, start = None, 0, 0
    if resumable and (state := _resume(ckpt_dir, clf, opt, sched, g, cfg.epochs, name)) is not None:
        start, history, best, best_epoch, best_state = state
        for e in range(1, start + 1):  # gradual unfreezing up to the resumed epoch
            for b in plan.get(e, []):
                b.requires_grad_(True)
                locked.remove(b)
    image = clf.backbone.modality == "image"
    for epoch in range(start + 1, cfg.epochs + 1):
        t0 = time.perf_counter()
        for b in plan.get(epoch, []):
            b.requires_grad_(True)
            locked.remove(b)
        set_train_mode(clf, frozen + locked)
        if epoch == start + 1 or plan.get(epoch):
            model = ctx.wrap(clf)  # DDP when distributed (re-wrapped when the trainable set changes)
        perm = torch.randperm(len(train), generator=g).numpy()
        tot_loss, tot_correct, seen = torch.zeros((), device=ctx.device), torch.zeros((), device=ctx.device), 0
        batches = distributed.epoch_batches(
            train.x, perm, cfg.batch_size, bucket=not image, generator=g, rank=ctx.rank, world=ctx.world
        )  # text: length-grouped batches
        for idx in batches:
            inputs = clf.backbone.prepare(_take(train.x, idx))
            if image and cfg.augment:
                inputs["pixel_values"] = _shift(inputs["pixel_values"], g)
            inputs = ctx.to_device(inputs)
            y = torch.from_numpy(train.y[idx]).to(ctx.device)
            with ctx.autocast():
                logits = model(**inputs)
            loss = F.cross_entropy(logits.float(), y)
            if l2sp is not None:
                loss = loss + l2sp.penalty()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot_loss += loss.detach() * len(idx)  # no per-step .item() sync
            tot_correct += (logits.argmax(1) == y).sum()
            seen += len(idx)
        tl, tc, n_seen = ctx.all_reduce_sum(tot_loss, tot_correct, torch.tensor(float(seen)))  # over DDP ranks
        rec: dict[str, Any] = {"epoch": epoch, "train_loss": tl / max(n_seen, 1), "train_acc": tc / max(n_seen, 1)}
        if val is not None and len(val):
            rec |= evaluate_split(clf, val, cfg.batch_size * 2)
        rec["seconds"] = round(time.perf_counter() - t0, 3)
        history.append(rec)
        score = (rec.get("val_acc", rec["train_acc"]), -rec.get("val_loss", rec["train_loss"]))
        if best is None or score > best:
            best, best_epoch = score, epoch
            best_state = {k: v.detach().clone() for k, v in clf.state_dict().items()}
        if ctx.is_main:
            _checkpoint(
                ckpt_dir,
                epoch,
                clf,
                opt,
                sched=sched,
                g=g,
                history=history,
                best=best,
                best_epoch=best_epoch,
                best_state=best_state,
                epochs=cfg.epochs,
                name=name,
            )
        log.info(
            "%s epoch %d/%d: loss %.4f acc %.3f%s (%.1fs)",
            name,
            epoch,
            cfg.epochs,
            rec["train_loss"],
            rec["train_acc"],
            f" val_acc {rec['val_acc']:.3f}" if "val_acc" in rec else "",
            rec["seconds"],
        )
    if resumable and ctx.is_main:
        _export_checkpoints(ckpt_dir, out_dir / "checkpoints")
    clf.load_state_dict(best_state)
    clf.to("cpu")
    clf.eval()
    return history


CHECKPOINT_ENV = "TLOPS_CHECKPOINT_DIR"


def checkpoint_dir(out_dir: Path, name: str) -> tuple[Path, bool]:
    """Where this strategy's checkpoints go, and whether they survive the step (resumable).

    ``$TLOPS_CHECKPOINT_DIR/<name>`` when the runner set it (a stable per-fingerprint dir
    under the workdir); else ``out_dir/checkpoints`` (inside the step's temp dir: gone with it)."""
    root = os.environ.get(CHECKPOINT_ENV)
    d = Path(root) / name if root else out_dir / "checkpoints"
    d.mkdir(parents=True, exist_ok=True)
    return d, bool(root)


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "gauss": float(np_state[4]),
        },
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _checkpoint(
    d: Path,
    epoch: int,
    clf: Classifier,
    opt: torch.optim.Optimizer,
    *,
    sched: Any = None,
    g: torch.Generator | None = None,
    history: list[dict[str, Any]] | None = None,
    best: tuple[float, float] | None = None,
    best_epoch: int = 0,
    best_state: dict[str, torch.Tensor] | None = None,
    epochs: int | None = None,
    name: str = "",
) -> None:
    """Write ``epoch_NNN.pt`` atomically (unique temp name: two writers never share a temp file)."""
    path = d / f"epoch_{epoch:03d}.pt"
    tmp = d / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
    ckpt: dict[str, Any] = {"epoch": epoch, "model": clf.state_dict(), "optimizer": opt.state_dict()}
    if g is not None:  # everything a resumed run needs to continue exactly
        ckpt |= {
            "name": name,
            "epochs": epochs,
            "scheduler": sched.state_dict() if sched is not None else None,
            "generator": g.get_state(),
            "rng": _rng_state(),
            "history": history or [],
            "best": list(best) if best is not None else None,
            "best_epoch": best_epoch,
            # the best weights, unless they are this epoch's (then "model" holds them)
            "best_state": best_state if best_epoch != epoch else None,
        }
    try:
        torch.save(ckpt, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    for old in sorted(d.glob("epoch_*.pt"))[:-KEEP_CHECKPOINTS]:
        old.unlink(missing_ok=True)


def _resume(
    d: Path,
    clf: Classifier,
    opt: torch.optim.Optimizer,
    sched: Any,
    g: torch.Generator,
    epochs: int,
    name: str,
) -> tuple[int, list[dict[str, Any]], tuple[float, float] | None, int, dict[str, torch.Tensor]] | None:
    """Load the newest readable checkpoint in ``d`` into the model, optimizer, scheduler and
    RNGs; return (epoch, history, best score, best epoch, best weights), or None to start fresh."""
    for stale in d.glob(".epoch_*.tmp"):  # a temp file of a killed writer
        stale.unlink(missing_ok=True)
    for path in sorted(d.glob("epoch_*.pt"), reverse=True):
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - unreadable (e.g. truncated by a full disk): try an older one
            log.warning(
                "%s: checkpoint %s is unreadable (%s: %s); trying an older one", name, path, type(e).__name__, e
            )
            continue
        if (
            "generator" not in ckpt
            or ckpt.get("epochs") != epochs
            or ckpt.get("name") != name
            or ckpt["epoch"] > epochs
        ):
            log.warning("%s: checkpoint %s does not match this training run; starting from scratch", name, path)
            return None
        clf.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        if sched is not None and ckpt.get("scheduler") is not None:
            sched.load_state_dict(ckpt["scheduler"])
        g.set_state(ckpt["generator"])
        _set_rng_state(ckpt["rng"])
        epoch = int(ckpt["epoch"])
        best = tuple(ckpt["best"]) if ckpt.get("best") is not None else None
        best_state = ckpt["best_state"] if ckpt.get("best_state") is not None else ckpt["model"]
        log.info("%s: resuming from epoch %d of %d (checkpoint %s)", name, epoch, epochs, path)
        return epoch, list(ckpt["history"]), best, int(ckpt["best_epoch"]), best_state  # type: ignore[return-value]
    return None


def _export_checkpoints(src: Path, dst: Path) -> None:
    """Link the kept checkpoints into the artifact (``dst``), as in the non-resumable layout."""
    from tlops.artifacts import link_or_copy

    dst.mkdir(parents=True, exist_ok=True)
    for p in sorted(src.glob("epoch_*.pt"))[-KEEP_CHECKPOINTS:]:
        if not (dst / p.name).exists():
            link_or_copy(p, dst / p.name)

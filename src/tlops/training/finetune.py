"""Fine-tuning of backbone + head: full, or with the first K backbone blocks frozen.

Frozen blocks have ``requires_grad=False`` *and* are kept in eval mode during training, so
BatchNorm running statistics in them do not move. A checkpoint is written after every
epoch (the newest two are kept) and the evaluation with the best validation accuracy wins:
one per epoch, or one every ``train.eval_every`` optimizer steps (time to accuracy is then
step-granular, and ``train.patience`` stops a run that has stopped improving).

Where it runs (device, precision, DDP rank/world, threads) and where its checkpoints go come
from the :class:`~tlops.training.runtime.Runtime` passed in. Crash and resume: when the
runtime has a checkpoint dir (the runner gives ``<workdir>/checkpoints/<step key>`` to the
fine-tune step and removes it once the step has succeeded), checkpoints go to
``<checkpoint dir>/<name>/``, a location that survives a killed step, and a rerun resumes from
the newest readable one. A checkpoint holds everything the rest of the run depends on (model,
optimizer, scheduler, the shuffling/augmentation generator, the global RNGs, history, best
score and best weights), so a resumed run ends with the same weights as an uninterrupted one.
The kept checkpoints are also linked into the artifact's ``checkpoints/``.
"""

from __future__ import annotations

import logging
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
from tlops.training.checkpoints import Checkpoints
from tlops.training.distributed import epoch_batches
from tlops.training.runtime import Runtime, to_device

log = logging.getLogger(__name__)


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
    return ValScorer(split, batch_size, cache_bytes=0)(clf)


class ValScorer:
    """Scores a validation split, keeping its prepared batches (token ids, resized pixels) up to
    ``cache_bytes``: with ``train.eval_every`` the split is scored many times per epoch, and
    preparing it (tokenising) would otherwise cost as much as the forward passes."""

    def __init__(self, split: Split, batch_size: int, cache_bytes: int = 256 << 20) -> None:
        self.split, self.batch_size, self.budget = split, batch_size, cache_bytes
        self._cache: list[tuple[dict[str, torch.Tensor], np.ndarray]] | None = None

    def _batches(self, clf: Classifier):
        if self._cache is not None:
            yield from self._cache
            return
        kept: list[tuple[dict[str, torch.Tensor], np.ndarray]] = []
        size = 0
        for idx in batches_for(clf.backbone, self.split.x, self.batch_size):
            inputs = clf.backbone.prepare(_take(self.split.x, idx))
            size += sum(t.numel() * t.element_size() for t in inputs.values())
            if size <= self.budget:
                kept.append((inputs, idx))
            yield inputs, idx
        if size <= self.budget:
            self._cache = kept

    @torch.inference_mode()
    def __call__(self, clf: Classifier) -> dict[str, float]:
        clf.eval()
        dev = next(clf.parameters()).device
        loss, correct = torch.zeros((), device=dev), torch.zeros((), dtype=torch.long, device=dev)  # no per-batch sync
        for inputs, idx in self._batches(clf):
            logits = clf(**to_device(inputs, dev)).float()
            y = torch.from_numpy(self.split.y[idx]).to(dev)
            loss += F.cross_entropy(logits, y, reduction="sum")
            correct += (logits.argmax(1) == y).sum()
        n = max(len(self.split), 1)
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
    runtime: Runtime | None = None,
) -> list[dict[str, Any]]:
    """Train ``clf`` in place (left on the CPU, in eval mode, with the best epoch's weights);
    ``runtime``: where and how (default: built from ``cfg``, a single process)."""
    from tlops.training.partial import L2SP, param_groups, unfreeze_plan

    t_start = time.perf_counter()  # step evaluations are timed from here (time to accuracy)
    rt = runtime or Runtime.from_config(cfg)
    g = torch.Generator().manual_seed(seed)
    rt.apply_threads()  # unset: the usable CPUs (torch's all-cores default collapses on busy cores)
    rt.prepare(clf)
    frozen = freeze_blocks(clf, frozen_k)
    l2sp = L2SP(clf.backbone, cfg.l2sp) if cfg.l2sp else None
    # explicit per-group lr (layer decay) and weight decay; fused kernel where available (much faster step on CPU)
    opt = torch.optim.AdamW(param_groups(clf, cfg), **rt.adamw_kwargs())
    trainable = clf.backbone.blocks()[frozen_k:]
    plan = unfreeze_plan(trainable, cfg.epochs) if cfg.gradual_unfreeze else {}
    locked = [b for blocks in plan.values() for b in blocks]  # not yet unfrozen (gradual unfreezing)
    for b in locked:
        b.requires_grad_(False)
    steps_per_epoch = max(1, -(-len(train) // cfg.batch_size))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs * steps_per_epoch)
    ckpts = Checkpoints(rt, out_dir, name, cfg.epochs)
    history: list[dict[str, Any]] = []
    best: tuple[float, float] | None = None
    best_state, best_epoch, best_step, start, stale, stopped = None, 0, 0, 0, 0, False
    scorer = ValScorer(val, cfg.batch_size * 2) if val is not None and len(val) else None
    if (ckpt := ckpts.load()) is not None:
        clf.load_state_dict(ckpt["model"])
        if ckpt.get("optimizer") is not None:  # None in the loop's last checkpoint
            opt.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scheduler") is not None:
            sched.load_state_dict(ckpt["scheduler"])
        g.set_state(ckpt["generator"])
        start, history, best_epoch = int(ckpt["epoch"]), list(ckpt["history"]), int(ckpt["best_epoch"])
        best = tuple(ckpt["best"]) if ckpt.get("best") is not None else None  # type: ignore[assignment]
        best_state = ckpt["best_state"] if ckpt.get("best_state") is not None else ckpt["model"]
        best_step, stale, stopped = int(ckpt.get("best_step", 0)), int(ckpt.get("stale", 0)), bool(ckpt.get("stopped"))
        for e in range(1, start + 1):  # gradual unfreezing up to the resumed epoch
            for b in plan.get(e, []):
                b.requires_grad_(True)
                locked.remove(b)
    image = clf.backbone.modality == "image"

    def consider(rec: dict[str, Any], epoch: int, step: int) -> bool:
        """Keep the weights if this evaluation is the best so far; True when patience ran out."""
        nonlocal best, best_epoch, best_step, best_state, stale
        score = (rec.get("val_acc", rec.get("train_acc", 0.0)), -rec.get("val_loss", rec.get("train_loss", 0.0)))
        if best is None or score > best:
            best, best_epoch, best_step, stale = score, epoch, step, 0
            best_state = {k: v.detach().clone() for k, v in clf.state_dict().items()}
        else:
            stale += 1
        # every rank stops together (BatchNorm buffers may differ between ranks, and so their scores)
        return bool(cfg.patience) and rt.all_reduce_sum(torch.tensor(float(stale >= cfg.patience)))[0] > 0

    for epoch in range(start + 1, cfg.epochs + 1):
        if stopped:
            break
        t0 = time.perf_counter()
        for b in plan.get(epoch, []):
            b.requires_grad_(True)
            locked.remove(b)
        set_train_mode(clf, frozen + locked)
        if epoch == start + 1 or plan.get(epoch):
            model = rt.wrap(clf)  # DDP when distributed (re-wrapped when the trainable set changes)
        perm = torch.randperm(len(train), generator=g).numpy()
        tot_loss, tot_correct, seen = torch.zeros((), device=rt.device), torch.zeros((), device=rt.device), 0
        batches = epoch_batches(
            train.x, perm, cfg.batch_size, bucket=not image, generator=g, rank=rt.rank, world=rt.world
        )  # text: length-grouped batches
        evals: list[dict[str, Any]] = []
        with rt.task(f"{name} epoch {epoch}/{cfg.epochs}", total=len(batches)) as bar:
            for i, idx in enumerate(batches, start=1):
                inputs = clf.backbone.prepare(_take(train.x, idx))
                if image and cfg.augment:
                    inputs["pixel_values"] = _shift(inputs["pixel_values"], g)
                inputs = rt.to_device(inputs)
                y = rt.put(torch.from_numpy(train.y[idx]))
                with rt.autocast():
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
                bar.advance()
                step = (epoch - 1) * steps_per_epoch + i
                if scorer is not None and cfg.eval_every and step % cfg.eval_every == 0 and i < len(batches):
                    ev = {"step": step, **scorer(clf), "seconds": round(time.perf_counter() - t_start, 3)}
                    evals.append(ev)
                    stopped = consider(ev, epoch, step)
                    set_train_mode(clf, frozen + locked)
                    if stopped:
                        break
        tl, tc, n_seen = rt.all_reduce_sum(tot_loss, tot_correct, torch.tensor(float(seen)))  # over DDP ranks
        rec: dict[str, Any] = {"epoch": epoch, "train_loss": tl / max(n_seen, 1), "train_acc": tc / max(n_seen, 1)}
        end_step = (epoch - 1) * steps_per_epoch + len(batches)
        if stopped:  # mid-epoch: these weights were just scored, and that evaluation is the epoch's
            rec |= {k: v for k, v in evals.pop().items() if k != "seconds"}
        else:
            if scorer is not None:
                rec |= scorer(clf)
            stopped = consider(rec, epoch, end_step)
        rec["seconds"] = round(time.perf_counter() - t0, 3)
        if evals:
            rec["evals"] = evals
        history.append(rec)
        current = best_epoch == epoch and best_step == end_step  # then "model" holds the best weights
        ckpts.save(
            epoch,
            {
                "model": clf.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "generator": g.get_state(),
                "history": history,
                "best": list(best) if best is not None else None,
                "best_epoch": best_epoch,
                "best_step": best_step,
                "stale": stale,
                "stopped": stopped,
                # the best weights, unless they are this epoch's end (then "model" holds them)
                "best_state": None if current else best_state,
            },
            final=stopped,
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
        rt.report(name, rec)
        if stopped:
            log.info(
                "%s: stopped early after %d evaluations without improvement (train.patience); best: epoch %d, step %d",
                name,
                stale,
                best_epoch,
                best_step,
            )
    ckpts.export(out_dir / "checkpoints")
    clf.load_state_dict(best_state)
    clf.to("cpu")
    clf.eval()
    return history

"""Partial fine-tuning tools: where to cut (``freeze_blocks: auto``), layer-wise LR decay as
explicit param-group learning rates, gradual unfreezing, and L2-SP toward the pretrained weights.

``auto`` cut: the backbone's blocks are probed one by one. Each block's output is pooled to a
vector (mean over space for CNNs, masked mean over tokens for transformers), a linear probe is
fit on the train split and scored on validation; the blocks up to the best-probing one are
frozen (they already carry the features the target needs), the rest are fine-tuned. The cut
never freezes the last block (that would be a linear probe, which is its own strategy).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from torch import nn

from tlops.config import TrainConfig
from tlops.data.dataset import Split
from tlops.models.bundle import Classifier
from tlops.training.runtime import Runtime

log = logging.getLogger(__name__)


# ------------------------------------------------------------------ per-block features


def _pool(out: Any, mask: torch.Tensor | None) -> torch.Tensor:
    t = out[0] if isinstance(out, (tuple, list)) else getattr(out, "last_hidden_state", out)
    if t.ndim == 4:  # B,C,H,W
        return t.mean((2, 3))
    if t.ndim == 3:  # B,T,H (tokens)
        if mask is not None and mask.shape[:2] == t.shape[:2]:
            m = mask.unsqueeze(-1).to(t.dtype)
            return (t * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return t.mean(1)
    return t.flatten(1)


@torch.inference_mode()
def block_features(
    clf: Classifier, x: Any, batch_size: int = 64, *, runtime: Runtime | None = None
) -> list[np.ndarray]:
    """Pooled output of every backbone block for the inputs ``x``: one (N, D_k) array per block,
    computed on the runtime's device (default: CPU), where the classifier is left."""
    from tlops.features.extract import batches_for

    rt = runtime or Runtime()

    blocks = clf.backbone.blocks()
    n = len(x)
    outs: list[np.ndarray | None] = [None] * len(blocks)
    cur: dict[str, Any] = {}

    def hook(i: int):
        def fn(_m: nn.Module, _inp: Any, out: Any) -> None:
            v = _pool(out, cur.get("mask")).float().cpu().numpy()
            if outs[i] is None:
                outs[i] = np.zeros((n, v.shape[1]), dtype=np.float32)
            outs[i][cur["idx"]] = v

        return fn

    handles = [b.register_forward_hook(hook(i)) for i, b in enumerate(blocks)]
    was = clf.training
    clf.eval()
    rt.prepare(clf)
    try:
        for idx in batches_for(clf.backbone, x, batch_size):
            xb = x[idx] if isinstance(x, np.ndarray) else [x[i] for i in idx]
            tensors = rt.to_device(clf.backbone.prepare(xb))
            cur.update(idx=idx, mask=tensors.get("attention_mask"))
            with rt.autocast():
                clf.backbone(**tensors)
    finally:
        for h in handles:
            h.remove()
        clf.train(was)
    return [o if o is not None else np.zeros((n, 0), np.float32) for o in outs]


def choose_freeze_blocks(
    clf: Classifier,
    train: Split,
    val: Split | None,
    cfg: TrainConfig,
    seed: int,
    cached: list[tuple[np.ndarray, np.ndarray]] | None = None,
    *,
    runtime: Runtime | None = None,
) -> tuple[int, list[dict[str, Any]]]:
    """``freeze_blocks: auto``: probe each block on validation; freeze up to the best one.

    Returns (K, per-block scores). Without a validation split the train accuracy of the probe
    is used (and logged as such). ``cached`` = per-block (train, val) features, if known.
    """
    from tlops.training.probe import train_probe

    n_blocks = len(clf.backbone.blocks())
    if cached is None:
        bs = cfg.batch_size * 2
        tr = block_features(clf, train.x, bs, runtime=runtime)
        va = block_features(clf, val.x, bs, runtime=runtime) if val is not None and len(val) else [None] * n_blocks
        cached = list(zip(tr, va, strict=True))
    quick = cfg.model_copy(update={"probe_c": [1.0], "probe_scaling": "standardize"})  # one fit per block
    scores: list[dict[str, Any]] = []
    for i, (ft, fv) in enumerate(cached):
        if ft.shape[1] == 0:
            scores.append({"block": i, "score": None})
            continue
        n_cls = int(train.y.max()) + 1
        yv = val.y if fv is not None else None
        _, hist = train_probe(ft, train.y, fv, yv, n_cls, quick, seed, runtime=runtime, name=f"block-probe {i}")
        key = "val_acc" if fv is not None else "train_acc"
        best = max(h[key] for h in hist)
        scores.append({"block": i, "score": round(float(best), 4), "on": key.removesuffix("_acc")})
    valid = [s for s in scores if s["score"] is not None]
    best_block = max(valid, key=lambda s: (s["score"], -s["block"]))["block"] if valid else -1
    k = min(best_block + 1, n_blocks - 1)
    log.info(
        "freeze_blocks auto: block probe scores %s -> freezing the first %d of %d blocks",
        [s["score"] for s in scores],
        k,
        n_blocks,
    )
    return max(k, 0), scores


# ------------------------------------------------------------------ optimisation


def param_groups(clf: Classifier, cfg: TrainConfig) -> list[dict[str, Any]]:
    """AdamW param groups with explicit learning rates.

    With ``layer_decay`` d, block i of n gets ``lr * d**(n - i)`` (the last block ``lr * d``,
    parameters outside the blocks such as a final norm ``lr``); the head gets ``head_lr``.
    The rates are set on the groups themselves, so any torch scheduler scales them correctly.
    With ``l2sp`` > 0, weight decay applies to the head only (L2-SP regularises the backbone).
    """
    head_lr = cfg.head_lr or cfg.lr * 10
    body_wd = 0.0 if cfg.l2sp else cfg.weight_decay
    blocks = clf.backbone.blocks()
    n = len(blocks)
    in_blocks: set[int] = set()
    groups: list[dict[str, Any]] = []
    for i, b in enumerate(blocks):
        ps = [p for p in b.parameters() if p.requires_grad]
        in_blocks |= {id(p) for p in b.parameters()}
        if ps:
            scale = cfg.layer_decay ** (n - i) if cfg.layer_decay else 1.0
            groups.append({"params": ps, "lr": cfg.lr * scale, "weight_decay": body_wd, "name": f"block{i}"})
    rest = [p for p in clf.backbone.parameters() if p.requires_grad and id(p) not in in_blocks]
    if rest:
        groups.append({"params": rest, "lr": cfg.lr, "weight_decay": body_wd, "name": "backbone-rest"})
    groups.append(
        {"params": list(clf.head.parameters()), "lr": head_lr, "weight_decay": cfg.weight_decay, "name": "head"}
    )
    return groups


class L2SP:
    """``alpha/2 * ||w - w0||^2`` over the trainable backbone weights (Li et al., 2018)."""

    def __init__(self, backbone: nn.Module, alpha: float):
        self.alpha = alpha
        self.ref = {n: p.detach().clone() for n, p in backbone.named_parameters() if p.requires_grad}
        self.backbone = backbone

    def penalty(self) -> torch.Tensor:
        total = torch.zeros(())
        for n, p in self.backbone.named_parameters():
            if n in self.ref and p.requires_grad:
                total = total + (p - self.ref[n]).pow(2).sum()
        return 0.5 * self.alpha * total


def unfreeze_plan(trainable: list[nn.Module], epochs: int) -> dict[int, list[nn.Module]]:
    """Gradual unfreezing (ULMFiT): epoch 1 trains the head only; epoch e unfreezes the
    (e-1)-th block from the top. With fewer epochs than blocks + 1, the lowest blocks never
    unfreeze (logged), which is what the schedule means; nothing is crammed into the last epoch."""
    plan = {j + 2: [block] for j, block in enumerate(reversed(trainable))}
    never = len([e for e in plan if e > epochs])
    if never:
        log.info(
            "gradual_unfreeze: %d epochs open only the top %d of %d trainable blocks",
            epochs,
            len(trainable) - never,
            len(trainable),
        )
    return plan

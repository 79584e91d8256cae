"""Linear probe: a softmax-regression head trained full-batch on cached features.

Features are standardised with train statistics during training and the scaling is folded
back into the head, so the saved head works on raw backbone features. Early stopping keeps
the epoch with the best validation accuracy (ties: lower validation loss).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tlops.config import TrainConfig
from tlops.training.runtime import Runtime

log = logging.getLogger(__name__)


def train_probe(
    f_train: np.ndarray,
    y_train: np.ndarray,
    f_val: np.ndarray | None,
    y_val: np.ndarray | None,
    num_classes: int,
    cfg: TrainConfig,
    seed: int,
    *,
    runtime: Runtime | None = None,
    name: str = "linear-probe",
) -> tuple[nn.Linear, list[dict[str, Any]]]:
    """The head (on the CPU) and the per-epoch history; ``runtime``: where it trains (default: CPU)."""
    rt = runtime or Runtime()
    rt.apply_threads()
    torch.manual_seed(seed)
    xt, yt = torch.from_numpy(f_train).float(), torch.from_numpy(y_train).long()
    mean, std = xt.mean(0), xt.std(0)
    std = std.clamp(min=0.05 * float(std.mean()) + 1e-8)  # near-constant features must not get huge weights
    xt, yt = rt.put((xt - mean) / std), rt.put(yt)  # standardised on the host, trained on the device
    has_val = f_val is not None and len(f_val) > 0
    if has_val:
        xv, yv = rt.put((torch.from_numpy(f_val).float() - mean) / std), rt.put(torch.from_numpy(y_val).long())
    head = rt.prepare(nn.Linear(xt.shape[1], num_classes))
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.probe_lr, weight_decay=cfg.weight_decay)
    best: tuple[float, float] | None = None
    best_state, history, bad = None, [], 0
    for epoch in range(1, cfg.probe_epochs + 1):
        head.train()
        opt.zero_grad()
        loss = F.cross_entropy(head(xt), yt)
        loss.backward()
        opt.step()
        with torch.no_grad():
            head.eval()
            rec = {
                "epoch": epoch,
                "train_loss": float(loss),
                "train_acc": float((head(xt).argmax(1) == yt).float().mean()),
            }
            if has_val:
                lv = head(xv)
                rec |= {
                    "val_loss": float(F.cross_entropy(lv, yv)),
                    "val_acc": float((lv.argmax(1) == yv).float().mean()),
                }
                score = (rec["val_acc"], -rec["val_loss"])
            else:
                score = (rec["train_acc"], -rec["train_loss"])
        history.append(rec)
        rt.report(name, rec)
        if best is None or score > best:
            best, bad = score, 0
            best_state = {k: v.clone() for k, v in head.state_dict().items()}
        else:
            bad += 1
            if bad >= cfg.patience:
                log.info("%s: early stop at epoch %d (best val acc %.4f)", name, epoch, best[0])
                break
    head.load_state_dict(best_state)
    # fold standardisation into the layer: W (x - m)/s + b = (W/s) x + (b - W m/s)
    out = nn.Linear(xt.shape[1], num_classes)
    head.to("cpu")
    with torch.no_grad():
        w = head.weight / std
        out.weight.copy_(w)
        out.bias.copy_(head.bias - (w * mean).sum(1))
    return out, history

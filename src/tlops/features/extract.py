"""Batched, inference-mode feature extraction with progress.

Text batches are sorted by length so that dynamic padding wastes little compute; results
are returned in the original order.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from tlops import progress

log = logging.getLogger(__name__)

# Counts backbone forward passes in this process (tests use it to prove cache hits skip the model).
STATS = {"backbone_batches": 0, "backbone_items": 0}


def row_order(modality: str, x: Any) -> np.ndarray:
    """The order rows are batched in: text by length (little padding), images as given."""
    if modality == "text":
        return np.argsort([len(t) for t in x], kind="stable")
    return np.arange(len(x))


def batches_for(backbone: nn.Module, x: Any, batch_size: int) -> list[np.ndarray]:
    order = row_order(getattr(backbone, "modality", "image"), x)
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def shard_rows(modality: str, x: Any, batch_size: int, shard: int, shards: int) -> np.ndarray:
    """The rows of shard ``shard`` of ``shards``: a contiguous run of whole batches of
    :func:`batches_for`'s order. Extracting them alone makes the same batches (the run is already
    in that order, and a stable sort keeps it), so the features are bit-identical to one pass."""
    order = row_order(modality, x)
    n_batches = -(-len(order) // batch_size)
    lo, hi = (n_batches * shard) // shards, (n_batches * (shard + 1)) // shards
    return order[lo * batch_size : hi * batch_size]


@torch.inference_mode()
def extract(backbone: nn.Module, x: Any, batch_size: int = 64, desc: str = "extract") -> np.ndarray:
    backbone.eval()
    # the batches follow the backbone (a GPU after training there); a backbone without
    # parameters (a fixed transform) runs where its inputs are made: the CPU
    first = next(backbone.parameters(), None)
    dev = first.device if first is not None else torch.device("cpu")
    n = len(x)
    out = np.zeros((n, backbone.feature_dim), dtype=np.float32)
    t0 = time.perf_counter()
    with progress.task(desc, total=n) as bar:
        for idx in batches_for(backbone, x, batch_size):
            xb = x[idx] if isinstance(x, np.ndarray) else [x[i] for i in idx]
            tensors = backbone.prepare(xb)
            if dev.type != "cpu":
                tensors = {k: v.to(dev, non_blocking=True) for k, v in tensors.items()}
            out[idx] = backbone(**tensors).float().cpu().numpy()
            STATS["backbone_batches"] += 1
            STATS["backbone_items"] += len(idx)
            bar.advance(len(idx))
    dt = time.perf_counter() - t0
    log.info("%s: %d items in %.2fs (%.1f items/s)", desc, n, dt, n / dt if dt else float("inf"))
    return out

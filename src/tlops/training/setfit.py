"""SetFit-style few-shot text classification (Tunstall et al., 2022), without the setfit package.

1. Contrastive fine-tuning of the sentence encoder on pairs built from the few labelled
   examples: same label -> cosine target 1, different labels -> 0 (CosineSimilarityLoss).
   With 8 labels per class and 2 classes there are only 16 texts but 120 pairs, which is
   why this works where fine-tuning on 16 texts overfits.
2. A linear head (the usual probe, standardisation folded in) on the tuned embeddings.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from tlops.config import SetFitConfig
from tlops.data.dataset import Split
from tlops.errors import ConfigError
from tlops.models.bundle import Classifier
from tlops.training.checkpoints import Checkpoints
from tlops.training.runtime import Runtime

log = logging.getLogger(__name__)


def make_pairs(y: np.ndarray, pairs_per_sample: int, rng: np.random.Generator) -> np.ndarray:
    """(i, j, target) rows: for every sample, ``pairs_per_sample`` positives and as many negatives."""
    rows = []
    by_class = {c: np.flatnonzero(y == c) for c in np.unique(y)}
    for i, c in enumerate(y):
        same = by_class[c][by_class[c] != i]
        other = np.flatnonzero(y != c)
        for _ in range(pairs_per_sample):
            if len(same):
                rows.append((i, int(rng.choice(same)), 1.0))
            if len(other):
                rows.append((i, int(rng.choice(other)), 0.0))
    out = np.array(rows, dtype=np.float64)
    return out[rng.permutation(len(out))]


def contrastive_tune(
    clf: Classifier,
    train: Split,
    cfg: SetFitConfig,
    seed: int,
    *,
    runtime: Runtime | None = None,
    checkpoints: Checkpoints | None = None,
) -> list[dict[str, Any]]:
    """Tune ``clf.backbone`` in place on label pairs (left on the runtime's device); returns the
    per-epoch loss history. ``runtime``: where it trains (default: CPU); ``checkpoints``:
    per-epoch, to resume from."""
    if clf.backbone.modality != "text":
        raise ConfigError("train.strategies: setfit needs a sentence encoder (hf:...); for images use fine-tune")
    rt = runtime or Runtime()
    rt.apply_threads()
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    pairs = make_pairs(train.y, cfg.pairs_per_sample, rng)
    rt.prepare(clf)
    opt = torch.optim.AdamW([p for p in clf.backbone.parameters() if p.requires_grad], lr=cfg.lr)
    texts = list(train.x)
    history: list[dict[str, Any]] = []
    start = 0
    if checkpoints is not None and (ckpt := checkpoints.load()) is not None:
        clf.load_state_dict(ckpt["model"])
        if ckpt.get("optimizer") is not None:  # None in the loop's last checkpoint
            opt.load_state_dict(ckpt["optimizer"])
        start, history = int(ckpt["epoch"]), list(ckpt["history"])
    clf.backbone.train()
    for epoch in range(start + 1, cfg.epochs + 1):
        t0, total = time.perf_counter(), 0.0
        starts = range(0, len(pairs), cfg.batch_size)
        with rt.task(f"setfit epoch {epoch}/{cfg.epochs}", total=len(starts)) as bar:
            for b in starts:
                batch = pairs[b : b + cfg.batch_size]
                idx = np.unique(batch[:, :2].astype(int))
                pos = {int(i): k for k, i in enumerate(idx)}
                with rt.autocast():
                    emb = clf.backbone(**rt.to_device(clf.backbone.prepare([texts[i] for i in idx]))).float()
                a = emb[[pos[int(i)] for i in batch[:, 0]]]
                bb = emb[[pos[int(j)] for j in batch[:, 1]]]
                target = rt.put(torch.from_numpy(batch[:, 2]).float())
                loss = F.mse_loss(F.cosine_similarity(a, bb), target)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.item() * len(batch)
                bar.advance()
        rec = {
            "epoch": epoch,
            "pair_loss": total / len(pairs),
            "pairs": len(pairs),
            "seconds": round(time.perf_counter() - t0, 3),
        }
        history.append(rec)
        if checkpoints is not None:
            checkpoints.save(epoch, {"model": clf.state_dict(), "optimizer": opt.state_dict(), "history": history})
        log.info(
            "setfit epoch %d/%d: %d pairs, cosine loss %.4f (%.1fs)",
            epoch,
            cfg.epochs,
            len(pairs),
            rec["pair_loss"],
            rec["seconds"],
        )
        rt.report("setfit", rec)
    clf.backbone.eval()
    return history

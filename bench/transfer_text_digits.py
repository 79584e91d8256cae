"""Settings 3 and 4 of bench/transfer_text.py on digits: stacking two source CNNs vs each alone vs a probability
ensemble, and source selection (LogME vs the accuracy each candidate actually reaches)."""

from __future__ import annotations

import copy
import math
import statistics
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from common import SHARED_DATA, timed
from torch import nn
from transfer_text_encoder import clf_acc, head_acc

from tlops.config import TrainConfig
from tlops.data.dataset import Split
from tlops.features.extract import extract
from tlops.features.selection import logme, rank_sources
from tlops.models.backbone import ImageBackbone
from tlops.models.bundle import Classifier
from tlops.models.ensemble import ProbaEnsemble
from tlops.models.stack import StackBackbone
from tlops.training.finetune import fine_tune
from tlops.training.probe import train_probe

# --------------------------------------------------------------------------- settings 3+4: digits stacking & selection


class LeNetFeatures(nn.Sequential):
    """LeNet-style CNN with BatchNorm (as in bench/transfer.py): (N,1,28,28) -> 500-d features."""

    num_features = 500

    def __init__(self) -> None:
        super().__init__(
            nn.Sequential(nn.Conv2d(1, 20, 5), nn.BatchNorm2d(20), nn.ReLU(), nn.MaxPool2d(2)),
            nn.Sequential(nn.Conv2d(20, 50, 5), nn.BatchNorm2d(50), nn.ReLU(), nn.MaxPool2d(2)),
            nn.Sequential(nn.Flatten(), nn.Linear(50 * 4 * 4, 500), nn.BatchNorm1d(500), nn.ReLU(), nn.Dropout(0.5)),
        )


def lenet_backbone() -> ImageBackbone:
    pre = {
        "modality": "image",
        "image_size": 28,
        "in_chans": 1,
        "mean": [0.5],
        "std": [0.5],
        "interpolation": "bilinear",
    }
    return ImageBackbone(LeNetFeatures(), "lenet-bn", {}, pre)


def _usps_to_mnist_layout(x: np.ndarray) -> np.ndarray:
    t = torch.from_numpy(x).float().unsqueeze(1)
    t = F.interpolate(t, size=(20, 20), mode="bilinear", align_corners=False).clamp_(0, 255)
    return F.pad(t, (4, 4, 4, 4)).squeeze(1).round().to(torch.uint8).numpy()


def _to_gray28(x: np.ndarray) -> np.ndarray:
    """RGB photos -> 28x28 grayscale uint8 once, with the backbone's own preprocessing (channel mean, antialiased
    resize)."""
    t = lenet_backbone().prepare(x)["pixel_values"]
    return t.squeeze(1).mul(255).round().clamp(0, 255).to(torch.uint8).numpy()


def digits_data() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    m = np.load(SHARED_DATA / "mnist" / "mnist_subset.npz", allow_pickle=False)
    u = np.load(SHARED_DATA / "usps" / "usps.npz", allow_pickle=False)
    h = np.load(SHARED_DATA / "hymenoptera" / "hymenoptera_64.npz", allow_pickle=False)
    mx, my = m["x_test"], m["y_test"]
    ux, uy = u["x_train"], u["y_train"]
    lo_m, hi_m, lo_u = my < 5, my >= 5, uy < 5
    return {
        "mnist-0-4": (mx[lo_m], my[lo_m]),
        "usps-0-4": (_usps_to_mnist_layout(ux[lo_u]), uy[lo_u]),
        "ants-bees": (
            _to_gray28(np.concatenate([h["x_train"], h["x_val"]])),
            np.concatenate([h["y_train"], h["y_val"]]),
        ),
        "target": (mx[hi_m], my[hi_m] - 5),
    }


CANDIDATES = ["random-init", "ants-bees", "usps-0-4", "mnist-0-4"]


def _train_source(
    name: str, data: dict[str, Any], seed: int, hp: dict[str, Any], threads: int
) -> tuple[ImageBackbone, dict[str, Any]]:
    torch.manual_seed(seed * 100 + CANDIDATES.index(name))
    bb = lenet_backbone()
    if name == "random-init":
        return bb, {"seconds": 0.0, "cpu_seconds": 0.0, "other_cpu": None, "source_val_acc": None}
    x, y = data[name]
    perm = np.random.default_rng(seed).permutation(len(y))
    n_val = len(y) // 10
    val, tr = perm[:n_val], perm[n_val:]
    bs = 64
    epochs = max(1, math.ceil(hp["digits_source_steps"] / math.ceil(len(tr) / bs)))
    clf = Classifier(bb, int(y.max()) + 1)
    cfg = TrainConfig(
        threads=threads, epochs=epochs, batch_size=bs, lr=hp["digits_lr"], head_lr=hp["digits_lr"], augment=True
    )
    with tempfile.TemporaryDirectory(prefix="tlops-bench-") as tmp:
        train, val_split = Split(x[tr], y[tr]), Split(x[val], y[val])
        hist, dt, other, cpu = timed(
            fine_tune, clf, train, val_split, cfg, seed, Path(tmp), frozen_k=0, name=f"source {name}"
        )
    best = max(hist, key=lambda h: (h["val_acc"], -h["val_loss"]))
    clf.eval()
    return clf.backbone, {
        "seconds": dt,
        "cpu_seconds": cpu,
        "other_cpu": other,
        "source_val_acc": best["val_acc"],
        "epochs": epochs,
        "n_train": len(tr),
    }


def run_digits(seeds: list[int], hp: dict[str, Any], threads: int) -> dict[str, Any]:
    """Per seed: train the candidate source CNNs, then selection rows per candidate and the stacking rows."""
    from scipy.stats import kendalltau, spearmanr

    data = digits_data()
    tx, ty = data["target"]
    stack_runs: dict[str, list[dict[str, Any]]] = {
        m: [] for m in ["usps-0-4 probe", "mnist-0-4 probe", "stacked (usps+mnist)", "ensemble (prob. average)"]
    }
    sel_runs: list[dict[str, Any]] = []
    sources: dict[str, list[dict[str, Any]]] = {c: [] for c in CANDIDATES}
    sizes: dict[str, Any] = {}
    k = hp["digits_shots"]
    for seed in seeds:
        rng = np.random.default_rng(seed)
        perm = rng.permutation(len(ty))
        tr = np.concatenate([perm[ty[perm] == c][:k] for c in range(5)])
        rest = np.setdiff1d(perm, tr, assume_unique=True)
        te = rng.permutation(rest)[: hp["digits_test"]]
        sizes = {
            "target_train": len(tr),
            "target_test": len(te),
            **{f"source {n}": int(len(data[n][1]) - len(data[n][1]) // 10) for n in CANDIDATES if n in data},
        }
        xtr, ytr, xte, yte = tx[tr], ty[tr], tx[te], ty[te]
        backbones: dict[str, ImageBackbone] = {}
        for c in CANDIDATES:
            bb, info = _train_source(c, data, seed, hp, threads)
            backbones[c] = bb
            sources[c].append({"seed": seed, **info})
            print(
                f"[digits] seed {seed} source {c:12s} trained in {info['seconds']:.0f}s (source val "
                f"{info['source_val_acc']})",
                flush=True,
            )
        # -------- per-candidate features, probes, LogME, fine-tune
        feats: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        cand_rows = []
        for i, c in enumerate(CANDIDATES):
            (ftr, fte), dt_feat, _, _ = timed(_features, backbones[c], xtr, xte, c)
            feats[c] = (ftr, fte)
            (head, _), dt_p, other_p, cpu_p = timed(train_probe, ftr, ytr, None, None, 5, TrainConfig(), seed)
            score, dt_l, _, _ = timed(logme, ftr, ytr)
            clf = Classifier(copy.deepcopy(backbones[c]), 5)
            clf.head.load_state_dict(head.state_dict())
            cfg = TrainConfig(
                threads=threads,
                epochs=hp["digits_ft_epochs"],
                batch_size=16,
                lr=hp["digits_ft_lr"],
                head_lr=hp["digits_ft_lr"] * 10,
                augment=True,
            )
            with tempfile.TemporaryDirectory(prefix="tlops-bench-") as tmp:
                _, dt_ft, other_ft, cpu_ft = timed(
                    fine_tune, clf, Split(xtr, ytr), None, cfg, seed, Path(tmp), frozen_k=0, name=f"ft {c}"
                )
            row = {
                "index": i,
                "source": c,
                "score": score,
                "logme_seconds": dt_l,
                "probe_acc": head_acc(head, fte, yte),
                "probe_seconds": dt_p + dt_feat,
                "ft_acc": clf_acc(clf, xte, yte),
                "ft_seconds": dt_ft,
                "other_cpu": other_ft,
                "cpu_seconds": cpu_ft,
            }
            cand_rows.append(row)
            print(
                f"[digits] seed {seed} candidate {c:12s} LogME {score:7.4f} probe {row['probe_acc'] * 100:5.1f} "
                f"fine-tune {row['ft_acc'] * 100:5.1f}",
                flush=True,
            )
        ranked = rank_sources([dict(r) for r in cand_rows])
        rank_of = {r["source"]: r["rank"] for r in ranked}
        scores = [r["score"] for r in cand_rows]
        corr = {}
        for key in ("probe_acc", "ft_acc"):
            accs = [r[key] for r in cand_rows]
            corr[key] = {
                "spearman": float(spearmanr(scores, accs).statistic),
                "kendall": float(kendalltau(scores, accs).statistic),
                "top_ranked_is_best": ranked[0]["source"] == max(cand_rows, key=lambda r: r[key])["source"],
                "best": max(cand_rows, key=lambda r: r[key])["source"],
            }
        sel_runs.append(
            {
                "seed": seed,
                "candidates": [{**r, "rank": rank_of[r["source"]]} for r in cand_rows],
                "top_ranked": ranked[0]["source"],
                "correlation": corr,
            }
        )
        # -------- stacking
        singles = {}
        for c in ("usps-0-4", "mnist-0-4"):
            (head, _), dt, other, cpu = timed(train_probe, feats[c][0], ytr, None, None, 5, TrainConfig(), seed)
            clf = Classifier(backbones[c], 5)
            clf.head.load_state_dict(head.state_dict())
            singles[c] = clf
            stack_runs[f"{c} probe"].append(
                {
                    "seed": seed,
                    "acc": head_acc(head, feats[c][1], yte),
                    "seconds": dt,
                    "other_cpu": other,
                    "cpu_seconds": cpu,
                }
            )
        stack = StackBackbone([backbones["usps-0-4"], backbones["mnist-0-4"]])
        st_clf, dt, other, cpu = timed(_stacked_probe, stack, xtr, ytr, seed)
        stack_runs["stacked (usps+mnist)"].append(
            {
                "seed": seed,
                "acc": clf_acc(st_clf, xte, yte),
                "seconds": dt,
                "other_cpu": other,
                "cpu_seconds": cpu,
                "feature_dim": stack.feature_dim,
            }
        )
        ens = ProbaEnsemble([singles["usps-0-4"], singles["mnist-0-4"]])
        proba, dt, other, cpu = timed(ens.predict_proba, xte, batch_size=256)
        stack_runs["ensemble (prob. average)"].append(
            {
                "seed": seed,
                "acc": float((proba.argmax(1) == yte).mean()),
                "seconds": dt,
                "other_cpu": other,
                "cpu_seconds": cpu,
            }
        )
        print(
            f"[digits] seed {seed} stacking: "
            + ", ".join(f"{m} {v[-1]['acc'] * 100:.1f}" for m, v in stack_runs.items()),
            flush=True,
        )
    return {"tasks": {"stacking": stack_runs}, "selection": sel_runs, "sources": sources, "sizes": sizes}


def _features(bb: ImageBackbone, xtr: np.ndarray, xte: np.ndarray, desc: str) -> tuple[np.ndarray, np.ndarray]:
    return extract(bb, xtr, 256, desc=desc), extract(bb, xte, 256, desc=desc)


def _stacked_probe(stack: StackBackbone, xtr: np.ndarray, ytr: np.ndarray, seed: int) -> Classifier:
    """One probe head on the concatenated features of the stacked sources."""
    f_tr = extract(stack, xtr, 256, desc="stack")
    head, _ = train_probe(f_tr, ytr, None, None, 5, TrainConfig(), seed)
    clf = Classifier(stack, 5)
    clf.head.load_state_dict(head.state_dict())
    return clf


def selection_summary(sel: list[dict[str, Any]]) -> dict[str, Any]:
    from scipy.stats import kendalltau, spearmanr

    if not sel:
        return {}
    names = [c["source"] for c in sel[0]["candidates"]]
    mean = {
        n: {
            k: statistics.mean(next(c[k] for c in s["candidates"] if c["source"] == n) for s in sel)
            for k in ("score", "probe_acc", "ft_acc")
        }
        for n in names
    }
    out: dict[str, Any] = {"means": mean, "ranking_by_mean_logme": sorted(names, key=lambda n: -mean[n]["score"])}
    for key in ("probe_acc", "ft_acc"):
        s, a = [mean[n]["score"] for n in names], [mean[n][key] for n in names]
        out[key] = {
            "spearman_on_means": float(spearmanr(s, a).statistic),
            "kendall_on_means": float(kendalltau(s, a).statistic),
            "spearman_per_seed": [r["correlation"][key]["spearman"] for r in sel],
            "kendall_per_seed": [r["correlation"][key]["kendall"] for r in sel],
            "top_ranked_is_best_per_seed": [r["correlation"][key]["top_ranked_is_best"] for r in sel],
            "best_by_mean": max(names, key=lambda n: mean[n][key]),
        }
    return out

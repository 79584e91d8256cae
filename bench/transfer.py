"""Digits domain adaptation benchmark: USPS -> MNIST and MNIST -> USPS with tlops.training.adaptation.

Run from the repository root:

    .venv/bin/python bench/transfer.py                  # full run: 3 seeds, both pairs, all methods
    .venv/bin/python bench/transfer.py --quick          # reduced run for the slow test (~2-3 min)
    .venv/bin/python bench/transfer.py --seeds 0 --pairs usps-mnist --methods source-only dann

Protocol (nothing here looks at target labels except the final test and the target-only
upper bound, which is trained on labelled target data disjoint from the test split):

* images: 28x28 grayscale, ``x/255`` then normalised with mean 0.5 / std 0.5.  MNIST is used
  as is.  USPS 16x16 is resized bilinearly to 20x20 and zero-padded to 28x28 (default,
  ``--usps-size 20``): MNIST digits are size-normalised to 20x20 and centred in 28x28 while
  USPS digits fill their frame, so this puts both at the same scale.  ``--usps-size 28``
  resizes USPS straight to 28x28 (the ADDA/CyCADA/TLlib protocol; a larger domain gap).
* augmentation: random translation of each image by up to 2 px, on source and (unlabelled)
  target batches (``--augment``, ``--augment-target``).
* training: SGD (momentum 0.9, lr 0.01 annealed as lr/(1+10p)^0.75), batches of 64 source +
  64 target images, 15 epochs over the source for USPS->MNIST and 11 for MNIST->USPS (about
  1,500 steps each).
* USPS -> MNIST: source = USPS train (7,291) minus a seeded 10 % held out as source
  validation; target = the 10,000 MNIST images (the official test split, the only one
  available offline) shuffled with the seed and split 5,000 unlabelled (used for adaptation)
  / 5,000 labelled target test (disjoint).
* MNIST -> USPS: source = the 10,000 MNIST images minus a seeded 10 % source validation;
  target = USPS train (7,291, unlabelled) and the labelled target test = USPS test (2,007).
* target-only (upper bound): supervised on the labelled version of the target adaptation
  split (10 % of it held out for model selection), tested on the same target test split.
* AdaBN: the source-only model with BatchNorm statistics re-estimated on the unlabelled
  target split (no training; its time is the source-only training time + the AdaBN pass).
* model: LeNet-style CNN with BatchNorm (conv5x5-20 / conv5x5-50 / fc-500 features,
  dropout 0.5, linear head), as in the TLlib digits benchmark plus BatchNorm; the same
  initial weights for every method of a seed.
* methods: source-only, AdaBN, CORAL, MMD (multi-kernel), DANN, CDAN (randomized multilinear
  map; ``cdan+e`` with entropy conditioning), ``X+ent`` = method X plus target entropy
  minimisation (``--entropy-weight``), and the target-only upper bound.
* ``shot`` (SHOT, Liang et al. 2020, official digits recipe of tim-learn/SHOT): the same LeNet trained
  source-only with label smoothing 0.1, then adapted on the unlabelled target alone with the head
  frozen: information maximisation + ``--shot-beta`` (0.1, the official digits value) x cross-entropy
  to cosine-centroid pseudo-labels recomputed every epoch; ``--shot-epochs`` (30) passes over the
  target, batch 64, SGD lr 0.01 Nesterov momentum 0.9, weight decay 1e-3, lr/(1+10p)^0.75, no target
  augmentation, the last epoch kept; its time includes the source training.
* ``dann+self-train``: the DANN model of the same seed (reused when ``dann`` is in the run), then
  ``--self-train-rounds`` rounds of pseudo-labelling the target (top probability ≥
  ``--self-train-threshold``) and ``--self-train-epochs`` epochs on source + pseudo-labelled target;
  its time includes the DANN training.
* model selection uses no target labels: by default the weights after the last epoch
  (``--select last``; the per-epoch source-validation accuracy is recorded in the JSON).

Results go to bench/results/transfer.md and transfer.json (--quick: transfer-quick.md and
transfer-quick.json, which tests/test_adaptation.py compares against).
Data are read from ../shared/data (override with TLOPS_SHARED_DATA); nothing is copied.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from common import (
    RESULTS,
    SHARED_DATA,
    below,
    epoch_printer,
    fmt_ms,
    merged_command,
    other_cpu_stats,
    per_seed_accs,
    rounded_history,
    run_info,
    run_machine,
    summarise,
    timed,
    write_report,
)
from torch import nn

from tlops.training import adaptation as da

RESULTS_DIR = RESULTS
PAIRS = {"usps-mnist": ("usps", "mnist"), "mnist-usps": ("mnist", "usps")}
ARROW = {"usps-mnist": "USPS→MNIST", "mnist-usps": "MNIST→USPS"}
# "X+ent": method X plus target entropy minimisation (weight --entropy-weight); plain names have none.
ALL_METHODS = [
    "source-only",
    "adabn",
    "coral",
    "mmd",
    "dann",
    "cdan",
    "cdan+e",
    "coral+ent",
    "mmd+ent",
    "dann+ent",
    "cdan+e+ent",
    "shot",
    "dann+self-train",
    "target-only",
]
DEFAULT_METHODS = ["source-only", "adabn", "coral", "mmd", "dann", "cdan+e", "dann+ent", "target-only"]
# About the same number of steps (~1,500 batches of 64) for both pairs: USPS 6,562 vs MNIST 9,000 source images.
EPOCHS = {"usps-mnist": 15, "mnist-usps": 11}
TARGETS = {"usps-mnist": 0.95, "mnist-usps": 0.93}
# TLlib LeNet digits numbers quoted in /work/shared/DESIGN.md "Reference numbers" (target test used
# for model selection there, so optimistic).
REFERENCE = {
    "usps-mnist": {"source-only": 74.6, "dann": 95.2, "cdan": 97.7, "target-only": 99.2},
    "mnist-usps": {"source-only": 82.1, "dann": 91.7, "cdan": 96.0, "target-only": 96.3},
}

# Training hyper-parameters shared by all methods (the CLI can override them).
DEFAULTS: dict[str, Any] = {
    "epochs": 0,  # 0: per pair, EPOCHS below
    "batch_size": 64,
    "lr": 0.01,
    "optimizer": "sgd",
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "lr_schedule": "dann",
    "select": "last",
    "augment": 2,  # max random shift in pixels (0 = no augmentation)
    "disc_hidden": 500,
    "entropy_weight": 0.1,  # for the "+ent" methods only
    "augment_target": 1,  # also shift the (unlabelled) target batches
}
TRADE_OFF = {"coral": 1.0, "mmd": 1.0, "dann": 1.0, "cdan": 1.0, "cdan+e": 1.0}
# SHOT and self-training (not in DEFAULTS: --merge compares DEFAULTS with earlier runs that predate them)
EXTRA: dict[str, Any] = {
    "shot_beta": 0.1,  # tim-learn/SHOT digits (README, digit.sh: --cls_par 0.1); 0.3 on the object benchmarks
    "shot_epochs": 30,  # passes over the target (uda_digit.py --max_epoch 30)
    "shot_weight_decay": 1e-3,  # uda_digit.py lr_scheduler
    "shot_label_smoothing": 0.1,  # of the source training (uda_digit.py --smooth 0.1)
    "self_train_rounds": 2,
    "self_train_threshold": 0.9,
    "self_train_epochs": 2,  # per round, over source + pseudo-labelled target
}
QUICK = {
    "epochs": 3,
    "n_source": 2000,
    "n_target": 2000,
    "n_test": 1000,
    "seeds": [0],
    "methods": ["source-only", "adabn", "coral", "mmd", "cdan+e", "dann+ent"],
}


# --------------------------------------------------------------------------- data


def load_domain(name: str) -> dict[str, np.ndarray]:
    if name == "usps":
        d = np.load(SHARED_DATA / "usps" / "usps.npz", allow_pickle=False)
        return {"x_train": d["x_train"], "y_train": d["y_train"], "x_test": d["x_test"], "y_test": d["y_test"]}
    d = np.load(SHARED_DATA / "mnist" / "mnist_subset.npz", allow_pickle=False)
    return {"x": d["x_test"], "y": d["y_test"]}


USPS_SIZE = (
    20  # 20: resize 16->20 and zero-pad to 28 (MNIST's 20x20-in-28 layout); 28: resize 16->28 (TLlib/ADDA protocol)
)


def to_tensor(x: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W) -> float (N, 1, 28, 28), normalised to [-1, 1]; 16x16 USPS is resized bilinearly."""
    t = torch.from_numpy(x).float().div_(255.0).unsqueeze(1)
    if t.shape[-1] != 28:
        t = F.interpolate(t, size=(USPS_SIZE, USPS_SIZE), mode="bilinear", align_corners=False).clamp_(0, 1)
        if USPS_SIZE < 28:
            p = (28 - USPS_SIZE) // 2
            t = F.pad(t, (p, 28 - USPS_SIZE - p, p, 28 - USPS_SIZE - p))
    return t.sub_(0.5).div_(0.5)


def make_pair(pair: str, seed: int, limits: dict[str, int] | None = None) -> dict[str, Any]:
    """Seeded splits for one pair; see the module docstring.  ``limits`` subsample (quick mode)."""
    rng = np.random.default_rng(seed)
    usps, mnist = load_domain("usps"), load_domain("mnist")
    perm_m = rng.permutation(len(mnist["y"]))
    perm_u = rng.permutation(len(usps["y_train"]))
    if pair == "usps-mnist":
        n_val = len(perm_u) // 10
        src_x, src_y = usps["x_train"][perm_u[n_val:]], usps["y_train"][perm_u[n_val:]]
        val_x, val_y = usps["x_train"][perm_u[:n_val]], usps["y_train"][perm_u[:n_val]]
        half = len(perm_m) // 2
        tgt_x, tgt_y = mnist["x"][perm_m[:half]], mnist["y"][perm_m[:half]]
        test_x, test_y = mnist["x"][perm_m[half:]], mnist["y"][perm_m[half:]]
    elif pair == "mnist-usps":
        n_val = len(perm_m) // 10
        src_x, src_y = mnist["x"][perm_m[n_val:]], mnist["y"][perm_m[n_val:]]
        val_x, val_y = mnist["x"][perm_m[:n_val]], mnist["y"][perm_m[:n_val]]
        tgt_x, tgt_y = usps["x_train"][perm_u], usps["y_train"][perm_u]
        test_x, test_y = usps["x_test"], usps["y_test"]
    else:
        raise SystemExit(f"unknown pair {pair!r} (allowed: {', '.join(PAIRS)})")
    if limits:
        src_x, src_y = src_x[: limits["n_source"]], src_y[: limits["n_source"]]
        tgt_x, tgt_y = tgt_x[: limits["n_target"]], tgt_y[: limits["n_target"]]
        test_x, test_y = test_x[: limits["n_test"]], test_y[: limits["n_test"]]
        val_x, val_y = val_x[: limits["n_test"]], val_y[: limits["n_test"]]
    return {
        "source": (to_tensor(src_x), torch.from_numpy(src_y)),
        "source_val": (to_tensor(val_x), torch.from_numpy(val_y)),
        "target": (to_tensor(tgt_x), torch.from_numpy(tgt_y)),  # labels only for target-only
        "test": (to_tensor(test_x), torch.from_numpy(test_y)),
        "pair": pair,
        "sizes": {
            "source": len(src_y),
            "source_val": len(val_y),
            "target_unlabelled": len(tgt_y),
            "target_test": len(test_y),
        },
    }


# --------------------------------------------------------------------------- model


class LeNet(nn.Module):
    """LeNet-style CNN with BatchNorm: ``.backbone`` (N,1,28,28) -> (N,500) features, ``.head`` linear."""

    feature_dim = 500

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(1, 20, 5),
            nn.BatchNorm2d(20),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(20, 50, 5),
            nn.BatchNorm2d(50),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(50 * 4 * 4, self.feature_dim),
            nn.BatchNorm1d(self.feature_dim),
            nn.ReLU(),
            nn.Dropout(0.5),
        )
        self.backbone.feature_dim = self.feature_dim  # type: ignore[assignment]
        self.head = nn.Linear(self.feature_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


# --------------------------------------------------------------------------- running


def run_method(
    method: str,
    data: dict[str, Any],
    seed: int,
    hp: dict[str, Any],
    trade_off: dict[str, float],
    models: dict[str, nn.Module],
    verbose: bool,
) -> tuple[dict[str, Any], nn.Module | None]:
    """One method on one pair and seed; ``models``: the models this seed trained so far (by method)."""
    test_x, test_y = data["test"]
    source_only_model = models.get("source-only")

    if method == "adabn":
        if source_only_model is None:
            raise RuntimeError("adabn needs the source-only model of the same seed (list source-only first)")
        model = LeNet()
        model.load_state_dict(source_only_model.state_dict())
        tx = data["target"][0]
        n, dt, other, cpu = timed(da.adabn, model, (tx[i : i + 256] for i in range(0, len(tx), 256)))
        acc = da.evaluate(model, test_x, test_y)["acc"]
        return {
            "acc": acc,
            "seconds": dt,
            "cpu_seconds": cpu,
            "other_cpu": other,
            "selection": f"source-only model, BN stats from {n} unlabelled target images",
            "selected_epoch": None,
        }, None

    if method in ("shot", "dann+self-train"):
        return run_extra(method, data, seed, hp, trade_off, models, verbose)

    torch.manual_seed(seed)
    model = LeNet()  # same initial weights for every method of this seed
    if method == "target-only":
        tx, ty = data["target"]
        n_val = len(ty) // 10
        source, source_val, algo = (tx[n_val:], ty[n_val:]), (tx[:n_val], ty[:n_val]), "source-only"
        target_x = tx[n_val:]
    else:
        source, source_val, algo, target_x = (
            data["source"],
            data["source_val"],
            method.removesuffix("+ent"),
            data["target"][0],
        )
    ent = hp["entropy_weight"] if method.endswith("+ent") else 0.0

    def target_test(m: nn.Module) -> dict[str, float]:  # diagnostics only (printed, never used for selection)
        return {"target_test_acc": da.evaluate(m, test_x, test_y)["acc"]}

    hist, dt, other, cpu = timed(
        da.adapt,
        model,
        algo,
        source,
        target_x,
        epochs=hp["epochs"] or EPOCHS[data["pair"]],
        batch_size=hp["batch_size"],
        lr=hp["lr"],
        trade_off=trade_off.get(method, 1.0),
        seed=seed,
        source_val=source_val,
        log=epoch_printer(method, seed, verbose),
        select=hp["select"],
        optimizer=hp["optimizer"],
        momentum=hp["momentum"],
        weight_decay=hp["weight_decay"],
        lr_schedule=hp["lr_schedule"],
        augment=da.random_shift(hp["augment"]) if hp["augment"] else None,
        monitor=target_test if verbose else None,
        discriminator_hidden=hp["disc_hidden"],
        entropy_weight=ent,
        augment_target=bool(hp["augment_target"]),
    )
    acc = da.evaluate(model, test_x, test_y)["acc"]
    sel = hist.meta["selection"]
    last = hist[-1]
    res = {
        "acc": acc,
        "seconds": dt,
        "cpu_seconds": cpu,
        "other_cpu": other,
        "selection": sel["criterion"],
        "selected_epoch": sel["epoch"],
        "history": rounded_history(hist),
        "source_val_acc": next(r["source_val_acc"] for r in hist if r["selected"]),
        "final_cls_loss": last["cls_loss"],
        "final_transfer_loss": last["transfer_loss"],
    }
    if "domain_acc" in last:
        res["final_domain_acc"] = last["domain_acc"]
    if method != "target-only":  # diagnostic only: the same model after a post-hoc AdaBN pass on the target
        m2 = LeNet()
        m2.load_state_dict(model.state_dict())
        tx = data["target"][0]
        da.adabn(m2, (tx[i : i + 256] for i in range(0, len(tx), 256)))
        res["acc_after_adabn"] = da.evaluate(m2, test_x, test_y)["acc"]
    return res, model


def _sgd(hp: dict[str, Any], **over: Any) -> dict[str, Any]:
    """The optimisation settings of da.adapt / da.shot / da.self_train from the benchmark's hyper-parameters."""
    keys = ("batch_size", "lr", "optimizer", "momentum", "weight_decay", "lr_schedule", "select")
    return {k: hp[k] for k in keys} | over


def run_extra(
    method: str,
    data: dict[str, Any],
    seed: int,
    hp: dict[str, Any],
    trade_off: dict[str, float],
    models: dict[str, nn.Module],
    verbose: bool,
) -> tuple[dict[str, Any], nn.Module]:
    """``shot`` and ``dann+self-train`` (see the module docstring); no target labels but the final test."""
    test_x, test_y = data["test"]
    tx = data["target"][0]
    epochs = hp["epochs"] or EPOCHS[data["pair"]]
    augment = da.random_shift(hp["augment"]) if hp["augment"] else None
    log = epoch_printer(method, seed, verbose)

    def target_test(m: nn.Module) -> dict[str, float]:  # diagnostics only (printed, never used for selection)
        return {"target_test_acc": da.evaluate(m, test_x, test_y)["acc"]}

    monitor = target_test if verbose else None

    def train() -> tuple[nn.Module, dict[str, Any]]:
        torch.manual_seed(seed)
        model = LeNet()  # the same initial weights as every method of this seed
        extra: dict[str, Any] = {}
        if method == "shot":
            da.adapt(
                model,
                "source-only",
                data["source"],
                tx,
                epochs=epochs,
                seed=seed,
                source_val=data["source_val"],
                augment=augment,
                label_smoothing=hp["shot_label_smoothing"],
                log=log,
                **_sgd(hp),
            )
            extra["source_acc"] = da.evaluate(model, test_x, test_y)["acc"]  # diagnostic: before SHOT
            hist = da.shot(
                model,
                tx,
                beta=hp["shot_beta"],
                epochs=hp["shot_epochs"],
                seed=seed,
                source_val=data["source_val"],
                monitor=monitor,
                log=log,
                **_sgd(hp, weight_decay=hp["shot_weight_decay"], select="last", nesterov=True),
            )
        else:
            if "dann" in models:
                model.load_state_dict(models["dann"].state_dict())
            else:
                da.adapt(
                    model,
                    "dann",
                    data["source"],
                    tx,
                    epochs=epochs,
                    seed=seed,
                    trade_off=trade_off.get("dann", 1.0),
                    source_val=data["source_val"],
                    augment=augment,
                    discriminator_hidden=hp["disc_hidden"],
                    augment_target=bool(hp["augment_target"]),
                    log=log,
                    **_sgd(hp),
                )
            extra["source_acc"] = da.evaluate(model, test_x, test_y)["acc"]  # diagnostic: the DANN model
            hist = da.self_train(
                model,
                data["source"],
                tx,
                rounds=hp["self_train_rounds"],
                threshold=hp["self_train_threshold"],
                epochs=hp["self_train_epochs"],
                seed=seed,
                source_val=data["source_val"],
                augment=augment,
                monitor=monitor,
                log=log,
                **_sgd(hp),
            )
            extra["pseudo_labelled"] = [r["pseudo_labelled"] for r in hist.meta["rounds"]]
        extra["history"] = rounded_history(hist)
        return model, extra

    (model, extra), dt, other, cpu = timed(train)
    res = {
        "acc": da.evaluate(model, test_x, test_y)["acc"],
        "seconds": dt,
        "cpu_seconds": cpu,
        "other_cpu": other,
        "selection": "last" if method == "shot" else hp["select"],
        "selected_epoch": None,
        **extra,
    }
    if method == "dann+self-train" and "dann" in models:
        res["note"] = "started from this seed's dann model (its training time is in the dann row)"
    return res, model


def markdown(
    args: argparse.Namespace,
    hp: dict[str, Any],
    trade_off: dict[str, float],
    results: dict[str, Any],
    summary: dict[str, Any],
    sizes: dict[str, dict[str, int]],
    info: dict[str, Any],
) -> str:
    methods = [m for m in args.methods]
    lines = [
        "## Digits domain adaptation: USPS ↔ MNIST" + (" (quick mode)" if args.quick else ""),
        "",
        f"- date: {info['date']}; total wall time {info['total_seconds']:.0f} s",
        f"- command: `{info['command']}`",
        f"- machine: {run_machine(info)}; other processes used {info['other_cpu_mean'] * 100:.0f} % of the "
        f"CPUs on average during the runs (worst run {info['other_cpu_max'] * 100:.0f} %), so wall times are upper "
        "bounds; "
        "CPU s = CPU time of the benchmark process itself (user + system)"
        + (f"; {info['note']}" if info.get("note") else ""),
        "- model: LeNet-style CNN + BatchNorm (conv5x5-20, BN, ReLU, maxpool / conv5x5-50, BN, ReLU, maxpool / "
        "fc-500, BN, ReLU, dropout 0.5 = 500-d features / linear head), random init (same init for all methods of a "
        "seed)",
        "- training: "
        + (
            f"{hp['epochs']} epoch(s)"
            if hp["epochs"]
            else ", ".join(f"{EPOCHS[p]} epochs for {ARROW[p]}" for p in args.pairs)
        )
        + " over the source (an epoch = one pass over the labelled training images), "
        f"batch {hp['batch_size']} source + {hp['batch_size']} target, "
        f"{hp['optimizer'].upper()} lr {hp['lr']} momentum {hp['momentum']} weight decay {hp['weight_decay']}, "
        f"lr schedule `{hp['lr_schedule']}` (lr/(1+10p)^0.75), "
        + (
            f"augmentation: random shift ≤ {hp['augment']} px per image on source"
            + (" and target" if hp["augment_target"] else "")
            + " batches"
            if hp["augment"]
            else "no augmentation"
        )
        + (
            f"; shot: source-only with label smoothing {hp['shot_label_smoothing']:g}, then {hp['shot_epochs']} "
            f"epochs over the target alone (head frozen), information maximisation + {hp['shot_beta']:g} x "
            "cosine-centroid pseudo-label cross-entropy, SGD Nesterov, weight decay "
            f"{hp['shot_weight_decay']:g}, last epoch"
            if "shot" in methods
            else ""
        )
        + (
            f"; dann+self-train: the dann model, then {hp['self_train_rounds']} round(s) of {hp['self_train_epochs']} "
            f"epoch(s) on source + target pseudo-labels with top probability ≥ {hp['self_train_threshold']:g}"
            if "dann+self-train" in methods
            else ""
        )
        + "; transfer-loss weights "
        + ", ".join(f"{k} {v:g}" for k, v in trade_off.items() if k in methods)
        + (
            f"; `+ent` = plus target entropy minimisation, weight {hp['entropy_weight']:g}"
            if any(m.endswith("+ent") for m in methods)
            else ""
        )
        + f"; DANN/CDAN: 3-layer discriminator (hidden {hp['disc_hidden']}, BatchNorm), "
        "GRL coefficient 2/(1+exp(-10p))-1; "
        "CDAN: randomized multilinear map (1024-d, as the paper does when features x classes = 5000 > 4096), "
        "cdan+e = with entropy conditioning",
        f"- model selection (no target labels): `{hp['select']}`"
        + (" (weights after the last epoch)" if hp["select"] == "last" else " (best source-validation accuracy)")
        + "; target-only uses a 10 % hold-out of its labelled target-train part",
        "- images: 28x28 grayscale, x/255 normalised with mean 0.5/std 0.5; "
        + (
            "USPS 16x16 resized to 28x28 bilinearly"
            if info["usps_size"] == 28
            else f"USPS 16x16 resized bilinearly to {info['usps_size']}x{info['usps_size']} and zero-padded to 28x28 "
            "(MNIST digits are "
            "size-normalised to 20x20 and centred in 28x28; USPS digits fill their frame)"
        ),
    ]
    for pair in args.pairs:
        s = sizes[pair]
        src, tgt = PAIRS[pair]
        lines.append(
            f"- {ARROW[pair]} splits (seeded shuffle per seed): source {src.upper()} {s['source']} labelled + "
            f"{s['source_val']} source-val; target {tgt.upper()} {s['target_unlabelled']} unlabelled; "
            f"target test {s['target_test']} labelled (disjoint from the unlabelled part)"
        )
    lines += [
        "",
        f"Target-test accuracy (%), mean ± std over seeds {' '.join(map(str, args.seeds))}; wall time per seed (s).",
        "",
    ]
    header = "| method | " + " | ".join(f"{ARROW[p]} acc | {ARROW[p]} time (s)" for p in args.pairs) + " |"
    header = header.replace(" time (s) |", " time (s): wall [CPU] |")
    lines += [header, "|---|" + "---:|---:|" * len(args.pairs)]
    for method in methods:
        cells = []
        for pair in args.pairs:
            sm = summary[pair].get(method)
            if sm is None:
                cells += ["–", "–"]
                continue
            accs = sm["accs"]
            acc = fmt_ms(accs) + (f" (n={len(accs)})" if len(accs) != len(args.seeds) else "")
            flag = ""
            base = summary[pair].get("source-only")
            if method not in ("source-only", "target-only") and base and below(sm["acc_mean"], base["acc_mean"]):
                flag = " ⚠ negative transfer"
            best = max((summary[pair][m]["acc_mean"], m) for m in methods if m != "target-only" and m in summary[pair])
            if best[1] == method:
                acc = f"**{acc}**"
            secs = [r["seconds"] for r in results[pair][method]]
            t = fmt_ms(secs, pct=False)
            cpus = [r["cpu_seconds"] for r in results[pair][method] if "cpu_seconds" in r]
            if cpus:
                t += f" [{statistics.mean(cpus):.0f}]"
            if method == "adabn":
                t += " (+ source-only)"
            if method == "dann+self-train" and any("note" in r for r in results[pair][method]):
                t += " (+ dann)"
            cells += [acc + flag, t]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += ["", "Per seed (acc %):", ""]
    for pair in args.pairs:
        lines.append(f"- {ARROW[pair]}: {per_seed_accs(summary[pair], methods)}")
    lines += [
        "",
        "Post-hoc AdaBN on each adapted model (diagnostic: another fixed variant, no target labels used; acc %):",
        "",
    ]
    for pair in args.pairs:
        per = "; ".join(
            f"{m} " + fmt_ms([r["acc_after_adabn"] for r in results[pair][m]])
            for m in methods
            if m in results[pair] and results[pair][m] and "acc_after_adabn" in results[pair][m][0]
        )
        lines.append(f"- {ARROW[pair]}: {per}")
    lines += [
        "",
        "Targets (best adaptation method, mean over seeds):"
        if not args.quick
        else "Targets (not applicable in quick mode: subsampled data, 3 epochs):",
        "",
    ]
    for pair in args.pairs if not args.quick else []:
        cands = [
            (summary[pair][m]["acc_mean"], m)
            for m in methods
            if m not in ("source-only", "target-only") and m in summary[pair]
        ]
        if cands:
            acc, m = max(cands)
            ok = "met" if acc >= TARGETS[pair] else "NOT met"
            lines.append(f"- {ARROW[pair]} ≥ {TARGETS[pair] * 100:.0f} %: {ok} ({m} {acc * 100:.1f} %)")
    lines += [
        "",
        'vs reference (TLlib digits benchmark, LeNet, 28x28, quoted in /work/shared/DESIGN.md "Reference numbers"; '
        "TLlib selects on the target test set, so its numbers are optimistic; "
        "target supervised from the CyCADA paper): "
        + "; ".join(f"{ARROW[p]} " + ", ".join(f"{m} {v}" for m, v in REFERENCE[p].items()) for p in args.pairs)
        + ". Differences here: MNIST has only its 10,000 official test images offline (TLlib trains on 60,000), "
        "model selection without target labels, and far fewer iterations (CPU budget)"
        + (
            "; USPS is resized to 20x20 and padded to MNIST's layout (TLlib resizes it to 28x28, a larger gap: "
            "compare source-only rows with care)."
            if info["usps_size"] == 20
            else "."
        ),
        "",
    ]
    return "\n".join(lines)


def with_text_report(md: str, args: argparse.Namespace, out: Path) -> str:
    """For bench/results/transfer.md: the digits report followed by the text/few-shot/stacking/selection
    report of bench/transfer_text.py (other outputs, e.g. per-pair parts, stay digits-only)."""
    path = getattr(args, "text_report", None)
    if (
        args.quick
        or path is None
        or not Path(path).is_file()
        or out.resolve() != (RESULTS_DIR / "transfer.md").resolve()
    ):
        return md
    return (
        md.rstrip("\n")
        + f"\n\n<!-- appended from {Path(path).name} (bench/transfer_text.py) -->\n\n"
        + Path(path).read_text()
    )


def merge(args: argparse.Namespace, out: Path) -> int:
    """Combine the JSON results of several runs (same hyper-parameters; different pairs and/or seeds; interrupted
    runs count with what they finished)."""
    payloads = [json.loads(p.read_text()) for p in args.merge]
    first = payloads[0]
    extra = {k: v for p in payloads for k, v in p.get("extra_hyperparameters", {}).items()}
    for p in payloads[1:]:
        for key in ("hyperparameters", "trade_off", "quick"):
            if p[key] != first[key]:
                raise SystemExit(f"--merge: the runs differ in {key}: {p[key]} vs {first[key]}")
        if p["info"].get("usps_size") != first["info"].get("usps_size"):
            raise SystemExit("--merge: the runs differ in --usps-size")
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    repeated: list[str] = []  # (pair, method, seed) run again by a later payload: the first listed one counts
    for path, p in zip(args.merge, payloads, strict=True):
        for pair, per in p["runs"].items():
            for method, rs in per.items():
                have = runs.setdefault(pair, {}).setdefault(method, [])
                seen = {r["seed"] for r in have}
                repeated += [f"{ARROW[pair]} {method} seed {r['seed']} in {path}" for r in rs if r["seed"] in seen]
                have.extend(r for r in rs if r["seed"] not in seen)
    for per in runs.values():
        for method in [m for m, rs in per.items() if not rs]:
            del per[method]
        for rs in per.values():
            rs.sort(key=lambda r: r["seed"])
    sizes = {pair: sz for p in payloads for pair, sz in p["sizes"].items()}
    infos = [p["info"] for p in payloads]
    info = dict(first["info"])
    info["command"] = merged_command(infos, "bench/transfer.py", args.merge, out, "pair")
    info["total_seconds"] = max(i["total_seconds"] for i in infos)
    info["other_cpu_mean"], info["other_cpu_max"] = other_cpu_stats(
        [r for per in runs.values() for rs in per.values() for r in rs]
    )
    incomplete = [str(p) for p, payload in zip(args.merge, payloads, strict=True) if not payload.get("complete", True)]
    info["load_start"] = max(i["load_start"] for i in infos)
    machines: dict[str, list[str]] = {}
    for path, i in zip(args.merge, infos, strict=True):
        machines.setdefault(f"CPU {i['cpu']} ({i['cores']} logical cores)", []).append(str(path))
    info["note"] = (
        (
            f"the {len(infos)} benchmark processes ran side by side"
            if len(machines) == 1
            else "the benchmark processes of each machine below ran side by side"
        )
        + f" with {info['threads']} torch thread(s) each, so 'other processes' includes the sibling benchmark processes"
        + (
            f"; interrupted runs (only their finished methods are counted): {', '.join(incomplete)}"
            if incomplete
            else ""
        )
        + (
            "; the runs come from different machines: "
            + "; ".join(f"{m}: {', '.join(ps)}" for m, ps in machines.items())
            if len(machines) > 1
            else ""
        )
        + (f"; repeated runs not counted (the first listed run counts): {', '.join(repeated)}" if repeated else "")
    )
    args.pairs = [p for p in PAIRS if p in runs]
    args.methods = [m for m in ALL_METHODS if any(m in per for per in runs.values())]
    args.seeds = sorted({r["seed"] for per in runs.values() for rs in per.values() for r in rs})
    args.quick = first["quick"]
    summary = summarise(runs)
    md = with_text_report(
        markdown(args, first["hyperparameters"] | extra, first["trade_off"], runs, summary, sizes, info), args, out
    )
    print(md)
    payload = {
        **first,
        "info": info,
        "sizes": sizes,
        "summary": summary,
        "runs": runs,
        "merged_from": [str(p) for p in args.merge],
        "extra_hyperparameters": extra,
    }
    write_report(out, md, payload)
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


def main(argv: list[str] | None = None) -> int:
    global USPS_SIZE
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2 (--quick: 0)")
    ap.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    ap.add_argument(
        "--methods",
        nargs="+",
        default=None,
        choices=ALL_METHODS,
        help=f"default: {' '.join(DEFAULT_METHODS)} (--quick: a subset)",
    )
    ap.add_argument("--quick", action="store_true", help=f"reduced run for the slow test: {QUICK}")
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="markdown output (default bench/results/transfer.md, "
        "or transfer-quick.md with --quick); a .json with the raw results is written next to it",
    )
    for k, v in (DEFAULTS | EXTRA).items():
        ap.add_argument(f"--{k.replace('_', '-')}", type=type(v), default=None, help=f"default {v}")
    ap.add_argument(
        "--trade-off", nargs="*", default=[], metavar="METHOD=W", help=f"transfer-loss weights, default {TRADE_OFF}"
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--usps-size",
        type=int,
        default=USPS_SIZE,
        choices=[20, 28],
        help="28: resize USPS 16->28; 20: resize to 20 and zero-pad to 28 (default %(default)s)",
    )
    ap.add_argument(
        "--merge",
        nargs="+",
        type=Path,
        default=None,
        metavar="JSON",
        help="no training: combine the .json results of earlier runs (e.g. one process per pair) into --out",
    )
    ap.add_argument(
        "--text-report",
        type=Path,
        default=RESULTS_DIR / "transfer-text.md",
        help="append this bench/transfer_text.py report (text cross-domain, few-shot, stacking, source selection) "
        "to bench/results/transfer.md, so that it holds every setting (default %(default)s, if it exists; "
        "not with --quick)",
    )
    ap.add_argument(
        "-v", "--verbose", action="store_true", help="per-epoch log incl. target-test accuracy (diagnostics only)"
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    USPS_SIZE = args.usps_size

    hp = dict(DEFAULTS)
    limits = None
    if args.quick:
        hp["epochs"] = QUICK["epochs"]
        limits = {k: QUICK[k] for k in ("n_source", "n_target", "n_test")}
    if args.seeds is None:
        args.seeds = QUICK["seeds"] if args.quick else [0, 1, 2]
    if args.methods is None:
        args.methods = list(QUICK["methods"] if args.quick else DEFAULT_METHODS)
    for k in DEFAULTS:
        if getattr(args, k) is not None:
            hp[k] = getattr(args, k)
    extra = {k: v if getattr(args, k) is None else getattr(args, k) for k, v in EXTRA.items()}
    trade_off = dict(TRADE_OFF)
    for item in args.trade_off:
        m, w = item.split("=")
        trade_off[m] = float(w)
    if "adabn" in args.methods and "source-only" not in args.methods:
        args.methods.insert(0, "source-only")
    args.methods = [m for m in ALL_METHODS if m in args.methods]
    out = args.out or RESULTS_DIR / ("transfer-quick.md" if args.quick else "transfer.md")
    if args.merge:
        return merge(args, out)

    info: dict[str, Any] = run_info("bench/transfer.py", argv) | {"usps_size": USPS_SIZE}
    t_all = time.perf_counter()
    results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    sizes: dict[str, dict[str, int]] = {}
    for pair in args.pairs:
        results[pair] = {m: [] for m in args.methods}
        for seed in args.seeds:
            data = make_pair(pair, seed, limits)
            sizes[pair] = data["sizes"]
            models: dict[str, nn.Module] = {}
            for method in args.methods:
                res, model = run_method(method, data, seed, hp | extra, trade_off, models, args.verbose)
                if model is not None:
                    models[method] = model
                results[pair][method].append({"seed": seed, **res})
                # written after every method, so an interrupted run keeps what it finished (--merge reads it)
                partial = {
                    "info": {
                        **info,
                        "total_seconds": time.perf_counter() - t_all,
                        "other_cpu_mean": 0.0,
                        "other_cpu_max": 0.0,
                    },
                    "hyperparameters": hp,
                    "extra_hyperparameters": extra,
                    "trade_off": trade_off,
                    "quick": args.quick,
                    "limits": limits,
                    "seeds": args.seeds,
                    "sizes": sizes,
                    "runs": results,
                    "complete": False,
                }
                out.parent.mkdir(parents=True, exist_ok=True)
                out.with_suffix(".json").write_text(json.dumps(partial, indent=2))
                print(
                    f"{ARROW[pair]} seed {seed} {method:12s} acc {res['acc'] * 100:5.1f}  {res['seconds']:6.1f}s"
                    + (f"  (+AdaBN {res['acc_after_adabn'] * 100:.1f})" if "acc_after_adabn" in res else "")
                    + f"  (other procs {0 if res['other_cpu'] is None else res['other_cpu'] * 100:.0f}% CPU)",
                    flush=True,
                )
    info["total_seconds"] = time.perf_counter() - t_all
    info["other_cpu_mean"], info["other_cpu_max"] = other_cpu_stats(
        [r for per in results.values() for runs in per.values() for r in runs]
    )
    summary = summarise(results)
    md = with_text_report(markdown(args, hp | extra, trade_off, results, summary, sizes, info), args, out)
    print()
    print(md)
    payload = {
        "info": info,
        "hyperparameters": hp,
        "extra_hyperparameters": extra,
        "trade_off": trade_off,
        "quick": args.quick,
        "limits": limits,
        "seeds": args.seeds,
        "sizes": sizes,
        "summary": summary,
        "runs": results,
        "complete": True,
    }
    write_report(out, md, payload)
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""self-train-probe: pseudo-labels on real features, and the strategy through the pipeline steps."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from conftest import digits_config
from sklearn.datasets import load_digits

from tlops.config import TrainConfig, validate_config
from tlops.training.strategies.self_train_probe import self_train


def _digits(classes: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    x, y = load_digits(return_X_y=True)
    keep = np.isin(y, classes)
    return x[keep] / 16.0, np.searchsorted(classes, y[keep])


def test_pseudo_labels_are_confident_class_balanced_and_grow_per_round():
    """3 labels per class of digits 3/5/8 (real 8x8 scans), the other ~500 as the pool: each round adds at most its
    growing per-class budget, almost every pseudo-label is right, and the refit probe beats the 9-label one."""
    from tlops.training.probe import train_probe

    x, y = _digits((3, 5, 8))
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(y))
    lab = np.concatenate([perm[y[perm] == k][:3] for k in range(3)])
    rest = np.setdiff1d(perm, lab)
    pool, test = rest[: len(rest) // 2], rest[len(rest) // 2 :]
    cfg = TrainConfig()
    head0, _ = train_probe(x[lab], y[lab], None, None, 3, cfg, 0)
    head, hist = self_train(x[lab], y[lab], x[pool], None, None, 3, cfg, 0, threshold=0.6, rounds=3)

    assert [h["round"] for h in hist] == [0, 1, 2, 3] and [h["epoch"] for h in hist] == [1, 2, 3, 4]
    budget = [int(np.ceil(len(pool) / 3 * r / 3)) for r in (1, 2, 3)]
    for h, b in zip(hist[1:], budget, strict=True):
        assert max(h["per_class"]) <= b and h["pseudo_labelled"] == sum(h["per_class"]) > 0
    assert hist[1]["pseudo_labelled"] < hist[3]["pseudo_labelled"]
    # the (scaling, C) chosen on the 9 labels is kept: pseudo-labels choose no hyper-parameters
    assert {(h["scaling"], h["C"]) for h in hist} == {(hist[0]["scaling"], hist[0]["C"])}

    import torch

    def acc(h, idx):
        with torch.no_grad():
            return float((h(torch.as_tensor(x[idx], dtype=torch.float32)).argmax(1).numpy() == y[idx]).mean())

    assert acc(head, test) > acc(head0, test)  # measured: 0.95 vs 0.89


def test_strategy_trains_on_the_unlabelled_split_and_falls_back_to_the_probe(tmp_path, caplog):
    """digits 0-2, 10 labels per class, half of the rest unlabelled: the strategy pseudo-labels the unlabelled
    split's features; without an unlabelled split it is the linear probe, with a warning that says what to set."""
    from tlops.steps import extract_features, fine_tune, ingest, pull_model

    def run(root, data):
        cfg = validate_config(
            digits_config(root / "work", data=data, train={"strategies": ["linear-probe", "self-train-probe"]})
        )
        ins = {"dataset": ingest.run(cfg, {}, root / "ingest"), "model": pull_model.run(cfg, {}, root / "pull")}
        ins["features"] = extract_features.run(cfg, ins, root / "features")
        return fine_tune.run(cfg, ins, root / "ft")

    art = run(tmp_path / "a", {"unlabelled": 0.5})
    rec = art.meta["models"]["self-train-probe"]
    assert rec["epochs"] == 4 and rec["val_acc"] is not None  # the probe + 3 rounds

    with caplog.at_level(logging.WARNING, logger="tlops.steps.fine_tune"):
        art = run(tmp_path / "b", {})
    assert art.meta["models"]["self-train-probe"]["epochs"] == 1
    assert art.meta["models"]["self-train-probe"]["val_acc"] == pytest.approx(
        art.meta["models"]["linear-probe"]["val_acc"]
    )
    assert (
        "self-train-probe: no unlabelled target inputs, so nothing to pseudo-label: this is the linear probe. Set "
        "data.unlabelled (a fraction of the train pool kept unlabelled) or data.adapt_from (labelled source data; "
        "the target train inputs are then the pool)"
    ) in caplog.text

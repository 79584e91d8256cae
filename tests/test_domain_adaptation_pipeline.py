"""Domain adaptation through the pipeline: USPS (labelled source domain, data.adapt_from) ->
MNIST (target, unlabelled split) with real data; selection never uses target labels."""

from __future__ import annotations

import json

import pytest
from conftest import digits_config

from tlops.config import validate_config
from tlops.errors import ConfigError
from tlops.steps import extract_features, fine_tune, ingest, pull_model


def _cfg(tmp_path, shared, **train):
    return validate_config(
        digits_config(
            tmp_path / "work",
            data={
                "source": str(shared / "mnist" / "mnist_subset.npz"),
                "classes": [0, 1],
                "labels_per_class": None,
                "split": {"val": 0.1, "test": 0.3},
                "unlabelled": 0.9,
                "adapt_from": {"source": str(shared / "usps" / "usps.npz"), "max_samples": 300, "val": 0.25},
            },
            source={"model": "timm:resnet10t", "pretrained": False, "in_chans": 1, "image_size": 16},
            train={"strategies": ["dann", "adabn"], "adapt": {"epochs": 2, "batch_size": 32, "lr": 0.01}, **train},
        )
    )


def test_adaptation_strategies_select_on_source_validation(tmp_path, shared_data):
    cfg = _cfg(tmp_path, shared_data)
    ds = ingest.run(cfg, {}, tmp_path / "ingest")
    counts = ds.meta["counts"]
    assert counts["source_train"] + counts["source_val"] <= 300 and counts["source_val"] > 30
    assert ds.meta["adapt_from"]["dropped"] > 0  # USPS digits 2-9 are not target classes
    ins = {"dataset": ds, "model": pull_model.run(cfg, {}, tmp_path / "pull")}
    ins["features"] = extract_features.run(cfg, ins, tmp_path / "features")
    ft = fine_tune.run(cfg, ins, tmp_path / "ft")
    sel = json.loads((ft.path / "selection.json").read_text())
    assert sel["criterion"].startswith("best source-domain validation accuracy (no target labels")
    models = ft.meta["models"]
    assert set(models) == {"dann", "adabn"}
    for m in models.values():
        assert 0.0 <= m["source_val_acc"] <= 1.0 and m["val_acc"] is not None
        assert m["adaptation"]["selection"]["uses_target_labels"] is False
    best = max(models, key=lambda s: (models[s]["source_val_acc"], -cfg.train.strategies.index(s)))
    assert sel["selected"] == best
    assert models["adabn"]["adaptation"]["adabn_samples"] == counts["unlabelled"]
    assert models["adabn"]["source_val_acc"] > 0.6  # USPS 0 vs 1 is easy even from scratch


def test_adaptation_and_plain_strategies_mix_and_all_are_scored_on_source_validation(tmp_path, shared_data):
    """linear-probe (trained on the target's labelled train split) next to source-only: every
    strategy gets a source-validation score, and the selection compares them on it."""
    cfg = _cfg(tmp_path, shared_data, strategies=["linear-probe", "source-only"], adapt={"epochs": 1, "batch_size": 32})
    ins = {"dataset": ingest.run(cfg, {}, tmp_path / "ingest"), "model": pull_model.run(cfg, {}, tmp_path / "pull")}
    ins["features"] = extract_features.run(cfg, ins, tmp_path / "features")
    ft = fine_tune.run(cfg, ins, tmp_path / "ft")
    models = ft.meta["models"]
    assert list(models) == ["linear-probe", "source-only"]
    for m in models.values():
        assert 0.0 <= m["source_val_acc"] <= 1.0 and 0.0 <= m["val_acc"] <= 1.0
    best = max(models, key=lambda s: (models[s]["source_val_acc"], -cfg.train.strategies.index(s)))
    assert ft.meta["selected"] == best
    assert ft.meta["criterion"].startswith("best source-domain validation accuracy")


def test_adaptation_needs_source_domain_data(tmp_path):
    with pytest.raises(ConfigError, match=r"train.strategies: coral, adabn need data.adapt_from"):
        validate_config(digits_config(tmp_path, train={"strategies": ["coral", "adabn"]}))

"""Source-model selection: LogME on real features ranks a model trained on digits above a
random-init CNN for a new digits task; the winner's features and bundle flow downstream."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import digits_config

from tlops.config import validate_config
from tlops.features.selection import logme
from tlops.steps import extract_features, fine_tune, ingest, pull_model


def test_logme_prefers_informative_features():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 40)
    informative = rng.normal(size=(120, 16)) + 3.0 * np.eye(3, 16)[y]
    noise = rng.normal(size=(120, 16))
    assert logme(informative, y) > logme(noise, y) + 0.1
    # more dimensions than samples (few-shot, wide features) still gives finite scores
    wide = np.concatenate([informative, rng.normal(size=(120, 300))], axis=1)
    assert np.isfinite(logme(wide[:30], y[:30]))


@pytest.mark.slow  # ~45 s: trains a source model first
def test_candidates_are_ranked_and_the_best_is_used(tmp_path):
    from tlops.runners.local import run_pipeline

    src = validate_config(
        digits_config(
            tmp_path / "src",
            data={"classes": [0, 1, 2, 3, 4], "labels_per_class": None},
            train={"strategies": ["fine-tune"], "epochs": 3},
        )
    )
    trained = run_pipeline(src).artifact("fine-tune").path / "models" / "fine-tune"

    cfg = validate_config(
        digits_config(tmp_path / "work", data={"classes": [5, 6, 7]}, source={"candidates": [str(trained)]})
    )
    ins = {"dataset": ingest.run(cfg, {}, tmp_path / "ingest"), "model": pull_model.run(cfg, {}, tmp_path / "pull")}
    cands = ins["model"].meta["candidates"]
    assert [c["path"] for c in cands] == ["model", "candidates/1"]
    feats = extract_features.run(cfg, ins, tmp_path / "features")
    ranking = feats.meta["source_ranking"]
    assert [c["source"] for c in ranking] == [str(trained), "timm:resnet10t"]  # trained on digits beats random init
    assert ranking[0]["score"] > ranking[1]["score"] and [c["rank"] for c in ranking] == [1, 2]
    assert feats.meta["source_bundle"] == "candidates/1" and feats.meta["source"] == str(trained)
    assert feats.meta["model_digest"] == cands[1]["model_digest"]

    ins["features"] = feats
    ft = fine_tune.run(cfg, ins, tmp_path / "ft")
    assert ft.meta["source"] == str(trained) and ft.meta["source_digest"] == cands[1]["model_digest"]

    # the per-candidate train features are cached: a rerun ranks without running a backbone
    again = extract_features.run(cfg, ins, tmp_path / "features-2")
    assert again.meta["source_ranking"] == ranking and again.meta["cache"] == "hit"


def test_stacking_concatenates_cached_features_and_serves_as_one_model(tmp_path, digits_cfg):
    from tlops.errors import ConfigError
    from tlops.models.bundle import load_classifier
    from tlops.steps import evaluate

    with pytest.raises(ConfigError, match="train.strategies: stacking needs source.candidates"):
        digits_cfg(train={"strategies": ["stacking"]})
    cfg = digits_cfg(
        source={"candidates": ["timm:resnet10t"], "image_size": 16},
        train={"strategies": ["linear-probe", "stacking"], "epochs": 1},
    )
    # the candidate differs from the primary model by its random init (seeded differently per pull order)
    ins = {"dataset": ingest.run(cfg, {}, tmp_path / "ingest"), "model": pull_model.run(cfg, {}, tmp_path / "pull")}
    feats = extract_features.run(cfg, ins, tmp_path / "features")
    with np.load(feats.path / "features.npz") as z:
        d = z["train"].shape[1]
        assert z["stack_train"].shape == (z["train"].shape[0], 2 * d)
        cache_entry = feats.meta["cache_key"]
    # the features.npz of the selected model in the cache was not overwritten by the stacked file
    from tlops.features.cache import FeatureCache
    from tlops.steps.extract_features import cache_root

    assert "stack_train" not in FeatureCache(cache_root(cfg)).load(cache_entry)

    ins["features"] = feats
    ft = fine_tune.run(cfg, ins, tmp_path / "ft")
    assert set(ft.meta["models"]) == {"linear-probe", "stacking"}
    clf = load_classifier(ft.path / "models" / "stacking")
    assert clf.backbone.feature_dim == 2 * d and len(clf.backbone.members) == 2
    from tlops.data.dataset import Dataset

    test = Dataset(ins["dataset"]).load("test")
    assert clf.predict_proba(test.x[:5]).shape == (5, 3)
    ev = evaluate.run(cfg, {"dataset": ins["dataset"], "trained": ft}, tmp_path / "ev")
    assert "stacking" in ev.meta["summary"]

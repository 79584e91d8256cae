"""SetFit-style few-shot text on the real all-MiniLM-L6-v2 and UCI yelp sentences."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tlops.config import SetFitConfig, validate_config
from tlops.data.dataset import Split
from tlops.models.bundle import Classifier, load_classifier
from tlops.training.setfit import contrastive_tune, make_pairs


def test_pairs_cover_every_sample_with_positives_and_negatives():
    y = np.array([0, 0, 0, 1, 1, 1])
    pairs = make_pairs(y, 3, np.random.default_rng(0))
    assert len(pairs) == 6 * 3 * 2
    i, j, t = pairs[:, 0].astype(int), pairs[:, 1].astype(int), pairs[:, 2]
    assert ((y[i] == y[j]) == (t == 1.0)).all() and (i != j).all()
    assert sorted(set(i)) == list(range(6))


def _yelp(shared_data: Path, per_class: int) -> Split:
    rows = [
        ln.rsplit("\t", 1)
        for ln in (shared_data / "sentiment_labelled_sentences" / "yelp_labelled.txt").read_text().split("\n")
        if ln.strip()
    ]
    texts = {
        0: [t for t, lab in rows if lab.strip() == "0"][:per_class],
        1: [t for t, lab in rows if lab.strip() == "1"][:per_class],
    }
    return Split(texts[0] + texts[1], np.array([0] * per_class + [1] * per_class))


@pytest.mark.slow  # ~40 s: two contrastive epochs of MiniLM; the strategy test below covers the step
def test_contrastive_tuning_pulls_same_label_texts_together(minilm_dir, shared_data):
    from tlops.models.backbone import TextBackbone

    train = _yelp(shared_data, 8)
    clf = Classifier(TextBackbone.create(str(minilm_dir), max_length=32, pooling="mean"), 2)

    def margin() -> float:
        clf.eval()
        with torch.inference_mode():
            e = torch.nn.functional.normalize(clf.backbone(**clf.backbone.prepare(train.x)), dim=1)
        sim = (e @ e.T).numpy()
        same = train.y[:, None] == train.y[None, :]
        off = ~np.eye(len(train.y), dtype=bool)
        return float(sim[same & off].mean() - sim[~same].mean())

    before = margin()
    hist = contrastive_tune(clf, train, SetFitConfig(pairs_per_sample=2, epochs=2, batch_size=16, lr=1e-4), seed=0)
    assert [h["epoch"] for h in hist] == [1, 2] and hist[0]["pairs"] == 16 * 2 * 2
    assert hist[1]["pair_loss"] < hist[0]["pair_loss"]
    assert margin() > before + 0.1


def test_setfit_strategy_in_the_fine_tune_step(minilm_dir, shared_data, tmp_path):
    from tlops.steps import extract_features, fine_tune, ingest, pull_model

    cfg = validate_config(
        {
            "name": "t-setfit",
            "workdir": str(tmp_path / "work"),
            "data": {
                "source": str(shared_data / "sentiment_labelled_sentences" / "yelp_labelled.txt"),
                "format": "tsv",
                "columns": ["text", "label"],
                "quoting": "none",
                "labels_per_class": 8,
                "split": {"val": 0.05, "test": 0.05},
            },
            "source": {"model": f"hf:{minilm_dir}", "max_length": 32},
            "train": {"strategies": ["linear-probe", "setfit"], "setfit": {"pairs_per_sample": 2}},
            "evaluate": {"scratch_baseline": False},
            "register": {"model_name": "t-setfit"},
        }
    )
    ins = {"dataset": ingest.run(cfg, {}, tmp_path / "ingest"), "model": pull_model.run(cfg, {}, tmp_path / "pull")}
    ins["features"] = extract_features.run(cfg, ins, tmp_path / "features")
    ft = fine_tune.run(cfg, ins, tmp_path / "ft")
    rec = ft.meta["models"]["setfit"]
    assert rec["setfit"]["pairs"] == 16 * 2 * 2 and rec["val_acc"] is not None
    probs = load_classifier(ft.path / "models" / "setfit").predict_proba(
        ["Loved it, great food!", "Awful. Never again."]
    )
    assert probs.shape == (2, 2) and np.allclose(probs.sum(1), 1, atol=1e-5)


def test_setfit_on_images_is_refused_by_validation(tmp_path):
    from conftest import digits_config

    from tlops.errors import ConfigError

    with pytest.raises(ConfigError, match=r"train.strategies: setfit needs a text model \(hf:...\), but source.model "):
        validate_config(digits_config(tmp_path, train={"strategies": ["setfit"]}))

"""Fine-tuning mechanics on a tiny real CNN: frozen blocks stay frozen (BN too), determinism, checkpoints."""

from __future__ import annotations

import json

import pytest
import torch

from tlops.errors import ConfigError
from tlops.steps import extract_features, fine_tune, ingest, pull_model


@pytest.fixture
def upstream(digits_cfg, tmp_path):
    cfg = digits_cfg(train={"strategies": ["fine-tune"], "epochs": 3, "freeze_blocks": 5})
    ins = {"dataset": ingest.run(cfg, {}, tmp_path / "ingest"), "model": pull_model.run(cfg, {}, tmp_path / "pull")}
    ins["features"] = extract_features.run(cfg, ins, tmp_path / "features")
    return cfg, ins


def _state(path):
    from tlops.models.bundle import load_backbone

    return {k: v.clone() for k, v in load_backbone(path).model.state_dict().items()}


def test_frozen_blocks_and_their_batchnorm_stats_do_not_move(upstream, tmp_path):
    cfg, ins = upstream
    before = _state(ins["model"].path / "model")
    out = fine_tune.run(cfg, ins, tmp_path / "ft")
    after = _state(out.path / "models" / "fine-tune")
    # resnet10t blocks: conv1, bn1, layer1, layer2, layer3, layer4 -> first 5 frozen, layer4 trains
    frozen = [k for k in before if not k.startswith("layer4.")]
    assert any("running_mean" in k for k in frozen)
    for k in frozen:
        assert torch.equal(before[k], after[k]), f"{k} moved although its block is frozen"
    moved = [k for k in before if k.startswith("layer4.") and not torch.equal(before[k], after[k])]
    assert any("running_mean" in k for k in moved) and any(k.endswith("weight") for k in moved)


def test_fine_tune_is_deterministic_and_writes_checkpoints_and_curves(upstream, tmp_path):
    cfg, ins = upstream
    a = fine_tune.run(cfg, ins, tmp_path / "a")
    b = fine_tune.run(cfg, ins, tmp_path / "b")
    assert a.meta["models"]["fine-tune"]["digest"] == b.meta["models"]["fine-tune"]["digest"]
    d = a.path / "models" / "fine-tune"
    assert sorted(p.name for p in (d / "checkpoints").iterdir()) == ["epoch_002.pt", "epoch_003.pt"]
    ckpt = torch.load(d / "checkpoints" / "epoch_002.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["optimizer"]["state"] and ckpt["scheduler"]["last_epoch"] > 0
    last = torch.load(d / "checkpoints" / "epoch_003.pt", weights_only=True)  # nothing continues from the last
    assert last["epoch"] == 3 and last["optimizer"] is None and last["scheduler"] is None and last["model"]
    hist = json.loads((d / "history.json").read_text())
    assert [h["epoch"] for h in hist] == [1, 2, 3] and {"train_loss", "val_acc"} <= hist[0].keys()
    assert (d / "curves.png").stat().st_size > 0
    sel = json.loads((a.path / "selection.json").read_text())
    assert sel["selected"] == "fine-tune"


def test_linear_probe_head_reproduces_on_raw_features(upstream, digits_cfg, tmp_path):
    """The saved probe head (standardisation folded in) gives the same val accuracy as in training."""
    import numpy as np

    from tlops.data.dataset import Dataset
    from tlops.models.bundle import load_classifier

    cfg, ins = upstream
    cfg = digits_cfg(train={"strategies": ["linear-probe"]})
    out = fine_tune.run(cfg, ins, tmp_path / "lp")
    clf = load_classifier(out.path / "models" / "linear-probe")
    val = Dataset(ins["dataset"]).load("val")
    acc = float((clf.predict_proba(val.x).argmax(1) == val.y).mean())
    assert acc == pytest.approx(out.meta["models"]["linear-probe"]["val_acc"], abs=1e-6)
    assert np.isfinite(acc)


def test_bad_freeze_fails_with_message_and_leaves_no_artifact(upstream, digits_cfg, tmp_path):
    _, ins = upstream
    cfg = digits_cfg(train={"strategies": ["fine-tune"], "freeze_blocks": 99})
    with pytest.raises(
        ConfigError, match=r"train.freeze_blocks: got 99, but the backbone has only 6 blocks \(allowed: 0..6\)"
    ):
        fine_tune.run(cfg, ins, tmp_path / "ft")
    assert not (tmp_path / "ft").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ft.tmp")]


def _scores(hist):
    """Every validation score of a history, in training order: step evaluations, then the epoch's end."""
    return [(e["val_acc"], -e["val_loss"]) for h in hist for e in [*h.get("evals", []), h] if "val_acc" in e]


def test_eval_every_n_steps_keeps_the_best_evaluation_and_patience_stops(upstream, tmp_path):
    """train.eval_every scores validation between epoch ends too, and the weights kept are the best
    evaluation's; train.patience stops after that many evaluations in a row without a better one."""
    from tlops.data.dataset import Dataset
    from tlops.models.bundle import load_classifier

    cfg, ins = upstream
    cfg = cfg.model_copy(update={"evaluate": cfg.evaluate.model_copy(update={"scratch_baseline": False})})
    tcfg = cfg.train.model_copy(  # one probe C: the LP-FT head's search is not what this tests
        update={"eval_every": 1, "epochs": 4, "batch_size": 16, "lr": 0.05, "probe_c": [1.0], "probe_scaling": "none"}
    )
    out = fine_tune.run(cfg.model_copy(update={"train": tcfg}), ins, tmp_path / "ft")
    d = out.path / "models" / "fine-tune"
    hist = json.loads((d / "history.json").read_text())
    steps = [e["step"] for h in hist for e in h.get("evals", [])]
    per_epoch = len(steps) // 4 + 1  # one evaluation per step; the last step of an epoch is the epoch's record
    assert len(hist) == 4 and per_epoch > 1 and steps == [s for s in range(1, 4 * per_epoch) if s % per_epoch]
    scores = _scores(hist)
    assert len(set(scores)) > 1
    val = Dataset(ins["dataset"]).load("val")
    kept = float((load_classifier(d).predict_proba(val.x).argmax(1) == val.y).mean())
    assert kept == pytest.approx(max(scores)[0], abs=1e-6) == out.meta["models"]["fine-tune"]["val_acc"]

    patience = 2
    early = fine_tune.run(
        cfg.model_copy(update={"train": tcfg.model_copy(update={"patience": patience})}), ins, tmp_path / "early"
    )
    seq = _scores(json.loads((early.path / "models" / "fine-tune" / "history.json").read_text()))
    assert seq == scores[: len(seq)] and len(seq) < len(scores)  # the same run, cut short
    best, stale = seq[0], 0
    for s in seq[1:]:
        best, stale = (s, 0) if s > best else (best, stale + 1)
    assert stale == patience  # it stopped exactly when patience ran out

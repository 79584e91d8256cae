"""Partial fine-tuning on real (tiny) backbones: layer-wise LR decay on the param groups
themselves, L2-SP, gradual unfreezing (blocks really frozen until their epoch, BN included),
and ``freeze_blocks: auto`` choosing the cut from per-block probes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tlops.config import TrainConfig
from tlops.models.bundle import Classifier, load_backbone
from tlops.steps import extract_features, fine_tune, ingest, pull_model
from tlops.training.partial import L2SP, block_features, choose_freeze_blocks, param_groups, unfreeze_plan


@pytest.fixture
def upstream(digits_cfg, tmp_path):
    def make(**train):
        cfg = digits_cfg(train={"strategies": ["fine-tune"], "epochs": 2, **train})
        ins = {"dataset": ingest.run(cfg, {}, tmp_path / "ingest"), "model": pull_model.run(cfg, {}, tmp_path / "pull")}
        ins["features"] = extract_features.run(cfg, ins, tmp_path / "features")
        return cfg, ins

    return make


def _clf(ins) -> Classifier:
    return Classifier(load_backbone(ins["model"].path / "model"), 3)


def _state(path):
    return {k: v.clone() for k, v in load_backbone(path).model.state_dict().items()}


def test_layer_decay_sets_group_lrs_and_a_scheduler_keeps_the_ratios(upstream):
    _, ins = upstream()
    clf = _clf(ins)
    cfg = TrainConfig(lr=1e-3, head_lr=1e-2, layer_decay=0.5)
    groups = param_groups(clf, cfg)
    n = len(clf.backbone.blocks())  # resnet10t: conv1, bn1, layer1..layer4
    blocks = [g for g in groups if g["name"].startswith("block")]
    assert [g["lr"] for g in blocks] == pytest.approx([1e-3 * 0.5 ** (n - i) for i in range(n)])
    assert groups[-1]["name"] == "head" and groups[-1]["lr"] == 1e-2
    opt = torch.optim.AdamW(groups)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    for _ in range(4):
        opt.step()
        sched.step()
    lrs = [g["lr"] for g in opt.param_groups]
    ratios = [lrs[i + 1] / lrs[i] for i in range(n - 1)]
    assert ratios == pytest.approx([2.0] * (n - 1))  # decay survives the schedule
    assert lrs[0] < 1e-3 * 0.5**n  # and the schedule did scale them


def test_l2sp_penalty_pulls_toward_the_pretrained_weights(upstream, tmp_path):
    cfg, ins = upstream()
    clf = _clf(ins)
    reg = L2SP(clf.backbone, alpha=2.0)
    assert float(reg.penalty().detach()) == 0.0
    with torch.no_grad():
        next(clf.backbone.parameters()).add_(1.0)
    n = next(clf.backbone.parameters()).numel()
    assert float(reg.penalty().detach()) == pytest.approx(0.5 * 2.0 * n)
    # a strong L2-SP keeps the fine-tuned backbone much closer to the source weights
    before = _state(ins["model"].path / "model")
    dist = {}
    for alpha in (0.0, 100.0):
        c = cfg.model_copy(update={"train": cfg.train.model_copy(update={"l2sp": alpha, "lr": 0.01})})
        out = fine_tune.run(c, ins, tmp_path / f"ft-{alpha}")
        after = _state(out.path / "models" / "fine-tune")
        dist[alpha] = sum(
            float((after[k].float() - before[k].float()).pow(2).sum()) for k in before if k.endswith("weight")
        )
    assert dist[100.0] < 0.5 * dist[0.0], dist


def test_gradual_unfreezing_keeps_lower_blocks_and_their_bn_stats_frozen_until_their_epoch(upstream, tmp_path):
    cfg, ins = upstream(gradual_unfreeze=True, epochs=2)
    blocks = _clf(ins).backbone.blocks()
    plan = unfreeze_plan(blocks, 10)
    assert sorted(plan) == list(range(2, 2 + len(blocks)))
    assert plan[2] == [blocks[-1]] and plan[1 + len(blocks)] == [blocks[0]]

    # 2 epochs: epoch 1 trains the head only, epoch 2 opens the top block (layer4) only;
    # the per-epoch checkpoints show the weights at the end of each epoch
    before = _state(ins["model"].path / "model")
    out = fine_tune.run(cfg, ins, tmp_path / "ft")
    ckpt = out.path / "models" / "fine-tune" / "checkpoints"
    states = {
        e: {
            k.removeprefix("backbone.model."): v
            for k, v in torch.load(ckpt / f"epoch_00{e}.pt", weights_only=True)["model"].items()
            if k.startswith("backbone.model.")
        }
        for e in (1, 2)
    }
    assert any("running_mean" in k for k in before)
    for k in before:
        assert torch.equal(before[k], states[1][k]), f"{k} moved during the head-only epoch"
        if not k.startswith("layer4."):
            assert torch.equal(before[k], states[2][k]), f"{k} moved although its block was never unfrozen"
    moved = [k for k in before if k.startswith("layer4.") and not torch.equal(before[k], states[2][k])]
    assert any("running_mean" in k for k in moved) and any(k.endswith("weight") for k in moved)


def test_freeze_blocks_auto_probes_each_block_and_partial_fine_tune_records_the_cut(upstream, tmp_path):
    cfg, ins = upstream(strategies=["partial-fine-tune"])
    from tlops.data.dataset import Dataset

    ds = Dataset(ins["dataset"])
    train, val = ds.load("train"), ds.load("val")
    clf = _clf(ins)
    feats = block_features(clf, train.x)
    n = len(clf.backbone.blocks())
    assert len(feats) == n and all(f.shape[0] == len(train) for f in feats)
    k, scores = choose_freeze_blocks(clf, train, val, cfg.train, 0)
    assert 0 <= k <= n - 1 and [s["block"] for s in scores] == list(range(n))
    assert all(s["on"] == "val" for s in scores if s["score"] is not None)

    out = fine_tune.run(cfg, ins, tmp_path / "ft")
    rec = out.meta["models"]["partial-fine-tune"]
    assert rec["freeze_choice"] == "auto" and rec["freeze_blocks"] == k and len(rec["block_probe"]) == n
    before = _state(ins["model"].path / "model")
    after = _state(out.path / "models" / "partial-fine-tune")
    names = [
        name for name, m in clf.backbone.model.named_children() if any(m in [b] for b in clf.backbone.blocks()[:k])
    ]
    for key in before:
        if key.split(".")[0] in names:
            assert torch.equal(before[key], after[key]), f"{key} is in a frozen block but moved"


def test_block_features_on_a_transformer(minilm_dir):
    from tlops.models.backbone import TextBackbone

    clf = Classifier(TextBackbone.create(str(minilm_dir), max_length=32, pooling="mean"), 2)
    texts = ["good food", "terrible service, never again", "ok", "the best pizza in town!"]
    feats = block_features(clf, texts, batch_size=2)
    assert len(feats) == 7  # embeddings + 6 layers
    assert all(f.shape == (4, 384) and np.isfinite(f).all() for f in feats)
    # the last block's pooled output is exactly the backbone's mean-pooled feature, before the L2 step of
    # the model's sentence-transformers pipeline (source.normalize: auto)
    assert clf.backbone.preprocessing["normalize"] == "l2"
    clf.eval()
    with torch.inference_mode():
        direct = np.concatenate([clf.backbone(**clf.backbone.prepare(texts[i : i + 2])).numpy() for i in (0, 2)])
    order = np.argsort([len(t) for t in texts], kind="stable")  # block_features batches by length
    assert list(order) != [0, 1, 2, 3]
    assert np.allclose(feats[-1] / np.linalg.norm(feats[-1], axis=1, keepdims=True), direct, atol=1e-5)

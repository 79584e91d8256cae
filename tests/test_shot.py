"""SHOT (source-free adaptation) and pseudo-label self-training: the building blocks on real
tensors, the loops on real digits (USPS -> MNIST), and the registry strategies (``shot``,
``dann-self-train``) on a tiny real setup, where replacing every target label by -1 must leave
the trained weights unchanged (no strategy reads them). Resume from checkpoints is covered for
every registered strategy by tests/test_runtime.py."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import SHARED_DATA, digits_config
from torch import nn

from tlops.training import adaptation as da


@pytest.fixture(autouse=True)
def _threads():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# --------------------------------------------------------------------------- building blocks


def test_information_maximisation_rewards_confident_and_diverse_predictions():
    confident_diverse = torch.eye(4).repeat(8, 1) * 20  # each sample sure, classes balanced
    collapsed = torch.zeros(32, 4)
    collapsed[:, 0] = 20  # each sample sure, all the same class
    uniform = torch.zeros(32, 4)
    best = float(da.information_maximisation(confident_diverse)[0])
    assert best == pytest.approx(-np.log(4), abs=1e-3)  # entropy 0 - log(4) diversity
    assert float(da.information_maximisation(collapsed)[0]) == pytest.approx(0.0, abs=1e-3)
    assert float(da.information_maximisation(uniform)[0]) == pytest.approx(0.0, abs=1e-3)  # log 4 - log 4
    loss, stats = da.information_maximisation(uniform)
    assert stats["target_entropy"] == pytest.approx(np.log(4), abs=1e-4)


def test_cluster_pseudo_labels_follow_the_feature_clusters_not_the_classifier():
    """Two well separated clusters in feature space; a classifier that is wrong on a third of
    each cluster. The probability-weighted centroids still sit in the clusters, so the nearest
    centroid (cosine) labels every sample right after one refinement pass."""
    rng = np.random.default_rng(0)
    y = np.arange(300) % 2
    feats = rng.normal(size=(300, 16)) * 0.3 + np.where(y[:, None] == 1, 1.0, -1.0) * np.eye(16)[0] * 3
    wrong = rng.random(300) < 0.33
    pred = np.where(wrong, 1 - y, y)
    probs = np.where(np.eye(2)[pred] == 1, 0.7, 0.3)
    assert (probs.argmax(1) == y).mean() < 0.75
    labels = da.cluster_pseudo_labels(feats, probs)
    assert labels.dtype == np.int64 and (labels == y).mean() == 1.0


def test_confident_pseudo_labels_keep_only_the_sure_samples():
    probs = torch.tensor([[0.95, 0.05], [0.6, 0.4], [0.02, 0.98], [0.5, 0.5]])
    idx, labels = da.confident_pseudo_labels(probs, 0.9)
    assert idx.tolist() == [0, 2] and labels.tolist() == [0, 1]


# --------------------------------------------------------------------------- the loops on real digits


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(1, 8, 5),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(8 * 6 * 6, 32),
            nn.BatchNorm1d(32),
            nn.ReLU(),
        )
        self.head = nn.Linear(32, 10)


def _digits(n: int = 400) -> dict[str, Any]:
    """USPS (16x16) as labelled source, MNIST resized to 16x16 as target; [-1, 1] floats."""
    u = np.load(SHARED_DATA / "usps" / "usps.npz", allow_pickle=False)
    m = np.load(SHARED_DATA / "mnist" / "mnist_subset.npz", allow_pickle=False)

    def t(x: np.ndarray, size: int) -> torch.Tensor:
        """MNIST's 20x20 digits in a 28x28 frame -> 16x16; USPS fills its frame: -> 12x12 + 2 px padding."""
        x = torch.from_numpy(x[:n]).float().div(255).unsqueeze(1)
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        return F.pad(x, [(16 - size) // 2] * 4).sub(0.5).div(0.5)

    return {
        "source": (t(u["x_train"], 12), torch.from_numpy(u["y_train"][:n])),
        "source_val": (t(u["x_test"], 12), torch.from_numpy(u["y_test"][:n])),
        "target": t(m["x_test"], 16),
        "target_y": torch.from_numpy(m["y_test"][:n]),  # only to measure, never passed to a loop
    }


def _source_model(d: dict[str, Any]) -> SmallCNN:
    torch.manual_seed(0)
    model = SmallCNN()
    da.adapt(model, "source-only", d["source"], d["target"], epochs=3, batch_size=32, seed=0, label_smoothing=0.1)
    return model


def test_shot_adapts_the_backbone_with_the_head_frozen_and_is_deterministic():
    d = _digits()
    src = _source_model(d)
    runs = []
    for _ in range(2):
        model = SmallCNN()
        model.load_state_dict(src.state_dict())
        hist = da.shot(model, d["target"], beta=0.3, epochs=2, batch_size=32, seed=1, source_val=d["source_val"])
        runs.append((model, hist))
    (m1, h1), (m2, h2) = runs
    s0, s1, s2 = src.state_dict(), m1.state_dict(), m2.state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)  # deterministic
    assert torch.equal(s1["head.weight"], s0["head.weight"]) and torch.equal(s1["head.bias"], s0["head.bias"])
    assert not torch.equal(s1["backbone.0.weight"], s0["backbone.0.weight"])
    assert all(p.requires_grad for p in m1.parameters())  # the head's flags are restored
    assert h1.meta["method"] == "shot" and h1.meta["n_source"] == 0 and h1.meta["bn_batches"] == "target only"
    assert h1.meta["selection"] == {"criterion": "last", "epoch": 2, "uses_target_labels": False}
    assert [r["epoch"] for r in h1] == [1, 2] and all(0 < r["pseudo_label_agreement"] <= 1 for r in h1)
    assert h1[-1]["transfer_loss"] < h1[0]["transfer_loss"]  # information maximisation goes down
    acc = lambda m: da.evaluate(m, d["target"], d["target_y"])["acc"]  # noqa: E731
    assert acc(m1) > acc(src)  # on this pair SHOT helps even in 2 tiny epochs


def test_self_train_adds_confident_target_pseudo_labels_and_never_reads_target_labels():
    d = _digits()
    src = _source_model(d)
    model = SmallCNN()
    model.load_state_dict(src.state_dict())
    hist = da.self_train(
        model, d["source"], d["target"], rounds=2, threshold=0.3, epochs=1, batch_size=32, seed=0, select="last"
    )
    rounds = hist.meta["rounds"]
    assert [r["round"] for r in rounds] == [1, 2] and all(0 < r["pseudo_labelled"] < 400 for r in rounds)
    assert [r["round"] for r in hist] == [1, 2] and hist.meta["selection"]["uses_target_labels"] is False
    assert not torch.equal(model.state_dict()["head.weight"], src.state_dict()["head.weight"])


# --------------------------------------------------------------------------- the registry strategies


def _tiny_mnist(path):
    with np.load(SHARED_DATA / "mnist" / "mnist_subset.npz", allow_pickle=False) as z:
        x, y = z["x_test"], z["y_test"]
    idx = np.concatenate([np.flatnonzero(y == c)[:60] for c in (0, 1)])
    np.savez(path, x=x[idx], y=y[idx])
    return path


class _NoTargetLabels:
    """The job's dataset with every target split's labels replaced by -1 (source splits untouched)."""

    def __init__(self, ds):
        self._ds = ds

    def __getattr__(self, name):
        return getattr(self._ds, name)

    def load(self, name):
        from tlops.data.dataset import Split

        s = self._ds.load(name)
        return s if name.startswith("source_") else Split(s.x, np.full_like(s.y, -1))


# dann-self-train is slow (DANN + 2 rounds, twice); cdan-self-train shares its code (_self_train)
@pytest.mark.parametrize("name", ["shot", pytest.param("dann-self-train", marks=pytest.mark.slow)])
def test_strategy_trains_through_the_registry_without_target_labels(name, tmp_path):
    from tlops.config import validate_config
    from tlops.data.dataset import Split
    from tlops.steps import extract_features, fine_tune, ingest, pull_model
    from tlops.training import strategies as registry
    from tlops.training.runtime import Runtime

    data = {
        "source": str(_tiny_mnist(tmp_path / "mnist01.npz")),
        "classes": [0, 1],
        "labels_per_class": None,
        "split": {"val": 0.2, "test": 0.2},
        "unlabelled": 0.8,
        "adapt_from": {"source": str(SHARED_DATA / "usps" / "usps.npz"), "max_samples": 80, "val": 0.25},
    }
    raw = digits_config(
        tmp_path / "work",
        source={"model": "timm:resnet10t", "pretrained": False, "in_chans": 1, "image_size": 16},
        train={
            "strategies": [name],
            "threads": 1,
            "adapt": {"epochs": 1, "batch_size": 16, "self_train_threshold": 0.5, "self_train_epochs": 1},
        },
    )
    raw["data"] = data
    cfg = validate_config(raw)
    ins = {"dataset": ingest.run(cfg, {}, tmp_path / "ingest"), "model": pull_model.run(cfg, {}, tmp_path / "pull")}
    ins["features"] = extract_features.run(cfg, ins, tmp_path / "features")
    strategy = registry.get(name)
    assert strategy.needs_adapt_from

    trained = []
    for blind in (False, True):
        job = fine_tune.load_job(cfg, ins, Runtime.from_config(cfg.train))
        if blind:
            job.dataset = _NoTargetLabels(job.dataset)
            job.train = Split(job.train.x, np.full_like(job.train.y, -1))
            job.val = None
        trained.append(strategy.train(job, tmp_path / f"out-{blind}"))
    a, b = (t.classifier.state_dict() for t in trained)
    assert all(torch.equal(a[k], b[k]) for k in a)  # the target labels changed nothing
    t = trained[0]
    assert all(p.device.type == "cpu" for p in t.classifier.parameters())
    phases = [r.get("phase") for r in t.history]
    assert phases[:1] == [None] and len(t.history) == len({r["epoch"] for r in t.history})
    ad = t.extra["adaptation"]
    if name == "shot":
        assert phases[1:] == ["target"] and ad["method"] == "shot" and ad["shot_beta"] == 0.3
        assert ad["selection"]["criterion"] == "last" and ad["source_label_smoothing"] == 0.1
    else:
        assert phases[1:] == ["self-train round 1", "self-train round 2"] and ad["method"] == "dann+self-train"
        assert [r["round"] for r in ad["self_train"]["rounds"]] == [1, 2]

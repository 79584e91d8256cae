"""Domain adaptation building blocks (tlops.training.adaptation) on real tensors, plus the digits benchmark."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tlops.training import adaptation as da

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _threads():
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(old)


# --------------------------------------------------------------------------- CORAL


def test_coral_is_zero_for_identical_distributions_and_matches_the_formula():
    g = torch.Generator().manual_seed(0)
    fs = torch.randn(300, 6, generator=g)
    assert float(da.coral_loss(fs, fs)) == 0.0
    assert float(da.coral_loss(fs, fs[torch.randperm(300, generator=g)] + 3.0)) < 1e-10  # order and mean do not matter
    ft = torch.randn(200, 6, generator=g) @ torch.randn(6, 6, generator=g)
    cs, ct = np.cov(fs.numpy(), rowvar=False), np.cov(ft.numpy(), rowvar=False)
    expected = ((cs - ct) ** 2).sum() / (4 * 6**2)
    assert float(da.coral_loss(fs, ft)) == pytest.approx(expected, rel=1e-4)
    with pytest.raises(ValueError):
        da.coral_loss(fs, ft[:, :3])


def test_minimising_coral_over_a_learnable_scale_and_shift_aligns_the_covariances():
    g = torch.Generator().manual_seed(1)
    ft = torch.randn(256, 8, generator=g) @ torch.diag(torch.linspace(0.3, 3.0, 8)) + 2.0
    fs = torch.randn(256, 8, generator=g)
    scale = nn.Parameter(torch.ones(8))
    shift = nn.Parameter(torch.zeros(8))
    opt = torch.optim.Adam([scale, shift], lr=0.05)
    losses = []
    for _ in range(150):
        loss = da.coral_loss(fs * scale + shift, ft)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.05 * losses[0]
    assert losses[0] > losses[25] > losses[50] > losses[-1]
    cov = lambda x: torch.cov(x.T)  # noqa: E731
    before = torch.linalg.matrix_norm(cov(fs) - cov(ft))
    after = torch.linalg.matrix_norm(cov(fs * scale.detach()) - cov(ft))
    assert after < 0.25 * before
    # CORAL matches second-order statistics only: a shift gets (numerically) no gradient
    shift.grad = None
    da.coral_loss(fs * scale + shift, ft).backward()
    assert shift.grad.abs().max() < 1e-5 < scale.grad.abs().max()


# --------------------------------------------------------------------------- MMD


def test_mmd_is_about_zero_for_the_same_distribution_and_clearly_positive_for_a_shift():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(200, 5, generator=g), torch.randn(200, 5, generator=g)
    shifted = torch.randn(200, 5, generator=g) + 1.0
    assert float(da.mmd_loss(a, a)) == pytest.approx(0.0, abs=1e-6)
    same_u, same_b = float(da.mmd_loss(a, b, unbiased=True)), float(da.mmd_loss(a, b))
    diff_u, diff_b = float(da.mmd_loss(a, shifted, unbiased=True)), float(da.mmd_loss(a, shifted))
    assert abs(same_u) < 0.01 and 0 <= same_b < 0.02
    assert diff_u > 0.1 and diff_b > 0.1 and diff_u > 10 * abs(same_u)
    # more shift -> more MMD; one kernel with a fixed bandwidth works too
    assert float(da.mmd_loss(a, shifted + 1.0)) > diff_b
    assert float(da.mmd_loss(a, shifted, kernels=[1.0], bandwidth=10.0)) > 0.05
    x = a.clone().requires_grad_(True)
    da.mmd_loss(x, shifted).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


# --------------------------------------------------------------------------- gradient reversal


def test_gradient_reversal_is_identity_forward_and_flips_and_scales_the_gradient():
    x = torch.randn(4, 3, requires_grad=True)
    w = torch.randn(4, 3)
    layer = da.GradientReversal(lambd=0.5)
    y = layer(x)
    assert torch.equal(y, x)
    (y * w).sum().backward()
    assert torch.allclose(x.grad, -0.5 * w)
    x.grad = None
    layer.lambd = 2.0
    (layer(x) * w).sum().backward()
    assert torch.allclose(x.grad, -2.0 * w)
    x.grad = None
    (da.grad_reverse(x, 1.0) * w).sum().backward()
    assert torch.allclose(x.grad, -w)
    sched = [da.dann_schedule(p) for p in np.linspace(0, 1, 11)]
    assert sched[0] == 0.0 and sched[-1] == pytest.approx(2 / (1 + np.exp(-10)) - 1) and sched == sorted(sched)
    assert da.dann_schedule(0.5, gamma=10.0) == pytest.approx(2 / (1 + np.exp(-5)) - 1)


def test_domain_discriminator_and_multilinear_map_shapes():
    d = da.DomainDiscriminator(12, hidden=16)
    assert d(torch.randn(5, 12)).shape == (5,)
    assert sum(isinstance(m, nn.Linear) for m in d.modules()) == 3
    f, p = torch.randn(5, 4), torch.softmax(torch.randn(5, 3), 1)
    m = da.multilinear_map(f, p)
    assert m.shape == (5, 12) and torch.allclose(m[2].view(3, 4), torch.outer(p[2], f[2]))


# --------------------------------------------------------------------------- AdaBN


class TinyNet(nn.Module):
    def __init__(self, d_in: int = 4, d_hidden: int = 8, n_cls: int = 2, dropout: float = 0.5):
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Linear(d_in, d_hidden), nn.Dropout(dropout), nn.BatchNorm1d(d_hidden), nn.ReLU()
        )
        self.backbone.feature_dim = d_hidden
        self.head = nn.Linear(d_hidden, n_cls)

    def forward(self, x):
        return self.head(self.backbone(x))


def test_adabn_sets_bn_stats_to_the_target_statistics_and_changes_no_weight():
    torch.manual_seed(0)
    model = TinyNet()
    model.train()
    with torch.no_grad():  # running stats from the "source"
        for _ in range(20):
            model(torch.randn(64, 4))
    model.eval()
    bn = model.backbone[2]
    bn.momentum = 0.3
    weights = {k: v.clone() for k, v in model.named_parameters()}
    target = torch.randn(512, 4) * 3.0 + 5.0
    n = da.adabn(model, [target[i : i + 128] for i in range(0, 512, 128)])
    assert n == 512
    with torch.no_grad():
        h = model.backbone[0](target)  # dropout must have been OFF during AdaBN
    assert torch.allclose(bn.running_mean, h.mean(0), atol=1e-4)
    per_batch_var = torch.stack([h[i : i + 128].var(0, unbiased=True) for i in range(0, 512, 128)]).mean(0)
    assert torch.allclose(bn.running_var, per_batch_var, rtol=1e-4)
    assert bn.num_batches_tracked.item() == 4
    for k, v in model.named_parameters():
        assert torch.equal(v, weights[k]), f"{k} changed"
    assert not model.training and not bn.training and bn.momentum == 0.3  # modes and momentum restored
    # whole target as one batch: exactly the target's mean and unbiased variance
    da.adabn(model, [target])
    assert torch.allclose(bn.running_var, h.var(0, unbiased=True), rtol=1e-4)
    # in eval mode the BN output of the target is now standardised
    with torch.no_grad():
        z = bn(h)
    assert torch.allclose(z.mean(0), bn.bias, atol=1e-3)


def test_adabn_with_a_prepare_callable_keeps_train_mode():
    model = TinyNet()
    model.train()
    raw = [np.full((16, 4), 2.0, dtype=np.float32) + np.random.default_rng(0).normal(size=(16, 4)).astype(np.float32)]
    da.adabn(model, raw, prepare=torch.from_numpy)
    assert model.training and all(m.training for m in model.modules())
    with pytest.raises(ValueError):
        da.adabn(model, [])


# --------------------------------------------------------------------------- adapt()


def two_domains(n: int = 96, seed: int = 0):
    """Two Gaussian classes in 4-d; the target is rotated, scaled and shifted."""
    g = torch.Generator().manual_seed(seed)

    def sample(m):
        y = torch.arange(m) % 2
        x = torch.randn(m, 4, generator=g) * 0.7
        x[:, 0] += torch.where(y == 1, 1.5, -1.5)
        return x, y

    xs, ys = sample(n)
    xv, yv = sample(32)
    xt, yt = sample(n)
    rot = torch.linalg.qr(torch.randn(4, 4, generator=g))[0]
    xt = (xt @ (0.3 * rot + 0.9 * torch.eye(4))) * 1.5 + 0.8
    return (xs, ys), (xv, yv), xt, yt


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("method", da.METHODS)
def test_adapt_runs_is_deterministic_and_records_the_selection(method):
    source, source_val, xt, _ = two_domains()
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        model = TinyNet()
        hist = da.adapt(
            model,
            method,
            source,
            xt,
            epochs=3,
            batch_size=32,
            lr=0.05,
            seed=7,
            source_val=source_val,
            discriminator_hidden=16,
        )
        runs.append((model, hist))
    (m1, h1), (m2, h2) = runs
    s1, s2 = _state(m1), _state(m2)
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
    assert strip(h1) == strip(h2)
    assert isinstance(h1, list) and [r["epoch"] for r in h1] == [1, 2, 3]
    assert h1.meta["method"] == method and h1.meta["iters_per_epoch"] == 3
    sel = h1.meta["selection"]
    assert sel["criterion"] == "source_val" and sel["uses_target_labels"] is False
    assert sum(r["selected"] for r in h1) == 1
    best = max(h1, key=lambda r: (r["source_val_acc"], -r["source_val_loss"], r["epoch"]))
    assert best["selected"] and best["epoch"] == sel["epoch"]
    assert all({"cls_loss", "transfer_loss", "train_acc", "source_val_acc", "lr"} <= r.keys() for r in h1)
    if method == "source-only":
        assert all(r["transfer_loss"] == 0 for r in h1)
    else:
        assert any(r["transfer_loss"] != 0 for r in h1)
    if method in ("dann", "cdan", "cdan+e"):
        assert "domain_acc" in h1[0] and 0 < h1[-1]["grl_lambda"] < 1
    assert not m1.training
    # another seed gives another run
    torch.manual_seed(123)
    m3 = TinyNet()
    da.adapt(
        m3, method, source, xt, epochs=3, batch_size=32, lr=0.05, seed=8, source_val=source_val, discriminator_hidden=16
    )
    assert any(not torch.equal(v, _state(m3)[k]) for k, v in s1.items() if v.is_floating_point())


def test_adapt_last_epoch_selection_prepare_augment_and_monitor():
    (xs, ys), _, xt, yt = two_domains(64)

    class KwNet(TinyNet):  # a backbone that takes keyword tensors, like tlops' ImageBackbone
        def __init__(self):
            super().__init__(dropout=0.0)
            inner = self.backbone
            self.backbone = type("B", (nn.Module,), {"forward": lambda s, values: s.inner(values)})()
            self.backbone.inner = inner

    torch.manual_seed(0)
    model = KwNet()
    seen = []
    hist = da.adapt(
        model,
        "coral",
        (xs.numpy(), ys.numpy()),
        xt.numpy(),
        epochs=2,
        batch_size=16,
        lr=0.05,
        seed=0,
        prepare=lambda raw: {"values": torch.from_numpy(np.asarray(raw))},
        augment=lambda inputs, g: {
            "values": inputs["values"] + 0.01 * torch.randn(inputs["values"].shape, generator=g)
        },
        monitor=lambda m: {"target_acc": da.evaluate(m, xt, yt, prepare=lambda r: {"values": r})["acc"]},
        log=seen.append,
    )
    assert hist.meta["selection"] == {"criterion": "last", "epoch": 2, "uses_target_labels": False}
    assert [r["selected"] for r in hist] == [False, True] and len(seen) == 2
    assert all(0 <= r["monitor_target_acc"] <= 1 for r in hist) and "source_val_acc" not in hist[0]
    assert hist.meta["iters_per_epoch"] == 4
    with pytest.raises(ValueError):
        da.adapt(model, "nope", (xs, ys), xt)
    with pytest.raises(ValueError):
        da.adapt(model, "dann", (xs, ys), xt, select="source_val")


def test_adapt_randomized_cdan_map_and_target_entropy_term():
    source, _, xt, _ = two_domains(64)
    torch.manual_seed(0)
    hist = da.adapt(
        TinyNet(),
        "cdan+e",
        source,
        xt,
        epochs=2,
        batch_size=16,
        seed=0,
        discriminator_hidden=8,
        cdan_randomized_dim=8,
        entropy_weight=0.1,
    )
    assert hist.meta["cdan_map"] == "randomized 8" and hist.meta["entropy_weight"] == 0.1
    assert all(r["target_entropy"] > 0 for r in hist)
    rmap = da.RandomizedMultilinearMap(4, 3, 16, generator=torch.Generator().manual_seed(0))
    assert rmap(torch.randn(5, 4), torch.softmax(torch.randn(5, 3), 1)).shape == (5, 16)
    assert not list(rmap.parameters())  # fixed random projections, not trained
    # the paper's rule: exact map when C*D <= 4096
    hist = da.adapt(TinyNet(), "cdan", source, xt, epochs=1, batch_size=16, seed=0, discriminator_hidden=8)
    assert hist.meta["cdan_map"] == "exact"


def test_adapt_and_adabn_on_a_tlops_classifier_with_raw_uint8_images(shared_data):
    """The wiring the fine-tune step needs: Classifier + ImageBackbone, prepare=backbone.prepare, frozen blocks."""
    from tlops.models.backbone import ImageBackbone
    from tlops.models.bundle import Classifier

    d = np.load(shared_data / "usps" / "usps.npz", allow_pickle=False)
    xs, ys, xt = d["x_train"][:64], d["y_train"][:64], d["x_test"][:64]  # uint8 (N, 16, 16)
    torch.manual_seed(0)
    clf = Classifier(ImageBackbone.create("resnet10t", pretrained=False, in_chans=1, image_size=16), 10)
    frozen = clf.backbone.blocks()[:2]
    for m in frozen:
        for p in m.parameters():
            p.requires_grad_(False)
    before = {k: v.clone() for k, v in clf.state_dict().items()}

    def train_mode(model):
        model.train()
        for m in frozen:
            m.eval()

    hist = da.adapt(
        clf,
        "dann",
        (xs, ys),
        xt,
        epochs=1,
        batch_size=32,
        seed=0,
        source_val=(d["x_test"][64:96], d["y_test"][64:96]),
        prepare=clf.backbone.prepare,
        augment=da.random_shift(1),
        set_train_mode=train_mode,
        discriminator_hidden=32,
    )
    assert hist.meta["selection"]["criterion"] == "source_val" and len(hist) == 1
    after = {k: v.clone() for k, v in clf.state_dict().items()}
    frozen_keys = [k for k in before if k.startswith(("backbone.model.conv1.", "backbone.model.bn1."))]
    assert frozen_keys and all(torch.equal(before[k], after[k]) for k in frozen_keys)  # weights and BN stats
    assert not torch.equal(before["head.weight"], after["head.weight"])
    trainable = clf.backbone.blocks()[2:]
    assert da.adabn(clf, [xt[:32], xt[32:]], prepare=clf.backbone.prepare, within=trainable) == 64
    assert all(torch.equal(before[k], clf.state_dict()[k]) for k in frozen_keys)
    assert not torch.equal(
        after["backbone.model.layer4.0.bn1.running_mean"], clf.state_dict()["backbone.model.layer4.0.bn1.running_mean"]
    )
    assert clf.predict_proba(xt[:4]).shape == (4, 10)


def test_random_shift_moves_pixels_and_is_seeded():
    x = torch.zeros(8, 1, 6, 6)
    x[:, :, 2:4, 2:4] = 1.0
    aug = da.random_shift(2)
    a = aug(x, torch.Generator().manual_seed(0))
    b = aug({"pixel_values": x}, torch.Generator().manual_seed(0))["pixel_values"]
    assert torch.equal(a, b) and a.shape == x.shape
    assert torch.allclose(a.sum((1, 2, 3)), x.sum((1, 2, 3)))  # a 2x2 blob shifted by <= 2 stays inside a 6x6 frame
    assert not all(torch.equal(a[i], x[i]) for i in range(8))


# --------------------------------------------------------------------------- the benchmark


QUICK_TOLERANCE = 0.03  # absolute accuracy; same code, data, seed and thread count -> usually identical


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_quick_benchmark_reproduces_the_committed_results(shared_data, tmp_path):
    committed = json.loads((REPO / "bench" / "results" / "transfer-quick.json").read_text())
    out = tmp_path / "transfer-quick.md"
    subprocess.run(
        [sys.executable, str(REPO / "bench" / "transfer.py"), "--quick", "--out", str(out)],
        check=True,
        cwd=REPO,
        env={**__import__("os").environ, "TLOPS_SHARED_DATA": str(shared_data)},
    )
    got = json.loads(out.with_suffix(".json").read_text())
    assert got["sizes"] == committed["sizes"] and got["hyperparameters"] == committed["hyperparameters"]
    assert got["summary"].keys() == committed["summary"].keys()
    for pair, per in committed["summary"].items():
        assert per.keys() == got["summary"][pair].keys()
        for method, ref in per.items():
            acc = got["summary"][pair][method]["acc_mean"]
            assert acc == pytest.approx(ref["acc_mean"], abs=QUICK_TOLERANCE), (
                f"{pair} {method}: {acc:.3f} vs committed {ref['acc_mean']:.3f}"
            )
    text = out.read_text()
    assert "model selection (no target labels)" in text and "vs reference" in text

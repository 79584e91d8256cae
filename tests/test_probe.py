"""The linear probe: scikit-learn's logistic regression with the scaling and C chosen on held-out data,
exported as an ``nn.Linear`` on the raw features."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression

from tlops.config import TrainConfig
from tlops.training.probe import train_probe


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits(return_X_y=True)
    p = np.random.default_rng(0).permutation(len(y))
    return x, y, p[:600], p[600:800], p[800:]


def _proba(head: torch.nn.Linear, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return torch.softmax(head(torch.from_numpy(x).float()), 1).numpy()


@pytest.mark.parametrize("scaling", ["none", "standardize"])
def test_head_on_raw_features_is_the_fitted_model(digits, scaling):
    """The folded head gives scikit-learn's probabilities on raw features (multiclass and binary)."""
    x, y, tr, va, te = digits
    for labels, k in ((y, 10), ((y > 4).astype(int), 2)):
        cfg = TrainConfig(probe_scaling=scaling, probe_c=[0.5], probe_max_iter=5000)
        head, hist = train_probe(x[tr], labels[tr], None, None, k, cfg, seed=0)
        assert hist[0]["selected_by"] == "none" and hist[0]["scaling"] == scaling
        xs = x[tr]
        mean, std = (xs.mean(0), xs.std(0)) if scaling == "standardize" else (0.0, 1.0)
        if scaling == "standardize":
            std = np.maximum(std, 0.05 * std.mean() + 1e-8)
        ref = LogisticRegression(C=0.5, max_iter=5000).fit((xs - mean) / std, labels[tr])
        want = ref.predict_proba((x[te] - mean) / std)
        np.testing.assert_allclose(_proba(head, x[te]), want, atol=2e-4)


def test_c_and_scaling_are_chosen_on_validation(digits):
    """Every (scaling, C), LogisticRegressionCV's C among them, is scored on val; the search's best replaces
    LogisticRegressionCV's choice only when it beats it by more than a standard error."""
    x, y, tr, va, te = digits
    head, hist = train_probe(x[tr], y[tr], x[va], y[va], 10, TrainConfig(probe_select="val"), seed=0)
    rec = hist[0]
    assert rec["selected_by"] == "val"
    n_c = len(TrainConfig().probe_c)
    assert len(rec["search"]) in (2 * n_c, 2 * n_c + 1)  # + the anchor's C when it is not on the grid
    assert {r["scaling"] for r in rec["search"]} == {"none", "standardize"}
    anchor = next(r for r in rec["search"] if r["scaling"] == "none" and r["C"] == rec["anchor_C"])
    assert rec["anchor_C"] in np.logspace(-4, 4, 10)
    se = np.sqrt(anchor["acc"] * (1 - anchor["acc"]) / len(va))
    best = max(r["acc"] for r in rec["search"])
    if rec["chose_anchor"]:
        assert (rec["scaling"], rec["C"]) == ("none", rec["anchor_C"]) and best - anchor["acc"] <= se
    else:
        assert rec["val_acc"] - anchor["acc"] > se
    assert rec["val_acc"] == pytest.approx(
        next(r["acc"] for r in rec["search"] if r["C"] == rec["C"] and r["scaling"] == rec["scaling"])
    )
    assert float((_proba(head, x[te]).argmax(1) == y[te]).mean()) > 0.94


def test_kept_anchor_predicts_as_logistic_regression_cv(digits):
    """On few labels the wider search cannot show it is better, so the probe is scikit-learn's
    ``LogisticRegressionCV`` itself: the same C and the same test predictions (issue 16: never below it)."""
    import warnings

    from sklearn.linear_model import LogisticRegressionCV

    x, y, tr, va, te = digits
    few = np.concatenate([tr[y[tr] == c][:5] for c in range(10)])
    # the search's grid is only its ends (LRCV's whole range, few fits); 100 lbfgs steps keep it fast
    cfg = TrainConfig(probe_scaling="none", probe_c=[1e-4, 1e4], probe_max_iter=100)
    head, hist = train_probe(x[few], y[few], None, None, 10, cfg, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = LogisticRegressionCV(max_iter=100).fit(x[few], y[few])
    assert hist[0]["chose_anchor"] and hist[0]["C"] == pytest.approx(ref.C_[0])
    assert (_proba(head, x[te]).argmax(1) == ref.predict(x[te])).mean() > 0.995  # float32 head: rare near-ties


def test_auto_cross_validates_on_train_and_is_deterministic(digits):
    """By default (val smaller than train, or no val at all) C is chosen by repeated stratified CV on train."""
    x, y, tr, va, te = digits
    few = np.concatenate([tr[y[tr] == c][:4] for c in range(10)])
    a, ha = train_probe(x[few], y[few], x[va[:30]], y[va[:30]], 10, TrainConfig(), seed=3)
    b, hb = train_probe(x[few], y[few], None, None, 10, TrainConfig(), seed=3)
    assert ha[0]["selected_by"] == hb[0]["selected_by"] == "cv"
    assert (ha[0]["cv_folds"], ha[0]["cv_repeats"]) == (4, 3)  # 4 labels per class: 4 stratified folds
    assert (ha[0]["scaling"], ha[0]["C"]) == (hb[0]["scaling"], hb[0]["C"])
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)


def test_forcing_val_without_a_split_is_an_error(digits):
    x, y, tr, *_ = digits
    with pytest.raises(ValueError, match="train.probe_select is 'val' but there is no validation split"):
        train_probe(x[tr], y[tr], None, None, 10, TrainConfig(probe_select="val"), seed=0)


def test_a_class_missing_from_train_is_never_predicted(digits):
    x, y, tr, *_ = digits
    keep = tr[y[tr] != 7]
    head, _ = train_probe(x[keep], y[keep], None, None, 10, TrainConfig(probe_c=[1.0]), seed=0)
    assert not (_proba(head, x).argmax(1) == 7).any()


def test_probe_c_must_be_positive():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="every probe_c value must be > 0"):
        TrainConfig(probe_c=[1.0, 0.0])


def test_unit_norm_features_keep_their_geometry(digits):
    """L2-normalised rows (a sentence encoder's pipeline) are not z-scored: only ``none`` is searched."""
    x, y, tr, va, te = digits
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    _, hist = train_probe(xn[tr[:200]], y[tr[:200]], None, None, 10, TrainConfig(), seed=0)
    assert {r["scaling"] for r in hist[0]["search"]} == {"none"}
    _, hist = train_probe(x[tr[:200]], y[tr[:200]], None, None, 10, TrainConfig(), seed=0)
    assert {r["scaling"] for r in hist[0]["search"]} == {"none", "standardize"}

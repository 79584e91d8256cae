"""The linear probe: scikit-learn's LogisticRegressionCV (or C chosen on validation), exported as an
``nn.Linear`` on the raw features."""

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


def test_c_is_chosen_on_validation_by_the_path_it_was_scored_on(digits):
    """probe_select val: every C of the grid is scored on val; the best (ties: the smaller C) is the head,
    and its validation accuracy is the one that was scored."""
    x, y, tr, va, te = digits
    head, hist = train_probe(x[tr], y[tr], x[va], y[va], 10, TrainConfig(probe_select="val"), seed=0)
    rec = hist[0]
    assert rec["selected_by"] == "val" and rec["scaling"] == "none"
    assert [r["C"] for r in rec["search"]] == pytest.approx(list(np.logspace(-4, 4, 10)))
    best = max(rec["search"], key=lambda r: (r["acc"], -r["C"]))
    assert rec["C"] == best["C"] and rec["val_acc"] == pytest.approx(best["acc"])
    assert rec["temperature"] >= 1.0
    assert float((_proba(head, x[te]).argmax(1) == y[te]).mean()) > 0.94


def test_default_is_logistic_regression_cv_itself(digits):
    """By default the probe is scikit-learn's ``LogisticRegressionCV`` with its defaults (issue 16: never below
    it): the same C, the same per-C fold accuracies and the same test predictions, deterministic; a smaller
    validation split does not change the choice, only the reported val accuracy."""
    import warnings

    from sklearn.linear_model import LogisticRegressionCV

    x, y, tr, va, te = digits
    few = np.concatenate([tr[y[tr] == c][:4] for c in range(10)])  # 4 labels per class: 4 stratified folds
    a, ha = train_probe(x[few], y[few], x[va[:30]], y[va[:30]], 10, TrainConfig(), seed=3)
    b, hb = train_probe(x[few], y[few], None, None, 10, TrainConfig(), seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = LogisticRegressionCV(cv=4, max_iter=TrainConfig().probe_max_iter).fit(x[few], y[few])
    assert ha[0]["selected_by"] == hb[0]["selected_by"] == "cv" and ha[0]["cv_folds"] == 4
    assert ha[0]["C"] == pytest.approx(ref.C_[0]) and hb[0]["C"] == ha[0]["C"]
    np.testing.assert_allclose([r["acc"] for r in ha[0]["search"]], ref.scores_[0].mean(0), atol=1e-6)
    assert ha[0]["cv_acc"] == pytest.approx(ref.scores_[0].mean(0).max(), abs=1e-6)
    assert (_proba(a, x[te]).argmax(1) == ref.predict(x[te])).mean() > 0.995  # float32 head: rare near-ties
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)


def test_temperature_comes_from_out_of_fold_logits_and_keeps_every_prediction(digits):
    """The CV head is softened (T >= 1) using LogisticRegressionCV's own fold models; scaling logits by 1/T
    changes no argmax, so its predictions stay LogisticRegressionCV's."""
    from tlops.training.probe import _cross_validated, _oof_logits

    x, y, tr, *_ = digits
    cfg = TrainConfig()
    lrcv = _cross_validated(x[tr], y[tr], list(cfg.probe_c), 5, cfg)
    oof = _oof_logits(lrcv, x[tr], y[tr], 5)
    ci = list(lrcv.Cs_).index(lrcv.C_[0])
    # each sample scored once, by the fold model that did not see it: its accuracy is the reported CV score
    assert float((oof.argmax(1) == y[tr]).mean()) == pytest.approx(lrcv.scores_[0][:, ci].mean(), abs=0.01)
    head, hist = train_probe(x[tr], y[tr], None, None, 10, cfg, seed=0)
    assert hist[0]["temperature"] >= 1.0
    assert (_proba(head, x).argmax(1) == lrcv.predict(x)).mean() > 0.995


def test_one_label_in_a_class_falls_back_to_validation_or_the_middle_of_the_grid(digits):
    """A class with a single train label cannot be stratified: auto uses the validation split when there is
    one, else the middle of the grid (no search)."""
    x, y, tr, va, _ = digits
    few = np.concatenate([tr[y[tr] == c][: 1 if c == 0 else 3] for c in range(10)])
    _, hv = train_probe(x[few], y[few], x[va[:20]], y[va[:20]], 10, TrainConfig(), seed=0)
    _, hn = train_probe(x[few], y[few], None, None, 10, TrainConfig(), seed=0)
    assert hv[0]["selected_by"] == "val" and len(hv[0]["search"]) == 10
    assert hn[0]["selected_by"] == "none" and hn[0]["C"] == pytest.approx(np.logspace(-4, 4, 10)[5])


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


def test_default_grid_is_logistic_regression_cvs():
    assert TrainConfig().probe_c == list(np.logspace(-4, 4, 10))

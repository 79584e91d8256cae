"""Bootstrap intervals: coverage on a known Bernoulli, macro-F1 as scikit-learn computes it,
paired differences narrower than unpaired ones, determinism."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import f1_score

from tlops.evaluation.uncertainty import (
    _macro_f1_rows,
    metric_intervals,
    paired_difference_interval,
    unpaired_difference_interval,
)


def test_accuracy_interval_covers_the_true_rate_about_95_percent_of_the_time():
    p, n, hits = 0.8, 300, 0
    for seed in range(200):
        rng = np.random.default_rng(1000 + seed)
        y = np.zeros(n, dtype=np.int64)
        pred = np.where(rng.random(n) < p, 0, 1)  # correct with probability p
        lo, hi = metric_intervals(y, pred, 2, resamples=1000, seed=seed)["accuracy"]
        hits += lo <= p <= hi
    assert 0.90 <= hits / 200 <= 0.99, hits


def test_macro_f1_rows_match_scikit_learn_including_absent_classes():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 60)
    pred = np.where(rng.random(60) < 0.6, y, rng.integers(0, 4, 60))
    rows = rng.integers(0, 60, size=(20, 60))
    rows[0] = np.flatnonzero(y != 3)[0]  # one resample that holds a single sample: most classes absent
    ours = _macro_f1_rows(y[rows], pred[rows], 5)  # class 4 never occurs: F1 0, still averaged
    ref = [f1_score(y[r], pred[r], labels=list(range(5)), average="macro", zero_division=0) for r in rows]
    np.testing.assert_allclose(ours, ref)


def test_interval_holds_the_point_estimate_and_is_deterministic():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, 200)
    pred = np.where(rng.random(200) < 0.7, y, (y + 1) % 3)
    a = metric_intervals(y, pred, 3, seed=7)
    assert a == metric_intervals(y, pred, 3, seed=7)
    assert a != metric_intervals(y, pred, 3, seed=8)
    acc = (y == pred).mean()
    f1 = f1_score(y, pred, average="macro")
    assert a["accuracy"][0] < acc < a["accuracy"][1]
    assert a["macro_f1"][0] < f1 < a["macro_f1"][1]
    # ~ +-1.96 * sqrt(p(1-p)/n)
    assert a["accuracy"][1] - a["accuracy"][0] == pytest.approx(2 * 1.96 * np.sqrt(acc * (1 - acc) / 200), rel=0.15)


def test_paired_interval_is_narrower_than_unpaired_on_correlated_predictions():
    rng = np.random.default_rng(0)
    n = 400
    easy = rng.random(n) < 0.75  # both models get the easy samples right
    a = easy | (rng.random(n) < 0.25)
    b = easy | (rng.random(n) < 0.1)
    paired = paired_difference_interval(a, b, seed=0)
    unpaired = unpaired_difference_interval(a, b, seed=0)
    gain = a.mean() - b.mean()
    assert paired[0] < gain < paired[1] and unpaired[0] < gain < unpaired[1]
    assert (paired[1] - paired[0]) < 0.6 * (unpaired[1] - unpaired[0])
    assert paired[0] > 0 > unpaired[0]  # the gain is resolved only when the pairing is used


def test_paired_interval_refuses_different_samples():
    with pytest.raises(ValueError, match="same samples"):
        paired_difference_interval(np.ones(10), np.ones(11))


def test_large_test_split_is_bounded_in_memory_and_identical_across_blocks(monkeypatch):
    import tlops.evaluation.uncertainty as u

    rng = np.random.default_rng(1)
    y = rng.integers(0, 5, 500)
    pred = np.where(rng.random(500) < 0.8, y, rng.integers(0, 5, 500))
    whole = metric_intervals(y, pred, 5, resamples=300, seed=2)
    monkeypatch.setattr(u, "_BLOCK", 500 * 7)  # 7 resamples a block: 43 blocks, same random stream
    assert metric_intervals(y, pred, 5, resamples=300, seed=2) == whole

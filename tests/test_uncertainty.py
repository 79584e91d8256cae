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


# ---------------------------------------------------------------- gates and report on the intervals


@pytest.mark.parametrize(
    ("bound", "gain", "ci", "passed"),
    [
        ("point", 0.04, [-0.01, 0.09], True),  # the point estimate clears 0.02...
        ("lower", 0.04, [-0.01, 0.09], False),  # ...but the gain may be noise
        ("lower", 0.08, [0.03, 0.13], True),
        ("lower", 0.08, None, False),  # asked for a bound that was not computed
    ],
)
def test_min_gain_over_scratch_on_the_lower_bound(bound, gain, ci, passed):
    from tlops.config import GatesConfig
    from tlops.evaluation.gates import decide

    d = decide(GatesConfig(min_gain_over_scratch=0.02, gain_bound=bound), 0.9, gain, None, gain_ci=ci)
    assert d["passed"] is passed
    if bound == "lower" and ci:
        assert d["checks"][0]["reason"].startswith(f"lower 95% bound of the gain over scratch {ci[0]:+.4f}")


@pytest.mark.parametrize(("ci", "passed"), [([-0.02, 0.05], False), ([0.001, 0.05], True), ([0.0, 0.05], False)])
def test_must_beat_champion_on_the_lower_bound(ci, passed):
    from tlops.config import GatesConfig
    from tlops.evaluation.gates import decide

    champion = {"version": "3", "comparable": True, "accuracy": 0.85, "gain": 0.015, "gain_ci": ci}
    d = decide(GatesConfig(must_beat_champion=True, gain_bound="lower"), 0.865, None, champion)
    assert d["passed"] is passed
    assert "gain over champion v3" in d["checks"][0]["reason"]
    # the point estimate alone beats the champion
    assert decide(GatesConfig(must_beat_champion=True), 0.865, None, champion)["passed"] is True


def test_report_and_summary_table_show_the_intervals():
    from rich.console import Console

    from tlops.evaluation.report import render_markdown
    from tlops.report import rows_table

    models = {
        "linear-probe": {
            "accuracy": 0.822,
            "accuracy_ci": [0.777, 0.866],
            "macro_f1": 0.81,
            "macro_f1_ci": [0.76, 0.85],
            "ece": 0.05,
            "train_seconds": 0.1,
            "gain_over_scratch": 0.216,
            "gain_over_scratch_ci": [0.149, 0.283],
            "per_class": {},
        },
        "scratch": {
            "accuracy": 0.606,
            "accuracy_ci": [0.55, 0.66],
            "macro_f1": 0.6,
            "macro_f1_ci": [0.54, 0.65],
            "ece": 0.1,
            "train_seconds": 10.0,
            "per_class": {},
        },
    }
    report = {
        "pipeline": "p",
        "selected": "linear-probe",
        "test_size": 269,
        "metrics": models["linear-probe"] | {"gain_over_majority": 0.6, "gain_over_scratch_ci": [0.149, 0.283]},
        "models": models,
        "baselines": {"majority": {"class": "5", "accuracy": 0.204}},
        "scratch_baseline": "on",
        "champion": {"version": "2", "comparable": True, "accuracy": 0.8, "macro_f1": 0.79, "ece": 0.06}
        | {"gain": 0.022, "gain_ci": [-0.011, 0.056], "accuracy_ci": [0.75, 0.85], "macro_f1_ci": [0.74, 0.84]},
        "gates": {"passed": True, "reasons": ["all gates passed"]},
        "data_hash": "0" * 64,
        "intervals": {"confidence": 0.95, "resamples": 2000, "seed": 0},
    }
    md = render_markdown(report)
    assert "| linear-probe (selected) | 0.8220 [0.7770, 0.8660] | 0.8100 [0.7600, 0.8500] |" in md
    assert "+0.2160 [+0.1490, +0.2830]" in md
    assert "- gain over from-scratch: +0.2160 [+0.1490, +0.2830]" in md
    assert "gain over it +0.0220 [-0.0110, +0.0560]" in md
    assert "In brackets: 95% percentile bootstrap intervals over the 269 test samples (2000 resamples" in md
    rows = [
        {"strategy": "linear-probe *", "accuracy": 0.822, "accuracy_ci": [0.777, 0.866], "gain": 0.216}
        | {"gain_ci": [0.149, 0.283], "seconds": 0.11},
        {"strategy": "scratch", "accuracy": 0.606, "accuracy_ci": [0.55, 0.66], "gain": None, "seconds": 177.0},
    ]
    console = Console(width=80, record=True)
    console.print(rows_table("t", rows, 0.95))
    text = console.export_text()
    assert "│ linear-probe * │ 0.822 [0.777, 0.866] │ +0.216 [+0.149, +0.283] │" in text
    assert "in brackets: 95% bootstrap interval; gains paired" in text

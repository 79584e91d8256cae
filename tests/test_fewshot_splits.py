"""Few-shot splits: the validation split is held to the label budget too (unless it has its own),
the training samples stay the ones drawn first, and the report states what was spent."""

from __future__ import annotations

import numpy as np
import pytest

from tlops.config import DataConfig
from tlops.data.splits import stratified_split, val_budget

Y = np.repeat(np.arange(3), 100)  # 3 classes x 100 samples: val 0.2 -> 20 per class uncapped


def _split(**data):
    cfg = DataConfig(source="sklearn:digits", split={"val": 0.2, "test": 0.3}, **data)
    return stratified_split(Y, cfg, 0, ["a", "b", "c"])


def _per_class(ix):
    return np.bincount(Y[ix], minlength=3).tolist()


def test_labels_per_class_caps_validation_and_keeps_the_training_draw():
    full = _split()
    few = _split(labels_per_class=8)
    assert _per_class(few.train) == [8, 8, 8]
    assert _per_class(few.val) == [8, 8, 8]
    assert _per_class(full.val) == [20, 20, 20]
    np.testing.assert_array_equal(few.test, full.test)
    assert set(few.val) <= set(full.val)
    # the K training samples are the first K of the pool, as before the cap
    legacy_pool = np.setdiff1d(np.arange(300), np.concatenate([full.test, full.val]))
    assert set(few.train) <= set(legacy_pool)


def test_explicit_validation_budget_wins_either_way():
    assert _per_class(_split(labels_per_class=8, val_labels_per_class=15).val) == [15, 15, 15]
    assert _per_class(_split(labels_per_class=8, val_labels_per_class=2).val) == [2, 2, 2]
    assert _per_class(_split(labels_per_class=8, val_labels_per_class=500).val) == [20, 20, 20]  # fraction bounds it


def test_validation_budget_without_training_budget_returns_the_rest_to_training():
    s = _split(val_labels_per_class=5)
    assert _per_class(s.val) == [5, 5, 5]
    assert _per_class(s.train) == [65, 65, 65]  # 100 - 30 test - 5 val
    every = np.concatenate([s.train, s.val, s.test])
    assert len(every) == len(set(every)) == 300


def test_budget_rule_is_stated():
    assert val_budget(DataConfig(source="x")) == (None, None)
    cap, rule = val_budget(DataConfig(source="x", labels_per_class=10))
    assert (cap, rule) == (
        10,
        "validation capped at labels_per_class=10 (few-shot default; data.val_labels_per_class sets another budget)",
    )
    cap, rule = val_budget(DataConfig(source="x", labels_per_class=10, val_labels_per_class=30))
    assert cap == 30 and "data.val_labels_per_class=30" in rule


@pytest.mark.parametrize("bad", [0, -1])
def test_val_labels_per_class_must_be_positive(bad):
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        DataConfig(source="x", val_labels_per_class=bad)


def test_report_states_labels_spent_on_training_and_selection():
    from tlops.evaluation.report import _budget_line, label_budget

    dataset = {
        "counts": {"train": 50, "val": 50, "test": 269, "unlabelled": 0},
        "per_class": {"train": dict.fromkeys("56789", 10), "val": dict.fromkeys("56789", 10)},
        "label_budget": {"labels_per_class": 10, "val_labels_per_class": 10, "rule": "validation capped at 10"},
    }
    b = label_budget(dataset, {"criterion": "best validation accuracy (ties: earlier strategy)"})
    assert b["training"] == {"split": "train", "labels": 50, "per_class": [10, 10]}
    assert b["selection"]["split"] == "val" and b["selection"]["labels"] == 50
    line = _budget_line(b)
    assert "training 50 labels (train split, 10 per class)" in line
    assert "selection 50 labels (val split, 10 per class): best validation accuracy" in line
    assert "validation capped at 10" in line
    da = label_budget(
        {"counts": {"train": 0, "source_val": 40}, "per_class": {}},
        {"criterion": "best source-domain validation accuracy (no target labels; ties: earlier strategy)"},
    )
    assert da["selection"]["split"] == "source_val" and da["selection"]["labels"] == 40


def test_no_classes_make_empty_integer_splits():
    """Every split is an empty int64 index array (not a float array, not a missing key)."""
    out = stratified_split(np.zeros(0, dtype=np.int64), DataConfig(source="x"), 0, [])
    for name, idx in out.items():
        assert idx.dtype == np.int64 and idx.shape == (0,), name

"""data.splits on tiny classes: exact split sizes, the one-sample floors, ``split.val: 0`` and the
refusal that names every class that is too small (the digits-based tests in test_fewshot_splits.py
never reach these edges)."""

from __future__ import annotations

import numpy as np
import pytest

from tlops.config import DataConfig
from tlops.data.splits import stratified_split
from tlops.errors import DataError


def _split(y, **data):
    cfg = DataConfig(source="sklearn:digits", **data)
    return stratified_split(np.asarray(y), cfg, 0, ["a", "b", "c"][: int(max(y)) + 1])


def _sizes(s, c, y):
    y = np.asarray(y)
    return {k: int((y[v] == c).sum()) for k, v in s.items()}


def test_exact_sizes_and_one_sample_floors():
    y = [0] * 10 + [1] * 5
    s = _split(y, split={"val": 0.2, "test": 0.2}, min_per_class=1)
    assert _sizes(s, 0, y) == {"train": 6, "val": 2, "test": 2, "unlabelled": 0}
    # 5 * 0.2 rounds to 1; 4 * 0.1 rounds to 0 but every split keeps at least one sample
    assert _sizes(s, 1, y) == {"train": 3, "val": 1, "test": 1, "unlabelled": 0}
    s = _split([0] * 4, split={"val": 0.1, "test": 0.1}, min_per_class=1)
    assert _sizes(s, 0, [0] * 4) == {"train": 2, "val": 1, "test": 1, "unlabelled": 0}
    all_ix = np.concatenate([v for _, v in s.items()])
    assert sorted(all_ix.tolist()) == [0, 1, 2, 3]  # disjoint and complete


def test_no_validation_split_when_val_is_zero():
    y = [0] * 5
    s = _split(y, split={"val": 0.0, "test": 0.2}, min_per_class=1)
    assert _sizes(s, 0, y) == {"train": 4, "val": 0, "test": 1, "unlabelled": 0}


def test_too_small_classes_are_all_named_in_one_error():
    y = [0] * 10 + [1] * 2 + [2] * 1
    with pytest.raises(DataError) as err:
        _split(y, split={"val": 0.2, "test": 0.2}, min_per_class=1)
    assert str(err.value) == (
        "data: too few samples for the requested split (val=0.2, test=0.2): "
        "'b' has 2 sample(s), needs at least 3; 'c' has 1 sample(s), needs at least 3. "
        "Lower data.split fractions or labels_per_class, add data, or drop the class with data.classes"
    )
    want = r"\(val=0.2, test=0.2, labels_per_class=2\): 'a' has 10 sample\(s\), needs at least 12\."
    with pytest.raises(DataError, match=want):
        _split([0] * 10, split={"val": 0.2, "test": 0.2}, min_per_class=12, labels_per_class=2)


def test_boundaries_exactly_enough_is_enough():
    # exactly min_per_class samples and a training pool of exactly one: accepted
    s = _split([0] * 3, split={"val": 0.2, "test": 0.2}, min_per_class=3)
    assert _sizes(s, 0, [0] * 3) == {"train": 1, "val": 1, "test": 1, "unlabelled": 0}
    # a training pool of exactly labels_per_class: accepted, all of it used
    y = [0] * 10
    s = _split(y, split={"val": 0.2, "test": 0.2}, min_per_class=1, labels_per_class=6)
    assert _sizes(s, 0, y) == {"train": 6, "val": 2, "test": 2, "unlabelled": 0}
    # unlabelled: that fraction of the pool (6 * 0.5 = 3)
    s = _split(y, split={"val": 0.2, "test": 0.2}, min_per_class=1, unlabelled=0.5)
    assert _sizes(s, 0, y) == {"train": 3, "val": 2, "test": 2, "unlabelled": 3}


def test_pool_refusals_name_every_class():
    y = [0] * 3 + [1] * 3
    with pytest.raises(DataError) as err:
        _split(y, split={"val": 0.2, "test": 0.2}, min_per_class=1, unlabelled=0.9)
    assert "'a' has no labelled training sample left after the unlabelled split; 'b' has no labelled" in str(err.value)
    y = [0] * 10 + [1] * 10
    with pytest.raises(DataError) as err:
        _split(y, split={"val": 0.2, "test": 0.2}, min_per_class=1, labels_per_class=7)
    assert (
        "'a' has 6 training sample(s) after splitting, fewer than labels_per_class=7; "
        "'b' has 6 training sample(s) after splitting, fewer than labels_per_class=7." in str(err.value)
    )

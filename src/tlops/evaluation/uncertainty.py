"""Bootstrap intervals for test-split metrics and for paired differences between models.

A test split of a few hundred samples moves accuracy by several points from one draw to the
next, so every number evaluate reports comes with a percentile bootstrap interval over the test
samples. Differences between two models scored on the same samples (gain over scratch, over the
champion) use a *paired* bootstrap: both models are scored on the same resampled indices, so
the sample-to-sample difficulty they share cancels and the interval is much narrower than two
independent intervals would suggest.

Everything is vectorised numpy over (resamples x samples) index blocks. Measured on 2 shared
cores, 2,000 resamples of a 10,000-sample 5-class test split: accuracy and macro-F1 intervals
together in ~1.7 s (300 samples: 0.05 s). ``scipy.stats.bootstrap`` needs as long for the
accuracy interval alone with ``method="percentile"`` (1.6 s; 11 s with its BCa default), and
macro-F1 through it (scikit-learn once per resample) ~7 ms a resample, ~14 s; so numpy it is.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

#: resamples x samples per block, so memory stays bounded (a few arrays of this many elements)
_BLOCK = 4_000_000


def _index_blocks(n: int, resamples: int, seed: int) -> Iterator[np.ndarray]:
    """Resampled index rows (with replacement), deterministic for ``seed``, in memory-bounded blocks."""
    rng = np.random.default_rng(seed)
    rows = max(1, _BLOCK // max(n, 1))
    done = 0
    while done < resamples:
        b = min(rows, resamples - done)
        yield rng.integers(0, n, size=(b, n), dtype=np.int32)
        done += b


def _macro_f1_rows(y: np.ndarray, pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Macro-F1 of every row of (resamples x samples) label arrays, as scikit-learn computes it
    with all labels listed and ``zero_division=0``: F1 = 2 tp / (2 tp + fp + fn), 0 where a class
    is neither present nor predicted, averaged over all classes."""
    b = y.shape[0]
    offset = (np.arange(b) * n_classes)[:, None]
    true_n = np.bincount((y + offset).ravel(), minlength=b * n_classes).reshape(b, n_classes)
    pred_n = np.bincount((pred + offset).ravel(), minlength=b * n_classes).reshape(b, n_classes)
    hit = y == pred
    tp = np.bincount((y + offset)[hit], minlength=b * n_classes).reshape(b, n_classes)
    denom = true_n + pred_n
    f1 = np.divide(2.0 * tp, denom, out=np.zeros(tp.shape), where=denom > 0)
    return f1.mean(axis=1)


def _interval(stats: np.ndarray, confidence: float) -> list[float]:
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(stats, [alpha, 1.0 - alpha])
    return [float(lo), float(hi)]


def metric_intervals(
    y: np.ndarray,
    pred: np.ndarray,
    n_classes: int,
    *,
    resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, list[float]]:
    """Percentile bootstrap intervals for accuracy and macro-F1 of one model's predictions."""
    y, pred = np.asarray(y, dtype=np.int64), np.asarray(pred, dtype=np.int64)
    acc, f1 = [], []
    for ix in _index_blocks(len(y), resamples, seed):
        yt, yp = y[ix], pred[ix]
        acc.append((yt == yp).mean(axis=1))
        f1.append(_macro_f1_rows(yt, yp, n_classes))
    return {
        "accuracy": _interval(np.concatenate(acc), confidence),
        "macro_f1": _interval(np.concatenate(f1), confidence),
    }


def paired_difference_interval(
    correct_a: np.ndarray,
    correct_b: np.ndarray,
    *,
    resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> list[float]:
    """Interval for accuracy(a) - accuracy(b) when both were scored on the same samples: each
    resample draws one set of indices and scores both models on it."""
    a = np.asarray(correct_a, dtype=np.float64)
    b = np.asarray(correct_b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired bootstrap needs predictions on the same samples: {a.shape} vs {b.shape}")
    diff = a - b
    stats = [diff[ix].mean(axis=1) for ix in _index_blocks(len(diff), resamples, seed)]
    return _interval(np.concatenate(stats), confidence)


def unpaired_difference_interval(
    correct_a: np.ndarray,
    correct_b: np.ndarray,
    *,
    resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> list[float]:
    """Interval for accuracy(a) - accuracy(b) resampling each model's samples independently: the
    right interval when the two were tested on different samples (and the comparison the paired
    interval is measured against)."""
    a = np.asarray(correct_a, dtype=np.float64)
    b = np.asarray(correct_b, dtype=np.float64)
    sa = np.concatenate([a[ix].mean(axis=1) for ix in _index_blocks(len(a), resamples, seed)])
    sb = np.concatenate([b[ix].mean(axis=1) for ix in _index_blocks(len(b), resamples, seed + 1)])
    return _interval(sa - sb, confidence)


def describe(resamples: int, confidence: float, seed: int) -> dict[str, Any]:
    """How the intervals were made (stored next to them in the evaluation report)."""
    return {
        "method": "percentile bootstrap over test samples; differences paired (same resampled indices for both models)",
        "confidence": confidence,
        "resamples": resamples,
        "seed": seed,
    }

"""The statistics behind ``tlops monitor``: two-sample tests on embeddings, label-shift and
label-free accuracy estimates. numpy/scipy/scikit-learn only, seeded, vectorised.

- :func:`mmd_test`: kernel two-sample test (Gretton et al. 2012), Gaussian kernel with the
  median-heuristic bandwidth, biased MMD², p-value from a permutation test.
- :func:`c2st`: classifier two-sample test (Lopez-Paz & Oquab 2017): a logistic-regression domain
  classifier trained on half of two equal-size samples and tested on the other half; p-value =
  binomial tail of its held-out accuracy (chance = 0.5), AUC reported alongside. One split, as
  the paper does, not k-fold: out-of-fold predictions of k models that share training rows are
  not independent hits, and the binomial tail of their count is too small under no shift
  (bench/shift.py measures the false-alarm rate).
- :func:`label_shift_test`: predicted-class frequencies on new data against validation (chi-squared),
  the black-box shift detection of Rabanser et al. 2019.
- :func:`bbse`: black-box shift estimation of the new class priors (Lipton et al. 2018) from the
  validation confusion matrix.
- :func:`atc`: Average Thresholded Confidence (Garg et al. 2022) with a bootstrap interval.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _sqdist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
    return np.maximum(d, 0.0)


def mmd_test(
    x: np.ndarray, y: np.ndarray, *, permutations: int = 500, seed: int = 0, max_n: int = 2000
) -> dict[str, Any]:
    """MMD² of ``x`` vs ``y`` and its permutation p-value. Each sample is capped at ``max_n`` rows
    (seeded subsample) so the kernel matrix stays small (4,000² floats at most)."""
    rng = np.random.default_rng(seed)
    x = _cap(np.asarray(x, np.float32), max_n, rng)
    y = _cap(np.asarray(y, np.float32), max_n, rng)
    z = np.concatenate([x, y]).astype(np.float64)
    m, n = len(x), len(y)
    d = _sqdist(z, z)
    off = d[np.triu_indices(len(z), 1)]
    if len(off) > 200_000:
        off = rng.choice(off, 200_000, replace=False)
    med = float(np.median(off[off > 0])) if np.any(off > 0) else 1.0
    k = np.exp(-d / med).astype(np.float32)  # bandwidth: 2 sigma^2 = median squared distance
    labels = np.zeros((permutations + 1, m + n), dtype=bool)
    labels[:, :m] = True
    for i in range(1, permutations + 1):
        labels[i] = labels[i, rng.permutation(m + n)]
    a = np.where(labels, 1.0 / m, -1.0 / n).astype(np.float32)
    stats = np.empty(permutations + 1)
    for lo in range(0, permutations + 1, 128):  # a (block, N) @ (N, N): memory-bounded
        blk = a[lo : lo + 128]
        stats[lo : lo + 128] = ((blk @ k) * blk).sum(1)
    obs = float(stats[0])
    p = float((1 + np.sum(stats[1:] >= obs)) / (1 + permutations))
    return {"mmd2": obs, "p_value": p, "bandwidth_sq": med, "permutations": permutations, "n_ref": m, "n_new": n}


def c2st(x: np.ndarray, y: np.ndarray, *, seed: int = 0, max_n: int = 2000) -> dict[str, Any]:
    """Domain-classifier two-sample test on equal-size samples (the larger one subsampled): fit on
    half of each sample, score the other half. Under no shift the held-out rows' sample labels are
    exchangeable given the fitted classifier, so the binomial tail of its hits holds its level
    (with balanced halves the count varies less than a binomial: conservative, if anything)."""
    from scipy.stats import binomtest
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(seed)
    n = min(len(x), len(y), max_n)
    xs, ys = _cap(np.asarray(x, np.float32), n, rng), _cap(np.asarray(y, np.float32), n, rng)
    h = n // 2
    if h < 1:
        return {"auc": 0.5, "accuracy": 0.5, "p_value": 1.0, "n_each": n, "n_test": 0}
    px, py = rng.permutation(n), rng.permutation(n)
    fit_z, fit_t = np.concatenate([xs[px[:h]], ys[py[:h]]]), np.r_[np.zeros(h, int), np.ones(h, int)]
    test_z = np.concatenate([xs[px[h:]], ys[py[h:]]])
    test_t = np.r_[np.zeros(n - h, int), np.ones(n - h, int)]
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=500))
    prob = clf.fit(fit_z, fit_t).predict_proba(test_z)[:, 1]
    correct = int(np.sum((prob > 0.5) == (test_t == 1)))
    p = float(binomtest(correct, len(test_t), 0.5, alternative="greater").pvalue)
    return {
        "auc": float(roc_auc_score(test_t, prob)),
        "accuracy": correct / len(test_t),
        "p_value": p,
        "n_each": n,
        "n_test": len(test_t),
    }


def label_shift_test(val_pred: np.ndarray, new_pred: np.ndarray, num_classes: int) -> dict[str, Any]:
    """Chi-squared test of predicted-class frequencies, new inputs vs validation."""
    from scipy.stats import chi2_contingency

    table = np.stack([np.bincount(val_pred, minlength=num_classes), np.bincount(new_pred, minlength=num_classes)])
    table = table[:, table.sum(0) > 0]
    if table.shape[1] < 2:
        return {"p_value": 1.0, "chi2": 0.0}
    chi2, p, _, _ = chi2_contingency(table)
    return {"chi2": float(chi2), "p_value": float(p)}


def confusion(pred: np.ndarray, y: np.ndarray, num_classes: int) -> np.ndarray:
    """counts[i, j] = #(predicted i, true j)."""
    c = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(c, (pred, y), 1)
    return c


def bbse_priors(conf_counts: np.ndarray, new_pred: np.ndarray) -> np.ndarray:
    """New class priors q from the joint C[i,j] = P(pred i, true j) on validation and the
    prediction frequencies mu on the new data: solve C w = mu (least squares), clip w >= 0,
    q = w * p_val, normalised."""
    k = conf_counts.shape[0]
    c = conf_counts / max(conf_counts.sum(), 1)
    mu = np.bincount(new_pred, minlength=k) / max(len(new_pred), 1)
    w = np.clip(np.linalg.lstsq(c, mu, rcond=None)[0], 0.0, None)
    q = w * c.sum(0)
    return q / q.sum() if q.sum() > 0 else c.sum(0)


def bbse(
    conf_counts: np.ndarray, new_pred: np.ndarray, *, boots: int = 500, confidence: float = 0.95, seed: int = 0
) -> dict[str, Any]:
    """:func:`bbse_priors` with a percentile bootstrap over the validation pairs (the confusion
    matrix redrawn from its cell frequencies) and the new inputs."""
    rng = np.random.default_rng(seed)
    q = bbse_priors(conf_counts, new_pred)
    n, nv = len(new_pred), int(conf_counts.sum())
    cells = conf_counts.ravel() / max(nv, 1)
    bs = np.stack(
        [
            bbse_priors(rng.multinomial(nv, cells).reshape(conf_counts.shape), new_pred[rng.integers(0, n, n)])
            for _ in range(boots)
        ]
    )
    lo, hi = np.quantile(bs, [(1 - confidence) / 2, (1 + confidence) / 2], axis=0)
    train = conf_counts.sum(0) / max(conf_counts.sum(), 1)
    return {"priors": q.tolist(), "low": lo.tolist(), "high": hi.tolist(), "validation_priors": train.tolist()}


def atc_threshold(val_conf: np.ndarray, val_correct: np.ndarray) -> float:
    """t such that the fraction of validation confidences above t equals validation accuracy."""
    acc = float(np.mean(val_correct))
    if acc >= 1.0:  # every validation input counts as right: a threshold below them all
        return float(np.min(val_conf)) - 1.0
    if acc <= 0.0:
        return float(np.max(val_conf)) + 1.0
    return float(np.quantile(val_conf, 1.0 - acc, method="lower"))


def atc(
    val_conf: np.ndarray,
    val_correct: np.ndarray,
    new_conf: np.ndarray,
    *,
    boots: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """ATC accuracy estimate on the new inputs; the interval resamples validation (threshold) and
    new inputs together."""
    rng = np.random.default_rng(seed)
    t = atc_threshold(val_conf, val_correct)
    est = float(np.mean(new_conf > t))
    nv, nn = len(val_conf), len(new_conf)
    samples = np.empty(boots)
    for b in range(boots):
        iv = rng.integers(0, nv, nv)
        tb = atc_threshold(val_conf[iv], val_correct[iv])
        samples[b] = np.mean(new_conf[rng.integers(0, nn, nn)] > tb)
    lo, hi = np.quantile(samples, [(1 - confidence) / 2, (1 + confidence) / 2])
    return {"estimate": est, "low": float(lo), "high": float(hi), "threshold": t, "confidence": confidence}


def _cap(a: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    return a if len(a) <= n else a[np.sort(rng.choice(len(a), n, replace=False))]

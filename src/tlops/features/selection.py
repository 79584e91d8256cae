"""Source-model selection: rank candidate source models by a transferability score on their
(cached) features of the labelled train split, before any fine-tuning.

Every score here is "higher is better" and needs no validation split and no training loop:

* :func:`logme` -- LogME (You et al., ICML 2021), Bayesian linear-model evidence per sample;
* :func:`h_score` -- H-Score (Bao et al., ICIP 2019) with the Ledoit-Wolf shrunk feature
  covariance of Ibrahim et al. (2022, "Newer is not always better"), as TLlib does;
* :func:`transrate` -- TransRate (Huang et al., ICML 2022), coding-rate reduction by the labels;
* :func:`leep` and :func:`nce` -- LEEP (Nguyen et al., ICML 2020) and NCE (Tran et al., ICCV
  2019): they read the candidate's *source-head* class probabilities, so they exist only for a
  candidate that has a classification head (a bundle trained by tlops, a source CNN).

The reference implementations are TLlib's (thuml/Transfer-Learning-Library, tllib/ranking/);
where a formula here departs from them the function's docstring says how and why.
:data:`FEATURE_SCORES` / :data:`HEAD_SCORES` name them for ``source.selection_score``.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable

import numpy as np

log = logging.getLogger(__name__)


def logme(features: np.ndarray, labels: np.ndarray, max_iter: int = 100, tol: float = 1e-3) -> float:
    """LogME score of ``features`` (N, D) for integer ``labels`` (N,).

    You et al., "LogME: Practical Assessment of Pre-trained Models for Transfer Learning", ICML
    2021: the log marginal evidence of a Bayesian linear model on the features, per class
    one-vs-rest, maximised over the prior/noise precisions, averaged and divided by N. Higher is
    better."""
    f = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels)
    n, d = f.shape
    u, s, _ = np.linalg.svd(f, full_matrices=False)
    sigma = s**2  # eigenvalues of F^T F (the other d - r are 0)
    r = len(sigma)
    evidences = []
    for k in np.unique(y):
        yk = (y == k).astype(np.float64)
        x = u.T @ yk
        x2 = x**2
        res_out = max(float(yk @ yk - x2.sum()), 0.0)  # part of y outside the features' span
        alpha, beta = 1.0, 1.0
        for _ in range(max_iter):
            t = alpha / beta
            gamma = float((sigma / (sigma + t)).sum())
            m2 = float((sigma * x2 / (t + sigma) ** 2).sum())
            res2 = float((x2 / (1.0 + sigma / t) ** 2).sum()) + res_out
            alpha = gamma / (m2 + 1e-5)
            beta = (n - gamma) / (res2 + 1e-5)
            if abs(alpha / beta - t) / t <= tol:
                break
        t = alpha / beta
        m2 = float((sigma * x2 / (t + sigma) ** 2).sum())
        res2 = float((x2 / (1.0 + sigma / t) ** 2).sum()) + res_out
        logdet = float(np.log(alpha + beta * sigma).sum()) + (d - r) * math.log(alpha)
        evidence = (
            d / 2 * math.log(alpha)
            + n / 2 * math.log(beta)
            - 0.5 * logdet
            - beta / 2 * res2
            - alpha / 2 * m2
            - n / 2 * math.log(2 * math.pi)
        )
        evidences.append(evidence / n)
    return float(np.mean(evidences))


def h_score(features: np.ndarray, labels: np.ndarray) -> float:
    """Shrinkage-regularised H-Score: ``tr(cov_a(f)^-1 (1 - a) cov(E[f|y]))``. Higher is better.

    Bao et al., "An Information-theoretic Approach to Transferability in Task Transfer Learning",
    ICIP 2019, defined ``tr(cov(f)^-1 cov(E[f|y]))``: how much of the feature variance lies
    between the class means. With fewer samples than dimensions (few-shot, 384-768-d features)
    ``cov(f)`` is singular and the plain score is noise, so, as Ibrahim et al. ("Newer is not
    always better: Rethinking transferability metrics", 2022) and TLlib's ``regularized_h_score``,
    the covariance is scikit-learn's Ledoit-Wolf estimate ``cov_a`` with shrinkage ``a`` and the
    between-class part is scaled by ``1 - a``. Both covariances here divide by N (TLlib's
    ``np.cov`` of the class means divides by N - 1): the score is then exactly the correlation
    ratio in one dimension, and differs from TLlib's by the factor (N - 1) / N, which is the same
    for every candidate on one task.
    Invariant to permuting samples and to scaling the features."""
    from scipy.linalg import LinAlgError, solve
    from sklearn.covariance import LedoitWolf

    f = np.asarray(features, dtype=np.float64)
    classes, yi, counts = np.unique(np.asarray(labels), return_inverse=True, return_counts=True)
    f = f - f.mean(axis=0, keepdims=True)
    lw = LedoitWolf(assume_centered=True, store_precision=False).fit(f)
    means = np.zeros((len(classes), f.shape[1]))
    np.add.at(means, yi, f)
    means /= counts[:, None]
    # cov(E[f|y]) = sum_k (n_k / N) m_k m_k^T (f is centred), so the trace is sum_k (n_k / N) m_k^T cov_a^-1 m_k:
    # C right-hand sides instead of a D x D inverse
    try:
        x = solve(lw.covariance_, means.T, assume_a="pos")
    except LinAlgError:  # no shrinkage and singular (constant features): the pseudo-inverse, as TLlib
        x = np.linalg.pinv(lw.covariance_, rcond=1e-15, hermitian=True) @ means.T
    return float((1 - lw.shrinkage_) * np.einsum("k,kd,dk->", counts / len(f), means, x))


def _coding_rate(z: np.ndarray, eps: float) -> float:
    """``0.5 logdet(I_d + Z^T Z / (n eps))``, through the smaller of the d x d and n x n Gram
    matrices (Sylvester's determinant identity: the same value, a 128 x 128 instead of a 768 x 768
    determinant for few-shot text)."""
    n, d = z.shape
    gram = z.T @ z if d <= n else z @ z.T
    _, rate = np.linalg.slogdet(np.eye(len(gram)) + gram / (n * eps))
    return 0.5 * float(rate)


def transrate(features: np.ndarray, labels: np.ndarray, eps: float = 1e-4) -> float:
    """TransRate: ``R(f) - mean_y R(f | y)``, the coding rate of the centred features minus the
    mean coding rate of each class's features (nats). Higher is better.

    Huang et al., "Frustratingly Easy Transferability Estimation", ICML 2022: features that are
    spread out overall (high rate) but compact within each class (low conditional rate) transfer
    well. As in the authors' code and TLlib: ``R(Z) = 0.5 logdet(I + Z^T Z / (n eps))`` with the
    distortion ``eps`` = 1e-4 and n the rows of Z, the classes averaged unweighted (our targets are
    class-balanced, where this equals the n_y / n weighting of the paper's MCR^2 form). Not scale
    invariant (``eps`` is an absolute distortion), so candidates compare on their own raw features."""
    f = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels)
    f = f - f.mean(axis=0, keepdims=True)
    classes = np.unique(y)
    return _coding_rate(f, eps) - float(np.mean([_coding_rate(f[y == k], eps) for k in classes]))


def _joint(source_probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Empirical joint P(y, z) of target label y and source class z (target classes in sorted
    order), and the target labels as indices into it."""
    classes, yi = np.unique(np.asarray(labels), return_inverse=True)
    p = np.asarray(source_probs, dtype=np.float64)
    joint = np.zeros((len(classes), p.shape[1]))
    np.add.at(joint, yi, p / len(p))
    return joint, yi


def leep(source_probs: np.ndarray, labels: np.ndarray) -> float:
    """LEEP: mean log-likelihood of the target labels under the "expected empirical predictor"
    ``p(y | x) = sum_z P(y | z) theta(x)_z``. Higher is better (always <= 0).

    Nguyen et al., "LEEP: A New Measure to Evaluate Transferability of Learned Representations",
    ICML 2020. ``source_probs`` (N, C_s) are the candidate's source-head softmax outputs on the
    target inputs; ``P(y | z)`` is the empirical conditional from the soft joint of target labels
    and source classes (TLlib's ``log_expected_empirical_prediction``). A source class no target
    input is assigned any mass gets ``P(y | z) = 0`` (TLlib divides by zero there)."""
    p = np.asarray(source_probs, dtype=np.float64)
    joint, yi = _joint(p, labels)
    pz = joint.sum(axis=0, keepdims=True)
    cond = np.divide(joint, pz, out=np.zeros_like(joint), where=pz > 0)  # P(y | z), (C_t, C_s)
    eep = (p @ cond.T)[np.arange(len(p)), yi]
    return float(np.mean(np.log(eep)))


def nce(source_probs: np.ndarray, labels: np.ndarray) -> float:
    """NCE: the negative conditional entropy ``-H(Y | Z)`` of the target labels given the source
    head's hard prediction ``Z = argmax`` (nats). Higher is better (always <= 0).

    Tran et al., "Transferability and Hardness of Supervised Classification Tasks", ICCV 2019
    (TLlib's ``negative_conditional_entropy``): 0 when every source class the head predicts maps
    to a single target class."""
    p = np.asarray(source_probs)
    hard = np.eye(p.shape[1])[p.argmax(axis=1)]
    joint, _ = _joint(hard, labels)
    pz = joint.sum(axis=0)
    nz = joint > 0
    cond = np.divide(joint, pz, out=np.ones_like(joint), where=pz > 0)
    return float((joint[nz] * np.log(cond[nz])).sum())


FEATURE_SCORES: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "logme": logme,
    "hscore": h_score,
    "transrate": transrate,
}
HEAD_SCORES: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {"leep": leep, "nce": nce}
SCORE_NAMES = (*FEATURE_SCORES, *HEAD_SCORES)


def all_scores(
    features: np.ndarray, labels: np.ndarray, source_probs: np.ndarray | None = None
) -> dict[str, float | None]:
    """Every score of one candidate; the head scores are None without ``source_probs``."""
    out: dict[str, float | None] = {name: fn(features, labels) for name, fn in FEATURE_SCORES.items()}
    for name, fn in HEAD_SCORES.items():
        out[name] = None if source_probs is None else fn(source_probs, labels)
    return out


def rank_sources(scored: list[dict[str, Any]], score_name: str = "logme") -> list[dict[str, Any]]:
    """Sort candidates (dicts with ``score``: their ``score_name`` value) best first, ties to the
    earlier candidate."""
    ranked = sorted(scored, key=lambda c: (-c["score"], c["index"]))
    for i, c in enumerate(ranked, 1):
        c["rank"] = i
    log.info(
        "source selection (%s on train features, higher is better):\n%s",
        score_name,
        "\n".join(f"  {c['rank']}. {c['source']}: {c['score']:.4f}" for c in ranked),
    )
    return ranked

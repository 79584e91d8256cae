"""Source-model selection: rank candidate source models by a transferability score on their
(cached) features of the labelled train split, before any fine-tuning.

The score is LogME (You et al., "LogME: Practical Assessment of Pre-trained Models for
Transfer Learning", ICML 2021): the log marginal evidence of a Bayesian linear model on the
features, per class one-vs-rest, averaged and normalised by the number of samples. Higher is
better; it needs no validation split and no training loop.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


def logme(features: np.ndarray, labels: np.ndarray, max_iter: int = 100, tol: float = 1e-3) -> float:
    """LogME score of ``features`` (N, D) for integer ``labels`` (N,)."""
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


def rank_sources(scored: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Sort candidates (dicts with ``score``) best first, ties to the earlier candidate."""
    ranked = sorted(scored, key=lambda c: (-c["score"], c["index"]))
    for i, c in enumerate(ranked, 1):
        c["rank"] = i
    log.info(
        "source selection (LogME on train features, higher is better):\n%s",
        "\n".join(f"  {c['rank']}. {c['source']}: {c['score']:.4f}" for c in ranked),
    )
    return ranked

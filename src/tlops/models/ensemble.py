"""Probability-averaging ensembles: several trained classifiers with the same classes, one prediction.

The late-fusion counterpart of :mod:`tlops.models.stack` (which concatenates features under one
head): every member keeps its own backbone and head, and the ensemble averages their class
probabilities (optionally weighted). Members are anything with ``predict_proba(x) -> (N, C)``
and ``classes`` (e.g. :class:`tlops.models.bundle.Classifier`).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from tlops.errors import ConfigError


def average_proba(probas: Sequence[np.ndarray], weights: Sequence[float] | None = None) -> np.ndarray:
    """Weighted mean of per-member probability arrays, each (N, C); weights default to equal."""
    if not probas:
        raise ConfigError("ensemble: no member predictions to average")
    arrs = [np.asarray(p, dtype=np.float64) for p in probas]
    shapes = {a.shape for a in arrs}
    if len(shapes) != 1 or arrs[0].ndim != 2:
        raise ConfigError(f"ensemble: member predictions must all be (N, C) arrays of one shape, got {sorted(shapes)}")
    if weights is None:
        w = np.full(len(arrs), 1.0 / len(arrs))
    else:
        w = np.asarray(weights, dtype=np.float64)
        if w.shape != (len(arrs),) or (w < 0).any() or w.sum() <= 0:
            raise ConfigError(
                f"ensemble: need {len(arrs)} non-negative weights with a positive sum, got {list(weights)}"
            )
        w = w / w.sum()
    return np.tensordot(w, np.stack(arrs), axes=1).astype(np.float32)


class ProbaEnsemble:
    """Average the ``predict_proba`` outputs of ``members`` (same classes, same order)."""

    def __init__(self, members: Sequence[Any], weights: Sequence[float] | None = None):
        if not members:
            raise ConfigError("ensemble: needs at least one member")
        classes = [list(getattr(m, "classes", [])) for m in members]
        if any(c != classes[0] for c in classes[1:]):
            raise ConfigError(f"ensemble: the members have different classes: {classes}")
        self.members = list(members)
        self.weights = None if weights is None else [float(v) for v in weights]
        self.classes = classes[0]

    def predict_proba(self, x: Any, batch_size: int = 64) -> np.ndarray:
        return average_proba([m.predict_proba(x, batch_size=batch_size) for m in self.members], self.weights)

    def predict(self, x: Any, batch_size: int = 64) -> np.ndarray:
        return self.predict_proba(x, batch_size).argmax(1)

"""Linear probe: scikit-learn's ``LogisticRegressionCV`` on cached features, as an ``nn.Linear`` head.

The probe is the baseline every other strategy is measured against, so it is what a user would
type first, done right: ``LogisticRegressionCV`` (L2, lbfgs, stratified k-fold on train,
accuracy, refit) on the backbone's own features. Sentence encoders emit unit-norm embeddings
(``source.normalize``) whose geometry a per-dimension z-score distorts, so the features are left
as they are unless ``train.probe_scaling: standardize``.

A wider hand-written search (17 values of C, repeated shuffled folds, both scalings) ran on top of
it until ``bench/probe.py`` showed it never beat LogisticRegressionCV's choice by more than a
standard error, in 60 seeds over 12 text and digits settings, at ten times the cost; scikit-learn
is the tool for this job.

C is chosen on the validation split instead when it holds more labels than train
(``train.probe_select``). The chosen head is temperature-scaled on held-out logits (the
validation split's, or out of fold from LogisticRegressionCV's own fold models), and any
standardisation is folded back into the weights, so the saved head is a plain ``nn.Linear`` on
the backbone's features. lbfgs is deterministic and the folds are not shuffled.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from tlops.config import TrainConfig
from tlops.training.runtime import Runtime

log = logging.getLogger(__name__)


def _stats(x: np.ndarray, scaling: str) -> tuple[np.ndarray, np.ndarray]:
    if scaling == "none":
        return np.zeros(x.shape[1]), np.ones(x.shape[1])
    mean, std = x.mean(0), x.std(0)
    return mean, np.maximum(std, 0.05 * float(std.mean()) + 1e-8)  # near-constant features: no huge weights


def _quiet() -> Any:
    """One BLAS thread (these matrices are small: threaded BLAS on busy cores was 20x slower, measured) and no
    ConvergenceWarning (large C on separable data: lbfgs stops at max_iter) or scikit-learn 1.9's FutureWarnings."""
    from contextlib import ExitStack

    from threadpoolctl import threadpool_limits

    stack = ExitStack()
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    stack.enter_context(threadpool_limits(limits=1, user_api="blas"))
    return stack


def _path(x: np.ndarray, y: np.ndarray, cs: list[float], cfg: TrainConfig) -> Iterator[Any]:
    """The fitted model for each C in ascending order, each fit warm-started from the previous one (as
    LogisticRegressionCV walks its grid), so the path costs little more than its largest fit."""
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(max_iter=cfg.probe_max_iter, warm_start=True)
    for c in cs:
        clf.set_params(C=c)
        with _quiet():
            clf.fit(x, y)
        yield clf


def _score(clf: Any, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(accuracy, mean log-loss) of a fitted classifier on (x, y); labels unseen in training count as errors."""
    proba = clf.predict_proba(x)
    cols = {int(k): i for i, k in enumerate(clf.classes_)}
    idx = np.array([cols.get(int(k), -1) for k in y])
    p = np.where(idx >= 0, proba[np.arange(len(y)), np.maximum(idx, 0)], 0.0)
    acc = float((clf.classes_[proba.argmax(1)] == y).mean())
    return acc, float(-np.log(np.clip(p, 1e-12, None)).mean())


def _n_folds(y: np.ndarray) -> int:
    """LogisticRegressionCV's 5 stratified folds, fewer when a class has fewer labels (every fold must hold each)."""
    counts = np.bincount(y)
    return min(5, int(counts[counts > 0].min()))


def _select_on(n_val: int, n_train: int, n_folds: int, cfg: TrainConfig) -> str:
    """``auto``: cross-validation on train, which scores every train label once, unless the validation split
    is larger than train or train has too few labels per class to fold."""
    if cfg.probe_select != "auto":
        return cfg.probe_select
    return "val" if n_val and (n_val > n_train or n_folds < 2) else "cv"


def _cross_validated(x: np.ndarray, y: np.ndarray, cs: list[float], k: int, cfg: TrainConfig) -> Any:
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold

    with _quiet():
        return LogisticRegressionCV(Cs=cs, cv=StratifiedKFold(k), max_iter=cfg.probe_max_iter).fit(x, y)


def _oof_logits(lrcv: Any, x: np.ndarray, y: np.ndarray, k: int) -> np.ndarray:
    """Out-of-fold decision values at the chosen C, from the fold models LogisticRegressionCV already fitted
    (``coefs_paths_``: per class, folds x Cs x (features + intercept)); no extra fit."""
    from sklearn.model_selection import StratifiedKFold

    ci = int(np.argmin(np.abs(lrcv.Cs_ - lrcv.C_[0])))
    paths = [lrcv.coefs_paths_[c] for c in sorted(lrcv.coefs_paths_)]  # binary: one entry, class 1
    logits = np.zeros((len(y), len(paths)))
    for f, (_, te) in enumerate(StratifiedKFold(k).split(x, y)):
        w = np.stack([p[f, ci] for p in paths])  # (rows, features + 1)
        logits[te] = x[te] @ w[:, :-1].T + w[:, -1]
    return logits[:, 0] if len(paths) == 1 else logits


def train_probe(
    f_train: np.ndarray,
    y_train: np.ndarray,
    f_val: np.ndarray | None,
    y_val: np.ndarray | None,
    num_classes: int,
    cfg: TrainConfig,
    seed: int,
    *,
    runtime: Runtime | None = None,
    name: str = "linear-probe",
) -> tuple[nn.Linear, list[dict[str, Any]]]:
    """The head (on the CPU) and its history: one record for the chosen C with the scores of every C in it.

    ``seed`` is accepted for the strategy interface; nothing here is random (unshuffled folds, lbfgs).
    """
    del seed
    rt = runtime or Runtime()
    x, y = np.asarray(f_train, dtype=np.float64), np.asarray(y_train, dtype=np.int64)
    has_val = f_val is not None and y_val is not None and len(f_val) > 0
    cs = sorted(float(c) for c in cfg.probe_c)
    scaling = "standardize" if cfg.probe_scaling == "standardize" else "none"
    k = _n_folds(y)
    select = _select_on(len(y_val) if has_val else 0, len(y), k, cfg) if len(cs) > 1 else "none"
    if select == "val" and not has_val:
        raise ValueError(f"{name}: train.probe_select is 'val' but there is no validation split")
    if select == "cv" and k < 2:  # a class with one label: nothing to fold
        select = "none"
    mean, std = _stats(x, scaling)
    xs = (x - mean) / std
    xvs = (np.asarray(f_val, dtype=np.float64) - mean) / std if has_val else None
    yv = np.asarray(y_val, dtype=np.int64) if has_val else None
    search: list[dict[str, Any]] = []
    held: tuple[np.ndarray, np.ndarray] | None = None
    if select == "cv":
        clf = _cross_validated(xs, y, cs, k, cfg)
        c = float(clf.C_[0])
        fold_acc = next(iter(clf.scores_.values())).mean(0)  # every class holds the same (folds x Cs) accuracies
        search = [{"C": float(v), "acc": round(float(a), 6)} for v, a in zip(clf.Cs_, fold_acc, strict=True)]
        held = (_oof_logits(clf, xs, y, k), y)
    elif select == "val":
        scores = [_score(m, xvs, yv) for m in _path(xs, y, cs, cfg)]
        search = [{"C": v, "acc": round(a, 6), "loss": round(lo, 6)} for v, (a, lo) in zip(cs, scores, strict=True)]
        c = max(search, key=lambda r: (r["acc"], -r["C"]))["C"]  # ties: the stronger regularisation
        *_, clf = _path(xs, y, [v for v in cs if v <= c], cfg)
        held = (clf.decision_function(xvs), yv)
    else:
        c = cs[len(cs) // 2]
        *_, clf = _path(xs, y, [c], cfg)
    t = _temperature(*held, clf.classes_) if held is not None else 1.0
    head = _to_linear(clf, mean, std, num_classes, temperature=t)
    rec: dict[str, Any] = {"epoch": 1, "scaling": scaling, "C": c, "selected_by": select, "temperature": t}
    rec["train_acc"], rec["train_loss"] = _score(clf, xs, y)
    if has_val:
        rec["val_acc"], rec["val_loss"] = _score(clf, xvs, yv)
    if select == "cv":
        rec["cv_folds"], rec["cv_acc"] = k, max(r["acc"] for r in search)
    rec["search"] = search
    rt.report(name, {key: v for key, v in rec.items() if key != "search"})
    how = {
        "cv": f"LogisticRegressionCV, {k}-fold accuracy on train",
        "val": "validation accuracy",
        "none": "no search",
    }[select]
    log.info(
        "%s: scaling %s, C %.3g (chosen by %s over %d values)%s",
        name,
        scaling,
        c,
        how,
        max(len(search), 1),
        f"; val acc {rec['val_acc']:.4f}" if has_val else "",
    )
    return head, [rec]


def _temperature(logits: np.ndarray, y: np.ndarray, classes: np.ndarray) -> float:
    """Temperature scaling (Guo et al., ICML 2017): the T >= 1 minimising held-out NLL of softmax(z / T).

    T only softens: when every held-out prediction is right the NLL keeps falling as T shrinks, and a
    sharper head than the regularised fit chose would be fitted to a handful of points.

    The argmax, hence every accuracy, is unchanged; the probabilities become calibrated. A weakly
    regularised head on separable features has logits in the hundreds, which also breaks LP-FT: its
    first fine-tuning epoch ran at loss 17.5 and fell to chance on digits; T brings the logits back.
    """
    from scipy.optimize import minimize_scalar
    from scipy.special import log_softmax

    if len(y) == 0:
        return 1.0
    z = np.stack([-logits / 2, logits / 2], 1) if logits.ndim == 1 else logits
    idx = np.searchsorted(classes, y)

    def nll(log_t: float) -> float:
        return float(-log_softmax(z / np.exp(log_t), axis=1)[np.arange(len(y)), idx].mean())

    res = minimize_scalar(nll, bounds=(0.0, 8.0), method="bounded")  # soften only: never sharper than the fit
    return float(np.exp(res.x))


def _to_linear(clf: Any, mean: np.ndarray, std: np.ndarray, num_classes: int, *, temperature: float = 1.0) -> nn.Linear:
    """scikit-learn's fitted model as ``nn.Linear`` on raw features: W (x - m)/s + b = (W/s) x + (b - W m/s),
    divided by the temperature.

    Binary models have one weight row w for class 1; softmax over [-w/2, w/2] equals sigmoid(w x).
    Classes absent from train get a very low bias, so they are never predicted.
    """
    coef, bias = clf.coef_ / temperature, clf.intercept_ / temperature
    if coef.shape[0] == 1:
        coef, bias = np.vstack([-coef / 2, coef / 2]), np.array([-bias[0] / 2, bias[0] / 2])
    w_full = np.zeros((num_classes, coef.shape[1]))
    b_full = np.full(num_classes, -1e4)
    for row, k in enumerate(clf.classes_):
        w_full[int(k)] = coef[row] / std
        b_full[int(k)] = bias[row] - float((coef[row] / std) @ mean)
    out = nn.Linear(coef.shape[1], num_classes)
    with torch.no_grad():
        out.weight.copy_(torch.from_numpy(w_full).float())
        out.bias.copy_(torch.from_numpy(b_full).float())
    return out

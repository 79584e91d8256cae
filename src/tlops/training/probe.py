"""Linear probe: an L2-regularised multinomial logistic regression (scikit-learn) on cached features.

The probe is the baseline every other strategy is measured against, so it must be at least as
good as what a user would type first (``LogisticRegressionCV`` on the same features;
``bench/probe.py`` compares the two). Two choices decide most of its accuracy:

* the feature scaling: sentence encoders emit unit-norm embeddings (``source.normalize``) whose
  geometry a per-dimension z-score distorts, while CNN features gain from standardisation;
* the regularisation strength C, which differs by orders of magnitude between the two.

Unit-norm features keep their geometry; otherwise both scalings are tried. C (``train.probe_c``)
and the scaling are chosen together by repeated stratified k-fold cross-validation on train, or on
the validation split (``train.probe_select``). lbfgs is deterministic and the folds are seeded. The
standardisation is folded back into the weights, so the saved head is a plain ``nn.Linear`` on the
backbone's features.

The default is scikit-learn's own ``LogisticRegressionCV`` (its 10-value C grid, its 5 unshuffled
stratified folds, accuracy, refit): the wider search above replaces it only when it scores better
by more than a binomial standard error on the same held-out evidence (see ``_keep_anchor``).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from tlops.config import TrainConfig
from tlops.training.runtime import Runtime

log = logging.getLogger(__name__)

_CV_REPEATS = 3
# LogisticRegressionCV's default grid (Cs=10): the anchor the wider search has to beat
_ANCHOR_CS = tuple(float(c) for c in np.logspace(-4, 4, 10))


def _scalings(x: np.ndarray, cfg: TrainConfig) -> list[str]:
    """``auto``: unit-norm rows (an L2-normalising sentence encoder) keep their geometry; else both are tried."""
    if cfg.probe_scaling != "auto":
        return [cfg.probe_scaling]
    norms = np.linalg.norm(x, axis=1)
    return ["none"] if len(x) and np.allclose(norms, 1.0, atol=1e-3) else ["none", "standardize"]


def _stats(x: np.ndarray, scaling: str) -> tuple[np.ndarray, np.ndarray]:
    if scaling == "none":
        return np.zeros(x.shape[1]), np.ones(x.shape[1])
    mean, std = x.mean(0), x.std(0)
    return mean, np.maximum(std, 0.05 * float(std.mean()) + 1e-8)  # near-constant features: no huge weights


def _path(x: np.ndarray, y: np.ndarray, cs: list[float], cfg: TrainConfig) -> Iterator[Any]:
    """The fitted model for each C in ascending order, each fit warm-started from the previous one.

    The warm start makes the path cost little more than its largest fit; the final refit walks the
    same path, so the chosen candidate refitted on the same data is exactly the model that was scored.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    clf = LogisticRegression(max_iter=cfg.probe_max_iter, warm_start=True)
    for c in cs:
        clf.set_params(C=c)
        # one BLAS thread: these matrices are small, and threaded BLAS on busy cores was 20x slower (measured)
        with warnings.catch_warnings(), threadpool_limits(limits=1, user_api="blas"):
            warnings.simplefilter("ignore", ConvergenceWarning)  # large C on separable data: lbfgs stops at max_iter
            clf.fit(x, y)
        yield clf


def _up_to(cs: list[float], c: float) -> list[float]:
    """The warm-start path that ends at ``c``: the grid values below it, then ``c`` (it need not be on the grid)."""
    return [v for v in sorted(cs) if v < c] + [c]


def _anchor(x: np.ndarray, y: np.ndarray, cs: list[float], scaling: str, cfg: TrainConfig) -> Any | None:
    """scikit-learn's ``LogisticRegressionCV`` with its defaults (10 C values over 1e-4..1e4, 5-fold
    ``StratifiedKFold`` without shuffling, accuracy, refit on all of train), fitted on ``scaling``'s features.

    This is the baseline a user types first, so the probe starts from its choice (issue 16: the probe
    must never be below it). Its grid is clipped to the range of ``train.probe_c``. None when a class
    has fewer than 2 labels (no stratified folds) or the grid range holds none of its values.
    """
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold
    from threadpoolctl import threadpool_limits

    counts = np.bincount(y)
    k = min(5, int(counts[counts > 0].min()))
    grid = [c for c in _ANCHOR_CS if cs[0] * (1 - 1e-9) <= c <= cs[-1] * (1 + 1e-9)]
    if k < 2 or not grid:
        return None
    mean, std = _stats(x, scaling)
    lrcv = LogisticRegressionCV(Cs=grid, cv=StratifiedKFold(k), max_iter=cfg.probe_max_iter)
    with warnings.catch_warnings(), threadpool_limits(limits=1, user_api="blas"):
        warnings.simplefilter("ignore")  # ConvergenceWarning at large C; scikit-learn 1.9's FutureWarnings on defaults
        return lrcv.fit((x - mean) / std, y)


def _score(clf: Any, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(accuracy, mean log-loss) of a fitted classifier on (x, y); labels unseen in training count as errors."""
    proba = clf.predict_proba(x)
    cols = {int(k): i for i, k in enumerate(clf.classes_)}
    idx = np.array([cols.get(int(k), -1) for k in y])
    p = np.where(idx >= 0, proba[np.arange(len(y)), np.maximum(idx, 0)], 0.0)
    acc = float((clf.classes_[proba.argmax(1)] == y).mean())
    return acc, float(-np.log(np.clip(p, 1e-12, None)).mean())


def _grid(
    x: np.ndarray, y: np.ndarray, xv: np.ndarray, yv: np.ndarray, scaling: str, cs: list[float], cfg: TrainConfig
) -> list[tuple[float, float]]:
    """(accuracy, loss) on (xv, yv) for every C, fitted on (x, y) with the scaling's train statistics."""
    mean, std = _stats(x, scaling)
    xs, xvs = (x - mean) / std, (xv - mean) / std
    return [_score(clf, xvs, yv) for clf in _path(xs, y, cs, cfg)]


def _folds(y: np.ndarray, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Seeded stratified k-fold (k <= 5), repeated ``_CV_REPEATS`` times: on tens of labels one split's
    accuracy is too noisy to rank 17 values of C (bench/probe.py measured the repeats against one split)."""
    from sklearn.model_selection import RepeatedStratifiedKFold

    # classes rarer than k are missing from some training folds: their test samples count as errors
    k = min(5, int(np.bincount(y).max()), len(y) // 2)
    if k < 2:
        return []
    cv = RepeatedStratifiedKFold(n_splits=k, n_repeats=_CV_REPEATS, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "the least populated class has only 1 member"
        return list(cv.split(np.zeros(len(y)), y))


def _select_on(n_val: int, n_train: int, cfg: TrainConfig) -> str:
    """``auto``: the evidence with more held-out predictions. Cross-validation scores every train sample once
    per repeat, so it wins unless the validation split is larger than train; on UCI (900 train, 100 val)
    CV chose better C than the validation split (bench/probe.py, columns ``tlops cv`` / ``tlops val``)."""
    if cfg.probe_select != "auto":
        return cfg.probe_select
    return "val" if n_val > n_train or n_train < 4 and n_val else "cv"


def _choose(search: list[dict[str, Any]], n_scored: int) -> dict[str, Any]:
    """Best accuracy (ties: the smaller C, as LogisticRegressionCV); standardisation only where it helps.

    Ties go to the stronger regularisation, not the lower log-loss: on separable features every large C
    scores 100 % and the loss keeps falling as C grows, so a loss tie-break picks an unregularised head
    whose huge logits then wreck LP-FT's first fine-tuning epoch (loss 17.5, val 0.33 on digits).

    Standardising is one more choice to fit on few labels: it is kept only when its best accuracy beats
    the unscaled features' best by more than that accuracy's binomial standard error over the
    ``n_scored`` held-out predictions. Otherwise the winner's curse picks it on noise (on 50 digit
    labels it chose C = 0.001 and lost 2 points to LogisticRegressionCV; bench/probe.py).
    """

    def top(rows: list[dict[str, Any]]) -> dict[str, Any]:
        return max(rows, key=lambda r: (r["acc"], -r["C"]))

    best = top(search)
    plain = [r for r in search if r["scaling"] == "none"]
    if best["scaling"] != "none" and plain:
        p = top(plain)
        if best["acc"] - p["acc"] <= _se(p["acc"], n_scored):
            best = p
    return best


def _se(acc: float, n: int) -> float:
    return math.sqrt(acc * (1 - acc) / max(n, 1))


def _keep_anchor(best: dict[str, Any], anchor: dict[str, Any] | None, n_scored: int) -> bool:
    """The wider search (17 C values, 3 repeats of shuffled folds, two scalings) replaces LogisticRegressionCV's
    choice only when it beats that choice, scored on the same held-out predictions, by more than the binomial
    standard error of its accuracy over the ``n_scored`` labels.

    The search's best is a maximum over dozens of noisy estimates and so is biased upward (the winner's
    curse); on 128 labels it chose C = 100 over LogisticRegressionCV's 2.78 and lost 2.8 test points
    (yelp 64-shot, bench/probe.py). A margin below one standard error is not evidence of a better C.
    """
    return anchor is not None and best is not anchor and best["acc"] - anchor["acc"] <= _se(anchor["acc"], n_scored)


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
    """The head (on the CPU) and its history: one record for the chosen (scaling, C) with the search in it.

    ``runtime`` reports progress; the fit itself runs on the CPU (lbfgs on a few thousand cached
    vectors takes well under a second per C).
    """
    rt = runtime or Runtime()
    x, y = np.asarray(f_train, dtype=np.float64), np.asarray(y_train, dtype=np.int64)
    has_val = f_val is not None and y_val is not None and len(f_val) > 0
    xv = np.asarray(f_val, dtype=np.float64) if has_val else None
    yv = np.asarray(y_val, dtype=np.int64) if has_val else None
    cs = sorted(float(c) for c in cfg.probe_c)
    scalings = _scalings(x, cfg)
    select = _select_on(len(yv) if has_val else 0, len(y), cfg) if len(cs) * len(scalings) > 1 else "none"
    folds = _folds(y, seed) if select == "cv" else []
    if select == "cv" and not folds:  # fewer than 4 labels: nothing to cross-validate
        select = "val" if has_val else "none"  # none: the middle of the grid
    if select == "val" and not has_val:
        raise ValueError(f"{name}: train.probe_select is 'val' but there is no validation split")
    search: list[dict[str, Any]] = []
    lrcv = _anchor(x, y, cs, scalings[0], cfg) if select != "none" else None
    anchor: dict[str, Any] | None = None
    if select != "none":
        n_scored = len(yv) if select == "val" else len(y)
        for scaling in scalings:
            grid = cs
            if lrcv is not None and scaling == scalings[0]:  # score the anchor's C on the same evidence
                grid = sorted({*cs, float(lrcv.C_[0])})
            if select == "val":
                scores = _grid(x, y, xv, yv, scaling, grid, cfg)
            else:
                per_fold = [_grid(x[tr], y[tr], x[te], y[te], scaling, grid, cfg) for tr, te in folds]
                scores = [tuple(np.mean([f[i][j] for f in per_fold]) for j in range(2)) for i in range(len(grid))]
            search += [
                {"scaling": scaling, "C": c, "acc": round(float(a), 6), "loss": round(float(lo), 6)}
                for c, (a, lo) in zip(grid, scores, strict=True)
            ]
        if lrcv is not None:
            anchor = next(r for r in search if r["scaling"] == scalings[0] and r["C"] == float(lrcv.C_[0]))
        best = _choose(search, n_scored)
        if _keep_anchor(best, anchor, n_scored):
            best = anchor
        scaling, c = best["scaling"], best["C"]
    else:
        scaling, c = scalings[0], cs[len(cs) // 2]
    mean, std = _stats(x, scaling)
    if best_is_anchor := (anchor is not None and best is anchor):
        clf = lrcv  # LogisticRegressionCV's own refit: exactly the baseline's predictions
    else:
        *_, clf = _path((x - mean) / std, y, _up_to(cs, c), cfg)  # the path up to the chosen C
    t = 1.0
    if select != "none":  # held-out logits of the chosen candidate: the validation split's, or out of fold
        if select == "val":
            held_logits, held_y = clf.decision_function((xv - mean) / std), yv
        else:
            held_logits, held_y = _oof_logits(x, y, folds, scaling, c, cfg)
        t = _temperature(held_logits, held_y, clf.classes_)
    head = _to_linear(clf, mean, std, num_classes, temperature=t)
    rec: dict[str, Any] = {"epoch": 1, "scaling": scaling, "C": c, "selected_by": select, "temperature": t}
    if anchor is not None:
        rec["anchor_C"], rec["anchor_acc"], rec["chose_anchor"] = anchor["C"], anchor["acc"], best_is_anchor
    rec["train_acc"], rec["train_loss"] = _score(clf, (x - mean) / std, y)
    if has_val:
        rec["val_acc"], rec["val_loss"] = _score(clf, (xv - mean) / std, yv)
    if select == "cv":
        rec["cv_folds"] = len(folds) // _CV_REPEATS
        rec["cv_repeats"] = _CV_REPEATS
        rec["cv_acc"] = best["acc"]
    rec["search"] = search
    rt.report(name, {k: v for k, v in rec.items() if k != "search"})
    log.info(
        "%s: scaling %s, C %.3g (chosen by %s over %d candidates%s)%s",
        name,
        scaling,
        c,
        {
            "val": "validation accuracy",
            "cv": f"{len(folds) // _CV_REPEATS}-fold CV accuracy on train, {_CV_REPEATS} repeats",
            "none": "no search",
        }[select],
        len(search),
        ""
        if anchor is None
        else "; LogisticRegressionCV's choice"
        + (" kept" if best_is_anchor else f" C {anchor['C']:.3g} beaten by more than a standard error"),
        f"; val acc {rec['val_acc']:.4f}" if has_val else "",
    )
    return head, [rec]


def _oof_logits(
    x: np.ndarray, y: np.ndarray, folds: list[tuple[np.ndarray, np.ndarray]], scaling: str, c: float, cfg: TrainConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Out-of-fold decision values of the chosen (scaling, C), over every fold of every repeat."""
    logits, labels = [], []
    for tr, te in folds:
        mean, std = _stats(x[tr], scaling)
        *_, clf = _path((x[tr] - mean) / std, y[tr], _up_to(cfg.probe_c, c), cfg)
        if len(clf.classes_) != len(np.unique(y)):  # a class missing from this training fold
            continue
        logits.append(clf.decision_function((x[te] - mean) / std))
        labels.append(y[te])
    return (np.concatenate(logits), np.concatenate(labels)) if logits else (np.zeros((0,)), np.zeros((0,), int))


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

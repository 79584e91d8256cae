"""Stratified, seeded train/val/test splits with an optional label budget and unlabelled split.

A few-shot budget (``data.labels_per_class: K``) caps the validation split at K labels per class
too: a user with K labels per class does not have a larger labelled set to choose strategies and
epochs on, and selecting on one makes few-shot numbers optimistic. ``data.val_labels_per_class``
sets the validation budget explicitly (larger or smaller), with or without a training budget.
Validation samples beyond the budget go back to the training pool (after the samples drawn
first), so a capped validation split never changes which K samples a few-shot run trains on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tlops.config import DataConfig
from tlops.errors import DataError

SPLITS = ("train", "val", "test", "unlabelled")


@dataclass
class SplitIndices:
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    unlabelled: np.ndarray

    def items(self):
        return [(s, getattr(self, s)) for s in SPLITS]


def val_budget(cfg: DataConfig) -> tuple[int | None, str | None]:
    """Labels per class the validation split may hold (None: the ``split.val`` fraction, uncapped)
    and the rule that set it, for the dataset manifest and the evaluation report."""
    if cfg.val_labels_per_class is not None:
        return cfg.val_labels_per_class, f"validation capped by data.val_labels_per_class={cfg.val_labels_per_class}"
    if cfg.labels_per_class is not None:
        return cfg.labels_per_class, (
            f"validation capped at labels_per_class={cfg.labels_per_class} (few-shot default; "
            "data.val_labels_per_class sets another budget)"
        )
    return None, None


def stratified_split(y: np.ndarray, cfg: DataConfig, seed: int, class_names: list[str]) -> SplitIndices:
    rng = np.random.default_rng(seed)
    val_cap, _ = val_budget(cfg)
    parts: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    problems = []
    for c, name in enumerate(class_names):
        idx = np.flatnonzero(y == c)
        idx = idx[rng.permutation(len(idx))]
        n = len(idx)
        n_test = max(1, int(round(cfg.split.test * n)))
        n_val = max(1, int(round(cfg.split.val * n))) if cfg.split.val > 0 else 0
        n_pool = n - n_test - n_val
        if n < cfg.min_per_class or n_pool < 1:
            need = max(cfg.min_per_class, n_test + n_val + 1)
            problems.append(f"'{name}' has {n} sample(s), needs at least {need}")
            continue
        test, val, pool = idx[:n_test], idx[n_test : n_test + n_val], idx[n_test + n_val :]
        n_unl = int(round(cfg.unlabelled * len(pool)))
        unl, pool = pool[:n_unl], pool[n_unl:]
        if val_cap is not None:  # validation beyond its budget goes back to training (after the first K drawn)
            val, pool = val[:val_cap], np.concatenate([pool, val[val_cap:]])
        if len(pool) == 0:
            problems.append(f"'{name}' has no labelled training sample left after the unlabelled split")
            continue
        if cfg.labels_per_class is not None:
            if len(pool) < cfg.labels_per_class:
                problems.append(
                    f"'{name}' has {len(pool)} training sample(s) after splitting, fewer than "
                    f"labels_per_class={cfg.labels_per_class}"
                )
                continue
            pool = pool[: cfg.labels_per_class]
        for s, arr in (("train", pool), ("val", val), ("test", test), ("unlabelled", unl)):
            parts[s].append(arr)
    if problems:
        raise DataError(
            f"data: too few samples for the requested split (val={cfg.split.val}, test={cfg.split.test}"
            f"{f', labels_per_class={cfg.labels_per_class}' if cfg.labels_per_class else ''}): "
            + "; ".join(problems)
            + ". Lower data.split fractions or labels_per_class, add data, or drop the class with data.classes"
        )
    out = {s: np.sort(np.concatenate(v)) if v else np.zeros(0, dtype=np.int64) for s, v in parts.items()}
    return SplitIndices(**out)

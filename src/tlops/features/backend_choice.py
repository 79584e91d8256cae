"""``features.backend: auto``: the fastest extraction backend that keeps the run's own accuracy.

On a sample of the run's labelled train and validation rows, every installed backend the backbone supports
extracts features (fp32 ``torch`` first, as the reference); tlops' linear probe
(:mod:`tlops.training.probe`, default settings: C by cross-validation) is fitted on the
train sample and scored on the validation sample. The pick is the backend with the highest measured
throughput whose validation accuracy is within ``TOLERANCE_POINTS`` (0.3) of fp32 torch's; ``torch``
itself always qualifies, so ``auto`` never trades accuracy beyond that for speed. A sample of a few
hundred rows resolves one row as ~0.4 points, so in practice a candidate must lose no validation row
net.

The decision (with every candidate's accuracy, items/s and speedup) is returned for the step's
metadata and kept as a small JSON under the backend store, keyed by the model, its preprocessing,
the dataset and the sample, so a rerun (or the next step on the same data) does not measure again.
Timings on a shared machine are noisy; the accuracy criterion is not.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
from torch import nn

from tlops.features import backends
from tlops.hashing import hash_json

log = logging.getLogger(__name__)

TOLERANCE_POINTS = 0.3
SAMPLE_ROWS = 256  # per split
DECISION_VERSION = 1


def _sample(x: Any, y: np.ndarray, n: int, seed: int = 0) -> tuple[Any, np.ndarray]:
    labelled = np.flatnonzero(y >= 0)
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(labelled, size=min(n, len(labelled)), replace=False))
    xs = x[idx] if isinstance(x, np.ndarray) else [x[i] for i in idx]
    return xs, y[idx]


def _split_sample(
    train: tuple[Any, np.ndarray], val: tuple[Any, np.ndarray] | None, n: int
) -> tuple[tuple[Any, np.ndarray], tuple[Any, np.ndarray]]:
    """(train sample, validation sample); without labelled validation rows, halves of the train sample."""
    tr = _sample(*train, n)
    if val is not None and int((val[1] >= 0).sum()) >= 10:
        return tr, _sample(*val, n, seed=1)
    x, y = tr
    half = len(y) // 2
    return (x[:half], y[:half]), (x[half:], y[half:])


def probe_accuracy(
    f_train: np.ndarray,
    y_train: np.ndarray,
    f_val: np.ndarray,
    y_val: np.ndarray,
    settings: dict[str, Any] | None = None,
) -> tuple[float, dict[str, Any]]:
    """Validation accuracy of tlops' linear probe on one backend's features, and the probe's settings.

    Without ``settings`` the probe chooses C by cross-validation on the train sample (default
    ``train`` settings: the head the run will train); with the reference's ``settings`` it fits
    that one (scaling, C), so the backends are compared on the same head recipe and the search
    (50 fits) runs once, not once per backend."""
    import torch

    from tlops.config import TrainConfig
    from tlops.training.probe import train_probe

    if len(np.unique(y_train)) < 2:
        return float(np.mean(y_val == y_train[0])), settings or {}
    num_classes = int(max(y_train.max(), y_val.max())) + 1
    cfg = TrainConfig() if not settings else TrainConfig(probe_c=[settings["C"]], probe_scaling=settings["scaling"])
    head, hist = train_probe(f_train, y_train, None, None, num_classes, cfg, seed=0)
    with torch.no_grad():
        pred = head(torch.as_tensor(np.asarray(f_val, dtype=np.float32))).argmax(1).numpy()
    return float(np.mean(pred == y_val)), {"scaling": hist[-1]["scaling"], "C": hist[-1]["C"]}


def measure(
    candidates: list[str],
    train: tuple[Any, np.ndarray],
    val: tuple[Any, np.ndarray],
    make: Callable[[str], nn.Module],
    batch_size: int,
) -> dict[str, dict[str, float]]:
    """Accuracy and throughput of each backend on the samples (warm-up batch not timed). A candidate
    other than fp32 torch that cannot run this model (a :class:`ConfigError` from its export, e.g. an
    operator OpenVINO cannot convert) is recorded with its ``error`` and left out."""
    from tlops.errors import ConfigError
    from tlops.features.extract import extract

    out: dict[str, dict[str, Any]] = {}
    n = len(train[1]) + len(val[1])
    settings = None  # the probe recipe chosen on fp32 torch's features (candidates[0]), reused by the others
    for name in candidates:
        t_build = time.perf_counter()
        try:
            runner = make(name)
        except ConfigError as e:
            if name == "torch":
                raise
            log.warning("features.backend auto: leaving out %s: %s", name, e)
            out[name] = {"error": str(e)[:500]}
            continue
        build_s = time.perf_counter() - t_build
        extract(runner, train[0][: min(batch_size, len(train[1]))], batch_size, desc=f"auto warm-up {name}")
        t0 = time.perf_counter()
        f_tr = extract(runner, train[0], batch_size, desc=f"auto {name} train")
        f_va = extract(runner, val[0], batch_size, desc=f"auto {name} val")
        secs = time.perf_counter() - t0
        acc, settings = probe_accuracy(f_tr, train[1], f_va, val[1], settings)
        out[name] = {
            "val_accuracy": round(acc, 6),
            "items_s": round(n / secs, 3) if secs > 0 else float("inf"),
            "seconds": round(secs, 4),
            "build_seconds": round(build_s, 3),
        }
    return out


def pick(measured: dict[str, dict[str, float]], tolerance_points: float = TOLERANCE_POINTS) -> str:
    """The fastest backend within ``tolerance_points`` of fp32 torch's validation accuracy."""
    ref = measured["torch"]["val_accuracy"]
    ok = [
        b for b, m in measured.items() if "error" not in m and m["val_accuracy"] >= ref - tolerance_points / 100 - 1e-12
    ]
    return max(ok, key=lambda b: measured[b]["items_s"])  # torch always qualifies


def choose(
    modality: str,
    *,
    train: tuple[Any, np.ndarray],
    val: tuple[Any, np.ndarray] | None,
    make: Callable[[str], nn.Module],
    batch_size: int,
    decision_key: dict[str, Any] | None = None,
    store: str | os.PathLike | None = None,
    sample_rows: int = SAMPLE_ROWS,
) -> dict[str, Any]:
    """Resolve ``auto``: ``{"backend": name, "speedup": x, "candidates": {...}, ...}``.

    ``make(name)`` builds a runnable backbone for a backend (:func:`tlops.features.backends.build`).
    With ``decision_key`` and ``store``, an earlier decision for the same key is returned as is."""
    candidates = list(backends.available(modality))
    path = None
    if decision_key is not None and store is not None:
        key = hash_json(
            {
                **decision_key,
                "candidates": candidates,
                "rows": sample_rows,
                "v": DECISION_VERSION,
                "tol": TOLERANCE_POINTS,
            }
        )
        path = Path(store) / "auto" / f"{key}.json"
        if path.is_file():
            decision = json.loads(path.read_text())
            log.info("features.backend auto: reusing the decision %s (%s)", decision["backend"], path)
            return dict(decision, reused=True)
    tr, va = _split_sample(train, val, sample_rows)
    measured = measure(candidates, tr, va, make, batch_size)
    chosen = pick(measured)
    ref = measured["torch"]
    decision = {
        "backend": chosen,
        "speedup": round(measured[chosen]["items_s"] / ref["items_s"], 3),
        "val_accuracy": measured[chosen]["val_accuracy"],
        "torch_val_accuracy": ref["val_accuracy"],
        "tolerance_points": TOLERANCE_POINTS,
        "sample": {"train": len(tr[1]), "val": len(va[1])},
        "candidates": measured,
    }
    log.info(
        "features.backend auto: %s (%.2fx fp32 torch's items/s, val accuracy %.4f vs %.4f on %d + %d sampled rows)",
        chosen,
        decision["speedup"],
        decision["val_accuracy"],
        ref["val_accuracy"],
        len(tr[1]),
        len(va[1]),
    )
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(decision, indent=1))
        os.replace(tmp, path)
    return dict(decision, reused=False)

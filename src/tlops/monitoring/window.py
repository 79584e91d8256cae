"""The shift monitor on what a server actually receives: a rolling window of served inputs.

``tlops serve --monitor-window N`` keeps the last N inputs it answered (canonical inputs, after
the contract parsed them: strings or uint8 images) and, every ``--monitor-every`` seconds once
the window holds at least ``min_inputs``, runs the same statistics as ``tlops monitor``
(:func:`tlops.monitoring.monitor.analyse`) against the served version's reference. The inputs are
embedded again off the request path, in the monitor's own thread, so a check costs CPU but never
request latency; the window is not the request stream's forward pass because that one stops at
class probabilities.

The latest result is served as JSON at ``GET /monitor`` and as Prometheus series (``/metrics``):
``tlops_monitor_verdict{model,version,verdict}`` (1 for the current verdict),
``tlops_monitor_estimated_accuracy``, ``tlops_monitor_p_value{test}``, ``tlops_monitor_inputs``.
When the alias moves, the next check compares the window against the new version's reference.
"""

from __future__ import annotations

import collections
import logging
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WindowOptions:
    size: int = 0  # 0: off
    every_s: float = 60.0
    min_inputs: int = 100
    alpha: float = 0.05
    permutations: int = 200


class Window:
    """The last ``size`` served inputs (thread-safe: the batcher appends, the monitor snapshots)."""

    def __init__(self, size: int):
        self._items: collections.deque = collections.deque(maxlen=size)
        self._lock = threading.Lock()
        self.seen = 0  # inputs ever added

    def add(self, items: list[Any]) -> None:
        with self._lock:
            self._items.extend(items)
            self.seen += len(items)

    def snapshot(self) -> tuple[list[Any], int]:
        """The inputs held now, and how many were ever added when they were taken."""
        with self._lock:
            return list(self._items), self.seen


def load_reference(run_id: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    from tlops.monitoring import reference

    with tempfile.TemporaryDirectory(prefix="tlops-window-") as tmp:
        return reference.load(run_id, Path(tmp))


def check(clf: Any, kind: str, items: list[Any], ref: dict[str, np.ndarray], meta: dict, opts: WindowOptions) -> dict:
    """One check of the window: ``tlops monitor``'s statistics and verdict on ``items``."""
    from tlops.monitoring.monitor import Thresholds, analyse, embed
    from tlops.monitoring.reference import head_logits

    t0 = time.perf_counter()
    feats = embed(clf, kind, items)
    th = Thresholds(alpha=opts.alpha, permutations=opts.permutations)
    res = analyse(ref, meta, feats, head_logits(clf, feats), th)
    return {**res, "seconds": round(time.perf_counter() - t0, 2), "checked_at": time.strftime("%Y-%m-%dT%H:%M:%SZ")}


class Gauges:
    """The monitor's Prometheus series (one set per process, like the server's)."""

    _made: "Gauges | None" = None

    def __new__(cls) -> "Gauges":
        if cls._made is None:
            from prometheus_client import Gauge

            g = super().__new__(cls)
            g.verdict = Gauge(
                "tlops_monitor_verdict", "the window's verdict (1 on the current one)", ["model", "version", "verdict"]
            )
            g.estimate = Gauge(
                "tlops_monitor_estimated_accuracy", "label-free accuracy estimate (ATC)", ["model", "version"]
            )
            g.p_value = Gauge("tlops_monitor_p_value", "shift test p-value", ["model", "version", "test"])
            g.inputs = Gauge("tlops_monitor_inputs", "inputs in the checked window", ["model", "version"])
            cls._made = g
        return cls._made

    def publish(self, model: str, version: str, res: dict[str, Any]) -> None:
        for v in ("ok", "shift", "severe"):
            self.verdict.labels(model, version, v).set(1.0 if res["verdict"] == v else 0.0)
        self.estimate.labels(model, version).set(res["accuracy"]["estimate"])
        self.p_value.labels(model, version, "mmd").set(res["covariate_shift"]["mmd"]["p_value"])
        self.p_value.labels(model, version, "c2st").set(res["covariate_shift"]["c2st"]["p_value"])
        self.p_value.labels(model, version, "label").set(res["label_shift"]["test"]["p_value"])
        self.inputs.labels(model, version).set(res["n"])

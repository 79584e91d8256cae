"""bench/selection.py's metrics: weighted Kendall tau and top-1 regret of a score against the
fine-tuned accuracies, per task and seed, and the summary the report is written from."""

from __future__ import annotations

import sys

import pytest

from tests.conftest import REPO


@pytest.fixture(scope="module")
def sel():
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import selection

        yield selection
    finally:
        sys.path.remove(str(REPO / "bench"))


def _rows(seed: int, accs: list[float], logme: list[float], leep: list[float] | None) -> list[dict]:
    return [
        {
            "task": "t",
            "candidate": f"c{i}",
            "seed": seed,
            "ft_acc": a,
            "n_test": 100,
            "ft_cpu_seconds": 10.0,
            "extract_cpu_seconds": 1.0,
            "scores": {"logme": s, "hscore": s, "transrate": -s, "leep": leep and leep[i], "nce": None},
            "score_cpu_seconds": {"logme": 0.1, "hscore": 0.1, "transrate": 0.1, "leep": 0.1, "nce": None},
        }
        for i, (a, s) in enumerate(zip(accs, logme, strict=True))
    ]


def test_tau_and_regret_by_hand(sel):
    rows = _rows(0, [0.9, 0.8, 0.7], [3.0, 2.0, 1.0], None)
    same = sel.ranking_metrics(rows, "logme")
    assert same["weighted_tau"] == pytest.approx(1.0) and same["regret_points"] == 0.0 and same["top"] == "c0"
    reversed_ = sel.ranking_metrics(rows, "transrate")  # ranks the worst first
    assert reversed_["weighted_tau"] == pytest.approx(-1.0)
    assert reversed_["regret_points"] == pytest.approx(20.0) and reversed_["top"] == "c2" and reversed_["best"] == "c0"
    assert sel.ranking_metrics(rows, "leep") is None  # not defined for these candidates


def test_summary_averages_seeds_and_pools_compute(sel):
    rows = _rows(0, [0.9, 0.8, 0.7], [3.0, 2.0, 1.0], [0.0, -1.0, -2.0])
    rows += _rows(1, [0.9, 0.8, 0.7], [2.0, 3.0, 1.0], [0.0, -1.0, -2.0])  # seed 1: LogME picks c1, 10 points off
    s = sel.summarise(rows)
    t = s["tasks"]["t"]
    assert t["scores"]["logme"]["regret_points"] == pytest.approx(5.0)
    assert t["scores"]["leep"]["weighted_tau"] == pytest.approx(1.0)
    assert t["scores"]["nce"] is None and "nce" not in s["overall"]
    assert t["random_pick_regret_points"] == pytest.approx(10.0)  # (0 + 10 + 20) / 3
    assert t["scores"]["logme"]["on_means"]["regret_points"] == pytest.approx(0.0)  # means: 2.5, 2.5, 1 -> c0 first
    assert t["test_se_points"] == pytest.approx(3.0)  # sqrt(0.9 * 0.1 / 100)
    assert t["scores"]["logme"]["compute_share"] == pytest.approx(0.6 / 60)
    assert s["overall"]["logme"]["compute_share_with_extraction"] == pytest.approx((0.6 + 6) / 60)
    assert "| logme | 1 |" in sel.report(s, {"command": "x", "date": "d", **_info()}, {})


def _info() -> dict:
    return {"cpu": "cpu", "cores": 2, "usable": 2, "threads": 1, "load_start": 0.0}

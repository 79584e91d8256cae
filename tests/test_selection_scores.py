"""Transferability scores: each against a value derived independently (by hand in one dimension,
or TLlib's published formula re-derived here on fixed random data), their invariances, and the
ranking of clearly separable vs noise features."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.covariance import LedoitWolf

from tlops.features.selection import SCORE_NAMES, all_scores, h_score, leep, logme, nce, transrate


def _data(seed: int = 0, n_per: int = 20, d: int = 12, sep: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(3), n_per)
    return rng.normal(size=(len(y), d)) + sep * np.eye(3, d)[y], y


# ---------------------------------------------------------------------------------------- H-Score


def test_h_score_is_the_correlation_ratio_in_one_dimension():
    # 1-d: Ledoit-Wolf shrinks nothing, so H = between-class variance / total variance.
    # f = 0,0,2,2 | y = 0,0,1,1: all variance is between the classes -> 1
    assert h_score(np.array([[0.0], [0.0], [2.0], [2.0]]), np.array([0, 0, 1, 1])) == pytest.approx(1.0)
    # f = 0,2,0,2 | y = 0,0,1,1: class means equal -> 0
    assert h_score(np.array([[0.0], [2.0], [0.0], [2.0]]), np.array([0, 0, 1, 1])) == pytest.approx(0.0)
    # f = 0,1,3,4 | y = 0,0,1,1: means 0.5, 3.5 around 2 -> between 2.25; total (4+1+1+4)/4 = 2.5
    assert h_score(np.array([[0.0], [1.0], [3.0], [4.0]]), np.array([0, 0, 1, 1])) == pytest.approx(0.9)


def test_h_score_matches_tllib_regularized_h_score():
    f, y = _data(d=40, n_per=10)  # more dimensions than per-class samples: shrinkage matters
    # TLlib's regularized_h_score, re-derived: centre, Ledoit-Wolf, np.cov (N - 1) of the class means
    fc = f - f.mean(0)
    lw = LedoitWolf(assume_centered=False).fit(fc)
    g = np.zeros_like(fc)
    for k in range(3):
        g[y == k] = fc[y == k].mean(0)
    ref = np.trace(np.linalg.pinv(lw.covariance_, rcond=1e-15) @ ((1 - lw.shrinkage_) * np.cov(g, rowvar=False)))
    n = len(f)
    assert 0 < lw.shrinkage_ < 1
    assert h_score(f, y) == pytest.approx(ref * (n - 1) / n, rel=1e-9)  # ours divides by N


def test_h_score_invariances():
    f, y = _data(1)
    perm = np.random.default_rng(5).permutation(len(y))
    assert h_score(f[perm], y[perm]) == pytest.approx(h_score(f, y), rel=1e-10)
    assert h_score(f * 37.0 + 5.0, y) == pytest.approx(h_score(f, y), rel=1e-9)  # scale and shift


# ---------------------------------------------------------------------------------------- TransRate


def test_transrate_by_hand_in_one_dimension():
    # f = -1,-1,1,1 (centred) | y = 0,0,1,1, eps = 1/4:
    # R(f) = 0.5 log(1 + 4 / (4 * 1/4)) = 0.5 log 5; each class (2 rows of the same value 1 or -1):
    # R = 0.5 log(1 + 2 / (2 * 1/4)) = 0.5 log 5 -> TransRate 0 (TLlib does not re-centre classes)
    f, y = np.array([[-1.0], [-1.0], [1.0], [1.0]]), np.array([0, 0, 1, 1])
    assert transrate(f, y, eps=0.25) == pytest.approx(0.0, abs=1e-12)
    # three classes, eps = 1
    f3, y3 = np.array([[0.0], [0.0], [3.0], [3.0], [6.0], [6.0]]), np.array([0, 0, 1, 1, 2, 2])
    # centred -3,-3,0,0,3,3: R(f) = 0.5 log(1 + 36 / 6) = 0.5 log 7; classes: 0.5 log(1 + 18/2) = 0.5 log 10, 0, same
    expected = 0.5 * math.log(7) - (0.5 * math.log(10) * 2) / 3
    assert transrate(f3, y3, eps=1.0) == pytest.approx(expected)


def test_transrate_matches_the_authors_formula_in_either_gram_form():
    def coding_rate(z, eps):  # the authors' / TLlib's d x d form
        n, d = z.shape
        return 0.5 * np.linalg.slogdet(np.eye(d) + z.T @ z / (n * eps))[1]

    for d in (8, 90):  # d < n: d x d Gram; d > n: n x n Gram (Sylvester)
        f, y = _data(2, d=d)
        fc = f - f.mean(0)
        ref = coding_rate(fc, 1e-4) - sum(coding_rate(fc[y == k], 1e-4) for k in range(3)) / 3
        assert transrate(f, y) == pytest.approx(ref, rel=1e-9)


def test_transrate_is_invariant_to_permuting_samples():
    f, y = _data(3)
    perm = np.random.default_rng(1).permutation(len(y))
    assert transrate(f[perm], y[perm]) == pytest.approx(transrate(f, y), rel=1e-10)


# ---------------------------------------------------------------------------------------- LEEP / NCE


def test_leep_and_nce_by_hand():
    # a source head that predicts its class 0 for target class 0 and class 1 for target class 1: perfect
    hard = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    y = np.array([0, 0, 1, 1])
    assert leep(hard, y) == pytest.approx(0.0) and nce(hard, y) == pytest.approx(0.0)
    # a head that says the same for everyone: P(y|z) = 1/2 -> LEEP = NCE = log(1/2)
    same = np.array([[0.7, 0.3]] * 4)
    assert leep(same, y) == pytest.approx(math.log(0.5)) and nce(same, y) == pytest.approx(math.log(0.5))
    # soft case by hand: theta = (0.8, 0.2) for y=0 rows, (0.4, 0.6) for y=1 rows, two rows each
    soft = np.array([[0.8, 0.2], [0.8, 0.2], [0.4, 0.6], [0.4, 0.6]])
    # joint P(y,z): y0 = (0.4, 0.1), y1 = (0.2, 0.3); P(z) = (0.6, 0.4); P(y0|z) = (2/3, 1/4), P(y1|z) = (1/3, 3/4)
    eep0 = 0.8 * 2 / 3 + 0.2 * 1 / 4
    eep1 = 0.4 * 1 / 3 + 0.6 * 3 / 4
    assert leep(soft, y) == pytest.approx((math.log(eep0) + math.log(eep1)) / 2)
    # hard labels: z = 0, 0, 1, 1 -> perfect again
    assert nce(soft, y) == pytest.approx(0.0)


def test_leep_matches_tllib_and_is_invariant_to_permuting_samples():
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(60, 7))
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    y = rng.integers(0, 3, 60)
    # TLlib's log_expected_empirical_prediction, re-derived
    joint = np.stack([(p / 60)[y == i].sum(0) for i in range(3)])
    cond = (joint / joint.sum(0, keepdims=True)).T
    ref = np.mean(np.log((p @ cond)[np.arange(60), y]))
    assert leep(p, y) == pytest.approx(ref, rel=1e-10)
    perm = rng.permutation(60)
    assert leep(p[perm], y[perm]) == pytest.approx(leep(p, y), rel=1e-10)
    assert nce(p[perm], y[perm]) == pytest.approx(nce(p, y), rel=1e-10)
    # labels need not be 0..C-1: relabelling the target classes changes nothing
    assert leep(p, y * 10 + 3) == pytest.approx(leep(p, y)) and nce(p, y + 5) == pytest.approx(nce(p, y))


# ---------------------------------------------------------------------------------------- all scores


def test_logme_is_invariant_to_permuting_samples():
    f, y = _data(6)
    perm = np.random.default_rng(2).permutation(len(y))
    assert logme(f[perm], y[perm]) == pytest.approx(logme(f, y), rel=1e-8)


@pytest.mark.parametrize("d", [16, 300])  # 300 > 60 samples: the few-shot, wide-feature case
def test_every_score_ranks_separable_features_above_noise(d):
    rng = np.random.default_rng(7)
    y = np.repeat(np.arange(3), 20)
    separable = rng.normal(size=(60, d)) + 3.0 * np.eye(3, d)[y]
    noise = rng.normal(size=(60, d))
    good_head = np.eye(5)[np.where(rng.random(60) < 0.9, y, rng.integers(0, 5, 60))] * 0.8 + 0.04
    bad_head = rng.dirichlet(np.ones(5), 60)
    good, bad = all_scores(separable, y, good_head), all_scores(noise, y, bad_head)
    assert set(good) == set(SCORE_NAMES)
    for name in SCORE_NAMES:
        assert np.isfinite(good[name]) and np.isfinite(bad[name]), name
        assert good[name] > bad[name], name
    assert all_scores(separable, y)["leep"] is None  # no source head: no head scores


# ---------------------------------------------------------------------------------------- pipeline wiring


def test_extract_features_ranks_by_source_selection_score_and_records_every_score(tmp_path, digits_cfg):
    from tlops.errors import ConfigError
    from tlops.steps import extract_features, ingest, pull_model

    base = {"candidates": ["timm:resnet10t"]}  # a second random-init resnet10t (seeded differently per pull order)
    cfg = digits_cfg(source=base)
    assert cfg.source.selection_score == "logme"  # the default
    ins = {"dataset": ingest.run(cfg, {}, tmp_path / "ingest"), "model": pull_model.run(cfg, {}, tmp_path / "pull")}
    for score in ("logme", "hscore", "transrate"):
        cfg = digits_cfg(source={**base, "selection_score": score})
        feats = extract_features.run(cfg, ins, tmp_path / f"features-{score}")
        ranking = feats.meta["source_ranking"]
        assert feats.meta["selection_score"] == score
        assert [c["rank"] for c in ranking] == [1, 2] and ranking[0]["score"] >= ranking[1]["score"]
        for c in ranking:
            assert set(c["scores"]) == {"logme", "hscore", "transrate"}  # every score recorded, no head scores
            assert c["score"] == c["scores"][score] and all(np.isfinite(v) for v in c["scores"].values())
        assert feats.meta["source_bundle"] == ranking[0]["path"]  # the best by the configured score is used
    with pytest.raises(ConfigError, match="source.selection_score: got 'leep'"):
        digits_cfg(source={**base, "selection_score": "leep"})  # needs a source head: not offered

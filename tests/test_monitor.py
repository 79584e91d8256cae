"""Shift monitoring: the statistics on synthetic data with known answers, and ``tlops monitor``
end to end on a tiny registered digits model (reference stored by register, JSON + markdown +
plot written and logged to the version's run, ok in distribution, shift on shifted inputs)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

from tests.conftest import digits_config
from tlops.monitoring import stats


def test_mmd_permutation_p_value_uniformish_under_h0_and_tiny_on_shift():
    rng = np.random.default_rng(0)
    pool = rng.normal(size=(4000, 16)).astype(np.float32)
    ps = []
    for s in range(20):  # resplits of one distribution: p-values spread over (0, 1]
        idx = np.random.default_rng(s).permutation(len(pool))
        ps.append(stats.mmd_test(pool[idx[:1000]], pool[idx[1000:1100]], permutations=200, seed=s)["p_value"])
    assert sum(p < 0.05 for p in ps) <= 3 and np.median(ps) > 0.2
    shifted = rng.normal(size=(100, 16)).astype(np.float32) + 0.5
    r = stats.mmd_test(pool[:1000], shifted, permutations=200)
    assert r["p_value"] <= 1 / 201 + 1e-12 and r["mmd2"] > 0


def test_c2st_chance_in_distribution_and_separates_a_shift():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(500, 8)), rng.normal(size=(200, 8))
    r = stats.c2st(a, b)
    assert r["p_value"] > 0.01 and 0.35 < r["auc"] < 0.65 and r["n_each"] == 200
    s = stats.c2st(a, b + 1.0)
    assert s["p_value"] < 1e-6 and s["auc"] > 0.9


def test_c2st_p_value_is_the_binomial_tail_of_one_held_out_half_and_holds_its_level():
    from scipy.stats import binomtest

    rng = np.random.default_rng(5)
    r = stats.c2st(rng.normal(size=(300, 8)), rng.normal(size=(101, 8)))
    # 101 rows each: 50 of each sample fit the classifier, the other 51 + 51 score it
    assert r["n_each"] == 101 and r["n_test"] == 102
    hits = round(r["accuracy"] * 102)
    assert r["p_value"] == binomtest(hits, 102, 0.5, alternative="greater").pvalue
    # no shift: p < 0.05 about 5 % of the time, not more
    ps = [stats.c2st(rng.normal(size=(100, 8)), rng.normal(size=(100, 8)), seed=s)["p_value"] for s in range(100)]
    assert np.mean(np.array(ps) < 0.05) <= 0.08


def test_bbse_recovers_a_known_prior_shift():
    rng = np.random.default_rng(2)
    k = 3
    # a classifier with class-dependent errors: P(pred | true) = confusion columns
    p_pred_given_y = np.array([[0.8, 0.1, 0.1], [0.15, 0.7, 0.2], [0.05, 0.2, 0.7]])
    yv = rng.integers(0, k, 3000)  # validation: uniform priors
    pv = np.array([rng.choice(k, p=p_pred_given_y[:, y]) for y in yv])
    conf = stats.confusion(pv, yv, k)
    target = np.array([0.6, 0.3, 0.1])
    yn = rng.choice(k, 4000, p=target)
    pn = np.array([rng.choice(k, p=p_pred_given_y[:, y]) for y in yn])
    r = stats.bbse(conf, pn, boots=100)
    assert np.allclose(r["priors"], target, atol=0.04)
    assert all(lo <= t <= hi for lo, t, hi in zip(r["low"], target, r["high"], strict=True))
    naive = np.bincount(pn, minlength=k) / len(pn)  # prediction frequencies are biased toward the errors
    assert np.abs(naive - target).max() > np.abs(np.array(r["priors"]) - target).max()
    assert stats.label_shift_test(pv, pn, k)["p_value"] < 1e-6
    assert stats.label_shift_test(pv[:1500], pv[1500:], k)["p_value"] > 0.01


def test_atc_estimates_accuracy_from_confidences():
    rng = np.random.default_rng(3)

    def scored(n, shift):  # ATC's premise: correctness is (nearly) decided by the confidence
        c = np.clip(rng.beta(5 - shift, 1.5 + shift, n), 0.34, 1.0)
        return c, rng.random(n) < 1 / (1 + np.exp(-(c - 0.6) * 40))

    vc, vk = scored(2000, 0.0)
    t = stats.atc_threshold(vc, vk)
    assert abs(np.mean(vc > t) - np.mean(vk)) < 0.01
    nc, nk = scored(1000, 2.0)  # harder inputs: lower confidences and accuracy
    r = stats.atc(vc, vk, nc, boots=300)
    assert abs(r["estimate"] - np.mean(nk)) < 0.04
    assert abs(np.mean(nc) - np.mean(nk)) > 0.1  # the average confidence would be far off
    assert r["low"] <= r["estimate"] <= r["high"] and r["high"] - r["low"] < 0.1
    assert np.mean(nk) < np.mean(vk) - 0.1


# -- end to end -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reg(tmp_path_factory):
    from tlops.config import validate_config
    from tlops.runners.local import run_pipeline
    from tlops.tracking.setup import embedded_uri

    root = tmp_path_factory.mktemp("monitor")
    work = root / "work"
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.delenv("MLFLOW_RUN_ID", raising=False)
        cfg = digits_config(work, train={"strategies": ["linear-probe"], "epochs": 3, "batch_size": 16})
        cfg["data"]["labels_per_class"] = None
        cfg["data"]["split"] = {"val": 0.3, "test": 0.2}
        res = run_pipeline(validate_config(cfg))
    from sklearn.datasets import load_digits

    from tlops.data.dataset import Dataset

    test_rows = len(Dataset(res.steps["ingest"].artifact).load("test"))

    d = load_digits()
    keep = np.isin(d.target, [0, 1, 2])
    x = np.round(d.images[keep] * (255.0 / 16.0)).astype(np.uint8)
    y = d.target[keep]
    same = root / "same.npz"
    np.savez(same, x=x[::2], y=y[::2])
    shifted = root / "shifted.npz"
    np.savez(shifted, x=np.ascontiguousarray(np.rot90(x[1::2], axes=(1, 2))), y=y[1::2])  # rotated digits
    return SimpleNamespace(work=work, uri=embedded_uri(work), same=same, shifted=shifted, test_rows=test_rows)


def _cli(*args: str):
    from typer.testing import CliRunner

    from tlops.cli import app

    return CliRunner().invoke(app, list(args))


def test_register_stores_a_compact_reference_from_the_cached_train_features(reg, tmp_path):
    from tlops.monitoring import reference
    from tlops.tracking import registry
    from tlops.tracking.setup import use_store

    use_store(reg.uri)
    mv = registry.get_alias("t-digits", "challenger")
    arrays, meta = reference.load(mv.run_id, tmp_path)
    assert meta["feature_space"].startswith("source")  # linear probe: the extract-features cache entry
    assert arrays["features"].dtype == np.float16 and len(arrays["features"]) == meta["reference_rows"] <= 2000
    assert meta["reference_rows"] == meta["pool_rows"]  # < 2,000 train rows: all of them
    assert arrays["confusion"].sum() == meta["val_rows"] == len(arrays["val_score"])
    assert abs(arrays["val_correct"].mean() - meta["val_accuracy"]) < 1e-9
    # ATC's calibration rows: validation first, then every test row (fewer than 2,000)
    assert meta["calibration_rows"] == meta["val_rows"] + reg.test_rows == len(arrays["calib_score"])
    assert np.array_equal(arrays["calib_score"][: meta["val_rows"]], arrays["val_score"])
    assert np.array_equal(arrays["calib_correct"][: meta["val_rows"]], arrays["val_correct"])
    assert abs(arrays["calib_correct"].mean() - meta["calibration_accuracy"]) < 1e-9
    assert 0 < meta["bytes"] < 2_000_000 and set(arrays) == {
        "features",
        "ref_pred",
        "val_score",
        "val_pred",
        "val_correct",
        "confusion",
        "calib_score",
        "calib_correct",
    }


def test_atc_is_calibrated_on_the_held_out_rows_and_older_references_fall_back_to_validation():
    from tlops.monitoring.monitor import analyse

    rng = np.random.default_rng(4)
    ref_f = rng.normal(size=(300, 8)).astype(np.float16)
    new_f = rng.normal(size=(200, 8)).astype(np.float32)
    logits = rng.normal(size=(200, 2)) * 3
    val_score, cal_score = -rng.exponential(0.3, 100), -rng.exponential(0.3, 600)
    ref = {
        "features": ref_f,
        "ref_pred": rng.integers(0, 2, 300),
        "val_score": val_score,
        "val_correct": np.arange(100) < 60,  # a validation split that scores 0.60 ...
        "confusion": np.array([[30, 20], [20, 30]]),
        "calib_score": np.r_[val_score, cal_score],
        "calib_correct": np.r_[np.arange(100) < 60, np.arange(600) < 480],  # ... of 700 held-out rows at 0.77
    }
    meta = {"classes": ["a", "b"], "val_accuracy": 0.6}
    from tlops.monitoring.monitor import Thresholds
    from tlops.monitoring.reference import top_score

    th = Thresholds(permutations=50)
    acc = analyse(ref, meta, new_f, logits, th)
    expected = stats.atc(ref["calib_score"], ref["calib_correct"], top_score(logits)[1], seed=0)
    assert acc["accuracy"]["estimate"] == expected["estimate"] and acc["accuracy"]["threshold"] == expected["threshold"]
    assert acc["accuracy"]["held_out_rows"] == 700 and acc["accuracy"]["held_out_accuracy"] == 540 / 700
    assert acc["accuracy"]["validation_accuracy"] == 0.6
    assert acc["estimated_drop"] == pytest.approx(540 / 700 - expected["estimate"])
    old = {k: v for k, v in ref.items() if not k.startswith("calib_")}  # registered before the test rows were kept
    acc = analyse(old, meta, new_f, logits, th)
    expected = stats.atc(ref["val_score"], ref["val_correct"], top_score(logits)[1], seed=0)
    assert acc["accuracy"]["estimate"] == expected["estimate"] and acc["accuracy"]["held_out_rows"] == 100
    assert acc["estimated_drop"] == pytest.approx(0.6 - expected["estimate"])


def test_monitor_ok_in_distribution_and_shift_on_rotated_digits(reg, tmp_path):
    import mlflow

    from tlops.tracking.setup import use_store

    r = _cli(
        "monitor",
        "t-digits@challenger",
        "--data",
        str(reg.same),
        "--out",
        str(tmp_path / "same"),
        "--workdir",
        str(reg.work),
        "--permutations",
        "200",
    )
    assert r.exit_code == 0, r.output
    same = json.loads((tmp_path / "same" / "monitor.json").read_text())
    assert same["verdict"] == "ok" and same["n"] == 269 and "v1: ok on 269 inputs" in r.output
    assert (tmp_path / "same" / "monitor.png").stat().st_size > 10_000
    md = (tmp_path / "same" / "report.md").read_text()
    assert "**Verdict: ok**" in md and "ATC" in md and "BBSE" in md

    r = _cli(
        "monitor",
        "t-digits@challenger",
        "--data",
        str(reg.shifted),
        "--out",
        str(tmp_path / "rot"),
        "--workdir",
        str(reg.work),
        "--permutations",
        "200",
    )
    assert r.exit_code == 0, r.output
    rot = json.loads((tmp_path / "rot" / "monitor.json").read_text())
    assert rot["verdict"] in ("shift", "severe") and "mmd" in rot["flagged_by"]
    assert rot["covariate_shift"]["mmd"]["p_value"] < 0.01 and rot["covariate_shift"]["c2st"]["auc"] > 0.8
    assert rot["accuracy"]["estimate"] < same["accuracy"]["estimate"]

    use_store(reg.uri)
    logged = mlflow.artifacts.list_artifacts(artifact_uri=rot["mlflow_artifacts"])
    assert {Path(a.path).name for a in logged} == {"monitor.json", "report.md", "monitor.png"}


def test_monitor_reuses_cached_embeddings(reg, tmp_path):
    from tlops.features.extract import STATS

    args = ["monitor", "t-digits@challenger", "--data", str(reg.same), "--workdir", str(reg.work), "--no-log"]
    assert _cli(*args, "--out", str(tmp_path / "a")).exit_code == 0
    before = STATS["backbone_items"]
    assert _cli(*args, "--out", str(tmp_path / "b")).exit_code == 0
    assert STATS["backbone_items"] == before  # second run: embeddings from the feature cache
    a, b = (json.loads((tmp_path / p / "monitor.json").read_text()) for p in ("a", "b"))
    assert a["covariate_shift"] == b["covariate_shift"] and a["accuracy"] == b["accuracy"]


def test_monitor_bad_data_path_is_a_usage_error(reg, tmp_path):
    missing = tmp_path / "nope.npz"
    r = _cli("monitor", "t-digits@challenger", "--data", str(missing), "--workdir", str(reg.work))
    assert r.exit_code == 2
    assert f"error: --data: data.source: path not found: {missing}" in r.output
    assert not Path("monitor").exists() or not (Path("monitor") / "monitor.json").exists()


def test_adapt_writes_a_label_free_adaptation_config_from_the_models_own_training_data(reg, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "adapt.yaml"
    res = _cli(
        "adapt", "t-digits@challenger", "--data", str(reg.shifted), "--out", str(out), "--workdir", str(reg.work),
        "--set", "train.adapt.epochs=1",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[0].startswith("t-digits v1: shift on 268 inputs; estimated accuracy ")
    assert lines[1] == f"adaptation config -> {out} (strategies: source-only, coral, dann, adabn)"
    assert lines[2] == f"run it with: tlops run --config {out}"
    cfg = yaml.safe_load(out.read_text())
    from tlops.config import validate_config

    validate_config(cfg)
    d = cfg["data"]
    # the target: the new inputs, 90 % of the train pool without labels, the model's classes
    assert d["source"] == str(reg.shifted) and d["unlabelled"] == 0.9 and d["classes"] == [0, 1, 2]
    assert d["labels_per_class"] is None if "labels_per_class" in d else True
    # the source domain: what the registered model was trained on, read the same way
    assert d["adapt_from"]["source"] == "sklearn:digits" and d["adapt_from"]["val"] == 0.3
    assert cfg["train"]["select_on"] == "source_val" and cfg["train"]["adapt"]["epochs"] == 1
    assert cfg["register"] == {"model_name": "t-digits", "auto_promote": False}
    assert cfg["name"] == "t-digits-adapt" and cfg["evaluate"]["scratch_baseline"] is False
    assert cfg["workdir"] == str(reg.work)
    # everything else is the model's own config (same source model, same features)
    assert cfg["source"] == {**cfg["source"], "model": "timm:resnet10t", "pretrained": False, "image_size": 16}


def test_adapt_refuses_a_strategy_list_that_cannot_work_before_anything_runs(reg, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "adapt.yaml"
    res = _cli(
        "adapt", "t-digits@challenger", "--data", str(reg.shifted), "--out", str(out), "--workdir", str(reg.work),
        "--strategies", "dann,lora",
    )  # fmt: skip
    from tlops.errors import ConfigError

    assert isinstance(res.exception, ConfigError), res.output
    assert "train.strategies: lora needs a text model (hf:...), but source.model timm:resnet10t" in str(res.exception)
    assert not out.exists()


def test_confidence_score_keeps_order_where_float32_softmax_saturates():
    from tlops.monitoring.reference import top_score

    logits = np.array([[40.0, 0.0], [60.0, 0.0], [0.0, 1.0]])
    pred, score = top_score(logits)
    assert pred.tolist() == [0, 0, 1]
    assert score[1] > score[0] > score[2] and score[0] < 0  # softmax in float32: 1.0 and 1.0
    assert np.isclose(score[2], np.log(1 / (1 + np.exp(-1.0))))
    t = stats.atc_threshold(score[:2], np.array([True, True]))
    assert t < score.min() + 1 and np.mean(score[:2] > t) == 1.0

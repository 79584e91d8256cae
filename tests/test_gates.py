"""Gates and evaluation numbers, checked against the models and the registry themselves.

Each test recomputes what it checks (accuracies from the trained models' predictions on the test
split) or reads it from the MLflow registry (aliases, version tags), never from the step's own
summary of what it did: a step that reports the right thing but does the wrong one fails here.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import digits_config

NAME = "t-digits"


def _run(tmp_path, **sections):
    from tlops.config import validate_config
    from tlops.runners.local import run_pipeline

    return run_pipeline(validate_config(digits_config(tmp_path / "work", **sections)))


def _client(tmp_path):
    import mlflow

    from tlops.tracking.setup import use_store

    use_store(f"sqlite:///{tmp_path / 'work' / 'mlflow.db'}")
    return mlflow.MlflowClient()


def _aliases(tmp_path) -> dict[str, str]:
    return {a: str(v) for a, v in _client(tmp_path).get_registered_model(NAME).aliases.items()}


def _report(result) -> dict:
    return json.loads((result.steps["evaluate"].artifact.path / "report.json").read_text())


def _recomputed_accuracies(result) -> dict[str, float]:
    """Test accuracy of every trained model, from its own predictions."""
    from tlops.data.dataset import Dataset
    from tlops.models.bundle import load_classifier

    test = Dataset(result.steps["ingest"].artifact).load("test")
    trained = result.steps["fine-tune"].artifact
    out = {}
    for name in trained.meta["models"]:
        clf = load_classifier(trained.path / "models" / name)
        out[name] = float((np.asarray(clf.predict_proba(test.x)).argmax(1) == test.y).mean())
    return out


def test_evaluation_numbers_match_the_models_predictions(tmp_path):
    """The report's accuracies, scratch baseline and gain are the models' own numbers."""
    result = _run(tmp_path, evaluate={"scratch_baseline": True})
    report = _report(result)
    acc = _recomputed_accuracies(result)
    assert set(acc) == set(report["models"]) and "scratch" in acc
    for name, a in acc.items():
        assert report["models"][name]["accuracy"] == pytest.approx(a), name
    selected = report["selected"]
    assert selected != "scratch"
    assert report["baselines"]["scratch"]["accuracy"] == pytest.approx(acc["scratch"])
    assert report["metrics"]["gain_over_scratch"] == pytest.approx(acc[selected] - acc["scratch"])
    assert result.steps["evaluate"].artifact.meta["gain_over_scratch"] == pytest.approx(acc[selected] - acc["scratch"])


def test_failing_min_accuracy_and_min_gain_gates_block_promotion(tmp_path):
    """Unreachable gates: the version is registered as failed, with no alias (challenger moves only to a
    version that passed), auto_promote refused."""
    result = _run(
        tmp_path,
        evaluate={"scratch_baseline": True, "gates": {"min_accuracy": 0.999, "min_gain_over_scratch": 0.99}},
        register={"model_name": NAME, "auto_promote": True},
    )
    acc = _recomputed_accuracies(result)
    selected = _report(result)["selected"]
    assert acc[selected] < 0.999 and acc[selected] - acc["scratch"] < 0.99  # the gates really are unmet
    checks = {c["gate"]: c for c in _report(result)["gates"]["checks"]}
    assert checks["min_accuracy"]["passed"] is False and checks["min_gain_over_scratch"]["passed"] is False
    assert f"{acc[selected] - acc['scratch']:+.4f}" in checks["min_gain_over_scratch"]["reason"]

    c = _client(tmp_path)
    (mv,) = c.search_model_versions(f"name = '{NAME}'")
    assert mv.tags["validation_status"].startswith("failed: accuracy ")
    assert _aliases(tmp_path) == {}  # registered for the record: neither challenger nor champion

    from tlops.errors import TlopsError
    from tlops.tracking import registry

    with pytest.raises(TlopsError, match="validation_status is 'failed: "):
        registry.promote(NAME, str(mv.version))
    assert _aliases(tmp_path) == {}


def test_must_beat_champion_refuses_a_worse_challenger(tmp_path):
    """Two models of the same data (probe C fixed at 0.001 and at 1): the better one is champion, the other
    cannot beat it."""
    from tlops.tracking import registry

    gates = {"gates": {"must_beat_champion": True}}
    runs, versions = {}, {}
    for c in (0.001, 1.0):
        runs[c] = _run(tmp_path, train={"probe_c": [c]}, evaluate=gates)
        versions[c] = str(_client(tmp_path).get_model_version_by_alias(NAME, "challenger").version)
    assert versions[0.001] != versions[1.0]
    acc = {e: _recomputed_accuracies(r)[_report(r)["selected"]] for e, r in runs.items()}
    best, worse = (0.001, 1.0) if acc[0.001] >= acc[1.0] else (1.0, 0.001)
    registry.promote(NAME, versions[best], reason="the better one")

    again = _run(tmp_path, train={"probe_c": [worse]}, evaluate=gates)  # re-evaluated against the new champion
    report = _report(again)
    (check,) = [ch for ch in report["gates"]["checks"] if ch["gate"] == "must_beat_champion"]
    assert check["passed"] is False, check
    assert report["champion"]["version"] == versions[best]
    assert report["champion"]["accuracy"] == pytest.approx(acc[best])  # same test split: the champion's own number
    assert report["gates"]["passed"] is False
    c = _client(tmp_path)
    assert c.get_model_version(NAME, versions[worse]).tags["validation_status"].startswith("failed: ")
    assert _aliases(tmp_path)["champion"] == versions[best]


@pytest.mark.parametrize(
    ("gates", "accuracy", "gain", "champion", "failed"),
    [
        ({"min_accuracy": 0.9}, 0.89, None, None, ["min_accuracy"]),
        ({"min_accuracy": 0.9}, 0.9, None, None, []),
        ({"min_gain_over_scratch": 0.05}, 0.9, 0.04, None, ["min_gain_over_scratch"]),
        ({"min_gain_over_scratch": 0.05}, 0.9, None, None, ["min_gain_over_scratch"]),  # baseline off
        (
            {"must_beat_champion": True},
            0.8,
            None,
            {"version": "1", "accuracy": 0.8, "comparable": True},
            ["must_beat_champion"],
        ),
        ({"must_beat_champion": True}, 0.81, None, {"version": "1", "accuracy": 0.8, "comparable": True}, []),
        (
            {"must_beat_champion": True},
            0.9,
            None,
            {"version": "1", "comparable": False, "reason": "x"},
            ["must_beat_champion"],
        ),
    ],
)
def test_decide(gates, accuracy, gain, champion, failed):
    from tlops.config import GatesConfig
    from tlops.evaluation.gates import decide

    d = decide(GatesConfig(**gates), accuracy, gain, champion)
    assert [c["gate"] for c in d["checks"] if not c["passed"]] == failed
    assert d["passed"] is (not failed)

"""`tlops adapt`: from a monitored shift to an adaptation run of the same pipeline.

Here: its errors, and (slow) the whole loop on USPS -> MNIST, where the label-free estimate and
the true target accuracy both rise. The config it writes for a registered model is tested in
test_monitor.py, on that module's registered digits model and rotated digits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import SHARED_DATA, digits_config

from tlops.config import validate_config


def _cli(*args: str):
    from typer.testing import CliRunner

    from tlops.cli import app

    return CliRunner().invoke(app, list(args))


def test_adapt_names_a_missing_training_config(tmp_path):
    from tlops.errors import ModelError
    from tlops.monitoring.adapt import training_config

    with pytest.raises(ModelError, match=r"^m@champion: its monitoring reference does not record the training config"):
        training_config({"classes": [0, 1]}, "m@champion")


def test_adapt_refuses_dvc_training_data():
    from tlops.errors import ConfigError
    from tlops.monitoring.adapt import adapt_config

    orig = validate_config(digits_config(Path("w"))).to_dict()
    orig["data"] = {**orig["data"], "source": None, "dvc": {"repo": "https://x/y.git", "path": "d"}}
    with pytest.raises(ConfigError, match=r"^m: its training data is a DVC dataset"):
        adapt_config(orig, "new.npz", model_name="m")


@pytest.mark.slow
def test_adapt_loop_on_usps_to_mnist_raises_the_true_accuracy(tmp_path, monkeypatch):
    """A USPS model meets MNIST: the monitor flags it, `tlops adapt --run` trains the adaptation
    strategies on USPS + unlabelled MNIST, the adapted version registers as challenger, and the
    accuracy on labelled MNIST test rows goes up. The label-free estimate is right for the adapted
    model and not for the source model: ATC over-estimates a from-scratch CNN that is confidently
    wrong on the other domain (bench/results/shift.md), so the estimate does not rise with the
    truth here; the test records that instead of hiding it."""
    from tlops.runners.local import run_pipeline

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    work = tmp_path / "work"
    usps, mnist = SHARED_DATA / "usps" / "usps.npz", SHARED_DATA / "mnist" / "mnist_subset.npz"
    src = {
        "name": "digits-usps",
        "workdir": str(work),
        "seed": 0,
        "data": {"source": str(usps), "split": {"val": 0.1, "test": 0.5}, "labels_per_class": 100},
        "source": {"model": "timm:resnet10t", "pretrained": False, "in_chans": 1, "image_size": 16},
        "train": {"strategies": ["fine-tune"], "epochs": 3, "batch_size": 64},
        "evaluate": {"scratch_baseline": False},
        "register": {"model_name": "digits", "auto_promote": True},
    }
    run_pipeline(validate_config(src))
    out = tmp_path / "adapt.yaml"
    res = _cli(
        "adapt", "digits@champion", "--data", str(mnist), "--out", str(out), "--workdir", str(work), "--run",
        "--strategies", "source-only,dann,adabn",
        "--set", "data.adapt_from.max_samples=2000", "--set", "train.adapt.epochs=3",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    print(res.output)  # the loop's numbers (-s shows them)
    from tlops.tracking import registry
    from tlops.tracking.setup import embedded_uri, use_store

    use_store(embedded_uri(work))
    assert str(registry.get_alias("digits", "champion").version) == "1"
    mv = registry.get_alias("digits", "challenger")
    assert str(mv.version) == "2"
    before = json.loads(next(iter(_reports(mv.name, "1"))).read_text())
    after = json.loads(next(iter(_reports(mv.name, "2"))).read_text())
    assert before["verdict"] != "ok"
    # the truth, from the evaluate step's scores on labelled MNIST test rows (labels used only there)
    truth = [ln for ln in res.output.splitlines() if ln.startswith("test accuracy on the labelled test rows")]
    champion_acc, adapted_acc = (float(t.split()[-1].rstrip(",")) for t in truth[0].split(": ")[1].split(", "))
    assert adapted_acc > champion_acc + 0.05, truth
    # the adapted model's estimate is close to its true accuracy; the source model's is far above it
    assert abs(after["accuracy"]["estimate"] - adapted_acc) < 0.05, (after["accuracy"], adapted_acc)
    assert before["accuracy"]["estimate"] > champion_acc + 0.2, (before["accuracy"], champion_acc)
    assert "## Adaptation (tlops adapt)" in mv.description
    assert f"estimated accuracy {before['accuracy']['estimate']:.3f} -> {after['accuracy']['estimate']:.3f}" in (
        res.output
    )


def _reports(name: str, version: str):
    import mlflow

    from tlops.tracking import registry

    mv = registry.client().get_model_version(name, version)
    root = Path(mlflow.artifacts.download_artifacts(run_id=mv.run_id, artifact_path="monitoring/reports"))
    return sorted(root.glob("*/monitor.json"))

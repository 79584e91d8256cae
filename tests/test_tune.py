"""``tlops tune``: the Optuna study on the tiny digits config (real Optuna, real MLflow store in
tmp_path, real training), the ``tune:`` config errors, and the Katib Experiment it compiles to,
validated against Katib's schema vendored in k8s/schemas/."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import digits_config, error_text, run_cli

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "k8s" / "schemas"))
import crd_schemas  # noqa: E402

# Katib v0.19.0's own values (pkg/apis/controller/...: ParameterType, Distribution, ObjectiveType,
# CollectorKind; the optuna suggestion service's algorithm names) and the StdOut collector's default
# filter (pkg/metricscollector/v1beta1/common/const.go DefaultFilter)
KATIB_PARAMETER_TYPES = {"double", "int", "discrete", "categorical"}
KATIB_DISTRIBUTIONS = {"uniform", "logUniform", "normal", "logNormal"}
KATIB_FILTER = re.compile(r"([\w|-]+)\s*=\s*([+-]?\d*(\.\d+)?([Ee][+-]?\d+)?)")

PROBE_SPACE = {
    "train.probe_c": {"low": 1e-3, "high": 1e3, "log": True},
    "train.probe_scaling": {"choices": ["standardize", "none"]},
}


def _write(tmp_path: Path, **sections) -> Path:
    raw = digits_config(tmp_path / "work", **sections)
    p = tmp_path / "tune.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


def _probe_config(tmp_path: Path, trials: int = 8) -> Path:
    return _write(
        tmp_path,
        train={"strategies": ["linear-probe"], "probe_select": "val", "threads": 1},
        tune={"space": PROBE_SPACE, "trials": trials, "seed": 3},
    )


def _store(tmp_path: Path) -> str:
    from tlops.tracking.setup import embedded_uri

    return embedded_uri((tmp_path / "work").resolve())  # the embedded store: sqlite + artifacts in tmp_path


def _runs(tmp_path: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(_store(tmp_path))
    exps = client.search_experiments()
    return [r for e in exps for r in client.search_runs([e.experiment_id])]


@pytest.fixture(scope="module")
def probe_study(tmp_path_factory):
    """One CLI study of 4 linear-probe trials (--trials 4 over the config's 8), shared by the tests
    that read it (the MLflow store and the upstream steps are made once): (tmp dir, exit code,
    stdout, stderr)."""
    import contextlib
    import io

    from tlops.cli import main

    tmp = tmp_path_factory.mktemp("probe-study")
    cfg_file = _probe_config(tmp)
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        for var in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID"):
            mp.delenv(var, raising=False)
        mp.setenv("HF_HUB_OFFLINE", "1")
        argv = ["tlops", "tune", str(cfg_file), "--trials", "4", "--minutes", "10", "--out", str(tmp / "best.yaml")]
        mp.setattr(sys, "argv", argv)
        try:
            main()
            code = 0
        except SystemExit as e:
            code = int(e.code or 0)
    return tmp, code, out.getvalue(), err.getvalue()


def test_probe_study_writes_a_valid_best_config_with_one_nested_run_per_trial(probe_study):
    tmp_path, code, out, err = probe_study
    best_file = tmp_path / "best.yaml"
    cfg_file = tmp_path / "tune.yaml"
    assert code == 0, err
    lines = [ln for ln in err.splitlines() if ln.startswith("trial ")]
    assert len(lines) == 4 and all("probe_c=" in ln and "best" in ln and "elapsed" in ln for ln in lines)
    assert "best: trial" in out and str(best_file) in out

    from tlops.config import load_config

    best = load_config(best_file)  # a valid, complete config
    assert len(best.train.probe_c) == 1 and 1e-3 <= best.train.probe_c[0] <= 1e3
    assert best.train.probe_scaling in ("standardize", "none")
    assert best.data == load_config(cfg_file).data  # only train.* changed

    runs = _runs(tmp_path)
    parents = [r for r in runs if r.data.tags.get("tlops.tune") == "study"]
    trials = [r for r in runs if r.data.tags.get("tlops.tune") == "trial"]
    assert len(parents) == 1 and len(trials) == 4
    assert {r.data.tags["mlflow.parentRunId"] for r in trials} == {parents[0].info.run_id}
    assert all(r.data.tags["state"] == "COMPLETE" and "val_acc" in r.data.metrics for r in trials)
    assert all("train.probe_c" in r.data.params for r in trials)
    best_value = max(r.data.metrics["val_acc"] for r in trials)
    assert parents[0].data.metrics["best_val_acc"] == best_value
    head = best_file.read_text().splitlines()[0]
    assert head.startswith("# written by tlops tune") and f"{best_value:.4f}" in head


def test_selection_never_reads_test_labels(probe_study, monkeypatch):
    """No trial loads the test split, and scrambled test labels change nothing the study picks."""
    from tlops.config import load_config
    from tlops.data.dataset import Dataset
    from tlops.tuning.study import tune

    tmp_path = probe_study[0]
    cfg = load_config(tmp_path / "tune.yaml", ["tune.trials=2"])
    first = tune(cfg, echo=lambda s: None)
    loaded: list[str] = []
    real_load = Dataset.load

    def scrambled(self, name):
        loaded.append(name)
        split = real_load(self, name)
        if name == "test":
            split.y = np.random.default_rng(0).permutation(split.y)[::-1].copy()
        return split

    monkeypatch.setattr(Dataset, "load", scrambled)
    second = tune(cfg, echo=lambda s: None)  # upstream steps reused: only the trials run
    assert "test" not in loaded and "train" in loaded
    assert [t.params for t in first.trials] == [t.params for t in second.trials]
    assert [t.value for t in first.trials] == [t.value for t in second.trials]
    assert first.best.params == second.best.params


@pytest.mark.slow
def test_training_trials_report_epochs_and_poor_ones_are_pruned(tmp_path, monkeypatch, capsys):
    """fine-tune reports every epoch's val_acc; a trial whose lr cannot learn falls below the median
    of the finished trials and stops before its last epoch (the sampler's seed puts it 4th); --run
    then runs the pipeline with the best config."""
    cfg_file = _write(
        tmp_path,
        train={"strategies": ["fine-tune"], "epochs": 3, "batch_size": 8, "threads": 1, "probe_c": [1.0]},
        tune={"space": {"train.lr": {"choices": [1e-2, 1e-6]}}, "trials": 4, "algorithm": "random", "seed": 2},
    )
    code, out, err = run_cli(monkeypatch, capsys, "tune", str(cfg_file), "--out", str(tmp_path / "b.yaml"), "--run")
    assert code == 0, err
    from mlflow.tracking import MlflowClient

    client = MlflowClient(_store(tmp_path))
    trials = sorted(
        (r for r in _runs(tmp_path) if r.data.tags.get("tlops.tune") == "trial"),
        key=lambda r: int(r.data.tags["trial_number"]),
    )
    states = [(r.data.params["train.lr"], r.data.tags["state"]) for r in trials]
    assert states == [("0.01", "COMPLETE")] * 3 + [("1e-06", "PRUNED")], states
    steps = [len(client.get_metric_history(r.info.run_id, "epoch_val_acc")) for r in trials]
    assert steps[:3] == [3, 3, 3]  # one value per epoch
    assert steps[3] < 3  # stopped before its last epoch
    assert "trial 4/4: lr=1e-06 -> pruned" in err
    assert yaml.safe_load((tmp_path / "b.yaml").read_text())["train"]["lr"] == 1e-2
    # --run: the whole pipeline ran with the best config (one more top-level MLflow run, registered)
    pipeline = [r for r in _runs(tmp_path) if "tlops.tune" not in r.data.tags]
    assert len(pipeline) == 1 and pipeline[0].data.params["train.lr"] == "0.01"
    assert "t-digits" in out and (tmp_path / "work" / "runs").is_dir()


@pytest.mark.parametrize(
    ("space", "args", "expected"),
    [
        ({"train.lrr": {"low": 1e-4, "high": 1e-2}}, [], "unknown search key 'train.lrr'"),
        ({"lr": {"low": 1e-4, "high": 1e-2}}, [], "unknown search key 'lr'"),
        ({}, [], "the search space is empty"),
        ({"train.lr": {"low": 1e-2, "high": 1e-4}}, [], "low must be < high"),
        ({"train.epochs": {"low": 1, "high": 2.5}}, [], "train.epochs is an integer field"),
        ({"train.probe_scaling": {"low": 1, "high": 2}}, [], "train.probe_scaling: not a number"),
        ({"train.lr": {"low": 1e-4, "high": 1e-2}}, ["--trials", "0"], "--trials: got 0"),
        ({"train.lr": {"low": 1e-4, "high": 1e-2}}, ["--minutes", "0"], "--minutes: got 0"),
        (
            {"train.strategies": {"choices": ["linear-probe", "dann"]}},
            [],
            "tune.space.train.strategies: 'dann' is not a valid choice: train.strategies: dann needs data.adapt_from",
        ),
        (
            {"train.strategies": {"choices": ["setfit"]}},
            [],
            "tune.space.train.strategies: 'setfit' is not a valid choice: train.strategies: setfit needs ",
        ),
        (
            {"train.strategies": {"choices": ["stacking"]}},
            [],
            "'stacking' is not a valid choice: stacking in some trials but not in train.strategies",
        ),
        (
            {"train.strategies": {"choices": [["linear-probe", "fine-tune"]]}},
            [],
            "is not a valid choice: a choice is one strategy name (each trial trains one strategy)",
        ),
        ({"train.strategies": {"choices": ["bogus"]}}, [], "tune.space.train.strategies: 'bogus' is not a valid value"),
    ],
)
def test_bad_search_spaces_and_budgets_exit_2_naming_the_problem(tmp_path, monkeypatch, capsys, space, args, expected):
    cfg_file = _write(tmp_path, tune={"space": space})
    code, out, err = run_cli(monkeypatch, capsys, "tune", str(cfg_file), *args)
    assert code == 2, err
    assert expected in error_text(err) and out == ""
    if "unknown" in expected:
        assert "allowed: train.strategies, train.epochs, train.batch_size, train.lr" in err
    assert not (tmp_path / "work" / "runs").exists()  # nothing ran


def test_a_study_over_strategies_trains_one_per_trial_on_the_shared_features(tmp_path, monkeypatch, capsys):
    """``train.strategies`` as choices: each trial trains the one strategy it drew (fine-tune trials
    report epochs, so the median pruner is on), upstream runs once for all of them, and the best
    config names one strategy."""
    from tlops.config import load_config
    from tlops.tuning import study

    cfg_file = _write(
        tmp_path,
        train={"strategies": ["linear-probe"], "epochs": 1, "batch_size": 16, "threads": 1, "probe_select": "val"},
        tune={
            "space": {"train.strategies": {"choices": ["linear-probe", "fine-tune"]}},
            "trials": 4,
            "algorithm": "random",
            "seed": 0,
        },
    )
    cfg = load_config(cfg_file)
    assert type(study._pruner(cfg.tune, cfg)).__name__ == "MedianPruner"
    assert study.trial_config(cfg, {"train.strategies": "fine-tune"}).train.strategies == ["fine-tune"]
    code, out, err = run_cli(monkeypatch, capsys, "tune", str(cfg_file), "--out", str(tmp_path / "b.yaml"))
    assert code == 0, err
    trials = sorted(
        (r for r in _runs(tmp_path) if r.data.tags.get("tlops.tune") == "trial"),
        key=lambda r: int(r.data.tags["trial_number"]),
    )
    drawn = [r.data.params["train.strategies"] for r in trials]
    assert sorted(set(drawn)) == ["fine-tune", "linear-probe"], drawn  # both were tried
    for r in trials:  # a fine-tune trial reports its epoch; a probe trial has no epochs to report
        assert ("epoch_val_acc" in r.data.metrics) == (r.data.params["train.strategies"] == "fine-tune")
    assert len(list((tmp_path / "work" / "runs").glob("*/extract-features"))) == 1  # extracted once
    best = load_config(tmp_path / "b.yaml")
    assert best.train.strategies in (["linear-probe"], ["fine-tune"])


def test_probe_fits_are_not_epochs_so_a_finished_head_is_never_pruned(tmp_path, monkeypatch):
    """SetFit's head (a probe fit, like the shared probe) is the last record of its trial: the median
    pruner must not see it, or a finished trial below the median would lose its value. Epochs are
    still reported and pruned on."""
    from tlops.config import load_config
    from tlops.tuning import study

    values = iter([0.9, 0.8, 0.7, 0.6, 0.5] * 2)  # each trial worse than the ones before

    def fake_trial(cfg, inputs, out, key, on_epoch=None):
        v = next(values)
        on_epoch({"loop": "setfit", "epoch": 1, "selected_by": "cv", key: v})  # a head fit
        if cfg.train.epochs == 2:  # then an epoch, as a fine-tune trial reports
            on_epoch({"loop": "fine-tune", "epoch": 1, key: v})
        return v

    monkeypatch.setattr(study, "train_trial", fake_trial)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    space = {"train.probe_c": {"choices": [0.001, 0.01, 0.1, 1.0]}}
    for epochs, want in ((1, ["COMPLETE"] * 5), (2, ["COMPLETE"] * 3 + ["PRUNED"] * 2)):
        (tmp_path / str(epochs)).mkdir()
        cfg_file = _write(
            tmp_path / str(epochs),
            train={"strategies": ["fine-tune"], "epochs": epochs, "threads": 1},
            tune={"space": space, "trials": 5, "algorithm": "random", "seed": 1},
        )
        got = study.tune(load_config(cfg_file), echo=lambda s: None)
        assert [t.state for t in got.trials] == want


def test_a_config_without_tune_section_says_how_to_add_one(tmp_path, monkeypatch, capsys):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(digits_config(tmp_path / "work")))
    code, _, err = run_cli(monkeypatch, capsys, "tune", str(p))
    assert code == 2 and "no tune: section" in err and "train.lr: {low:" in err


def _katib(tmp_path, monkeypatch, capsys, **sections) -> dict:
    cfg_file = _write(tmp_path, **sections)
    out = tmp_path / "exp.yaml"
    code, stdout, err = run_cli(monkeypatch, capsys, "tune", str(cfg_file), "--katib-manifest", str(out))
    assert code == 0, err
    assert "Experiment/t-digits-tune" in stdout
    return yaml.safe_load(out.read_text())


def _validate(tmp_path: Path, doc: dict) -> tuple[int, str]:
    rendered, rest = tmp_path / "rendered.yaml", tmp_path / "rest.yaml"
    rendered.write_text(yaml.safe_dump(doc))
    return crd_schemas.validate(rendered, rest), rest.read_text() if rest.exists() else ""


TUNE = {
    "space": {
        "train.lr": {"low": 1e-5, "high": 1e-3, "log": True},
        "train.epochs": {"low": 1, "high": 4},
        "train.probe_c": {"low": 0.01, "high": 100.0, "log": True},
        "train.probe_scaling": {"choices": ["standardize", "none"]},
        "train.strategies": {"choices": ["linear-probe", "fine-tune"]},
    },
    "trials": 12,
    "minutes": 30,
}


def test_katib_experiment_validates_against_katibs_schema_and_maps_the_space(tmp_path, monkeypatch, capsys):
    exp = _katib(
        tmp_path,
        monkeypatch,
        capsys,
        tune=TUNE,
        kubernetes={"gpu": {}, "secrets": [{"name": "s3", "env": {"AWS_ACCESS_KEY_ID": "key"}}]},
    )
    n, _ = _validate(tmp_path, exp)
    assert n == 1  # checked (strictly) against k8s/schemas/kubeflow.org_experiments.v1beta1.json
    spec = exp["spec"]
    params = {p["name"]: p for p in spec["parameters"]}
    assert params["lr"] == {
        "name": "lr",
        "parameterType": "double",
        "feasibleSpace": {"min": "1e-05", "max": "0.001", "distribution": "logUniform"},
    }
    assert params["epochs"]["parameterType"] == "int" and params["epochs"]["feasibleSpace"]["min"] == "1"
    assert params["probe-scaling"]["feasibleSpace"] == {"list": ["standardize", "none"]}
    assert {p["parameterType"] for p in params.values()} <= KATIB_PARAMETER_TYPES
    assert {p["feasibleSpace"].get("distribution", "uniform") for p in params.values()} <= KATIB_DISTRIBUTIONS
    assert spec["objective"] == {
        "type": "maximize",
        "objectiveMetricName": "val_acc",
        "metricStrategies": [{"name": "val_acc", "value": "latest"}],
    }
    assert spec["algorithm"]["algorithmName"] == "tpe" and spec["maxTrialCount"] == 12
    assert spec["earlyStopping"]["algorithmName"] == "medianstop"
    assert spec["metricsCollectorSpec"] == {"collector": {"kind": "StdOut"}}
    tmpl = spec["trialTemplate"]
    assert {p["name"] for p in tmpl["trialParameters"]} == set(params)
    job = tmpl["trialSpec"]
    assert job["spec"]["activeDeadlineSeconds"] == 1800
    pod = job["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["name"] == tmpl["primaryContainerName"]
    script = c["command"][-1]
    assert "tlops tune /work/config.yaml --trial" in script
    assert "--set train.lr=${trialParameters.lr}" in script
    assert "--set train.probe_c=[${trialParameters.probe-c}]" in script  # a list field gets one value
    assert params["strategies"]["feasibleSpace"] == {"list": ["linear-probe", "fine-tune"]}
    assert "--set train.strategies=[${trialParameters.strategies}]" in script  # one strategy per trial
    env = {e["name"]: e for e in c["env"]}
    assert yaml.safe_load(env["TLOPS_TUNE_CONFIG"]["value"])["tune"]["trials"] == 12
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"] == {"name": "s3", "key": "key"}
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1" and pod["nodeSelector"] == {"tlops.dev/node-pool": "gpu"}

    # the trial Job itself is a built-in kind: kubernetes-validate checks it strictly
    kv = pytest.importorskip("kubernetes_validate")
    kv.validate({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "t"}, **job}, "1.31.0", strict=True)


def test_katib_budget_follows_the_command_line(tmp_path, monkeypatch, capsys):
    cfg_file = _write(tmp_path, tune=TUNE)
    out = tmp_path / "exp.yaml"
    args = ("tune", str(cfg_file), "--katib-manifest", str(out), "--trials", "5", "--minutes", "2")
    code, _, err = run_cli(monkeypatch, capsys, *args)
    assert code == 0, err
    spec = yaml.safe_load(out.read_text())["spec"]
    assert spec["maxTrialCount"] == 5 and spec["trialTemplate"]["trialSpec"]["spec"]["activeDeadlineSeconds"] == 120
    code, _, err = run_cli(monkeypatch, capsys, *args[:4], "--trials", "0")
    assert code == 2 and "--trials: got 0" in err


def test_vendored_katib_schema_refuses_unknown_fields_and_wrong_types(tmp_path, monkeypatch, capsys):
    exp = _katib(tmp_path, monkeypatch, capsys, tune=TUNE)
    exp["spec"]["parameters"][0]["feasibleSpace"]["mn"] = "1"
    exp["spec"]["maxTrialCount"] = "twelve"
    n, _ = _validate(tmp_path, exp)
    err = capsys.readouterr().err
    assert n == -1
    assert "spec.parameters.0.feasibleSpace: Additional properties are not allowed ('mn'" in err
    assert "spec.maxTrialCount: 'twelve' is not of type 'integer'" in err
    assert "v0.19.0" in err


def test_katib_trial_prints_the_objective_for_katibs_stdout_collector(probe_study, monkeypatch, capsys):
    """What a trial pod runs, here: the values as --set, the objective on stdout as name=value."""
    cfg_file = probe_study[0] / "tune.yaml"
    code, out, err = run_cli(monkeypatch, capsys, "tune", str(cfg_file), "--trial", "--set", "train.probe_c=[0.5]")
    assert code == 0, err
    metrics = [KATIB_FILTER.fullmatch(ln) for ln in out.splitlines()]
    assert metrics and all(metrics), out
    assert metrics[-1].group(1) == "val_acc" and 0.0 <= float(metrics[-1].group(2)) <= 1.0


@pytest.mark.slow
def test_katib_trial_script_runs_as_katibs_stdout_collector_wraps_it(tmp_path, monkeypatch, capsys):
    """The trial container's script, with the trial's values substituted and the suffix Katib's
    webhook appends for the StdOut collector (pkg/webhook/v1beta1/pod/utils.go), run by sh here:
    the metrics file ends with the objective and the completion mark is written."""
    import os
    import subprocess

    exp = _katib(tmp_path, monkeypatch, capsys, tune=TUNE, train={"strategies": ["linear-probe"], "threads": 1})
    (c,) = exp["spec"]["trialTemplate"]["trialSpec"]["spec"]["template"]["spec"]["containers"]
    assert c["command"][:2] == ["sh", "-c"]
    values = {"lr": "0.0001", "epochs": "2", "probe-c": "0.5", "probe-scaling": "none", "strategies": "linear-probe"}
    script = c["command"][2]
    for name, value in values.items():
        script = script.replace(f"${{trialParameters.{name}}}", value)
    work = tmp_path / "pod"
    work.mkdir()
    script = script.replace("/work", str(work))
    wrapped = f"{script} 1>{work}/metrics.log 2>&1 && echo completed > {work}/$$$$.pid"
    env = {e["name"]: e["value"] for e in c["env"] if "value" in e}
    env = {**os.environ, **env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    r = subprocess.run(["sh", "-c", wrapped], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (work / "metrics.log").read_text()[-3000:]
    lines = [ln for ln in (work / "metrics.log").read_text().splitlines() if ln.startswith("val_acc=")]
    assert lines and KATIB_FILTER.fullmatch(lines[-1])
    assert [p.read_text().strip() for p in work.glob("*.pid")] == ["completed"]
    cfg = yaml.safe_load((work / "config.yaml").read_text())
    assert cfg["tune"] == yaml.safe_load(env["TLOPS_TUNE_CONFIG"])["tune"]

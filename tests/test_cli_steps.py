"""The CLI that every runner shell calls: `tlops step <name>` for all six steps, and `tlops run`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import digits_config

TLOPS = [str(Path(sys.executable).parent / "tlops")]


def tlops(*args, cwd=None):
    return subprocess.run(TLOPS + list(args), capture_output=True, text=True, cwd=cwd, timeout=600)


@pytest.mark.slow  # 35 s; the default suite runs every step through `tlops step` in test_dvc's repro and kfp.local
def test_six_steps_through_the_cli(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(digits_config(tmp_path / "work")))
    a = tmp_path / "a"
    plan = [
        ("ingest", []),
        ("pull-model", []),
        ("extract-features", ["dataset=ingest", "model=pull-model"]),
        ("fine-tune", ["dataset=ingest", "model=pull-model", "features=extract-features"]),
        ("evaluate", ["dataset=ingest", "trained=fine-tune"]),
        ("register", ["dataset=ingest", "model=pull-model", "trained=fine-tune", "evaluation=evaluate"]),
    ]
    for step, ins in plan:
        args = ["step", step, "--config", str(cfg), "--out", str(a / step)]
        for i in ins:
            name, producer = i.split("=")
            args += ["--in", f"{name}={a / producer}"]
        r = tlops(*args)
        assert r.returncode == 0, r.stderr
        assert f"{step}: wrote {a / step}" in r.stdout
        assert (a / step / "manifest.json").is_file()
    reg = json.loads((a / "register" / "registration.json").read_text())
    assert reg["model_name"] == "t-digits" and reg["version"] == "1" and reg["aliases"] == ["challenger"]
    # and the registry itself says so
    import mlflow

    from tlops.tracking.setup import use_store

    use_store(f"sqlite:///{tmp_path / 'work' / 'mlflow.db'}")
    held = mlflow.MlflowClient().get_registered_model("t-digits").aliases
    assert {k: str(v) for k, v in held.items()} == {"challenger": "1"}

    # same inputs again: reused, not recomputed
    r = tlops(
        "step",
        "fine-tune",
        "--config",
        str(cfg),
        "--out",
        str(tmp_path / "again"),
        "--in",
        f"dataset={a / 'ingest'}",
        "--in",
        f"model={a / 'pull-model'}",
        "--in",
        f"features={a / 'extract-features'}",
    )
    assert r.returncode == 0 and "fine-tune: reused" in r.stdout
    assert "inputs unchanged, reusing finished artifact" in r.stderr


def test_step_input_errors(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(digits_config(tmp_path / "work")))
    r = tlops("step", "evaluate", "--config", str(cfg), "--out", str(tmp_path / "e"), "--in", f"dataset={tmp_path}")
    assert r.returncode == 2
    assert "error: step evaluate takes inputs dataset, trained; missing: trained" in r.stderr
    r = tlops(
        "step",
        "evaluate",
        "--config",
        str(cfg),
        "--out",
        str(tmp_path / "e"),
        "--in",
        f"dataset={tmp_path / 'nope'}",
        "--in",
        f"trained={tmp_path}",
    )
    assert r.returncode == 1
    assert f"error: {tmp_path / 'nope'} is not a finished tlops artifact (no manifest.json)" in r.stderr
    r = tlops("step", "train", "--config", str(cfg), "--out", str(tmp_path / "e"))
    assert r.returncode == 2 and "unknown step 'train'" in r.stderr
    assert not (tmp_path / "e").exists()


def test_run_twice_reuses_and_lists_steps(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(digits_config(tmp_path / "work")))
    first = tlops("run", "--config", str(cfg), "--set", "train.epochs=1")
    assert first.returncode == 0, first.stderr
    assert "registered t-digits v1 as challenger" in " ".join(first.stdout.split())
    second = tlops("run", "--config", str(cfg), "--set", "train.epochs=1")
    assert second.returncode == 0, second.stderr
    assert "reused: ingest, pull-model, extract-features, fine-tune, evaluate" in " ".join(second.stdout.split())
    # a fully reused run never imports torch (that import was ~2 s of a ~8 s no-op rerun; bench/results/perf.md)
    probe = (
        "import sys; from tlops.cli import main\n"
        "sys.argv = ['tlops', 'run', '--config', sys.argv[1], '--set', 'train.epochs=1']\n"
        "try:\n    main()\nfinally:\n    print('torch imported:', 'torch' in sys.modules)"
    )
    third = subprocess.run([sys.executable, "-c", probe, str(cfg)], capture_output=True, text=True, timeout=600)
    assert third.returncode == 0, third.stderr
    assert "torch imported: False" in third.stdout and "registered t-digits v1 as challenger" in " ".join(
        third.stdout.split()
    )
    runs = sorted((tmp_path / "work" / "runs").iterdir())
    assert len(runs) == 3 and all((r / "config.yaml").is_file() for r in runs)
    listing = tlops("steps").stdout.split("\n")
    assert [line.split()[0] for line in listing if line] == [
        "ingest",
        "pull-model",
        "extract-features",
        "fine-tune",
        "evaluate",
        "register",
    ]


@pytest.mark.slow  # two pipeline runs (40 s); promote/rollback are tested on a real registry in test_registry_ops
def test_promote_moves_champion_and_keeps_previous(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    work = tmp_path / "work"
    cfg.write_text(yaml.safe_dump(digits_config(work)))
    assert tlops("run", "--config", str(cfg)).returncode == 0
    assert (
        tlops(
            "run", "--config", str(cfg), "--set", "train.epochs=2", "--set", "train.strategies=[fine-tune]"
        ).returncode
        == 0
    )
    r = tlops("promote", "t-digits", "1", "--workdir", str(work), "--reason", "reviewed")
    assert r.returncode == 0 and "t-digits: champion -> v1" in r.stdout
    r = tlops("promote", "t-digits", "2", "--workdir", str(work))
    assert r.returncode == 0 and "t-digits: champion -> v2 (previous champion: v1)" in r.stdout
    r = tlops("promote", "t-digits", "2", "--workdir", str(work))
    assert r.returncode == 0 and "v2 is already champion" in r.stdout
    r = tlops("promote", "t-digits", "9", "--workdir", str(work))
    assert r.returncode == 1 and r.stderr.startswith("error: cannot promote t-digits version 9")

    import mlflow

    from tlops.tracking.setup import use_store

    use_store(f"sqlite:///{work / 'mlflow.db'}")
    c = mlflow.MlflowClient()
    assert str(c.get_model_version_by_alias("t-digits", "champion").version) == "2"
    assert str(c.get_model_version_by_alias("t-digits", "previous-champion").version) == "1"
    assert "reviewed" in c.get_model_version("t-digits", "1").tags["tlops.promoted"]


def test_configuring_one_store_does_not_pin_the_next(tmp_path, monkeypatch):
    """mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI; tlops must not let that leak into the next config."""
    import os

    from tlops.config import validate_config
    from tlops.tracking.setup import configure

    a = validate_config(digits_config(tmp_path / "a"))
    b = validate_config(digits_config(tmp_path / "b"))
    assert configure(a).endswith(f"{tmp_path / 'a'}/mlflow.db")
    assert "MLFLOW_TRACKING_URI" not in os.environ
    assert configure(b).endswith(f"{tmp_path / 'b'}/mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'user.db'}")
    assert configure(a) == f"sqlite:///{tmp_path / 'user.db'}"  # the user's env var still wins

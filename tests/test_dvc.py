"""DVC: dvc.yaml/params.yaml generated from the DAG; real git + dvc: `dvc dag`, `dvc repro`, no-op rerun."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import REPO, digits_config
from tlops.config import load_config, validate_config
from tlops.contract import WHOLE_CONFIG
from tlops.dag import DAG, STEP_NAMES
from tlops.runners.dvc import export

BIN = Path(sys.executable).parent


def _edges_from_dag() -> set[tuple[str, str]]:
    return {(producer, s.name) for s in DAG for producer in s.inputs.values()}


def test_committed_dvc_files_are_fresh(tmp_path):
    # what `make dvc-export` writes in the checkout: stages run the checkout's .venv interpreter
    export(load_config(REPO / "configs" / "digits_source.yaml"), tmp_path, python=".venv/bin/python")
    for name in ("dvc.yaml", "params.yaml"):
        assert (REPO / name).read_text() == (tmp_path / name).read_text(), (
            f"{name} is stale: run tlops export dvc --config configs/digits_source.yaml"
        )


def test_dvc_stages_follow_the_dag():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert list(stages) == list(STEP_NAMES)
    for s in DAG:
        st = stages[s.name]
        assert st["cmd"].startswith(f".venv/bin/python -m tlops step {s.name} --config params.yaml")
        assert set(st.get("deps", [])) >= {f"dvc-artifacts/{p}" for p in s.inputs.values()}
        # the fields the step reads; a step that reads the whole config tracks the whole file (null)
        assert st["params"] == [{"params.yaml": None if WHOLE_CONFIG in s.params else list(s.params)}]
        assert list(st["outs"][0]) == [f"dvc-artifacts/{s.name}"]


def test_stages_call_the_interpreter_that_generated_them(tmp_path, monkeypatch):
    from tlops.runners.dvc import python_cmd

    monkeypatch.delenv("TLOPS_DVC_PYTHON", raising=False)
    assert python_cmd(tmp_path) == os.path.abspath(sys.executable)  # outside: absolute
    assert python_cmd(tmp_path, str(tmp_path / ".venv" / "bin" / "python")) == ".venv/bin/python"  # inside: relative
    monkeypatch.setenv("TLOPS_DVC_PYTHON", "python3")
    assert python_cmd(tmp_path) == "python3"


def test_metrics_and_plots_point_into_the_outs():
    d = yaml.safe_load((REPO / "dvc.yaml").read_text())
    outs = [next(iter(o)) for st in d["stages"].values() for o in st["outs"]]
    files = [*d["metrics"], *(p if isinstance(p, str) else next(iter(p)) for p in d["plots"])]
    assert "dvc-artifacts/evaluate/metrics.json" in d["metrics"]
    assert "dvc-artifacts/evaluate/confusion_matrix.png" in files
    assert "dvc-artifacts/fine-tune/models/fine-tune/history.json" in files
    assert all(any(f.startswith(o + "/") for o in outs) for f in files), files


def _run(cmd, cwd):
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, f"{cmd}: {r.stdout}\n{r.stderr}"
    return r.stdout + r.stderr


def test_dvc_dag_and_repro_in_a_real_repo(tmp_path):
    repo = tmp_path / "repo"
    cfg = validate_config(digits_config(Path(".tlops"), train={"strategies": ["fine-tune"], "epochs": 1}))
    export(cfg, repo)
    _run(["git", "init", "-q"], repo)
    _run([str(BIN / "dvc"), "init", "-q"], repo)
    _run(["git", "add", "-A"], repo)
    _run(["git", "commit", "-qm", "pipeline"], repo)

    dot = _run([str(BIN / "dvc"), "dag", "--dot"], repo)
    edges = {tuple(part.strip().strip('";') for part in line.split("->")) for line in dot.splitlines() if "->" in line}
    assert edges == _edges_from_dag()

    out = _run([str(BIN / "dvc"), "repro"], repo)
    for step in STEP_NAMES:
        assert f"Running stage '{step}'" in out
    reg = yaml.safe_load((repo / "dvc-artifacts" / "register" / "registration.json").read_text())
    assert reg["model_name"] == "t-digits" and reg["version"] == "1"
    assert (repo / "dvc.lock").is_file()

    again = _run([str(BIN / "dvc"), "repro"], repo)
    assert "Data and pipelines are up to date." in again and "Running stage" not in again

    # a training parameter changes: only fine-tune and what depends on it run again
    export(validate_config(digits_config(Path(".tlops"), train={"strategies": ["fine-tune"], "epochs": 2})), repo)
    third = _run([str(BIN / "dvc"), "repro"], repo)
    ran = {s for s in STEP_NAMES if f"Running stage '{s}'" in third}
    assert ran == {"fine-tune", "evaluate", "register"}

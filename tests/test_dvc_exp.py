"""``dvc exp run`` as users run it: a fresh git + DVC repo made by ``tlops export dvc``, no virtual
environment on ``PATH`` (the stages call the interpreter that generated them), two experiments
with ``--set-param``, both accuracies read back from ``dvc exp show --json``; the second one's gates
fail, and the registry shows it registered for the record while ``challenger`` stays put."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.conftest import digits_config
from tlops.config import validate_config
from tlops.runners.dvc import export

pytest.importorskip("dvc")
NAME = "t-digits"


def _run(cmd: list[str], cwd: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "TLOPS_DVC_PYTHON")}
    env |= {
        "PATH": "/usr/local/bin:/usr/bin:/bin",  # no tlops, no venv: what `dvc exp run` from a plain shell sees
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, f"{cmd}: {r.stdout}\n{r.stderr}"
    return r.stdout if "--json" in cmd else r.stdout + r.stderr


def _records(node: Any) -> Iterator[dict]:
    """Every revision record in ``dvc exp show --json`` output (workspace, baseline, experiments)."""
    if isinstance(node, dict):
        data = node.get("data")
        if isinstance(data, dict) and "params" in data:
            yield node
        for v in node.values():
            yield from _records(v)
    elif isinstance(node, list):
        for v in node:
            yield from _records(v)


@pytest.mark.slow
def test_dvc_exp_run_twice_and_read_both_accuracies(tmp_path):
    import mlflow

    from tlops.tracking.setup import use_store

    repo = tmp_path / "repo"
    cfg = validate_config(digits_config(Path(".tlops"), train={"strategies": ["fine-tune"], "epochs": 1}))
    export(cfg, repo)
    assert "tlops step" not in (repo / "dvc.yaml").read_text().replace("-m tlops step", "")
    (repo / ".gitignore").write_text(".tlops\n")
    dvc = [sys.executable, "-m", "dvc"]
    _run(["git", "init", "-q"], repo)
    _run([*dvc, "init", "-q"], repo)
    _run(["git", "add", "-A"], repo)
    _run(["git", "commit", "-qm", "pipeline"], repo)

    _run([*dvc, "exp", "run", "--name", "e1", "--set-param", "train.epochs=1"], repo)
    out = _run(
        [*dvc, "exp", "run", "--name", "e2", "--set-param", "train.epochs=2"]
        + ["--set-param", "evaluate.gates.min_accuracy=0.9999"],
        repo,
    )
    assert "challenger not moved (stays at v1)" in out

    shown = json.loads(_run([*dvc, "exp", "show", "--json"], repo))
    acc = {}
    for rec in _records(shown):
        if rec.get("name") in ("e1", "e2"):
            params = rec["data"]["params"]["params.yaml"]["data"]
            metrics = rec["data"]["metrics"]["dvc-artifacts/evaluate/metrics.json"]["data"]
            acc[rec["name"]] = (params["train"]["epochs"], metrics["accuracy"], metrics["gates_passed"])
    assert set(acc) == {"e1", "e2"}, shown
    assert acc["e1"][0] == 1 and acc["e2"][0] == 2
    assert all(0.0 < a[1] <= 1.0 for a in acc.values())
    assert (acc["e1"][2], acc["e2"][2]) == (True, False)

    # the workspace holds the last experiment: compared with HEAD (no results committed there)
    diff = json.loads(_run([*dvc, "metrics", "diff", "--json"], repo))
    assert diff["dvc-artifacts/evaluate/metrics.json"]["accuracy"] == {"old": None, "new": acc["e2"][1]}
    plots = json.loads(_run([*dvc, "plots", "diff", "--json"], repo))
    assert {
        "dvc-artifacts/fine-tune/models/fine-tune/history.json",
        "dvc-artifacts/evaluate/confusion_matrix.png",
    } <= set(plots["data"])

    # the registry itself: both versions on record, challenger only on the one that passed
    use_store(f"sqlite:///{repo / '.tlops' / 'mlflow.db'}")
    c = mlflow.MlflowClient()
    tags = {str(v.version): v.tags["validation_status"] for v in c.search_model_versions(f"name = '{NAME}'")}
    assert tags["1"] == "passed" and tags["2"].startswith("failed: accuracy ")
    assert {a: str(v) for a, v in c.get_registered_model(NAME).aliases.items()} == {"challenger": "1"}

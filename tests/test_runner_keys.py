"""In-process, `tlops step` (compose's command), `dvc repro` and kfp.local compute the same step keys
for the same config: each artifact's manifest records the key it was made under."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import digits_config
from tlops.config import validate_config
from tlops.contract import step_key
from tlops.dag import DAG
from tlops.runners.dvc import export

BIN = Path(sys.executable).parent
KIND_TO_STEP = {s.output: s.name for s in DAG}


def _sh(cmd, cwd):
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "GIT_AUTHOR_NAME": "t"}
    env |= {"GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, f"{cmd}: {r.stdout[-3000:]}\n{r.stderr[-3000:]}"


def _artifacts(root: Path) -> dict[str, dict]:
    """step -> manifest of the newest artifact of that step's kind under ``root``."""
    out: dict[str, tuple[float, dict]] = {}
    for mf in root.rglob("manifest.json"):
        m = json.loads(mf.read_text())
        step = KIND_TO_STEP.get(m.get("kind"))
        if step and (step not in out or mf.stat().st_mtime > out[step][0]):
            out[step] = (mf.stat().st_mtime, m)
    return {s: m for s, (_, m) in out.items()}


@pytest.mark.slow  # four pipelines, each step a fresh process for three of them
def test_every_runner_computes_the_same_step_keys(tmp_path):
    raw = digits_config(tmp_path / "work", train={"strategies": ["linear-probe"], "epochs": 1})
    cfg = validate_config(raw)
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(raw))

    from tlops.runners.local import run_pipeline

    res = run_pipeline(cfg, reuse=False)
    runs = {"in-process": {s: res.artifact(s).manifest for s in res.steps}}

    chain = tmp_path / "chain"
    for spec in DAG:
        cmd = ["tlops", "step", spec.name, "--config", str(cfg_file), "--out", str(chain / spec.name), "--no-reuse"]
        for name, producer in spec.inputs.items():
            cmd += ["--in", f"{name}={chain / producer}"]
        _sh(cmd, tmp_path)
    runs["tlops step"] = _artifacts(chain)

    repo = tmp_path / "repo"
    export(cfg, repo)
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "repro"]):
        _sh(cmd, repo)
    runs["dvc repro"] = _artifacts(repo / "dvc-artifacts")

    before = set((tmp_path / "work").rglob("manifest.json"))
    _sh(["tlops", "run", "--config", str(cfg_file), "--runner", "kfp-local", "--no-reuse"], tmp_path)
    new = tmp_path / "kfp-manifests"
    for i, mf in enumerate(set((tmp_path / "work").rglob("manifest.json")) - before):
        (new / str(i)).mkdir(parents=True)
        (new / str(i) / "manifest.json").write_text(mf.read_text())
    runs["kfp.local"] = _artifacts(new)

    ref = runs["in-process"]
    compared = set()
    for runner, arts in runs.items():
        for spec in DAG:
            m = arts[spec.name]
            same_inputs = {k: v["content_hash"] for k, v in m["inputs"].items()} == {
                k: v["content_hash"] for k, v in ref[spec.name]["inputs"].items()
            }
            if not same_inputs:
                continue  # e.g. a retrained model (new timings in its history): its consumers key on that
            assert m["step_key"] == ref[spec.name]["step_key"], (runner, spec.name)
            compared.add(spec.name)
    assert {"ingest", "pull-model", "extract-features", "fine-tune"} <= compared
    # and the key in a manifest is what step_key computes from that artifact's inputs
    assert ref["ingest"]["step_key"] == step_key(DAG[0], cfg, {})

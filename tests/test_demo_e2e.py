"""The digits demo end to end: source registration, transfer, aliases, pyfunc on raw inputs, reuse."""

from __future__ import annotations

import inspect
import io
import json
import re
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml

from tests.conftest import REPO

CONFIGS = REPO / "configs"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from tlops.demo import run_demo

    work = tmp_path_factory.mktemp("demo") / "work"
    out = run_demo(CONFIGS / "digits_source.yaml", CONFIGS / "digits_target.yaml", [f"workdir={work}"])
    out["workdir"] = work
    return out


def _use_store(work: Path) -> None:
    from tlops.tracking.setup import use_store

    use_store(f"sqlite:///{work / 'mlflow.db'}")


def _digits(classes):
    from sklearn.datasets import load_digits

    d = load_digits()
    keep = np.isin(d.target, classes)
    return np.round(d.images[keep] * 255 / 16).astype(np.uint8), d.target[keep]


def test_demo_registers_source_champion_and_target_challenger(demo):
    _use_store(demo["workdir"])
    c = mlflow.MlflowClient()
    src = c.get_model_version_by_alias("digits-source", "champion")
    tgt = c.get_model_version_by_alias("digits-target", "challenger")
    assert str(src.version) == "1" and str(tgt.version) == "1"
    with pytest.raises(mlflow.exceptions.MlflowException):
        c.get_model_version_by_alias("digits-target", "champion")  # auto_promote is off for the target
    assert demo["target"].artifact("pull-model").meta["mlflow"]["name"] == "digits-source"
    assert demo["target"].artifact("pull-model").meta["mlflow"]["version"] == "1"


def test_target_transfer_beats_scratch_and_majority(demo):
    ev = json.loads((demo["target"].artifact("evaluate").path / "report.json").read_text())
    assert set(ev["models"]) == {"linear-probe", "fine-tune", "scratch"}
    scratch = ev["models"]["scratch"]["accuracy"]
    selected = ev["models"][ev["selected"]]["accuracy"]  # chosen on validation: may not be the best on test
    best = max(ev["models"][s]["accuracy"] for s in ("linear-probe", "fine-tune"))
    assert best > scratch + 0.1  # exact numbers: test_readme_demo_table_is_what_the_demo_prints
    assert selected > scratch
    assert selected > ev["baselines"]["majority"]["accuracy"] + 0.4
    assert ev["gates"]["passed"] is True
    for name in ("report.md", "confusion_matrix.png"):
        assert (demo["target"].artifact("evaluate").path / name).stat().st_size > 0
    src_ev = demo["source"].artifact("evaluate").meta
    assert src_ev["accuracy"] > 0.9


def test_pyfunc_from_registry_predicts_raw_images(demo, tmp_path):
    _use_store(demo["workdir"])
    model = mlflow.pyfunc.load_model("models:/digits-target@challenger")
    x, y = _digits([5, 6, 7, 8, 9])
    out = model.predict(x[:200])
    assert list(out.columns[:2]) == ["label", "score"]
    assert set(out["label"]) <= {"5", "6", "7", "8", "9"}
    probs = out[[f"prob_{c}" for c in "56789"]].to_numpy()
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    assert (out["label"].astype(int).to_numpy() == y[:200]).mean() > 0.6
    # image files work through the unwrapped model
    from PIL import Image

    paths = []
    for i in range(3):
        p = tmp_path / f"{i}.png"
        Image.fromarray(x[i]).save(p)
        paths.append(str(p))
    files = model.unwrap_python_model().predict(None, paths)
    assert files["label"].tolist() == out["label"].tolist()[:3]


def test_version_tags_description_and_run_record(demo):
    _use_store(demo["workdir"])
    c = mlflow.MlflowClient()
    mv = c.get_model_version_by_alias("digits-target", "challenger")
    tgt = demo["target"]
    assert mv.tags["tlops.data_hash"] == tgt.artifact("ingest").meta["data_hash"]
    assert mv.tags["tlops.source_digest"] == tgt.artifact("pull-model").meta["model_digest"]
    assert len(mv.tags["tlops.config_hash"]) == 64
    assert mv.tags["tlops.git_commit"]
    assert mv.tags["validation_status"] == "passed"
    assert "| model | accuracy | macro-F1 | ECE |" in mv.description
    assert "scratch" in mv.description and "majority class" in mv.description
    run = c.get_run(tgt.mlflow_run_id)
    assert run.data.tags["tlops.feature_cache_key"] == tgt.artifact("extract-features").meta["cache_key"]
    assert run.data.params["train.epochs"] == "15"
    saved = yaml.safe_load((tgt.run_dir / "config.yaml").read_text())
    assert saved["workdir"] == str(demo["workdir"]) and saved["register"]["model_name"] == "digits-target"
    logged = mlflow.artifacts.download_artifacts(run_id=tgt.mlflow_run_id, artifact_path="config.yaml")
    assert yaml.safe_load(Path(logged).read_text()) == saved


def test_rerun_reuses_steps_and_registration(demo, caplog):
    from tlops.config import load_config
    from tlops.runners.local import run_pipeline

    cfg = load_config(CONFIGS / "digits_target.yaml", [f"workdir={demo['workdir']}"])
    caplog.set_level("INFO")
    again = run_pipeline(cfg)
    reused = {n for n, s in again.steps.items() if s.reused}
    assert reused == {"ingest", "pull-model", "extract-features", "fine-tune", "evaluate"}
    assert "inputs unchanged, reusing finished artifact" in caplog.text
    reg = again.artifact("register").meta
    assert reg["version"] == "1" and reg["reused"] is True
    assert again.seconds < 0.5 * demo["target"].seconds


@pytest.fixture(scope="module")
def rerun_imports(demo) -> set[str]:
    """The top-level packages an unchanged ``tlops run`` of the target config imports, in a fresh interpreter
    (read from ``python -X importtime``, so nothing in tlops has to cooperate)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID")}
    cmd = [sys.executable, "-X", "importtime", "-m", "tlops", "run", "--config", str(CONFIGS / "digits_target.yaml")]
    proc = subprocess.run(
        [*cmd, "--set", f"workdir={demo['workdir']}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(ingest, pull-model, extract-features, fine-tune, evaluate reused)" in proc.stdout + proc.stderr
    found = re.findall(r"^import time:\s+\d+\s+\|\s+\d+\s+\|\s+(\S+)\s*$", proc.stderr, flags=re.M)
    return {name.strip().split(".")[0] for name in found}


def test_unchanged_rerun_imports_no_torch(rerun_imports):
    """README: an unchanged second run "reuses every step, imports no torch". The trace must be real (it
    names tlops), and none of the model libraries may appear in it."""
    assert "tlops" in rerun_imports
    assert not rerun_imports & {"torch", "torchvision", "timm", "transformers", "sklearn"}


def test_unchanged_rerun_imports_no_mlflow(rerun_imports):
    """Issue 20 item 3: with the store unchanged since the last run, pre-flight, the pull-model and
    evaluate keys and register's "already there?" are answered from tlops.tracking.memo."""
    assert not rerun_imports & {"mlflow", "sqlalchemy"}


def test_registry_change_between_reruns_is_noticed(demo, rerun_imports):
    """The remembered registry answers hold only while the store is unchanged: after an alias moves
    (a write by someone else), the pull-model and evaluate keys see the new versions and register
    goes through MLflow again, and what it then finds is remembered for the next rerun."""
    from tlops.config import load_config
    from tlops.contract import step_key
    from tlops.dag import get
    from tlops.runners.local import run_pipeline
    from tlops.tracking import memo

    cfg = load_config(CONFIGS / "digits_target.yaml", [f"workdir={demo['workdir']}"])
    quiet = run_pipeline(cfg)
    assert quiet.mlflow_run_id is None  # nothing ran: no MLflow run
    reg = quiet.artifact("register").meta
    assert (reg["version"], reg["aliases"], reg["reused"]) == ("1", ["challenger"], True)

    def stale(step: str) -> bool:
        spec = get(step)
        ins = {name: quiet.artifact(producer) for name, producer in spec.inputs.items()}
        return step_key(spec, cfg, ins) != quiet.artifact(step).manifest["step_key"]

    _use_store(demo["workdir"])
    c = mlflow.MlflowClient()
    made = []
    try:
        c.set_registered_model_alias("digits-target", "champion", "1")  # this very model: evaluate's key holds
        assert memo.cached(cfg, ("alias", "digits-target", "champion")) is memo.MISS
        again = run_pipeline(cfg)
        assert again.mlflow_run_id is not None
        assert {n for n, s in again.steps.items() if s.reused} == set(list(again.steps)[:5])
        assert again.artifact("register").meta["aliases"] == ["challenger", "champion"]
        assert memo.cached(cfg, ("alias", "digits-target", "champion"))["version"] == "1"  # remembered after
        for name in ("digits-source", "digits-target"):  # a new champion of each: another model
            v1 = c.get_model_version(name, "1")
            made.append(c.create_model_version(name, v1.source, v1.run_id, tags={"tlops.model_digest": "other"}))
            c.set_registered_model_alias(name, "champion", made[-1].version)
        assert stale("pull-model") and stale("evaluate")
    finally:
        c.set_registered_model_alias("digits-source", "champion", "1")
        c.delete_registered_model_alias("digits-target", "champion")
        for mv in made:
            c.delete_model_version(mv.name, mv.version)


def _table_rows(text: str) -> list[tuple[str, str, str]]:
    """The rows of a printed summary table as (strategy, test accuracy cell, gain cell): each
    cell whole, interval brackets included."""
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("│").split("│")] if line.startswith("│") else []
        if len(cells) == 4 and cells[0]:  # a row (a wrapped cell continues on a line with no strategy)
            rows.append((cells[0], cells[1], cells[2]))
    return rows


def _readme_demo() -> tuple[str, list[tuple[str, str, str]], str]:
    """The CPU capability stated next to README's demo table, the table's rows as (strategy, test
    accuracy, gain over scratch) as printed, and the rest of the demo output block."""
    text = (REPO / "README.md").read_text()
    isa = re.search(r"CPU capability `(\w+)`", text)
    assert isa, "README must state the CPU capability (torch.backends.cpu.get_cpu_capability()) of its demo run"
    summary = text[text.index("demo summary") :]
    block = summary[: summary.index("```")]
    rows = _table_rows(block)
    assert rows, "README has no demo summary table"
    return isa.group(1), rows, block


def test_readme_demo_table_is_what_the_demo_prints(demo):
    """README's demo table equals what this run printed (strategy order, selection mark, test
    accuracy and gain over scratch, each with its bootstrap interval; train times are not
    compared). The numbers depend on the CPU kernels torch picks: on a machine whose CPU
    capability differs from the one README states (AVX2 vs AVX512) the comparison is skipped, not
    weakened."""
    import torch
    from rich.console import Console

    from tlops.report import rows_table, summary_rows

    isa, readme_rows, block = _readme_demo()
    here = torch.backends.cpu.get_cpu_capability()
    if here != isa:
        pytest.skip(f"README's demo numbers were measured with CPU capability {isa}; this machine has {here}")
    rows = summary_rows(demo["target"])
    console = Console(width=80, record=True, file=io.StringIO())
    console.print(rows_table("t", rows, demo["evaluation"]["confidence"]))
    printed = _table_rows(console.export_text())
    assert all("[" in acc for _, acc, _ in printed), f"the summary table prints no intervals: {printed}"
    assert printed == readme_rows, f"README's demo table is stale: the demo printed {printed}"
    assert "in brackets: 95% bootstrap interval; gains paired" in block


def test_readme_states_the_transfer_claim_with_its_interval(demo):
    """The README's sentence that transfer beats scratch carries the selected model's gain and its
    paired bootstrap interval, as evaluate computed them (and the interval excludes zero)."""
    import torch

    isa, _, _ = _readme_demo()
    if torch.backends.cpu.get_cpu_capability() != isa:
        pytest.skip(f"README's demo numbers were measured with CPU capability {isa}")
    ev = json.loads((demo["target"].artifact("evaluate").path / "report.json").read_text())
    gain, (lo, hi) = ev["metrics"]["gain_over_scratch"], ev["metrics"]["gain_over_scratch_ci"]
    assert lo > 0
    claim = (
        f"{gain:+.3f} (95 % interval {lo:+.3f} to {hi:+.3f}, paired bootstrap over the {ev['test_size']} test images)"
    )
    assert claim in " ".join((REPO / "README.md").read_text().split()), claim


def test_make_pipeline_local_runs_this_demo():
    """`make pipeline-local` is `tlops demo` with its defaults: the two configs this module's
    fixture runs, so the README table checked above is what that command prints."""
    from tlops.cli import demo

    recipe = re.search(r"^pipeline-local:.*\n((?:\t.*\n)+)", (REPO / "Makefile").read_text(), re.M)
    assert recipe and recipe.group(1).split() == ["$(BIN)/tlops", "demo"]
    defaults = {name: p.default.default for name, p in inspect.signature(demo).parameters.items()}
    assert defaults["source_config"] == Path("configs/digits_source.yaml")
    assert defaults["target_config"] == Path("configs/digits_target.yaml")
    assert not defaults["set_"]

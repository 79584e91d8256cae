"""Ctrl-C and SIGTERM during ``tlops run``: real signals to a real subprocess.

Each asserts the exit code (130 / 143), the one line saying what was interrupted and what was
kept, the MLflow run ended as KILLED, no temp dir left in the run, and that the rerun continues:
mid-epoch, it resumes from the kept checkpoints and ends with the weights of an uninterrupted
run (same digest); mid-extraction, it recomputes (no half cache entry is trusted).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import digits_config

from tlops.artifacts import read_artifact

TLOPS = str(Path(sys.executable).parent / "tlops")
EPOCHS = 3
# 5 classes, every image (about 450 train): an epoch lasts long enough to be interrupted inside
DATA = {"classes": [0, 1, 2, 3, 4], "labels_per_class": None}
TRAIN = {"strategies": ["fine-tune"], "epochs": EPOCHS, "batch_size": 16, "threads": 1, "augment": True}


def _cfg(tmp_path: Path, name: str, workdir: Path, **sections) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(digits_config(workdir, **sections)))
    return path


def _signal_when(cmd: list[str], log: Path, ready, signum: int, timeout: float = 300) -> int:
    """Start ``cmd``, send ``signum`` as soon as ``ready()`` holds; its exit code."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log, "wb") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + timeout
    while not ready():
        if p.poll() is not None:
            pytest.fail(f"finished (rc {p.returncode}) before the signal:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            p.kill()
            pytest.fail(f"timed out waiting to signal:\n{log.read_text()[-3000:]}")
        time.sleep(0.005)
    os.kill(p.pid, signum)
    return p.wait(timeout=120)


def _mlflow_status(workdir: Path, run_name: str) -> str:
    from mlflow import MlflowClient

    from tlops.tracking.setup import embedded_uri

    client = MlflowClient(embedded_uri(workdir))
    (run,) = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], f"attributes.run_name = '{run_name}'"
    )
    return run.info.status


def _leftovers(root: Path) -> list[str]:
    return [str(p) for p in root.rglob("*") if ".tmp-" in p.name or p.name.startswith((".reuse-", ".cache-entry-"))]


@pytest.mark.slow
def test_sigterm_mid_epoch_is_killed_cleanly_and_the_rerun_resumes_exactly(tmp_path):
    ref_work = tmp_path / "work-ref"
    ref = subprocess.run(
        [TLOPS, "run", "-c", str(_cfg(tmp_path, "ref", ref_work, data=DATA, train=TRAIN)), "--run-id", "ref"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert ref.returncode == 0, ref.stderr[-3000:]
    want = read_artifact(ref_work / "runs" / "ref" / "fine-tune", "trained-models").meta["models"]["fine-tune"]

    work = tmp_path / "work"
    cfg = _cfg(tmp_path, "cfg", work, data=DATA, train=TRAIN)
    log = tmp_path / "first.log"
    first_epoch = lambda: any(work.glob("checkpoints/*/fine-tune/epoch_001.pt"))  # noqa: E731
    rc = _signal_when([TLOPS, "run", "-c", str(cfg), "--run-id", "r1"], log, first_epoch, signal.SIGTERM)
    text = log.read_text()
    assert rc == 143, text[-3000:]
    (ckpt,) = work.glob("checkpoints/*")
    kept = sorted(p.name for p in ckpt.rglob("epoch_*.pt"))
    assert kept and kept[-1] < f"epoch_{EPOCHS:03d}.pt", kept
    last = text.strip().splitlines()[-1]
    mlrun = [ln for ln in text.splitlines() if "MLflow run " in ln]
    assert last.startswith(
        "tlops: interrupted by SIGTERM during fine-tune of run r1; kept: finished steps "
        f"extract-features, ingest, pull-model in {work / 'runs' / 'r1'}; {len(kept)} epoch checkpoint(s) in {ckpt} "
        "(the rerun resumes from them); MLflow run "
    ), last
    assert last.endswith(" marked KILLED; temp dirs removed, rerun the same command to continue"), mlrun
    assert "Traceback" not in text
    assert _mlflow_status(work, "r1") == "KILLED"
    assert _leftovers(work) == []
    assert not (work / "runs" / "r1" / "fine-tune").exists()

    again = subprocess.run(
        [TLOPS, "run", "-c", str(cfg), "--run-id", "r2"], capture_output=True, text=True, timeout=600
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"fine-tune: resuming from epoch {int(kept[-1][6:9])} of {EPOCHS}" in again.stderr
    got = read_artifact(work / "runs" / "r2" / "fine-tune", "trained-models").meta["models"]["fine-tune"]
    assert got["digest"] == want["digest"]
    assert _mlflow_status(work, "r2") == "FINISHED"


@pytest.mark.slow
def test_ctrl_c_mid_extraction_exits_130_and_the_rerun_recomputes(tmp_path):
    work = tmp_path / "work"
    data = {"classes": list(range(10)), "labels_per_class": None}
    src = {"model": "timm:resnet10t", "pretrained": False, "in_chans": 1, "image_size": 32}
    cfg = _cfg(tmp_path, "cfg", work, data=data, source=src)
    log = tmp_path / "first.log"
    # the train split is extracted, val and test are being extracted
    ready = lambda: log.exists() and b"extract train:" in log.read_bytes()  # noqa: E731
    rc = _signal_when([TLOPS, "run", "-c", str(cfg), "--run-id", "r1"], log, ready, signal.SIGINT)
    text = log.read_text()
    assert rc == 130, text[-3000:]
    last = text.strip().splitlines()[-1]
    assert last.startswith(
        "tlops: interrupted by SIGINT during extract-features of run r1; kept: finished steps ingest, pull-model in "
    ), last
    assert last.endswith(" marked KILLED; temp dirs removed, rerun the same command to continue"), last
    assert _mlflow_status(work, "r1") == "KILLED"
    assert _leftovers(work) == []
    cache = work / "cache" / "features"
    assert not cache.exists() or list(cache.rglob("manifest.json")) == []

    again = subprocess.run(
        [TLOPS, "run", "-c", str(cfg), "--run-id", "r2"], capture_output=True, text=True, timeout=600
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert read_artifact(work / "runs" / "r2" / "extract-features", "features").meta["cache"] == "miss"
    assert _mlflow_status(work, "r2") == "FINISHED"


# ---------------------------------------------------------------------- fast: exit codes through cli.main


def _main_with(monkeypatch, capsys, tmp_path, pipeline) -> tuple[int, str]:
    import tlops.report
    import tlops.runners.local
    from tlops import cli

    monkeypatch.setattr(tlops.runners.local, "run_pipeline", pipeline)
    monkeypatch.setattr(tlops.report, "print_run_summary", lambda cfg, result: None)
    cfg = _cfg(tmp_path, "cfg", tmp_path / "work")
    monkeypatch.setattr(sys, "argv", ["tlops", "run", "-c", str(cfg), *getattr(pipeline, "argv", [])])
    with pytest.raises(SystemExit) as e:
        cli.main()
    return e.value.code, capsys.readouterr().err


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_exit_codes_and_handlers_restored(monkeypatch, capsys, tmp_path, signum, code):
    before = signal.getsignal(signum)

    def pipeline(cfg, **kw):
        os.kill(os.getpid(), signum)
        time.sleep(5)  # the handler raises before this ends
        pytest.fail("not interrupted")

    rc, err = _main_with(monkeypatch, capsys, tmp_path, pipeline)
    assert rc == code
    assert err.splitlines()[-1] == (
        f"tlops: interrupted by {signal.Signals(signum).name}; kept: nothing; "
        "temp dirs removed, rerun the same command to continue"
    )
    assert signal.getsignal(signum) is before


def test_failed_gates_exit_3_unless_told_otherwise(monkeypatch, capsys, tmp_path):
    from types import SimpleNamespace

    result = SimpleNamespace(artifact=lambda step: SimpleNamespace(meta={"gates_passed": False}))

    def pipeline(cfg, **kw):
        return result

    rc, err = _main_with(monkeypatch, capsys, tmp_path, pipeline)
    assert rc == 3
    assert err.splitlines()[-1] == "gates failed: exit code 3 (--no-fail-on-gates to exit 0)"
    pipeline.argv = ["--no-fail-on-gates"]
    assert _main_with(monkeypatch, capsys, tmp_path, pipeline)[0] == 0
    result.artifact = lambda step: SimpleNamespace(meta={"gates_passed": True})
    pipeline.argv = []
    assert _main_with(monkeypatch, capsys, tmp_path, pipeline)[0] == 0

"""Crash and resume.

Fast, in-process: a fine-tune step that dies after an epoch resumes exactly (also from an
older checkpoint when the newest is unreadable). Slow, `kill -9` of real `tlops step` processes:

- fine-tune killed mid-epoch: the rerun resumes from the last checkpoint (kept under
  <workdir>/checkpoints/<step fingerprint>/, outside the step's temp dir) and ends with the
  same weights and metrics as an uninterrupted run with the same seed.
- extract-features killed mid-extraction: no cache entry a later run trusts; the rerun
  recomputes and succeeds.
"""

from __future__ import annotations

import json
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
EPOCHS = 4


def _write_cfg(path: Path, workdir: Path, **sections) -> Path:
    path.write_text(yaml.safe_dump(digits_config(workdir, **sections)))
    return path


def _step_cmd(step: str, cfg: Path, out: Path, ins: dict[str, Path]) -> list[str]:
    cmd = [TLOPS, "step", step, "--config", str(cfg), "--out", str(out)]
    for k, v in ins.items():
        cmd += ["--in", f"{k}={v}"]
    return cmd


def _kill_when(cmd: list[str], log: Path, ready, timeout: float = 300) -> subprocess.Popen:
    """Start ``cmd``; SIGKILL it as soon as ``ready()`` is true (polled every 5 ms)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log, "wb") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + timeout
    while not ready():
        if p.poll() is not None:
            pytest.fail(f"{cmd[2]} finished (rc {p.returncode}) before it could be killed:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            p.kill()
            pytest.fail(f"timed out waiting to kill {cmd[2]}:\n{log.read_text()[-3000:]}")
        time.sleep(0.005)
    os.kill(p.pid, signal.SIGKILL)
    assert p.wait(timeout=60) == -signal.SIGKILL
    return p


def _train_cfg(threads: int = 1) -> dict:
    # 5 classes, every image (about 450 train): an epoch takes long enough to be killed inside
    return {"strategies": ["fine-tune"], "epochs": EPOCHS, "batch_size": 16, "threads": threads, "augment": True}


@pytest.mark.parametrize("dies_after", [2, 3])
def test_fine_tune_dies_after_an_epoch_and_resumes_exactly(digits_cfg, tmp_path, monkeypatch, caplog, dies_after):
    """In-process and small: the step dies after epoch 2 of 3 (gradual unfreezing on, so the
    resumed run must replay the unfreezing too); the newest checkpoint is then truncated, so the
    rerun falls back to epoch 1. Or it dies after the last epoch, whose checkpoint holds no optimizer
    state (nothing continues from it): the rerun trains nothing. Either way the result equals an
    uninterrupted run, bit for bit."""
    import torch

    from tlops import dag
    from tlops.config import validate_config
    from tlops.runners.local import execute_step
    from tlops.steps import extract_features, ingest, pull_model

    train = {
        "strategies": ["fine-tune"],
        "epochs": 3,
        "batch_size": 16,
        "threads": 1,
        "augment": True,
        "gradual_unfreeze": True,
    }
    up = digits_cfg(train=train)
    ins = {"dataset": ingest.run(up, {}, tmp_path / "ingest"), "model": pull_model.run(up, {}, tmp_path / "pull")}
    ins["features"] = extract_features.run(up, ins, tmp_path / "features")
    spec = dag.get("fine-tune")
    ref = execute_step(
        spec, validate_config(digits_config(tmp_path / "work-ref", train=train)), ins, tmp_path / "ref"
    ).artifact

    cfg = validate_config(digits_config(tmp_path / "work", train=train))
    from tlops.training.checkpoints import Checkpoints

    real = Checkpoints.save

    def dies(self, epoch, state, **kw):
        real(self, epoch, state, **kw)
        if epoch == dies_after:
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(Checkpoints, "save", dies)
    with pytest.raises(KeyboardInterrupt):
        execute_step(spec, cfg, ins, tmp_path / "ft")
    monkeypatch.setattr(Checkpoints, "save", real)
    assert not (tmp_path / "ft").exists()
    (ck,) = (tmp_path / "work" / "checkpoints").glob("*/fine-tune")
    kept = [f"epoch_{e:03d}.pt" for e in (dies_after - 1, dies_after)]
    assert sorted(p.name for p in ck.iterdir()) == kept
    states = {p: torch.load(ck / p, weights_only=True) for p in kept}
    assert [states[p]["optimizer"] is None for p in kept] == [False, dies_after == 3]
    assert [states[p]["scheduler"] is None for p in kept] == [False, dies_after == 3]
    if dies_after == 2:
        newest = ck / "epoch_002.pt"
        newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # e.g. a disk that filled up

    caplog.set_level("INFO")
    caplog.clear()  # only the rerun's lines (an earlier test may have left tlops logging at INFO)
    art = execute_step(spec, cfg, ins, tmp_path / "ft").artifact
    if dies_after == 2:
        assert "epoch_002.pt is unreadable" in caplog.text
        assert "fine-tune: resuming from epoch 1 of 3" in caplog.text
        assert [e for e in (1, 2, 3) if f"fine-tune epoch {e}/3:" in caplog.text] == [2, 3]
    else:
        assert "fine-tune: resuming from epoch 3 of 3" in caplog.text
        assert not any(f"fine-tune epoch {e}/3:" in caplog.text for e in (1, 2, 3))
    got, want = art.meta["models"]["fine-tune"], ref.meta["models"]["fine-tune"]
    assert got["digest"] == want["digest"] and got["val_acc"] == want["val_acc"]
    assert not (tmp_path / "work" / "checkpoints").exists() or not any((tmp_path / "work" / "checkpoints").iterdir())


@pytest.fixture
def upstream(tmp_path):
    """ingest + pull-model + extract-features artifacts for a 5-class digits config (in-process)."""
    from tlops.config import validate_config
    from tlops.steps import extract_features, ingest, pull_model

    data = {"classes": [0, 1, 2, 3, 4], "labels_per_class": None}
    raw = digits_config(tmp_path / "work-up", data=data, train=_train_cfg())
    cfg = validate_config(raw)
    up = tmp_path / "up"
    ins = {"dataset": ingest.run(cfg, {}, up / "ingest"), "model": pull_model.run(cfg, {}, up / "pull")}
    ins["features"] = extract_features.run(cfg, ins, up / "features")
    return data, ins


@pytest.mark.slow
def test_fine_tune_killed_mid_epoch_resumes_and_matches_uninterrupted_run(upstream, tmp_path):
    data, ins = upstream
    paths = {k: a.path for k, a in ins.items()}
    # reference: one uninterrupted run of the same command (own workdir: nothing shared with the crashed one)
    ref_cfg = _write_cfg(tmp_path / "ref.yaml", tmp_path / "work-ref", data=data, train=_train_cfg())
    r = subprocess.run(
        _step_cmd("fine-tune", ref_cfg, tmp_path / "ref", paths), capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming" not in r.stderr
    ref = read_artifact(tmp_path / "ref", "trained-models")
    assert not any((tmp_path / "work-ref" / "checkpoints").iterdir())  # cleaned after success

    work = tmp_path / "work"
    cfg = _write_cfg(tmp_path / "cfg.yaml", work, data=data, train=_train_cfg())
    out = tmp_path / "ft"
    cmd = _step_cmd("fine-tune", cfg, out, paths)
    ckpts = work / "checkpoints"
    first = lambda: next(iter(ckpts.glob("*/fine-tune/epoch_001.pt")), None) is not None  # noqa: E731
    t0 = time.monotonic()
    _kill_when(cmd, tmp_path / "killed.log", first)
    killed_after = time.monotonic() - t0
    assert not out.exists(), "a killed step published its artifact"
    left = sorted(p.name for p in ckpts.glob("*/fine-tune/epoch_*.pt"))
    assert left and left[-1] < f"epoch_{EPOCHS:03d}.pt", left  # killed before the last epoch finished
    done_before = int(left[-1][6:9])

    t0 = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    resumed_secs = time.monotonic() - t0
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"fine-tune: resuming from epoch {done_before} of {EPOCHS}" in r.stderr
    trained = [e for e in range(1, EPOCHS + 1) if f"fine-tune epoch {e}/{EPOCHS}:" in r.stderr]
    assert trained == list(range(done_before + 1, EPOCHS + 1)), trained  # fewer epochs: only the missing ones
    art = read_artifact(out, "trained-models")
    got, want = art.meta["models"]["fine-tune"], ref.meta["models"]["fine-tune"]
    assert got["epochs"] == want["epochs"] == EPOCHS
    assert got["val_acc"] == pytest.approx(want["val_acc"], abs=1e-9)
    # exact resume: model, optimizer, scheduler, RNGs and best weights are all in the checkpoint
    assert got["digest"] == want["digest"]
    h_got = json.loads((out / "models" / "fine-tune" / "history.json").read_text())
    h_want = json.loads((ref.path / "models" / "fine-tune" / "history.json").read_text())
    for a, b in zip(h_got, h_want, strict=True):
        for k in ("epoch", "train_loss", "train_acc", "val_loss", "val_acc"):
            assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-9), (k, a, b)
    assert sorted(p.name for p in (out / "models" / "fine-tune" / "checkpoints").iterdir()) == [
        "epoch_003.pt",
        "epoch_004.pt",
    ]
    assert not ckpts.exists() or not any(ckpts.iterdir()), "resume checkpoints not cleaned after success"
    print(
        f"\nfine-tune killed after {killed_after:.1f}s with {done_before}/{EPOCHS} epochs checkpointed; "
        f"resumed run trained {len(trained)} epochs in {resumed_secs:.1f}s; digest {got['digest'][:12]} == reference"
    )


@pytest.mark.slow
def test_extract_features_killed_mid_extraction_leaves_no_trusted_cache_entry(tmp_path):
    from tlops.config import validate_config
    from tlops.steps import ingest, pull_model

    work = tmp_path / "work"
    data = {"classes": list(range(10)), "labels_per_class": None}
    src = {"model": "timm:resnet10t", "pretrained": False, "in_chans": 1, "image_size": 32}
    cfg_path = _write_cfg(tmp_path / "cfg.yaml", work, data=data, source=src)
    cfg = validate_config(digits_config(work, data=data, source=src))
    ins = {
        "dataset": ingest.run(cfg, {}, tmp_path / "ingest").path,
        "model": pull_model.run(cfg, {}, tmp_path / "pull").path,
    }
    out = tmp_path / "features"
    cmd = _step_cmd("extract-features", cfg_path, out, ins)
    log = tmp_path / "killed.log"
    # the train split is done, val and test are being extracted
    _kill_when(cmd, log, lambda: log.exists() and b"extract train:" in log.read_bytes())
    root = work / "cache" / "features"
    manifests = list(root.rglob("manifest.json")) if root.exists() else []
    assert manifests == [], f"a killed extraction left a trusted cache entry: {manifests}"
    assert not out.exists()

    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "waiting for" not in r.stderr  # the killed run's lock died with it
    art = read_artifact(out, "features")
    assert art.meta["cache"] == "miss"  # recomputed, not trusted from the killed run
    key = art.meta["cache_key"]
    entry = read_artifact(root / key[:2] / key, "feature-cache-entry")
    assert entry.meta["cache_key"] == key
    again = subprocess.run(
        _step_cmd("extract-features", cfg_path, tmp_path / "features-2", ins) + ["--no-reuse"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert read_artifact(tmp_path / "features-2", "features").meta["cache"] == "hit"


def test_checkpoints_are_written_without_zip_checksums_and_leave_torchs_setting_alone(tmp_path, monkeypatch):
    """Each tensor's CRC-32 was most of a checkpoint's cost; the file still loads, the global
    ``torch.save`` setting is the caller's again afterwards (also when the write fails), and a file
    cut short is still refused (the fallback the resume test above relies on)."""
    import torch
    from torch.utils.serialization import config

    from tlops.training.checkpoints import Checkpoints
    from tlops.training.runtime import Runtime

    ck = Checkpoints(Runtime(checkpoint_dir=tmp_path), tmp_path, "loop", 2)
    seen = []
    real = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, f: (seen.append(config.save.compute_crc32), real(obj, f))[1])
    ck.save(1, {"model": {"w": torch.arange(4.0)}})
    assert seen == [False] and config.save.compute_crc32 is True
    assert torch.equal(ck.load()["model"]["w"], torch.arange(4.0))

    def full_disk(obj, f):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        ck.save(2, {"model": {"w": torch.zeros(4)}})
    assert config.save.compute_crc32 is True
    assert sorted(p.name for p in (tmp_path / "loop").iterdir()) == ["epoch_001.pt"]  # no temp file left

    path = tmp_path / "loop" / "epoch_001.pt"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert ck.load() is None  # unreadable: the loop starts from scratch

"""Content hashes cover what later steps consume, not when or how fast it was made: two runs that
make bit-identical models give every artifact the same hash, so later steps reuse the first run's
work (the timings stay readable in the files and the manifest)."""

from __future__ import annotations

import json
import shutil

import pytest

from tlops.artifacts import read_artifact, write_artifact
from tlops.workdir import Workdir


def _write(out, kind, files, metadata):
    with write_artifact(out, kind) as w:
        for rel, text in files.items():
            (w.path / rel).parent.mkdir(parents=True, exist_ok=True)
            (w.path / rel).write_text(text)
        w.metadata = metadata
    return read_artifact(out)


def test_timings_and_run_ids_are_not_hashed_but_kept(tmp_path):
    hist = [{"epoch": 1, "train_loss": 0.5, "seconds": 1.25}]
    meta = {"models": {"a": {"val_acc": 0.9, "seconds": 3.0}}, "source": "/data/old/path.csv"}
    a = _write(tmp_path / "a", "trained-models", {"models/a/history.json": json.dumps(hist)}, meta)
    hist[0]["seconds"], meta["models"]["a"]["seconds"], meta["source"] = 9.5, 7.0, "/data/new/path.csv"
    b = _write(
        tmp_path / "b",
        "trained-models",
        {"models/a/history.json": json.dumps(hist, indent=2), "models/a/checkpoints/epoch_001.pt": "resume state"},
        meta,
    )
    assert a.content_hash == b.content_hash
    assert b.meta["models"]["a"]["seconds"] == 7.0  # still recorded
    hist[0]["train_loss"] = 0.51  # a consumed value
    c = _write(tmp_path / "c", "trained-models", {"models/a/history.json": json.dumps(hist)}, meta)
    assert c.content_hash != a.content_hash
    d = _write(tmp_path / "d", "trained-models", {"models/a/history.json": json.dumps(hist)}, {**meta, "selected": "a"})
    assert d.content_hash != c.content_hash  # metadata a later step reads is hashed


def test_rendering_is_unhashed_only_where_declared(tmp_path):
    e1 = _write(tmp_path / "e1", "evaluation", {"report.json": "{}", "report.md": "| a | 1.0s |"}, {})
    e2 = _write(tmp_path / "e2", "evaluation", {"report.json": "{}", "report.md": "| a | 2.0s |"}, {})
    assert e1.content_hash == e2.content_hash
    o1 = _write(tmp_path / "o1", "dataset", {"report.md": "1"}, {})
    o2 = _write(tmp_path / "o2", "dataset", {"report.md": "2"}, {})
    assert o1.content_hash != o2.content_hash


@pytest.mark.slow
def test_two_identical_runs_give_identical_hashes_and_reuse(digits_cfg):
    """Run twice; before the second run the reuse index is emptied for every step but evaluate, so
    ingest .. fine-tune and register are computed again. Their hashes match the first run's, and
    evaluate (keyed on fine-tune's content hash) and the registered version are reused."""
    from tlops.runners.local import run_pipeline

    cfg = digits_cfg(train={"strategies": ["linear-probe", "fine-tune"], "epochs": 1, "batch_size": 16})
    first = run_pipeline(cfg)
    index = Workdir.at(cfg.workdir_path).index
    for step in ("ingest", "pull-model", "extract-features", "fine-tune"):
        shutil.rmtree(index / step)
    second = run_pipeline(cfg)
    ran = {s for s, r in second.steps.items() if not r.reused}
    assert ran == {"ingest", "pull-model", "extract-features", "fine-tune", "register"}
    for step in first.steps:
        assert second.artifact(step).content_hash == first.artifact(step).content_hash, step
    ft1, ft2 = first.artifact("fine-tune"), second.artifact("fine-tune")
    assert ft1.meta["models"]["fine-tune"]["digest"] == ft2.meta["models"]["fine-tune"]["digest"]
    # the timings differ and are still recorded (files and manifest), outside the hash
    h1 = json.loads((ft1.path / "models" / "fine-tune" / "history.json").read_text())
    h2 = json.loads((ft2.path / "models" / "fine-tune" / "history.json").read_text())
    assert "seconds" in h1[0] and "seconds" in ft2.meta["models"]["fine-tune"]
    assert [r["train_loss"] for r in h1] == [r["train_loss"] for r in h2]
    reg1, reg2 = first.artifact("register").meta, second.artifact("register").meta
    assert (reg2["version"], reg2["reused"], reg1["reused"]) == (reg1["version"], True, False)


def test_the_content_hash_of_a_fixed_artifact_is_pinned(tmp_path):
    """Step keys, cache keys and registered digests build on this hash: a change to how it is
    computed (a separator, a prefix) silently invalidates every existing cache and run, so it must
    be deliberate and show up here. A ``.json`` file that is not text is hashed as bytes."""
    from tlops.artifacts import content_hash_of

    d = tmp_path / "art"
    (d / "sub").mkdir(parents=True)
    (d / "sub" / "w.bin").write_bytes(b"\x00\x01weights")
    (d / "config.json").write_text('{"b": 2, "a": 1, "seconds": 9.5}')
    (d / "blob.json").write_bytes(b"\xff\xfe not utf-8")
    meta = {"n": 3, "seconds": 1.0}
    pinned = "c2e93634a01c78016910d16e9a6701720ae99db12bb9849e8a69f4fddbf6dadd"
    assert content_hash_of(d, "trained-models", meta) == pinned

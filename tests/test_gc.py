"""`tlops gc --keep N`: prunes old runs, stale index entries, finished/abandoned checkpoints and
feature cache entries no kept run references; never a run in progress, never a cache entry
whose lock is held, never what kept runs reference. Bytes freed count hard links once.

(A gc on a real workdir after 20 pipeline runs, with reuse still working afterwards, is in
tests/test_soak.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from tlops.gc import collect
from tlops.storage import file_lock

TLOPS = str(Path(sys.executable).parent / "tlops")
KB = 1024


def _manifest(d: Path, kind: str, meta: dict | None = None) -> None:
    (d / "manifest.json").write_text(json.dumps({"kind": kind, "content_hash": "x", "metadata": meta or {}}))


def _entry(root: Path, key: str, size: int) -> Path:
    e = root / key[:2] / key
    e.mkdir(parents=True)
    (e / "features.npz").write_bytes(b"f" * size)
    _manifest(e, "feature-cache-entry", {"cache_key": key})
    return e


def _run(work: Path, name: str, age_s: float, key: str | None, cache: Path, extra: int = 0) -> Path:
    run = work / "runs" / name
    (run / "extract-features").mkdir(parents=True)
    (run / "config.yaml").write_text(f"name: {name}\n")
    if key:  # features hard-linked from the cache entry, as the extract step does
        os.link(cache / key[:2] / key / "features.npz", run / "extract-features" / "features.npz")
    _manifest(run / "extract-features", "features", {"cache_key": key, "cache_keys": [key] if key else []})
    (run / "fine-tune").mkdir()
    (run / "fine-tune" / "model.bin").write_bytes(b"m" * extra)
    _manifest(run / "fine-tune", "trained-models")
    (run / ".lock").touch()
    t = time.time() - age_s
    os.utime(run / "config.yaml", (t, t))
    return run


@contextmanager
def held(path: Path):
    """Hold a lock from another thread (as another process would)."""
    got, done = threading.Event(), threading.Event()

    def hold():
        with file_lock(path):
            got.set()
            done.wait(60)

    t = threading.Thread(target=hold)
    t.start()
    assert got.wait(10)
    try:
        yield
    finally:
        done.set()
        t.join()


@pytest.fixture
def workdir(tmp_path):
    """runs r1 (oldest) .. r5 (newest), r0 in progress (oldest of all); cache entries k1..k5."""
    work = tmp_path / "work"
    cache = work / "cache" / "features"
    keys = {i: f"{i:x}" * 64 for i in range(1, 7)}
    for i in (1, 2, 3, 5, 6):
        _entry(cache, keys[i], 10 * KB)
    runs = {
        0: _run(work, "r0-running", 500, keys[6], cache),
        1: _run(work, "r1", 400, keys[1], cache, extra=20 * KB),
        2: _run(work, "r2", 300, keys[2], cache, extra=20 * KB),
        3: _run(work, "r3", 200, keys[2], cache, extra=20 * KB),  # same features as r2
        4: _run(work, "r4", 100, keys[3], cache, extra=20 * KB),
    }
    (runs[4] / ".evaluate.tmp-1234abcd").mkdir()  # left by a killed step
    (runs[4] / ".evaluate.tmp-1234abcd" / "x").write_bytes(b"x" * KB)
    # reuse index: pointers into r1 (pruned) and r4 (kept)
    idx = work / "index" / "fine-tune"
    idx.mkdir(parents=True)
    (idx / "fp-r1").write_text(str(runs[1] / "fine-tune"))
    (idx / "fp-r4").write_text(str(runs[4] / "fine-tune"))
    (idx / "fp-gone").write_text(str(tmp_path / "nowhere"))
    # checkpoints: finished step (fp-r4), abandoned crash (old), recent crash (resumable)
    ck = work / "checkpoints"
    for fp, age in (("fp-r4", 0), ("fp-old", 1000), ("fp-recent", 0)):
        (ck / fp / "fine-tune").mkdir(parents=True)
        (ck / fp / "fine-tune" / "epoch_001.pt").write_bytes(b"c" * KB)
        t = time.time() - age
        for p in (ck / fp / "fine-tune" / "epoch_001.pt", ck / fp / "fine-tune", ck / fp):
            os.utime(p, (t, t))
    staging = cache / keys[5][:2] / f".{keys[5]}.abcd1234"  # a killed writer's staging dir
    staging.mkdir()
    (staging / "features.npz").write_bytes(b"s" * KB)
    return work, runs, keys, cache


def _names(items, kind):
    return sorted(i.path.name for i in items if i.kind == kind)


def test_gc_keeps_newest_runs_and_what_they_reference(workdir):
    work, runs, keys, cache = workdir
    before = sorted(str(p.relative_to(work)) for p in work.rglob("*"))
    with held(runs[0] / ".lock"), held(cache / ".locks" / f"{keys[5]}.lock"):
        dry = collect(work, keep=2, dry_run=True)
        assert sorted(str(p.relative_to(work)) for p in work.rglob("*") if ".locks" not in str(p)) == [
            b for b in before if ".locks" not in b
        ]  # dry run: nothing touched
        rep = collect(work, keep=2)
    assert [(i.kind, i.path, i.bytes) for i in dry.deleted] == [(i.kind, i.path, i.bytes) for i in rep.deleted]
    assert sorted(rep.kept_runs) == ["r0-running", "r3", "r4"]  # 2 newest + the one in progress
    assert _names(rep.deleted, "run") == ["r1", "r2"]
    assert not runs[1].exists() and not runs[2].exists()
    assert runs[0].exists() and runs[3].exists() and runs[4].exists()
    # cache: k1 (only r1) goes; k2 (r3 still uses it), k3 (r4), k6 (running r0) stay; k5 is locked: skipped
    assert _names(rep.deleted, "cache-entry") == [keys[1]]
    for i in (2, 3, 5, 6):
        assert (cache / keys[i][:2] / keys[i] / "manifest.json").is_file(), i
    assert [i.path.name for i in rep.skipped if i.kind == "cache-entry"] == [keys[5]]
    assert [i.path.name for i in rep.skipped if i.kind == "cache-staging"] == [f".{keys[5]}.abcd1234"]  # same lock
    # index: the pointer into r1 and the dangling one go, r4's stays
    assert _names(rep.deleted, "index") == ["fp-gone", "fp-r1"]
    assert (work / "index" / "fine-tune" / "fp-r4").is_file()
    # checkpoints: finished step and abandoned crash go; a recent crash stays resumable
    assert _names(rep.deleted, "checkpoints") == ["fp-old", "fp-r4"]
    assert (work / "checkpoints" / "fp-recent").is_dir()
    assert _names(rep.deleted, "leftover") == [".evaluate.tmp-1234abcd"]
    # bytes, hard links counted once: r1 frees its 20 KiB model and its 10 KiB features (linked
    # only from k1, which goes too); k1 then frees just its manifest; r2's features stay linked
    # from k2 (kept), so r2 frees only its model; plus small manifests/config files
    by = {i.path.name: i.bytes for i in rep.deleted}
    assert 30 * KB <= by["r1"] < 31 * KB, by
    assert by[keys[1]] < KB, by
    assert 20 * KB <= by["r2"] < 21 * KB, by
    assert by["fp-old"] == by["fp-r4"] == KB and by[".evaluate.tmp-1234abcd"] == KB
    assert rep.freed == sum(by.values())
    lines = rep.lines()
    assert lines[-1].startswith("freed ") and f"({rep.freed} bytes)" in lines[-1]
    assert any(line.startswith("deleted run") and "r1" in line for line in lines)
    assert any(line.startswith("skipped cache-entry") and "entry lock held" in line for line in lines)

    # the locks are gone now: r0 has finished (it is the oldest: pruned, and its entry k6 with
    # it); the unreferenced entry k5 and the staging dir go too
    again = collect(work, keep=2)
    assert _names(again.deleted, "run") == ["r0-running"]
    assert _names(again.deleted, "cache-entry") == [keys[5], keys[6]]
    assert _names(again.deleted, "cache-staging") == [f".{keys[5]}.abcd1234"]
    assert not any(p.name.startswith(".gc-") for p in work.rglob("*"))


def test_gc_never_deletes_a_run_in_progress_even_with_keep_0(workdir):
    work, runs, keys, cache = workdir
    with held(runs[0] / ".lock"):
        rep = collect(work, keep=0)
    assert rep.kept_runs == ["r0-running"]
    assert runs[0].exists() and (cache / keys[6][:2] / keys[6]).exists()
    assert not any(runs[i].exists() for i in (1, 2, 3, 4))


def test_gc_cli_dry_run_and_errors(workdir):
    work, runs, keys, cache = workdir
    r = subprocess.run(
        [TLOPS, "gc", "--keep", "3", "--workdir", str(work), "--dry-run"], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    assert "would delete run" in r.stdout and "[dry run: nothing deleted]" in r.stdout
    assert all(runs[i].exists() for i in runs)
    r = subprocess.run([TLOPS, "gc", "--keep", "-1", "--workdir", str(work)], capture_output=True, text=True)
    assert r.returncode == 2 and "error: --keep: got -1" in r.stderr
    r = subprocess.run([TLOPS, "gc", "--keep", "1", "--workdir", str(work / "nope")], capture_output=True, text=True)
    assert r.returncode == 2 and "is not a directory" in r.stderr


def _backend_entry(store: Path, key: str, model: str | None, size: int, age_s: float = 0) -> Path:
    e = store / key[:2] / key
    e.mkdir(parents=True)
    (e / "model.onnx").write_bytes(b"o" * size)
    if model is not None:
        (e / "entry.json").write_text(json.dumps({"model_digest": model, "backend": "onnx"}))
    t = time.time() - age_s
    for p in (*e.iterdir(), e):
        os.utime(p, (t, t))
    return e


def test_gc_prunes_exported_backbones_no_kept_run_uses(workdir):
    """cache/backends: an export stays while a kept run pulled or extracted with its model (a run
    still extracting has only its pull-model manifest), goes with the last run that used it, is
    skipped while its lock is held; one without entry.json goes only when older than the kept runs;
    a killed exporter's staging dir goes; auto's decisions stay."""
    work, runs, keys, cache = workdir
    _manifest(runs[3] / "extract-features", "features", {"cache_keys": [keys[2]], "model_digest": "m-r3"})
    _manifest(runs[1] / "extract-features", "features", {"cache_keys": [keys[1]], "model_digest": "m-r1"})
    (runs[0] / "pull-model").mkdir()  # in progress: pulled, not extracted yet
    _manifest(runs[0] / "pull-model", "model", {"model_digest": "m-r0", "candidates": [{"model_digest": "m-cand"}]})
    store = work / "cache" / "backends"
    k = {n: f"{n}" * 64 for n in "abcdefg"}
    kept = _backend_entry(store, k["a"], "m-r3", 10 * KB)
    (kept / ".export-1234").mkdir()  # a killed exporter's
    (kept / ".export-1234" / "model.onnx").write_bytes(b"x" * KB)
    gone = _backend_entry(store, k["b"], "m-r1", 30 * KB)  # only r1 (pruned) used it
    running = _backend_entry(store, k["c"], "m-r0", KB)
    candidate = _backend_entry(store, k["d"], "m-cand", KB)
    legacy_old = _backend_entry(store, k["e"], None, 2 * KB, age_s=1000)
    legacy_new = _backend_entry(store, k["f"], None, KB)
    locked = _backend_entry(store, k["g"], "m-elsewhere", KB)
    (store / "auto").mkdir()
    (store / "auto" / "decision.json").write_text("{}")

    with held(runs[0] / ".lock"), held(store / ".locks" / f"{k['g']}.lock"):
        rep = collect(work, keep=2)
    assert _names(rep.deleted, "backend-model") == [k["b"], k["e"]]
    assert not gone.exists() and not legacy_old.exists()
    assert all(e.is_dir() for e in (kept, running, candidate, legacy_new, locked))
    assert _names(rep.deleted, "backend-staging") == [".export-1234"] and not (kept / ".export-1234").exists()
    assert (kept / "model.onnx").is_file() and (store / "auto" / "decision.json").is_file()
    assert [(i.kind, i.path.name) for i in rep.skipped if i.kind.startswith("backend")] == [("backend-model", k["g"])]
    by = {i.path.name: i for i in rep.deleted}
    assert 30 * KB <= by[k["b"]].bytes < 31 * KB and by[k["b"]].reason == "its model is not used by a kept run"
    assert by[k["e"]].reason == "no entry.json, older than the kept runs"
    assert any(line.startswith("deleted backend-model") and k["b"] in line for line in rep.lines())

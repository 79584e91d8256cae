"""Concurrent pipelines share the feature cache without corruption (real processes).

- local cache: the per-key lock makes one process compute and the others wait, then hit;
  forced here by holding the entry lock until both processes are waiting on it.
- S3 cache (moto server): no locks; both compute, both publish with plain PUTs, data first
  and manifest last; the entry ends up valid and both runs got identical features.
- two whole `tlops run` pipelines started at once: separate workdirs with one shared cache,
  and one shared workdir (step locks: every step computed once; MLflow store initialised once).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import digits_config

from tlops.artifacts import read_artifact

TLOPS = str(Path(sys.executable).parent / "tlops")


def _arrays(path: Path) -> dict[str, np.ndarray]:
    with np.load(path / "features.npz", allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _upstream(tmp_path: Path, cache_dir: str):
    from tlops.config import validate_config
    from tlops.features.cache import cache_key
    from tlops.steps import ingest, pull_model

    cfg = validate_config(digits_config(tmp_path / "work-up", features={"cache_dir": cache_dir}))
    ds = ingest.run(cfg, {}, tmp_path / "ingest")
    model = pull_model.run(cfg, {}, tmp_path / "pull")
    key = cache_key(model.meta["model_digest"], model.meta["preprocessing"], ds.content_hash)
    return {"dataset": ds.path, "model": model.path}, key


def _extract_cmds(tmp_path: Path, cache_dir: str, ins: dict[str, Path], n: int = 2) -> list[tuple[list[str], Path]]:
    """``n`` `tlops step extract-features` commands, each with its own workdir, one shared cache."""
    out = []
    for i in range(n):
        cfg = tmp_path / f"cfg{i}.yaml"
        cfg.write_text(yaml.safe_dump(digits_config(tmp_path / f"work{i}", features={"cache_dir": cache_dir})))
        dst = tmp_path / f"features{i}"
        cmd = [TLOPS, "step", "extract-features", "--config", str(cfg), "--out", str(dst)]
        cmd += [arg for k, v in ins.items() for arg in ("--in", f"{k}={v}")]
        out.append((cmd, dst))
    return out


def _start(cmds: list[tuple[list[str], Path]], tmp_path: Path) -> list[tuple[subprocess.Popen, Path]]:
    procs = []
    for i, (cmd, _) in enumerate(cmds):
        log = tmp_path / f"proc{i}.log"
        with open(log, "wb") as f:
            procs.append((subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=dict(os.environ)), log))
    return procs


def _wait_all(procs) -> list[str]:
    logs = []
    for p, log in procs:
        rc = p.wait(timeout=600)
        text = log.read_text()
        assert rc == 0, text[-3000:]
        logs.append(text)
    return logs


def test_two_processes_local_cache_one_computes_other_waits(tmp_path):
    from tlops.features.cache import FeatureCache
    from tlops.storage import file_lock

    root = tmp_path / "shared-cache"
    ins, key = _upstream(tmp_path, str(root))
    cmds = _extract_cmds(tmp_path, str(root), ins)
    cache = FeatureCache(root)
    # hold the entry lock until both processes wait on it: they then race for it
    release = threading.Event()
    holding = threading.Event()

    def holder() -> None:
        with file_lock(cache.lock_path(key)):
            holding.set()
            release.wait(600)

    t = threading.Thread(target=holder)
    t.start()
    assert holding.wait(30)
    procs = _start(cmds, tmp_path)
    try:
        deadline = time.monotonic() + 300
        while not all(b"waiting for feature cache entry" in log.read_bytes() for _, log in procs):
            assert all(p.poll() is None for p, _ in procs), [log.read_text()[-2000:] for _, log in procs]
            assert time.monotonic() < deadline, "processes never waited on the entry lock"
            time.sleep(0.05)
    finally:
        release.set()
        t.join()
    logs = _wait_all(procs)
    modes = sorted(read_artifact(dst, "features").meta["cache"] for _, dst in cmds)
    assert modes == ["hit", "miss"], modes  # exactly one computed; the other waited and hit
    a, b = (_arrays(dst) for _, dst in cmds)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    entries = [p.parent for p in root.rglob("manifest.json")]
    assert [e.name for e in entries] == [key]
    entry = read_artifact(entries[0], "feature-cache-entry")
    assert entry.content_hash == key
    np.testing.assert_array_equal(_arrays(entries[0])["train"], a["train"])
    assert not [p for p in root.glob("*/.*")], "staging leftovers in the cache"
    assert sum("got feature cache entry" in text for text in logs) == 2


@pytest.mark.slow
def test_two_processes_s3_cache_compute_identically(s3, tmp_path):
    from s3srv import BUCKET

    from tlops.storage import S3Storage

    root = f"s3://{BUCKET}/features"
    ins, key = _upstream(tmp_path, root)
    cmds = _extract_cmds(tmp_path, root, ins)
    logs = _wait_all(_start(cmds, tmp_path))  # started together; no locks on S3
    metas = [read_artifact(dst, "features").meta for _, dst in cmds]
    assert {m["cache_key"] for m in metas} == {key}
    a, b = (_arrays(dst) for _, dst in cmds)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    st = S3Storage()
    objs = [o["Key"] for o in st.client.list_objects_v2(Bucket=BUCKET, Prefix="features/").get("Contents", [])]
    assert objs == [f"features/{key[:2]}/{key}/features.npz", f"features/{key[:2]}/{key}/manifest.json"]
    import tempfile

    from tlops.features.cache import FeatureCache

    with tempfile.TemporaryDirectory() as d:
        FeatureCache(root).fetch(key, Path(d) / "f.npz")
        with np.load(Path(d) / "f.npz") as z:
            np.testing.assert_array_equal(z["train"], a["train"])
    print(
        f"\nS3 cache, two writers: {[m['cache'] for m in metas]}; "
        f"{sum('stored' in t for t in logs)} uploaded, entry valid"
    )


@pytest.mark.slow
def test_two_pipeline_runs_at_once_share_the_cache(tmp_path):
    """Two `tlops run` processes, same data and model, separate workdirs (own MLflow stores),
    one local feature cache: both finish, one entry, same features and same results."""
    root = tmp_path / "shared-cache"
    cfgs = []
    for i in range(2):
        c = tmp_path / f"run{i}.yaml"
        c.write_text(yaml.safe_dump(digits_config(tmp_path / f"work{i}", features={"cache_dir": str(root)})))
        cfgs.append(([TLOPS, "run", "--config", str(c)], tmp_path / f"work{i}"))
    logs = _wait_all(_start(cfgs, tmp_path))
    modes, accs = [], []
    for _, work in cfgs:
        (run,) = list((work / "runs").iterdir())
        modes.append(read_artifact(run / "extract-features", "features").meta["cache"])
        accs.append(read_artifact(run / "evaluate", "evaluation").meta["accuracy"])
    assert sorted(modes) == ["hit", "miss"], (
        modes
    )  # the entry lock: one computed, the other waited (or came later) and hit
    assert len({*accs}) == 1
    assert len(list(root.rglob("manifest.json"))) == 1
    print(f"\ntwo concurrent `tlops run`: cache {modes}, test accuracy {accs}")
    assert all("pipeline" in t for t in logs)


@pytest.mark.slow
def test_two_pipeline_runs_at_once_same_workdir(tmp_path):
    """Two `tlops run` processes on one workdir (shared MLflow sqlite store, index and cache):
    every reusable step is computed once (the other run waits on the step lock and reuses it),
    the fresh store is initialised once, both runs finish with the same results."""
    from tlops.dag import DAG

    c = tmp_path / "run.yaml"
    c.write_text(yaml.safe_dump(digits_config(tmp_path / "work")))
    logs = _wait_all(_start([([TLOPS, "run", "--config", str(c)], tmp_path)] * 2, tmp_path))
    for spec in DAG:
        n = sum(text.count(f"INFO    {spec.name}: running") for text in logs)
        assert n == (1 if spec.reusable else 2), (spec.name, n)
    runs = list((tmp_path / "work" / "runs").iterdir())
    assert len(runs) == 2
    accs = {read_artifact(r / "evaluate", "evaluation").meta["accuracy"] for r in runs}
    assert len(accs) == 1
    assert len(list((tmp_path / "work" / "cache").rglob("manifest.json"))) == 1
    waits = sum(text.count("waiting for") for text in logs)
    print(f"\ntwo `tlops run` on one workdir: {waits} lock waits, test accuracy {accs}")

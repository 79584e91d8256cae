"""Soak: 20 pipeline runs back to back in one process and one workdir, reusing caches.

Checks that nothing grows that should not: open file descriptors, RSS, and disk outside the
expected per-run outputs (a run dir of hard links and small files; a full rerun writes a
fresh copy of its artifacts). Then `tlops gc --keep 3` prunes it back and the next run still
reuses every reusable step. Prints the counts.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

import pytest
from conftest import digits_config

RUNS = 20
FULL_RERUNS = {10, 20}  # --no-reuse: every step runs again (feature cache hit, fresh artifacts)
MiB = 1024 * 1024


def disk(work: Path) -> dict[str, int]:
    """Bytes per top-level area of the workdir, each file (inode) counted once."""
    seen: set[tuple[int, int]] = set()
    out: dict[str, int] = defaultdict(int)
    for p in sorted(work.rglob("*")):
        st = p.lstat()
        if p.is_dir() or (st.st_dev, st.st_ino) in seen:
            continue
        seen.add((st.st_dev, st.st_ino))
        top = p.relative_to(work).parts[0]
        area = "mlflow" if top in ("mlflow.db", "mlartifacts") or top.startswith("mlflow.db") else top
        out[area] += st.st_size
    return dict(out)


def files_in(work: Path, area: str) -> int:
    d = work / area
    return sum(1 for p in d.rglob("*") if p.is_file()) if d.exists() else 0


@pytest.mark.slow
def test_twenty_runs_reusing_caches_do_not_leak(tmp_path):
    import psutil

    from tlops.config import validate_config
    from tlops.dag import DAG
    from tlops.gc import collect
    from tlops.runners.local import run_pipeline

    work = tmp_path / "work"
    cfg = validate_config(digits_config(work))
    proc = psutil.Process()
    rows = []
    for i in range(1, RUNS + 1):
        full = i in FULL_RERUNS
        res = run_pipeline(cfg, run_id=f"soak-{i:02d}", reuse=not full)
        assert all((res.run_dir / s.name / "manifest.json").is_file() for s in DAG)
        reused = sorted(n for n, s in res.steps.items() if s.reused)
        if i > 1 and not full:
            assert reused == sorted(s.name for s in DAG if s.reusable), reused
        if full:
            assert res.artifact("extract-features").meta["cache"] == "hit"
        rows.append(
            {
                "run": i,
                "full": full,
                "fds": len(os.listdir("/proc/self/fd")),
                "rss": proc.memory_info().rss,
                "disk": disk(work),
                "index": files_in(work, "index"),
                "locks": files_in(work, "locks"),
                "reused": len(reused),
                "secs": res.seconds,
            }
        )
    print("\nrun full reused  fds  rss(MiB)  runs(KiB)  cache(KiB) mlflow(KiB) index locks  secs")
    for r in rows:
        d = r["disk"]
        print(
            f"{r['run']:3} {'yes' if r['full'] else '   ':4} {r['reused']:6} {r['fds']:4} {r['rss'] / MiB:9.1f} "
            f"{d.get('runs', 0) / 1024:10.0f} {d.get('cache', 0) / 1024:11.0f} {d.get('mlflow', 0) / 1024:11.0f} "
            f"{r['index']:5} {r['locks']:5} {r['secs']:5.1f}"
        )

    warm = rows[2]  # after two runs: imports, MLflow's connection pool and caches are warm
    last = rows[-1]
    assert last["fds"] - warm["fds"] <= 2, [r["fds"] for r in rows]
    assert last["rss"] - warm["rss"] < 150 * MiB, [round(r["rss"] / MiB) for r in rows]
    # nothing outside the run dirs and the MLflow store grows: the cache holds one entry; a
    # reusing run adds no index entry or lock (a full rerun may add one per step whose inputs'
    # content hashes changed, e.g. a retrained model's history has new timings); no checkpoints
    # or temp leftovers
    for prev, r in zip(rows, rows[1:], strict=False):
        assert r["disk"].get("cache", 0) == rows[0]["disk"].get("cache", 0)
        if not r["full"]:
            assert (r["index"], r["locks"]) == (prev["index"], prev["locks"]), r["run"]
        else:
            assert r["index"] - prev["index"] <= 2 and r["locks"] - prev["locks"] <= 2, r["run"]
    print("index entries per step:", {d.name: len(list(d.iterdir())) for d in sorted((work / "index").iterdir())})
    assert not (work / "checkpoints").exists() or not any((work / "checkpoints").iterdir())
    assert not [p for p in work.rglob(".*") if any(m in p.name for m in (".tmp-", ".old-", ".reuse-"))]
    # the run dirs: a reusing run adds only small files (its artifacts are hard links)
    first_run = rows[0]["disk"]["runs"]
    for prev, r in zip(rows, rows[1:], strict=False):
        grew = r["disk"]["runs"] - prev["disk"]["runs"]
        assert grew <= (first_run * 1.1 if r["full"] else 512 * 1024), (r["run"], grew)
    assert len(list((work / "runs").iterdir())) == RUNS

    # retention: keep the 3 newest runs; reuse keeps working afterwards
    before = disk(work)
    rep = collect(work, keep=3)
    after = disk(work)
    assert sorted(rep.kept_runs) == [f"soak-{i:02d}" for i in (18, 19, 20)]
    assert len([i for i in rep.deleted if i.kind == "run"]) == RUNS - 3
    assert before["runs"] - after["runs"] == pytest.approx(
        sum(i.bytes for i in rep.deleted if i.kind == "run"), abs=4096
    )
    res = run_pipeline(cfg, run_id="soak-after-gc")
    assert sorted(n for n, s in res.steps.items() if s.reused) == sorted(s.name for s in DAG if s.reusable)
    print(
        f"gc --keep 3: deleted {len(rep.deleted)} items, freed {rep.freed / MiB:.1f} MiB "
        f"(runs {before['runs'] / MiB:.1f} -> {after['runs'] / MiB:.1f} MiB); the next run reused "
        f"{sum(s.reused for s in res.steps.values())} steps"
    )

"""Section 2 of bench/perf.py: the feature cache (a miss vs a hit of the extract-features step) and a whole
``tlops run`` twice with unchanged inputs."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import REPO, SHARED_DATA, yelp_extract_config
from perf_setup import MAX_LENGTH, PASSES, TEXT_BS, child_env, med

# =============================================================================== 2. cache + e2e


def bench_cache(args, sz) -> dict[str, Any]:
    import numpy as np

    from tlops.features import extract as extract_mod
    from tlops.steps import extract_features, ingest, pull_model

    yelp = SHARED_DATA / "sentiment_labelled_sentences" / "yelp_labelled.txt"
    reps = max(2, min(args.repeats, 3))
    with tempfile.TemporaryDirectory(prefix="tlops-perf-cache-") as tmp:
        tmp = Path(tmp)

        def config(cache_dir: Path):
            return yelp_extract_config(tmp / "work", "perf-cache", cache_dir, TEXT_BS, MAX_LENGTH)

        cfg0 = config(tmp / "c")
        inputs = {"dataset": ingest.run(cfg0, {}, tmp / "ingest"), "model": pull_model.run(cfg0, {}, tmp / "pull")}
        miss, hit, same, forwards = [], [], True, 0
        for r in range(reps):
            cfg = config(tmp / f"cache-{r}")
            dt1, a1 = PASSES.timed("cache/miss", extract_features.run, cfg, inputs, tmp / f"r{r}a")
            before = extract_mod.STATS["backbone_batches"]
            dt2, a2 = PASSES.timed("cache/hit", extract_features.run, cfg, inputs, tmp / f"r{r}b")
            forwards += extract_mod.STATS["backbone_batches"] - before
            assert (a1.meta["cache"], a2.meta["cache"]) == ("miss", "hit"), (a1.meta["cache"], a2.meta["cache"])
            with np.load(a1.path / "features.npz") as z1, np.load(a2.path / "features.npz") as z2:
                same = same and all(np.array_equal(z1[k], z2[k]) for k in z1.files)
            miss.append(dt1)
            hit.append(dt2)
            print(f"  cache | {r + 1}/{reps}: miss {dt1:.2f} s, hit {dt2:.3f} s", flush=True)
    out = {
        "miss": miss,
        "hit": hit,
        "ratio": med(miss) / med(hit),
        "identical": same,
        "forwards_on_hit": forwards,
        "n": sum(inputs["dataset"].meta["counts"].values()),
    }

    # ------------------------------------------------------------------ e2e: `tlops run` twice, demo and text config
    env = child_env()
    e2e_configs = {"e2e": ("digits_source.yaml", [f"train.epochs={sz['e2e_epochs']}"])}
    # --quick trains one epoch, too few for the demo's accuracy gate: the run is timed, not judged.
    flags = ["--no-fail-on-gates"] if args.quick else []
    if not args.quick:
        e2e_configs["e2e_text"] = ("sentiment.yaml", [f"data.source={yelp}"])
    for key, (config, sets) in e2e_configs.items():
        out[key] = _e2e_twice(config, sets, env, key, flags)
    out["import_s"] = _time_heavy_imports(env)
    return out


def _e2e_twice(config: str, sets: list[str], env: dict[str, str], series: str, flags: list[str]) -> dict[str, Any]:
    """``tlops run`` (the CLI, local runner) twice with unchanged inputs in a fresh workdir."""
    tlops_cli = Path(sys.executable).parent / "tlops"
    with tempfile.TemporaryDirectory(prefix="tlops-perf-e2e-") as tmp:
        cmd = [str(tlops_cli), "run", "--config", str(REPO / "configs" / config), "--set", f"workdir={tmp}/work"]
        for s in sets:
            cmd += ["--set", s]
        cmd += flags
        runs, inside = [], []
        for i in range(2):
            dt, proc = PASSES.timed(
                f"{series}/run{i + 1}", subprocess.run, cmd, cwd=REPO, env=env, capture_output=True, text=True
            )
            if proc.returncode != 0:
                raise RuntimeError(
                    f"tlops run failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
                )
            runs.append(dt)
            m = re.search(r"pipeline \S+: done in ([0-9.]+)s", proc.stdout + proc.stderr)
            inside.append(float(m.group(1)) if m else None)
            reused = re.search(r"done in [0-9.]+s \(([^)]*) reused\)", proc.stdout + proc.stderr)
            print(
                f"  {series} | tlops run {config} #{i + 1}: {dt:.1f} s (steps, from the runner's log: {inside[-1]} s; "
                f"reused: {reused.group(1) if reused else 'none'})",
                flush=True,
            )
    shown = ["tlops", "run", "--config", f"configs/{config}", "--set", "workdir=<tmp>"]
    for s in sets:
        shown += ["--set", s.replace(str(SHARED_DATA), "<shared>/data")]
    shown += flags
    return {
        "first": runs[0],
        "second": runs[1],
        "fraction": runs[1] / runs[0],
        "command": shlex.join(shown),
        "steps_seconds": inside,
        "reused_second": reused.group(1) if reused else "",
    }


def _time_heavy_imports(env) -> float:
    """Seconds for a fresh interpreter to import what a fully reused ``tlops run`` needs (MLflow and the runner;
    no torch)."""
    code = "import mlflow, tlops.cli, tlops.runners.local"
    best = float("inf")
    for _ in range(2):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, cwd=REPO, check=True)
        best = min(best, time.perf_counter() - t0)
    return best

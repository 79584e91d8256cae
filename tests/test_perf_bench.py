"""bench/gpu.sh without a GPU, bench/perf.py flags, and a slow smoke run of `bench/perf.py --quick`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    return env | extra


def test_gpu_sh_without_gpu_exits_cleanly_with_a_message():
    # CUDA_VISIBLE_DEVICES="" hides any GPU, so this checks the no-GPU path on every machine
    proc = subprocess.run(
        ["bash", str(REPO / "bench" / "gpu.sh")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(CUDA_VISIBLE_DEVICES="", PYTHON=sys.executable),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no CUDA GPU detected" in proc.stdout and "skipping the GPU benchmark" in proc.stdout
    assert "==" not in proc.stdout, "nothing was run"


def test_perf_py_cuda_without_gpu_is_a_no_op(tmp_path):
    proc = subprocess.run(
        [sys.executable, "bench/perf.py", "--device", "cuda", "--out", str(tmp_path / "x")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(CUDA_VISIBLE_DEVICES=""),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no CUDA device is visible" in proc.stdout
    assert not list(tmp_path.iterdir())


def test_perf_py_rejects_unknown_section():
    proc = subprocess.run(
        [sys.executable, "bench/perf.py", "--only", "extract,warp"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "unknown section(s) warp" in proc.stderr


def _run_quick(script: str, out: Path, timeout: int) -> None:
    """``script --quick --out out`` from the repo root; it must exit 0."""
    proc = subprocess.run(
        [sys.executable, script, "--quick", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_env(TOKENIZERS_PARALLELISM="false"),
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


@pytest.mark.slow
def test_perf_quick_runs_every_section_and_writes_results(tmp_path):
    out = tmp_path / "perf-quick"
    _run_quick("bench/perf.py", out, timeout=1500)
    md = out.with_suffix(".md").read_text()
    for heading in (
        "### 1. Feature extraction",
        "### 2. Cache",
        "### 3. Fine-tuning",
        "### 4. Memory",
        "### 5. Scaling",
        "### Headline ratios",
        "load average",
        "other processes",
    ):
        assert heading in md, heading
    res = json.loads(out.with_suffix(".json").read_text())
    r = res["results"]
    assert {"extract", "cache", "finetune", "memory", "scaling"} <= r.keys()
    for row in r["extract"]["rows"]:
        assert row["max_abs_diff"] < 1e-3, row["workload"]  # both sides compute the same features
        assert row["naive"]["items_s"] > 0 and row["tlops"]["items_s"] > 0
    assert r["cache"]["forwards_on_hit"] == 0 and r["cache"]["identical"]
    assert r["cache"]["e2e"]["second"] > 0
    assert {"tlops fine_tune", "Trainer, dynamic padding (default collator)"} <= r["finetune"]["text"]["sides"].keys()
    assert all(s["slope"] == s["slope"] for s in r["scaling"].values())  # not NaN
    assert all(p["other_cpu"] is None or 0 <= p["other_cpu"] <= 1 for p in res["passes"])


@pytest.mark.slow
def test_gpu_sh_dry_run_runs_every_stage_on_the_cpu(tmp_path):
    """GPU_BENCH_DRY_RUN=1: the GPU script's four stages with their real flags, on the CPU at --quick sizes
    into a temp dir (a GPU is lent to some tasks only: the script must work the first time it gets one)."""
    proc = subprocess.run(
        ["bash", str(REPO / "bench" / "gpu.sh")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1500,
        env=_env(
            CUDA_VISIBLE_DEVICES="",
            PYTHON=sys.executable,
            GPU_BENCH_DRY_RUN="1",
            GPU_BENCH_BUDGET="1200",
            TMPDIR=str(tmp_path),
        ),
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "dry run on the CPU" in out
    for stage, flags in (
        ("fp32", "--device cpu --only extract,finetune"),
        ("bf16", "--amp bf16 --channels-last"),
        ("compile", "--amp bf16 --channels-last --compile"),
        ("compile-backend", "bench/perf_compile.py --device cpu"),
    ):
        assert f"== {stage} (limit " in out and flags in out, (stage, out[-3000:])
    (run_dir,) = tmp_path.glob("tlops-gpu-dry-run.*")
    assert (run_dir / "perf-gpu-fp32.md").is_file() and "Headline ratios" in out
    assert not list((REPO / "bench" / "results").glob("perf-gpu-*"))  # nothing written into the repo


@pytest.mark.slow
def test_perf_trainer_quick_reports_the_floor_checkpoint_times_and_steps_per_seed(tmp_path):
    out = tmp_path / "trainer.md"
    _run_quick("bench/perf_trainer.py", out, timeout=900)
    res = json.loads(out.with_suffix(".json").read_text())["results"]
    sides = res["series"]["throughput"]["sides"]
    assert set(sides) == {
        "tlops fine_tune",
        "Trainer: group_by_length + fused AdamW",
        "bare loop (the same math, nothing else: the floor)",
    }
    for name in ("tlops fine_tune", "Trainer: group_by_length + fused AdamW"):
        assert all(s > 0 for s in sides[name]["checkpoint_s"])  # one checkpoint per epoch on both sides
    (row,) = res["steps_to_target"]  # --quick: one seed
    assert row["seed"] == 0 and set(row) == {"seed", "tlops fine_tune", "Trainer: group_by_length + fused AdamW"}
    md = out.read_text()
    assert "- why: the bare loop" in md and "writing the per-epoch checkpoints" in md and "- why, time to 0.80" in md

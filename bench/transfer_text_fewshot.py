"""Setting 2 of bench/transfer_text.py: in-domain few-shot sentiment (frozen probe, SetFit, full fine-tune)."""

from __future__ import annotations

import math
import tempfile
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import timed
from torch import nn
from transfer_text_encoder import clf_acc, head_acc, minilm, probe
from transfer_text_setup import Progress, load_uci

from tlops.config import SetFitConfig, TrainConfig
from tlops.data.dataset import Split
from tlops.features.extract import extract
from tlops.models.bundle import Classifier
from tlops.training.finetune import fine_tune
from tlops.training.probe import train_probe
from tlops.training.setfit import contrastive_tune

# --------------------------------------------------------------------------- setting 2: few-shot


def run_fewshot(
    domains: list[str],
    shots: list[int],
    seeds: list[int],
    methods: list[str],
    hp: dict[str, Any],
    limit: int | None,
    progress: Progress,
    threads: int,
) -> dict[str, Any]:
    """Every domain x shots x seed x method; finished results go to ``progress`` at once. ``threads``: for
    fine_tune."""
    max_len = hp["uci_max_length"]
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    sizes: dict[str, dict[str, int]] = {}
    errors: list[dict[str, Any]] = []
    for d in domains:
        texts, y = load_uci(d)
        if limit:
            sel = np.sort(np.random.default_rng(99).permutation(len(y))[:limit])
            texts, y = [texts[i] for i in sel], y[sel]
        feats, emb_dt, _, _ = timed(_embed, max_len, texts, f"frozen {d}")
        print(f"[fewshot] encoded {d}: {len(y)} sentences in {emb_dt:.0f}s", flush=True)
        for k in shots:
            task = f"{d}-{k}"
            runs[task] = {m: [] for m in methods}
            for seed in seeds:
                rng = np.random.default_rng(seed)
                perm = rng.permutation(len(y))
                pool, test = perm[: len(y) // 2], perm[len(y) // 2 :]
                tr = np.concatenate([pool[y[pool] == c][:k] for c in (0, 1)])
                sizes[task] = {"train": len(tr), "test": len(test), "pool": len(pool)}
                train = Split([texts[i] for i in tr], y[tr])
                test_x, test_y = [texts[i] for i in test], y[test]
                (p_head, _), p_dt, p_other, p_cpu = timed(
                    train_probe, feats[tr], y[tr], None, None, 2, TrainConfig(), seed
                )
                for method in methods:
                    done = progress.get("fewshot", task, method, seed)
                    if done is not None:
                        runs[task][method].append(done)
                        print(
                            f"[fewshot] {d} {k}-shot seed {seed} {method:12s} acc {done['acc'] * 100:5.1f} (from the "
                            "partial file)",
                            flush=True,
                        )
                        continue
                    try:
                        if method == "frozen-probe":
                            res = {
                                "acc": head_acc(p_head, feats[test], test_y),
                                "seconds": p_dt,
                                "other_cpu": p_other,
                                "cpu_seconds": p_cpu,
                            }
                        elif method == "setfit":
                            res = _setfit(train, test_x, test_y, k, seed, hp, max_len)
                        else:
                            res = _few_ft(train, test_x, test_y, p_head, seed, hp, max_len, threads)
                    except Exception as e:
                        traceback.print_exc()
                        errors.append(
                            {"task": task, "method": method, "seed": seed, "error": f"{type(e).__name__}: {e}"}
                        )
                        continue
                    res["seed"] = seed
                    runs[task][method].append(res)
                    progress.put(res, "fewshot", task, method, seed)
                    print(
                        f"[fewshot] {d} {k}-shot seed {seed} {method:12s} acc {res['acc'] * 100:5.1f}  "
                        f"{res['seconds']:6.1f}s [{res['cpu_seconds']:.0f} CPU s] "
                        f"(other procs {0 if res['other_cpu'] is None else res['other_cpu'] * 100:.0f}% CPU)",
                        flush=True,
                    )
    return {"tasks": runs, "sizes": sizes, "errors": errors}


def _embed(max_len: int, texts: list[str], desc: str) -> np.ndarray:
    """Frozen embeddings of ``texts`` by a fresh copy of the encoder (the copy counts in the timing)."""
    return extract(minilm(max_len), texts, 64, desc=desc)


def _setfit(
    train: Split, test_x: list[str], test_y: np.ndarray, k: int, seed: int, hp: dict[str, Any], max_len: int
) -> dict[str, Any]:
    pairs = hp["setfit_pairs_8"] if k <= 8 else hp["setfit_pairs_64"]
    cfg = SetFitConfig(
        pairs_per_sample=pairs, epochs=hp["setfit_epochs"], batch_size=hp["setfit_batch"], lr=hp["setfit_lr"]
    )
    torch.manual_seed(seed)
    clf = Classifier(minilm(max_len), 2)

    def go():
        h = contrastive_tune(clf, train, cfg, seed)
        head = probe(extract(clf.backbone, train.x, 64, desc="setfit train"), train.y, None, None, seed)
        clf.head.load_state_dict(head.state_dict())
        return h

    hist, dt, other, cpu = timed(go)
    return {
        "acc": clf_acc(clf, test_x, test_y),
        "seconds": dt,
        "other_cpu": other,
        "cpu_seconds": cpu,
        "pairs": hist[-1]["pairs"],
        "pair_loss": [round(h["pair_loss"], 5) for h in hist],
    }


def _few_ft(
    train: Split,
    test_x: list[str],
    test_y: np.ndarray,
    p_head: nn.Linear,
    seed: int,
    hp: dict[str, Any],
    max_len: int,
    threads: int,
) -> dict[str, Any]:
    steps_per_epoch = math.ceil(len(train) / hp["few_ft_batch"])
    epochs = max(1, round(hp["few_ft_steps"] / steps_per_epoch))
    cfg = TrainConfig(
        threads=threads, epochs=epochs, batch_size=hp["few_ft_batch"], lr=hp["few_ft_lr"], head_lr=hp["few_ft_head_lr"]
    )
    torch.manual_seed(seed)
    clf = Classifier(minilm(max_len), 2)
    clf.head.load_state_dict(p_head.state_dict())
    with tempfile.TemporaryDirectory(prefix="tlops-bench-") as tmp:
        hist, dt, other, cpu = timed(fine_tune, clf, train, None, cfg, seed, Path(tmp), frozen_k=0, name="few-ft")
    return {
        "acc": clf_acc(clf, test_x, test_y),
        "seconds": dt,
        "other_cpu": other,
        "cpu_seconds": cpu,
        "epochs": epochs,
        "selected_epoch": max(hist, key=lambda h: (h["train_acc"], -h["train_loss"]))["epoch"],
    }

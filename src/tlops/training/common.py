"""Seeding, history files and training-curve plots shared by the trainers."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, numpy and torch (threads are the runtime's business: ``Runtime.apply_threads``)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def save_history(d: Path, history: list[dict[str, Any]], title: str) -> None:
    (d / "history.json").write_text(json.dumps(history, indent=2))
    if not history:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    for key in ("train_loss", "val_loss", "source_val_loss", "transfer_loss"):
        if key in history[0]:
            a.plot(epochs, [h[key] for h in history], label=key)
    for key in ("train_acc", "val_acc", "source_val_acc"):
        if key in history[0]:
            b.plot(epochs, [h[key] for h in history], label=key)
    a.set_xlabel("epoch"), b.set_xlabel("epoch"), a.legend(), b.legend()
    a.set_title(f"{title}: loss"), b.set_title(f"{title}: accuracy")
    fig.tight_layout()
    fig.savefig(d / "curves.png", dpi=80)
    plt.close(fig)

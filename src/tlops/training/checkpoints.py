"""Per-epoch checkpoints of a training loop, and exact resume from them.

A loop saves its state after every epoch (the newest two files are kept); a rerun of the same
loop (same name, same number of epochs) resumes from the newest readable one, so a killed step
loses at most one epoch. Each checkpoint also holds the global RNG states (Python, numpy, torch,
CUDA), so a resumed run ends with the same weights as an uninterrupted one. Where they go is
the runtime's business (:meth:`tlops.training.runtime.Runtime.checkpoints`): a stable directory
under the workdir when the runner gives one, else inside the step's output.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tlops.training.runtime import Runtime

log = logging.getLogger(__name__)
KEEP_CHECKPOINTS = 2
# state that only continuing the loop needs: the last epoch's checkpoint (or an early-stopped one) leaves
# it out, as nothing continues from there (a resumed run with nothing left to train only needs the
# weights, history and RNGs; a run with more epochs does not resume from it). For MiniLM-L6 the
# AdamW moments are two thirds of a checkpoint's bytes.
RESUME_ONLY = ("optimizer", "scheduler")


@contextlib.contextmanager
def _without_crc32():
    """``torch.save`` without the zip's CRC-32 of every tensor (PyTorch's
    ``torch.utils.serialization.config.save.compute_crc32``). Checksumming every tensor is a large
    part of a checkpoint's cost (MiniLM-L6's model and AdamW state, about 270 MB, is written every
    epoch; bench/perf_trainer.py times the writes). These files only serve resume: a file cut short
    (killed writer, full disk) still fails to load (the zip's central directory is at its end) and
    the loop then falls back to the older one; registered models are safetensors with their own
    digests."""
    from torch.utils.serialization import config

    old = config.save.compute_crc32
    config.save.compute_crc32 = False
    try:
        yield
    finally:
        config.save.compute_crc32 = old


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "gauss": float(np_state[4]),
        },
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpoints:
    """The checkpoints of one loop (``name``) that trains for ``epochs`` epochs."""

    def __init__(self, runtime: Runtime, out_dir: Path, name: str, epochs: int):
        self.dir, self.resumable = runtime.checkpoints(out_dir, name)
        self.name, self.epochs = name, epochs
        self.writer = runtime.is_main  # DDP: rank 0 writes, every rank may resume

    def save(self, epoch: int, state: dict[str, Any], *, final: bool = False) -> None:
        """Write ``epoch_NNN.pt`` atomically (unique temp name: two writers never share a temp file);
        ``final`` (or the last epoch): the loop ends here, so ``RESUME_ONLY`` state is stored as None."""
        if not self.writer:
            return
        if final or epoch >= self.epochs:
            state = {**state, **{k: None for k in RESUME_ONLY if k in state}}
        path = self.dir / f"epoch_{epoch:03d}.pt"
        tmp = self.dir / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
        ckpt = {"epoch": epoch, "name": self.name, "epochs": self.epochs, "rng": rng_state(), **state}
        try:
            with _without_crc32():
                torch.save(ckpt, tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        for old in sorted(self.dir.glob("epoch_*.pt"))[:-KEEP_CHECKPOINTS]:
            old.unlink(missing_ok=True)

    def load(self) -> dict[str, Any] | None:
        """The newest readable checkpoint of this loop, with the global RNGs restored from it;
        None to start from scratch (none, or they belong to another run)."""
        if not self.resumable:
            return None
        for stale in self.dir.glob(".epoch_*.tmp"):  # a temp file of a killed writer
            stale.unlink(missing_ok=True)
        for path in sorted(self.dir.glob("epoch_*.pt"), reverse=True):
            try:
                ckpt = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001 - unreadable (e.g. truncated by a full disk): try an older one
                log.warning(
                    "%s: checkpoint %s is unreadable (%s: %s); trying an older one",
                    self.name,
                    path,
                    type(e).__name__,
                    e,
                )
                continue
            if (
                "rng" not in ckpt
                or ckpt.get("epochs") != self.epochs
                or ckpt.get("name") != self.name
                or ckpt["epoch"] > self.epochs
            ):
                log.warning(
                    "%s: checkpoint %s does not match this training run; starting from scratch", self.name, path
                )
                return None
            set_rng_state(ckpt["rng"])
            log.info("%s: resuming from epoch %d of %d (checkpoint %s)", self.name, ckpt["epoch"], self.epochs, path)
            return ckpt
        return None

    def export(self, dst: Path) -> None:
        """Link the kept checkpoints into the artifact (``dst``), as in the non-resumable layout."""
        if not (self.resumable and self.writer):
            return
        from tlops.artifacts import link_or_copy

        dst.mkdir(parents=True, exist_ok=True)
        for p in sorted(self.dir.glob("epoch_*.pt"))[-KEEP_CHECKPOINTS:]:
            if not (dst / p.name).exists():
                link_or_copy(p, dst / p.name)

"""The dataset artifact: splits on disk plus a label map, readable by every later step."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tlops.artifacts import Artifact, read_artifact


@dataclass
class Split:
    x: Any  # uint8 array for images, list[str] for text
    y: np.ndarray  # int64 class indices (-1 for unlabelled)

    def __len__(self) -> int:
        return len(self.y)


def write_split(root: Path, name: str, kind: str, x: Any, y: np.ndarray) -> None:
    d = root / "splits"
    d.mkdir(exist_ok=True)
    if kind == "image":
        np.savez(d / f"{name}.npz", x=np.asarray(x, dtype=np.uint8), y=np.asarray(y, dtype=np.int64))
    else:
        with open(d / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for t, label in zip(x, y, strict=True):
                f.write(json.dumps({"text": t, "y": int(label)}, ensure_ascii=False) + "\n")


@dataclass
class Dataset:
    artifact: Artifact

    @classmethod
    def open(cls, path: str | Path) -> "Dataset":
        return cls(read_artifact(path, kind="dataset"))

    @property
    def kind(self) -> str:
        return self.artifact.meta["modality"]

    @property
    def classes(self) -> list[str]:
        return self.artifact.meta["classes"]

    @property
    def data_hash(self) -> str:
        return self.artifact.meta["data_hash"]

    @property
    def content_hash(self) -> str:
        return self.artifact.content_hash

    def splits(self) -> list[str]:
        return [s for s, n in self.artifact.meta["counts"].items() if n > 0]

    def load(self, name: str) -> Split:
        d = self.artifact.path / "splits"
        if self.kind == "image":
            with np.load(d / f"{name}.npz", allow_pickle=False) as z:
                return Split(z["x"], z["y"])
        rows = [json.loads(line) for line in (d / f"{name}.jsonl").read_text(encoding="utf-8").split("\n") if line]
        return Split([r["text"] for r in rows], np.array([r["y"] for r in rows], dtype=np.int64))

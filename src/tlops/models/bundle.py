"""Model bundle directories: ``bundle.json`` + backbone weights (+ head and label map).

A *source model* bundle has a backbone only; a *trained model* bundle adds a linear head and
its classes. Bundles load with ``safetensors`` only (never pickle).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from tlops.errors import ModelError
from tlops.hashing import hash_dir, hash_file, hash_json
from tlops.models.backbone import BACKBONES as SINGLE_KINDS
from tlops.models.bundle_files import BUNDLE_FILE, read_spec
from tlops.models.stack import StackBackbone

BACKBONES = {**SINGLE_KINDS, "stack": StackBackbone}  # bundle kind -> backbone class


def weights_digest(d: Path, spec: dict[str, Any]) -> str:
    """sha256 over the backbone weights (and the head, when the bundle has one)."""
    target = d / spec["weights"]
    backbone = hash_dir(target) if target.is_dir() else hash_file(target)
    if spec.get("adapter"):
        backbone = hash_json([backbone, hash_dir(d / spec["adapter"])])
    if "head" not in spec:
        return backbone
    return hash_json([backbone, hash_file(d / spec["head"]), spec.get("classes")])


class Classifier(nn.Module):
    """Backbone + linear head. ``predict_proba`` takes raw inputs (strings or uint8 images)."""

    def __init__(self, backbone: nn.Module, num_classes: int, classes: Sequence[str] | None = None):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.feature_dim, num_classes)
        self.classes = list(classes) if classes is not None else [str(i) for i in range(num_classes)]

    def forward(self, **tensors: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(**tensors))

    @torch.inference_mode()
    def predict_proba(self, x: Any, batch_size: int = 64) -> np.ndarray:
        from tlops.features.extract import batches_for

        was_training = self.training
        self.eval()
        n = len(x)
        out = np.zeros((n, len(self.classes)), dtype=np.float32)
        for idx in batches_for(self.backbone, x, batch_size):
            xb = x[idx] if isinstance(x, np.ndarray) else [x[i] for i in idx]
            logits = self(**self.backbone.prepare(xb))
            out[idx] = torch.softmax(logits.float(), -1).numpy()
        self.train(was_training)
        return out


def save_bundle(
    d: Path,
    backbone: nn.Module,
    *,
    head: nn.Linear | None = None,
    classes: Sequence[str] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    from safetensors.torch import save_file

    d.mkdir(parents=True, exist_ok=True)
    spec = backbone.save(d)
    spec.update(
        {
            "format": "tlops-bundle",
            "version": 1,
            "preprocessing": backbone.preprocessing,
            "feature_dim": backbone.feature_dim,
        }
    )
    if head is not None:
        save_file(
            {"weight": head.weight.detach().contiguous(), "bias": head.bias.detach().contiguous()},
            str(d / "head.safetensors"),
        )
        spec["head"] = "head.safetensors"
        spec["classes"] = list(classes or [])
    spec.update(extra or {})
    spec["digest"] = weights_digest(d, spec)
    (d / BUNDLE_FILE).write_text(json.dumps(spec, indent=2))
    return spec


def load_backbone(d: str | Path, random_init: bool = False) -> nn.Module:
    d = Path(d)
    spec = read_spec(d)
    kind = spec.get("kind")
    if kind not in BACKBONES:
        raise ModelError(f"{d}: unknown backbone kind '{kind}'; known kinds: {', '.join(BACKBONES)}")
    try:
        return BACKBONES[kind].load(d, spec, random_init=random_init)
    except (OSError, FileNotFoundError) as e:
        raise ModelError(f"{d}: cannot load the backbone weights ({e}); the bundle is incomplete") from None


def load_classifier(d: str | Path) -> Classifier:
    from safetensors.torch import load_file

    d = Path(d)
    spec = read_spec(d)
    if "head" not in spec:
        raise ModelError(f"{d} is a backbone-only bundle (no head); train it with the fine-tune step first")
    clf = Classifier(load_backbone(d), len(spec["classes"]), spec["classes"])
    clf.head.load_state_dict(load_file(str(d / spec["head"])))
    clf.eval()
    return clf

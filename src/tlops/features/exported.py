"""The backbone interface ``extract`` uses, for a model run by another runtime (ONNX Runtime, OpenVINO).

The exported file replaces only the forward pass: tokenising / resizing (``prepare``), the modality and
the feature width stay the PyTorch backbone's, and the preprocessing record gains the backend's name.
No parameters, so ``extract`` feeds it CPU tensors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn


class ExportedBackbone(nn.Module):
    def __init__(self, backbone: nn.Module, path: Path, backend: str):
        super().__init__()
        self.modality = backbone.modality
        self.preprocessing = dict(backbone.preprocessing, backend=backend)
        self._dim = int(backbone.feature_dim)
        self._prepare = backbone.prepare
        self.path = path

    @property
    def feature_dim(self) -> int:
        return self._dim

    def prepare(self, batch: Any) -> dict[str, torch.Tensor]:
        return self._prepare(batch)

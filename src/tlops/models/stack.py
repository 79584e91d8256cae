"""Model stacking: several source backbones side by side, features concatenated.

``StackBackbone`` looks like any other backbone to the rest of tlops (``prepare``,
``forward``, ``feature_dim``, ``save``/``load``), so a head trained on the concatenated cached
features is served, evaluated and registered like any single-backbone model. The members
stay frozen (``blocks()`` is empty): stacking trains the head only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from tlops.errors import ConfigError
from tlops.models.backbone import BACKBONES as MEMBER_KINDS


class StackBackbone(nn.Module):
    def __init__(self, members: Sequence[nn.Module]):
        super().__init__()
        kinds = {m.modality for m in members}
        if len(kinds) != 1:
            raise ConfigError(
                f"stacking: the source models mix modalities ({', '.join(sorted(kinds))}); stack models of one kind"
            )
        self.members = nn.ModuleList(members)
        self.modality = kinds.pop()
        self.preprocessing = {"modality": self.modality, "stack": [dict(m.preprocessing) for m in members]}

    @property
    def feature_dim(self) -> int:
        return sum(m.feature_dim for m in self.members)

    def prepare(self, batch: Any) -> dict[str, torch.Tensor]:
        return {f"m{i}.{k}": v for i, m in enumerate(self.members) for k, v in m.prepare(batch).items()}

    def forward(self, **tensors: torch.Tensor) -> torch.Tensor:
        outs = []
        for i, m in enumerate(self.members):
            prefix = f"m{i}."
            outs.append(m(**{k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}))
        return torch.cat(outs, dim=1)

    def token_lengths(self, texts: Sequence[str]):
        return self.members[0].token_lengths(texts)

    def blocks(self) -> list[nn.Module]:
        return []

    def save(self, d: Path) -> dict[str, Any]:
        specs = []
        for i, m in enumerate(self.members):
            sub = d / "members" / str(i)
            sub.mkdir(parents=True, exist_ok=True)
            specs.append({**m.save(sub), "preprocessing": dict(m.preprocessing)})
        return {"kind": "stack", "weights": "members", "members": specs}

    @classmethod
    def load(cls, d: Path, spec: dict[str, Any], random_init: bool = False) -> "StackBackbone":
        return cls(
            [
                MEMBER_KINDS[s["kind"]].load(d / "members" / str(i), s, random_init=random_init)
                for i, s in enumerate(spec["members"])
            ]
        )

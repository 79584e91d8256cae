"""Backbones that turn raw inputs (uint8 images or strings) into feature vectors.

``ImageBackbone`` wraps a timm model created with ``num_classes=0`` (pre-logits features);
``TextBackbone`` wraps a transformers ``AutoModel`` with attention-mask mean (or CLS) pooling.
Both expose ``prepare(raw_batch) -> tensors``, ``forward(tensors) -> (B, D)``, ``blocks()``
for partial freezing, and ``save(dir)`` for the bundle.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class ImageBackbone(nn.Module):
    modality = "image"

    def __init__(self, model: nn.Module, arch: str, model_kwargs: dict[str, Any], preprocessing: dict[str, Any]):
        super().__init__()
        self.model = model
        self.arch = arch
        self.model_kwargs = dict(model_kwargs)
        self.preprocessing = dict(preprocessing)
        self.register_buffer(
            "_mean", torch.tensor(preprocessing["mean"], dtype=torch.float32).view(1, -1, 1, 1), persistent=False
        )
        self.register_buffer(
            "_std", torch.tensor(preprocessing["std"], dtype=torch.float32).view(1, -1, 1, 1), persistent=False
        )

    @classmethod
    def create(cls, arch: str, *, pretrained: bool, in_chans: int | None, image_size: int | None) -> "ImageBackbone":
        import timm

        kwargs: dict[str, Any] = {"num_classes": 0}
        if in_chans:
            kwargs["in_chans"] = in_chans
        model = timm.create_model(arch, pretrained=pretrained, **kwargs)
        pc = model.pretrained_cfg
        chans = in_chans or pc.get("input_size", (3,))[0]
        mean, std = list(pc.get("mean", (0.5,) * 3)), list(pc.get("std", (0.5,) * 3))
        if chans != len(mean):
            mean, std = [float(np.mean(mean))] * chans, [float(np.mean(std))] * chans
        pre = {
            "modality": "image",
            "image_size": int(image_size or pc.get("input_size", (3, 224, 224))[-1]),
            "in_chans": int(chans),
            "mean": [float(m) for m in mean],
            "std": [float(s) for s in std],
            "interpolation": "bilinear",
        }
        return cls(model, arch, {k: v for k, v in kwargs.items() if k != "num_classes"}, pre)

    @property
    def feature_dim(self) -> int:
        return int(self.model.num_features)

    def prepare(self, batch: np.ndarray) -> dict[str, torch.Tensor]:
        x = torch.as_tensor(np.asarray(batch))
        if x.ndim == 3:  # (B,H,W) grayscale
            x = x.unsqueeze(-1)
        x = x.permute(0, 3, 1, 2).float().div_(255.0)  # B,C,H,W
        want = self.preprocessing["in_chans"]
        if x.shape[1] != want:
            x = x.mean(1, keepdim=True) if want == 1 else x.expand(-1, want, -1, -1) if x.shape[1] == 1 else x[:, :want]
        size = self.preprocessing["image_size"]
        if x.shape[-1] != size or x.shape[-2] != size:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        return {"pixel_values": x}

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = (pixel_values - self._mean) / self._std
        return self.model(x)

    def blocks(self) -> list[nn.Module]:
        skip = {"global_pool", "fc", "head", "classifier", "head_drop", "fc_norm"}
        return [m for n, m in self.model.named_children() if n not in skip and any(True for _ in m.parameters())]

    def save(self, d: Path) -> dict[str, Any]:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in self.model.state_dict().items()}, str(d / "backbone.safetensors"))
        return {"kind": "timm", "arch": self.arch, "model_kwargs": self.model_kwargs, "weights": "backbone.safetensors"}

    @classmethod
    def load(cls, d: Path, spec: dict[str, Any], random_init: bool = False) -> "ImageBackbone":
        import timm
        from safetensors.torch import load_file

        model = timm.create_model(spec["arch"], pretrained=False, num_classes=0, **spec.get("model_kwargs", {}))
        if not random_init:
            model.load_state_dict(load_file(str(d / spec["weights"])))
        return cls(model, spec["arch"], spec.get("model_kwargs", {}), spec["preprocessing"])


def pipeline_normalizes(name_or_dir: str) -> bool:
    """Whether a sentence-transformers model ends in a Normalize module (its ``modules.json``).

    Sentence encoders are trained for cosine similarity; their own pipeline L2-normalises the pooled
    embedding, and a linear probe on the normalised vectors is what the model's authors evaluate.
    """
    import json

    path = Path(name_or_dir) / "modules.json"
    if not path.is_file():
        if Path(name_or_dir).is_dir():
            return False
        try:  # a hub id: the file sits next to the weights in the same snapshot
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(name_or_dir, "modules.json"))
        except Exception:  # noqa: BLE001 - not a sentence-transformers repo (or no file): plain transformers model
            return False
    try:
        modules = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return any(str(m.get("type", "")).endswith(".Normalize") for m in modules if isinstance(m, dict))


class TextBackbone(nn.Module):
    modality = "text"

    def __init__(self, model: nn.Module, tokenizer: Any, preprocessing: dict[str, Any]):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.preprocessing = dict(preprocessing)

    @classmethod
    def create(cls, name_or_dir: str, *, max_length: int, pooling: str, normalize: str = "auto") -> "TextBackbone":
        """``normalize``: ``l2``, ``none`` or ``auto`` (what the model's sentence-transformers pipeline does)."""
        from transformers import AutoModel, AutoTokenizer

        local = Path(name_or_dir).is_dir()
        tok = AutoTokenizer.from_pretrained(name_or_dir, local_files_only=local)
        model = AutoModel.from_pretrained(name_or_dir, local_files_only=local)
        if normalize == "auto":
            normalize = "l2" if pipeline_normalizes(name_or_dir) else "none"
        pre = {
            "modality": "text",
            "max_length": int(max_length),
            "pooling": pooling,
            "normalize": normalize,
            "tokenizer": type(tok).__name__,
        }
        return cls(model, tok, pre)

    @property
    def feature_dim(self) -> int:
        return int(self.model.config.hidden_size)

    def prepare(self, batch: Sequence[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(
            list(batch), padding=True, truncation=True, max_length=self.preprocessing["max_length"], return_tensors="pt"
        )
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.preprocessing["pooling"] == "cls":
            pooled = hidden[:, 0]
        else:
            m = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
        if self.preprocessing.get("normalize") == "l2":  # bundles from before the setting: none
            pooled = torch.nn.functional.normalize(pooled, dim=-1)
        return pooled

    def token_lengths(self, texts: Sequence[str]) -> np.ndarray:
        enc = self.tokenizer(list(texts), truncation=True, max_length=self.preprocessing["max_length"])
        return np.array([len(ids) for ids in enc["input_ids"]])

    def blocks(self) -> list[nn.Module]:
        base = self.model
        layers = None
        for path in ("encoder.layer", "transformer.layer", "layers", "encoder.layers", "h"):
            obj: Any = base
            try:
                for part in path.split("."):
                    obj = getattr(obj, part)
                layers = list(obj)
                break
            except AttributeError:
                continue
        emb = getattr(base, "embeddings", None)
        return ([emb] if emb is not None else []) + (layers or [])

    def save(self, d: Path) -> dict[str, Any]:
        (d / "hf").mkdir(exist_ok=True)
        self.tokenizer.save_pretrained(d / "hf")
        if hasattr(self.model, "peft_config"):  # LoRA kept as an adapter: base weights + adapter/
            import copy

            copy.deepcopy(self.model).unload().save_pretrained(d / "hf", safe_serialization=True)
            self.model.save_pretrained(d / "adapter", safe_serialization=True)
            return {"kind": "hf", "weights": "hf", "adapter": "adapter"}
        self.model.save_pretrained(d / "hf", safe_serialization=True)
        return {"kind": "hf", "weights": "hf"}

    @classmethod
    def load(cls, d: Path, spec: dict[str, Any], random_init: bool = False) -> "TextBackbone":
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        path = d / spec["weights"]
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        if random_init:
            model = AutoModel.from_config(AutoConfig.from_pretrained(path, local_files_only=True))
        else:
            model = AutoModel.from_pretrained(path, local_files_only=True)
            if spec.get("adapter"):
                from peft import PeftModel

                model = PeftModel.from_pretrained(model, d / spec["adapter"])
        return cls(model, tok, spec["preprocessing"])


# single-model bundle kinds (a stack of them is tlops.models.stack; tlops.models.bundle knows all kinds)
BACKBONES = {"timm": ImageBackbone, "hf": TextBackbone}

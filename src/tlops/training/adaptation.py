"""Unsupervised domain adaptation: labelled source + unlabelled target -> a classifier for the target.

Framework-level, independent of tlops config objects:

* :func:`adapt_loop` -- the one training loop, whatever the method's transfer loss
  (:mod:`tlops.training.transfer_losses`: :class:`SourceOnly`, :class:`CORAL`, :class:`MMD`,
  :class:`DANN`, :class:`CDAN`), with model selection that never uses target labels, on the
  device of a :class:`~tlops.training.runtime.Runtime`, with resumable per-epoch checkpoints;
  :func:`adapt` builds the loss for a method name and runs the loop;
* :func:`adabn` -- post-hoc re-estimation of BatchNorm statistics on target data (AdaBN);
* :func:`shot` -- source-free adaptation of a source-trained model on the target alone (SHOT:
  information maximisation + self-supervised pseudo-labels, classifier head frozen), through
  the same loop with a target-only step; :func:`self_train` -- rounds of confidence-thresholded
  pseudo-labelling of the target and training on source + pseudo-labelled target (e.g. after
  DANN/CDAN);
* :func:`predict` / :func:`evaluate` and the :func:`random_shift` augmentation.

The losses and their building blocks (:func:`coral_loss`, :func:`mmd_loss`,
:class:`GradientReversal`, :class:`DomainDiscriminator`, ...) are importable from here too.

The model passed to :func:`adapt` / :func:`adabn` must have ``.backbone`` (inputs -> features
(B, D)) and ``.head`` (features -> logits).  Inputs are either tensors (``backbone(x)``) or,
through an optional ``prepare`` callable, raw batches turned into keyword tensors
(``backbone(**prepare(raw))``) -- e.g. ``prepare=clf.backbone.prepare`` for a
``tlops.models.bundle.Classifier`` on uint8 images.

References: see :mod:`tlops.training.transfer_losses` (also for SHOT); Li et al., "Revisiting Batch
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
    SHOT,
    DomainDiscriminator,
    GradientReversal,
    GradientReverseFunction,
    PseudoLabels,
    RandomizedMultilinearMap,
    SourceOnly,
    TransferLoss,
    cluster_pseudo_labels,
    confident_pseudo_labels,
    coral_loss,
    dann_schedule,
    entropy,
    grad_reverse,
    information_maximisation,
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
    "PseudoLabels",
    "SHOT",
    "SourceOnly",
    "TransferLoss",
    "DomainDiscriminator",
    "GradientReversal",
    "GradientReverseFunction",
    "adabn",
    "adapt",
    "adapt_loop",
    "cluster_pseudo_labels",
    "confident_pseudo_labels",
    "coral_loss",
    "dann_schedule",
    "entropy",
    "evaluate",
    "grad_reverse",
    "information_maximisation",
    "make_loss",
    "mmd_loss",
    "multilinear_map",
    "predict",
    "random_shift",
    "RandomizedMultilinearMap",
    "self_train",
    "shot",
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
    label_smoothing: float = 0.0  # of the source cross-entropy (SHOT trains its source model with 0.1)
    nesterov: bool = False  # SGD with Nesterov momentum (SHOT's recipe)


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
        return torch.optim.SGD(
            params, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay, nesterov=s.nesterov and s.momentum > 0
        )
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
        self.epoch_len = self.n_s  # an epoch is one pass over the source
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
            cls = F.cross_entropy(logits_s, ys, label_smoothing=s.label_smoothing)
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

    def samplers(self) -> dict[str, _Sampler]:
        """The batch orders a checkpoint must restore, by checkpoint key."""
        return {"source_order": self.src, "target_order": self.tgt}

    def state(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "loss": self.loss.state_dict(),
            "optimizer": self.opt.state_dict(),
            "generator": self.g.get_state(),
            **{key: sampler.state() for key, sampler in self.samplers().items()},
        }

    def load(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.loss.load_state_dict(state["loss"])
        if state.get("optimizer") is not None:  # None in the loop's last checkpoint
            self.opt.load_state_dict(state["optimizer"])
        self.g.set_state(state["generator"])
        for key, sampler in self.samplers().items():
            sampler.load(state[key])


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
    stepper: Any = None,
) -> AdaptHistory:
    """The one adaptation loop: ``cross_entropy(source) + trade_off * loss(...)`` (+ target
    entropy), whatever the method; see :func:`adapt`. ``g``: the generator for data order and
    augmentation (default: seeded with ``settings.seed``). ``stepper``: another optimisation
    step with :class:`_Stepper`'s interface (SHOT's target-only :class:`_ShotStepper`) that
    replaces the source + target step; its ``start_epoch()``, if any, runs before each epoch."""
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
    step_once = stepper or _Stepper(
        model, loss, source, target_unlabelled, s, prepare=prepare, augment=augment, runtime=rt, g=g
    )
    steps = s.iters_per_epoch or max(1, step_once.epoch_len // s.batch_size)
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
            **({"label_smoothing": s.label_smoothing} if s.label_smoothing else {}),
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
        if hasattr(step_once, "start_epoch"):
            step_once.start_epoch()
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


# --------------------------------------------------------------------------- SHOT and self-training


@torch.no_grad()
def _embed(model: nn.Module, x: Any, *, prepare: Prepare | None, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, logits) of all of ``x`` in eval mode, on the CPU (the model's mode is restored)."""
    was = model.training
    model.eval()
    dev = _device_of(model)
    feats, logits = [], []
    for i in range(0, len(x), batch_size):
        f = _features(model, put(_prepared(x[i : i + batch_size], prepare), dev))
        feats.append(f.float().cpu())
        logits.append(model.head(f).float().cpu())
    model.train(was)
    return torch.cat(feats), torch.cat(logits)


class _ShotStepper(_Stepper):
    """SHOT's optimisation step, source-free: a target batch only, through the backbone and the
    frozen head, minimising ``im_weight * information_maximisation + beta * cross_entropy(pseudo-labels)``.
    :meth:`start_epoch` recomputes the pseudo-labels of the whole target set from the current model
    (as the official code does once per pass over the target); they are a function of the weights,
    so a resumed run recomputes the same ones and the checkpoint does not hold them. Its own __init__
    (no source data); the checkpoint state is _Stepper's with the target order only."""

    def __init__(
        self,
        model: nn.Module,
        loss: SHOT,
        target: Any,
        s: AdaptSettings,
        *,
        prepare: Prepare | None,
        augment: Callable[[Inputs, torch.Generator], Inputs] | None,
        runtime: Runtime,
        g: torch.Generator,
    ):
        self.n_s, self.n_t, self.ew = 0, len(target), 0.0
        self.epoch_len = self.n_t  # an epoch is one pass over the target
        if self.n_t == 0:
            raise ValueError("shot: empty target data")
        self.model, self.loss, self.target, self.s = model, loss, target, s
        self.prepare, self.augment, self.rt, self.g = prepare, augment, runtime, g
        runtime.apply_threads()
        runtime.prepare(model)
        runtime.prepare(loss)
        for p in model.head.parameters():  # the source hypothesis stays fixed
            p.requires_grad_(False)
        self.opt = _optimizer(s.optimizer, [p for p in model.parameters() if p.requires_grad], s)
        self.tgt = _Sampler(self.n_t, g)
        self.labels: torch.Tensor | None = None
        self.agreement: float | None = None

    def start_epoch(self) -> None:
        if self.loss.beta <= 0:
            return
        feats, logits = _embed(self.model, self.target, prepare=self.prepare, batch_size=self.s.eval_batch_size)
        labels = cluster_pseudo_labels(feats.numpy(), F.softmax(logits, dim=1).numpy())
        self.labels = torch.from_numpy(labels)
        self.agreement = float((self.labels == logits.argmax(1)).float().mean())

    def __call__(self, p: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, dict[str, float]]:
        """One step: (beta * pseudo-label cross-entropy, IM loss, target logits, pseudo-labels, stats)."""
        s, rt, model, loss = self.s, self.rt, self.model, self.loss
        for group in self.opt.param_groups:
            group["lr"] = s.lr * _lr_factor(s.lr_schedule, p)
        idx = self.tgt.take(min(s.batch_size, self.n_t))
        xt = _prepared(_take(self.target, idx), self.prepare)
        if self.augment is not None and s.augment_target:
            xt = self.augment(xt, self.g)
        xt = rt.put(xt)
        with rt.autocast():
            logits = model.head(_features(model, xt))
            im, stats = loss(None, None, None, logits, p)
            if self.labels is not None:
                y = rt.put(self.labels[idx])
                cls = loss.beta * F.cross_entropy(logits, y)
            else:  # SHOT-IM (beta 0): no pseudo-labels
                y, cls = logits.detach().argmax(1), torch.zeros((), device=rt.device)
            total_loss = cls + im
        self.opt.zero_grad(set_to_none=True)
        total_loss.backward()
        self.opt.step()
        if self.agreement is not None:
            stats = {**stats, "pseudo_label_agreement": self.agreement}
        return cls, im, logits, y, stats

    def samplers(self) -> dict[str, _Sampler]:  # no source data: the target order only
        return {"target_order": self.tgt}


def shot(
    model: nn.Module,
    target_unlabelled: Any,
    *,
    beta: float = 0.3,
    im_weight: float = 1.0,
    source_val: tuple[Any, Any] | None = None,
    prepare: Prepare | None = None,
    augment: Callable[[Inputs, torch.Generator], Inputs] | None = None,
    set_train_mode: Callable[[nn.Module], None] | None = None,
    monitor: Callable[[nn.Module], dict[str, float]] | None = None,
    log: Callable[[dict[str, Any]], None] | None = None,
    runtime: Runtime | None = None,
    checkpoints: Checkpoints | None = None,
    **settings: Any,
) -> AdaptHistory:
    """SHOT (Liang et al., ICML 2020): adapt a model trained on the source (SHOT trains it with
    label smoothing 0.1: ``adapt(..., "source-only", label_smoothing=0.1)``) to the unlabelled
    target without the source data: the head (the source hypothesis) is frozen and the backbone
    minimises ``im_weight * (mean entropy - entropy of the mean prediction)`` plus ``beta`` *
    cross-entropy to the :func:`cluster_pseudo_labels` recomputed at every epoch (an epoch = one
    pass over the target). Published digits recipe: SGD lr 0.01, momentum 0.9 with Nesterov,
    weight decay 1e-3, ``lr / (1 + 10 p)^0.75``, batch 64, 30 epochs, ``im_weight`` 1 and
    ``beta`` 0.1 (0.3 on the object benchmarks; 0 = SHOT-IM).

    Runs through :func:`adapt_loop` (checkpoints, progress, monitor as there); ``settings`` are
    :class:`AdaptSettings` fields, ``select`` defaults to ``"last"`` (the published recipe: the
    source validation set measures the source hypothesis SHOT moves away from, it is recorded
    for diagnostics only). Never reads target labels. The head's ``requires_grad`` flags are
    restored afterwards."""
    settings.setdefault("select", "last")
    s = AdaptSettings(**settings)
    torch.manual_seed(s.seed)  # dropout uses the global generator
    g = torch.Generator().manual_seed(s.seed)  # data order and augmentation
    rt = runtime or Runtime()
    loss = SHOT(beta, im_weight)
    flags = [p.requires_grad for p in model.head.parameters()]
    step = _ShotStepper(model, loss, target_unlabelled, s, prepare=prepare, augment=augment, runtime=rt, g=g)
    try:
        history = adapt_loop(
            model,
            loss,
            None,  # type: ignore[arg-type]  (source-free: the stepper draws target batches only)
            target_unlabelled,
            s,
            source_val=source_val,
            prepare=prepare,
            augment=augment,
            set_train_mode=set_train_mode,
            monitor=monitor,
            log=log,
            runtime=rt,
            checkpoints=checkpoints,
            g=g,
            stepper=step,
        )
    finally:
        for p, flag in zip(model.head.parameters(), flags, strict=True):
            p.requires_grad_(flag)
    history.meta |= {
        "bn_batches": "target only",
        "augment": bool(augment and s.augment_target),
        "nesterov": s.nesterov,
        "head": "frozen (the source hypothesis)",
        "pseudo_labels": "weighted cosine centroids of the target features, 1 refinement pass, every epoch"
        if beta > 0
        else None,
    }
    return history


class _SelfTrainStepper(_Stepper):
    """Self-training's step: a labelled source batch and a batch of the same size from the
    pseudo-labelled target, through the backbone together (BatchNorm sees both domains), minimising
    ``cross_entropy(source) + trade_off * cross_entropy(target, pseudo-labels)``. Source and target
    inputs may differ in raw shape (each batch is prepared on its own), and the target batches are
    augmented like the source ones: they are labelled data now."""

    def __init__(self, model: nn.Module, source: tuple[Any, Any], target: Any, labels: torch.Tensor, s, **kw: Any):
        super().__init__(model, PseudoLabels(), source, target, s, **kw)
        self.yt = labels

    def __call__(self, p: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, dict[str, float]]:
        s, rt, model, loss = self.s, self.rt, self.model, self.loss
        for group in self.opt.param_groups:
            group["lr"] = s.lr * _lr_factor(s.lr_schedule, p)
        idx_s = self.src.take(min(s.batch_size, self.n_s))
        idx_t = self.tgt.take(min(len(idx_s), self.n_t))
        xs = _prepared(_take(self.xs, idx_s), self.prepare)
        xt = _prepared(_take(self.target, idx_t), self.prepare)
        if self.augment is not None:
            xs, xt = self.augment(xs, self.g), self.augment(xt, self.g)
        ys, yt = rt.put(self.ys[idx_s]), rt.put(self.yt[idx_t])
        with rt.autocast():
            fs, ft = _joint_features(model, rt.put(xs), rt.put(xt))
            logits_s, logits_t = model.head(fs), model.head(ft)
            transfer, stats = loss(fs, ft, logits_s, logits_t, p, labels=yt)
            cls = F.cross_entropy(logits_s, ys, label_smoothing=s.label_smoothing)
            total_loss = cls + s.trade_off * transfer
        self.opt.zero_grad(set_to_none=True)
        total_loss.backward()
        self.opt.step()
        return cls, transfer, logits_s, ys, stats


def self_train(
    model: nn.Module,
    source: tuple[Any, Any],
    target_unlabelled: Any,
    *,
    rounds: int = 2,
    threshold: float = 0.9,
    source_val: tuple[Any, Any] | None = None,
    prepare: Prepare | None = None,
    augment: Callable[[Inputs, torch.Generator], Inputs] | None = None,
    set_train_mode: Callable[[nn.Module], None] | None = None,
    monitor: Callable[[nn.Module], dict[str, float]] | None = None,
    log: Callable[[dict[str, Any]], None] | None = None,
    runtime: Runtime | None = None,
    checkpoints: Callable[[int], Checkpoints | None] | None = None,
    **settings: Any,
) -> AdaptHistory:
    """Pseudo-label self-training on top of an adapted model (e.g. after DANN/CDAN): ``rounds``
    times, label the target with the current model (eval mode), keep the samples whose top
    probability is at least ``threshold`` (:func:`confident_pseudo_labels`), and train from the
    current weights through :func:`adapt_loop` with :class:`_SelfTrainStepper`: each step a source
    batch and as many pseudo-labelled target samples, ``cross_entropy(source) + trade_off *
    cross_entropy(target, pseudo-labels)``; an epoch is one pass over the source. Each round
    relabels with the improved model; a round with no confident sample trains nothing. Never
    reads target labels. ``settings``: :class:`AdaptSettings` fields (the seed of round ``r`` is
    ``seed + r``); ``checkpoints(round)``: that round's checkpoints (None: none). Returns the
    rounds' epoch records in one history (``round`` and ``pseudo_labelled`` on each record;
    ``meta["rounds"]``: the pseudo-label count and the selection of each round)."""
    base = AdaptSettings(**settings)
    rt = runtime or Runtime()
    history = AdaptHistory(meta={"method": "self-train", "threshold": threshold, "rounds": []})
    for r in range(1, rounds + 1):
        probs = F.softmax(predict(model, target_unlabelled, prepare=prepare, batch_size=base.eval_batch_size), dim=1)
        keep, labels = confident_pseudo_labels(probs, threshold)
        info: dict[str, Any] = {"round": r, "pseudo_labelled": len(keep), "of": len(target_unlabelled)}
        if len(keep):
            s = AdaptSettings(**{**settings, "seed": base.seed + r})
            torch.manual_seed(s.seed)  # dropout uses the global generator
            g = torch.Generator().manual_seed(s.seed)
            step = _SelfTrainStepper(
                model,
                source,
                _take(target_unlabelled, keep),
                labels,
                s,
                prepare=prepare,
                augment=augment,
                runtime=rt,
                g=g,
            )
            h = adapt_loop(
                model,
                step.loss,
                source,
                None,
                s,
                source_val=source_val,
                prepare=prepare,
                augment=augment,
                set_train_mode=set_train_mode,
                monitor=monitor,
                log=log,
                runtime=rt,
                checkpoints=checkpoints(r) if checkpoints is not None else None,
                g=g,
                stepper=step,
            )
            for rec in h:
                rec |= {"round": r, "pseudo_labelled": len(keep)}
            history.extend(h)
            info["selection"] = h.meta["selection"]
        history.meta["rounds"].append(info)
    history.meta["selection"] = {
        "criterion": base.select,
        "rounds": [i.get("selection") for i in history.meta["rounds"]],
        "uses_target_labels": False,
    }
    return history

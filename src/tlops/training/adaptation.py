"""Unsupervised domain adaptation: labelled source + unlabelled target -> a classifier for the target.

Framework-level building blocks, independent of tlops config objects:

* losses between a batch of source features ``fs`` (n_s, d) and target features ``ft`` (n_t, d):
  :func:`coral_loss` (Deep CORAL) and :func:`mmd_loss` (multi-kernel Gaussian MMD, as in DAN);
* adversarial parts: :class:`GradientReversal` (DANN's gradient reversal layer, with
  :func:`dann_schedule` for its coefficient), :class:`DomainDiscriminator` (an MLP giving a
  domain logit) and :func:`multilinear_map` (CDAN's conditioning on the classifier output);
* :func:`adabn` -- post-hoc re-estimation of BatchNorm statistics on target data (AdaBN);
* :func:`adapt` -- one training entry point for ``source-only``, ``coral``, ``mmd``, ``dann``
  and ``cdan`` (``cdan+e`` adds entropy conditioning), with model selection that never uses
  target labels.

The model passed to :func:`adapt` / :func:`adabn` must have ``.backbone`` (inputs -> features
(B, D)) and ``.head`` (features -> logits).  Inputs are either tensors (``backbone(x)``) or,
through an optional ``prepare`` callable, raw batches turned into keyword tensors
(``backbone(**prepare(raw))``) -- e.g. ``prepare=clf.backbone.prepare`` for a
``tlops.models.bundle.Classifier`` on uint8 images.

References: Sun & Saenko, "Deep CORAL", ECCV-W 2016; Long et al., "Learning Transferable
Features with Deep Adaptation Networks" (DAN/MK-MMD), ICML 2015; Ganin et al.,
"Domain-Adversarial Training of Neural Networks", JMLR 2016; Long et al., "Conditional
Adversarial Domain Adaptation" (CDAN), NeurIPS 2018; Li et al., "Revisiting Batch
Normalization for Practical Domain Adaptation" (AdaBN), 2016/2018.
"""

from __future__ import annotations

import copy
import math
import time
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "METHODS",
    "AdaptHistory",
    "DomainDiscriminator",
    "GradientReversal",
    "GradientReverseFunction",
    "adabn",
    "adapt",
    "coral_loss",
    "dann_schedule",
    "entropy",
    "evaluate",
    "grad_reverse",
    "mmd_loss",
    "multilinear_map",
    "predict",
    "random_shift",
    "RandomizedMultilinearMap",
]

METHODS = ("source-only", "coral", "mmd", "dann", "cdan", "cdan+e")
DEFAULT_MMD_KERNELS = (0.25, 0.5, 1.0, 2.0, 4.0)


# --------------------------------------------------------------------------- statistical losses


def _covariance(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[0]
    xc = x - x.mean(0, keepdim=True)
    return xc.t() @ xc / max(n - 1, 1)


def coral_loss(fs: torch.Tensor, ft: torch.Tensor) -> torch.Tensor:
    """Deep CORAL loss: ``||C_s - C_t||_F^2 / (4 d^2)``.

    ``C_s``, ``C_t`` are the (unbiased, ``n-1``) covariance matrices of the source and target
    features (each (n, d); the batch sizes may differ).  Zero when the two batches have the
    same covariance; only second-order statistics are matched (not the means).
    """
    if fs.ndim != 2 or ft.ndim != 2 or fs.shape[1] != ft.shape[1]:
        raise ValueError(
            f"coral_loss expects (n_s, d) and (n_t, d) features, got {tuple(fs.shape)} and {tuple(ft.shape)}"
        )
    d = fs.shape[1]
    diff = _covariance(fs.float()) - _covariance(ft.float())
    return (diff * diff).sum() / (4.0 * d * d)


def mmd_loss(
    fs: torch.Tensor,
    ft: torch.Tensor,
    kernels: Sequence[float] = DEFAULT_MMD_KERNELS,
    *,
    bandwidth: float | None = None,
    unbiased: bool = False,
) -> torch.Tensor:
    """Squared multi-kernel MMD with Gaussian kernels (as in DAN), averaged over the kernels.

    Kernel ``i`` is ``k_i(a, b) = exp(-||a - b||^2 / (kernels[i] * bandwidth))``.  With
    ``bandwidth=None`` the base bandwidth is the mean pairwise squared distance over the
    pooled batch (computed without gradient) -- the usual heuristic, so ``kernels`` are
    multipliers around the data scale.

    ``unbiased=False`` (default) is the biased V-statistic ``mean K_ss + mean K_tt - 2 mean K_st``
    including the diagonal terms: always >= 0, exactly 0 for identical batches, slightly
    positive for two finite samples of the same distribution.  ``unbiased=True`` drops the
    diagonal ``k(x_i, x_i)`` terms from the within-domain means (U-statistic): an unbiased
    estimate of MMD^2 that can be negative and is ~0 in expectation for equal distributions.
    """
    if fs.ndim != 2 or ft.ndim != 2 or fs.shape[1] != ft.shape[1]:
        raise ValueError(
            f"mmd_loss expects (n_s, d) and (n_t, d) features, got {tuple(fs.shape)} and {tuple(ft.shape)}"
        )
    ns, nt = fs.shape[0], ft.shape[0]
    if unbiased and (ns < 2 or nt < 2):
        raise ValueError("the unbiased MMD estimate needs at least 2 samples per domain")
    z = torch.cat([fs, ft]).float()
    d2 = torch.cdist(z, z).pow(2)
    if bandwidth is None:
        n = z.shape[0]
        bw = (d2.detach().sum() / max(n * n - n, 1)).clamp_min(1e-8)
    else:
        bw = torch.as_tensor(float(bandwidth))
    k = sum(torch.exp(-d2 / (float(m) * bw)) for m in kernels) / len(kernels)
    kss, ktt, kst = k[:ns, :ns], k[ns:, ns:], k[:ns, ns:]
    if unbiased:
        mss = (kss.sum() - kss.diagonal().sum()) / (ns * (ns - 1))
        mtt = (ktt.sum() - ktt.diagonal().sum()) / (nt * (nt - 1))
    else:
        mss, mtt = kss.mean(), ktt.mean()
    return mss + mtt - 2.0 * kst.mean()


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-sample Shannon entropy (nats) of ``softmax(logits)``."""
    logp = F.log_softmax(logits, dim=1)
    return -(logp.exp() * logp).sum(1)


# --------------------------------------------------------------------------- adversarial parts


class GradientReverseFunction(torch.autograd.Function):
    """Identity in the forward pass; multiplies the gradient by ``-lambd`` in the backward pass."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, lambd: float) -> torch.Tensor:  # type: ignore[override]
        ctx.lambd = float(lambd)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad.neg() * ctx.lambd, None


def grad_reverse(x: torch.Tensor, lambd: float = 1.0) -> torch.Tensor:
    return GradientReverseFunction.apply(x, lambd)


class GradientReversal(nn.Module):
    """Gradient reversal layer; set ``.lambd`` during training (e.g. from :func:`dann_schedule`)."""

    def __init__(self, lambd: float = 1.0):
        super().__init__()
        self.lambd = float(lambd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return grad_reverse(x, self.lambd)

    def extra_repr(self) -> str:
        return f"lambd={self.lambd}"


def dann_schedule(progress: float, gamma: float = 10.0, high: float = 1.0) -> float:
    """DANN's coefficient ``high * (2 / (1 + exp(-gamma * p)) - 1)`` for training progress ``p`` in [0, 1].

    Starts at 0 (the discriminator's noisy early gradients do not reach the features) and
    approaches ``high``.
    """
    p = min(max(float(progress), 0.0), 1.0)
    return float(high * (2.0 / (1.0 + math.exp(-gamma * p)) - 1.0))


class DomainDiscriminator(nn.Module):
    """MLP ``in_features -> hidden -> ... -> 1`` giving a domain logit (source = 1, target = 0).

    ``num_hidden`` hidden layers (default 2, i.e. 3 linear layers as in DANN/TLlib), each
    ``Linear -> BatchNorm1d -> ReLU`` (or ``Linear -> ReLU -> Dropout(0.5)`` with
    ``batch_norm=False``).  Returns logits, use ``binary_cross_entropy_with_logits``.
    """

    def __init__(self, in_features: int, hidden: int = 1024, num_hidden: int = 2, batch_norm: bool = True):
        super().__init__()
        layers: list[nn.Module] = []
        d = in_features
        for _ in range(num_hidden):
            layers.append(nn.Linear(d, hidden))
            layers += [nn.BatchNorm1d(hidden), nn.ReLU()] if batch_norm else [nn.ReLU(), nn.Dropout(0.5)]
            d = hidden
        layers.append(nn.Linear(d, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(1)


def multilinear_map(features: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """CDAN's conditioning: the flattened outer product ``probs ⊗ features``, shape (B, C*D)."""
    return torch.bmm(probs.unsqueeze(2), features.unsqueeze(1)).flatten(1)


class RandomizedMultilinearMap(nn.Module):
    """CDAN's randomized multilinear map ``(R_f f) ⊙ (R_g g) / sqrt(output_dim)`` with fixed Gaussian ``R_f``, ``R_g``.

    Approximates the inner products of :func:`multilinear_map` with ``output_dim`` instead of
    ``C*D`` dimensions; the paper uses it when ``C*D > 4096``.  ``R_f``, ``R_g`` are buffers
    drawn from ``generator`` (not trained).
    """

    def __init__(
        self, features_dim: int, num_classes: int, output_dim: int = 1024, generator: torch.Generator | None = None
    ):
        super().__init__()
        self.output_dim = output_dim
        self.register_buffer("rf", torch.randn(features_dim, output_dim, generator=generator))
        self.register_buffer("rg", torch.randn(num_classes, output_dim, generator=generator))

    def forward(self, features: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        return (features @ self.rf) * (probs @ self.rg) / math.sqrt(self.output_dim)


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
    out = []
    for i in range(0, len(x), batch_size):
        out.append(model.head(_features(model, _prepared(x[i : i + batch_size], prepare))).float())
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
        for raw in target_batches:
            inputs = _prepared(raw, prepare)
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


# --------------------------------------------------------------------------- training entry point


class AdaptHistory(list):
    """Per-epoch records (a plain ``list[dict]``) plus ``.meta``: method, hyper-parameters and model selection.

    ``meta["selection"]`` = ``{"criterion": ..., "epoch": selected epoch, "uses_target_labels": False}``.
    """

    def __init__(self, records: Iterable[dict[str, Any]] = (), meta: dict[str, Any] | None = None):
        super().__init__(records)
        self.meta: dict[str, Any] = dict(meta or {})


def _lr_factor(schedule: str, progress: float) -> float:
    if schedule == "constant":
        return 1.0
    if schedule == "dann":  # Ganin et al.: lr_p = lr / (1 + 10 p) ** 0.75
        return (1.0 + 10.0 * progress) ** -0.75
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown lr_schedule {schedule!r} (allowed: constant, dann, cosine)")


def adapt(
    model: nn.Module,
    method: str,
    source: tuple[Any, Any],
    target_unlabelled: Any,
    *,
    epochs: int = 10,
    batch_size: int = 64,
    lr: float = 0.01,
    trade_off: float = 1.0,
    seed: int = 0,
    source_val: tuple[Any, Any] | None = None,
    log: Callable[[dict[str, Any]], None] | None = None,
    select: str = "auto",
    optimizer: str = "sgd",
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    lr_schedule: str = "dann",
    prepare: Prepare | None = None,
    augment: Callable[[Inputs, torch.Generator], Inputs] | None = None,
    augment_target: bool = False,
    discriminator_hidden: int = 1024,
    lambda_schedule: bool = True,
    cdan_randomized_dim: int | None = -1,
    entropy_weight: float = 0.0,
    iters_per_epoch: int | None = None,
    set_train_mode: Callable[[nn.Module], None] | None = None,
    monitor: Callable[[nn.Module], dict[str, float]] | None = None,
    eval_batch_size: int = 512,
) -> AdaptHistory:
    """Train ``model`` on labelled ``source`` batches jointly with unlabelled ``target_unlabelled`` batches.

    Every step draws a source batch (an epoch is one pass over the shuffled source without
    its short last batch, or ``iters_per_epoch`` steps) and a target batch of the same size (the target set is
    reshuffled whenever it is exhausted), and minimises
    ``cross_entropy(source) + trade_off * transfer_loss``:

    * ``source-only``: no transfer loss (target batches are not even forwarded);
    * ``coral`` / ``mmd``: :func:`coral_loss` / :func:`mmd_loss` between source and target features;
    * ``dann``: domain-classification BCE of a :class:`DomainDiscriminator` on the features behind a
      :class:`GradientReversal` whose coefficient follows :func:`dann_schedule` (constant 1 with
      ``lambda_schedule=False``);
    * ``cdan``: same, but the discriminator sees ``multilinear_map(features, softmax(logits))`` (the
      softmax is detached, as in the paper); ``cdan+e`` also weights each sample by
      ``1 + exp(-entropy)`` (entropy conditioning).  ``cdan_randomized_dim``: ``-1`` (default)
      follows the paper -- the :class:`RandomizedMultilinearMap` with 1024 dimensions when
      ``C*D > 4096``, the exact map otherwise; ``None`` always the exact map; ``k > 0`` always
      the randomized map with ``k`` dimensions.

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

    The selected weights are loaded back into ``model`` (left in eval mode).  Deterministic
    for a fixed ``seed`` (data order, target pairing, dropout and augmentation all come from
    it; the model's initial weights are the caller's business).

    ``source`` is ``(x, y)``; ``x`` (and ``target_unlabelled``) are tensors ready for
    ``model.backbone`` or, with ``prepare``, raw batches (numpy arrays / lists) that
    ``prepare`` maps to a tensor or a dict of keyword tensors.  ``augment(inputs, generator)``
    is applied to prepared source batches (and target batches if ``augment_target``).
    ``set_train_mode(model)`` replaces ``model.train()`` at the start of each epoch (e.g. to
    keep frozen blocks in eval mode); only parameters with ``requires_grad`` are optimised.
    ``monitor(model) -> dict`` is called after each epoch for diagnostics (e.g. target-test
    accuracy in a benchmark); its values are recorded with a ``monitor_`` prefix and are
    never used for selection.  ``log(record)`` receives each epoch record.

    Returns an :class:`AdaptHistory` (list of per-epoch dicts, ``.meta`` with the selection).
    """
    method = method.lower()
    if method not in METHODS:
        raise ValueError(f"unknown adaptation method {method!r} (allowed: {', '.join(METHODS)})")
    if select == "auto":
        select = "source_val" if source_val is not None else "last"
    if select not in ("source_val", "last"):
        raise ValueError(f"unknown select {select!r} (allowed: auto, source_val, last)")
    if select == "source_val" and source_val is None:
        raise ValueError("select='source_val' needs source_val=(x, y)")
    xs_all, ys_all = source
    ys_all = torch.as_tensor(np.asarray(ys_all) if not isinstance(ys_all, torch.Tensor) else ys_all, dtype=torch.long)
    n_s, n_t = len(xs_all), len(target_unlabelled)
    if n_s == 0 or (method != "source-only" and n_t == 0):
        raise ValueError(f"adapt: empty source ({n_s}) or target ({n_t}) data")

    torch.manual_seed(seed)  # dropout and discriminator init use the global generator
    g = torch.Generator().manual_seed(seed)
    adversarial = method in ("dann", "cdan", "cdan+e")
    disc: DomainDiscriminator | None = None
    grl = GradientReversal(0.0)
    rmap: RandomizedMultilinearMap | None = None
    if adversarial:
        feat_dim = getattr(model.backbone, "feature_dim", None) or model.head.in_features
        n_cls = model.head.out_features
        d_in = feat_dim
        if method.startswith("cdan"):
            d_in = feat_dim * n_cls
            rdim = (1024 if d_in > 4096 else None) if cdan_randomized_dim == -1 else cdan_randomized_dim
            if rdim:
                rmap = RandomizedMultilinearMap(feat_dim, n_cls, rdim, generator=g)
                d_in = rdim
        disc = DomainDiscriminator(d_in, hidden=discriminator_hidden)

    params = [p for p in model.parameters() if p.requires_grad]
    if disc is not None:
        params += list(disc.parameters())
    if optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    elif optimizer == "adam":
        opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    else:
        raise ValueError(f"unknown optimizer {optimizer!r} (allowed: sgd, adam)")

    steps = iters_per_epoch or max(1, n_s // batch_size)
    total = epochs * steps
    meta: dict[str, Any] = {
        "method": method,
        "epochs": epochs,
        "iters_per_epoch": steps,
        "batch_size": batch_size,
        "lr": lr,
        "lr_schedule": lr_schedule,
        "optimizer": optimizer,
        "momentum": momentum,
        "weight_decay": weight_decay,
        "trade_off": trade_off,
        "seed": seed,
        "n_source": n_s,
        "n_target": n_t,
        "n_source_val": len(source_val[0]) if source_val is not None else 0,
        "augment": augment is not None,
        "augment_target": bool(augment and augment_target),
        "entropy_weight": entropy_weight if method != "source-only" else 0.0,
        "discriminator": f"{discriminator_hidden} hidden x2" if adversarial else None,
        "cdan_map": (f"randomized {rmap.output_dim}" if rmap is not None else "exact")
        if method.startswith("cdan")
        else None,
        "bn_batches": "source+target concatenated" if method != "source-only" else "source only",
    }
    history = AdaptHistory(meta=meta)
    best_score: tuple[float, ...] | None = None
    best_state: dict[str, torch.Tensor] | None = None
    best_epoch = 0
    src_perm, src_pos = torch.randperm(n_s, generator=g), 0
    tgt_perm, tgt_pos = torch.randperm(max(n_t, 1), generator=g), 0
    step = 0
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        (set_train_mode or (lambda m: m.train()))(model)
        if disc is not None:
            disc.train()
        sums = {"cls_loss": 0.0, "transfer_loss": 0.0, "train_acc": 0.0, "domain_acc": 0.0}
        seen = 0
        for _ in range(steps):
            p = step / total
            for group in opt.param_groups:
                group["lr"] = lr * _lr_factor(lr_schedule, p)
            if src_pos + min(batch_size, n_s) > n_s:  # a new pass; the short tail of the last one is dropped
                src_perm, src_pos = torch.randperm(n_s, generator=g), 0
            idx_s = src_perm[src_pos : src_pos + batch_size]
            src_pos += batch_size
            xs = _prepared(_take(xs_all, idx_s), prepare)
            ys = ys_all[idx_s]
            if augment is not None:
                xs = augment(xs, g)
            if method == "source-only":
                fs = _features(model, xs)
                logits_s = model.head(fs)
                transfer = torch.zeros(())
            else:
                if tgt_pos + len(idx_s) > n_t:
                    tgt_perm, tgt_pos = torch.randperm(n_t, generator=g), 0
                idx_t = tgt_perm[tgt_pos : tgt_pos + len(idx_s)]
                tgt_pos += len(idx_s)
                xt = _prepared(_take(target_unlabelled, idx_t), prepare)
                if augment is not None and augment_target:
                    xt = augment(xt, g)
                fs, ft = _joint_features(model, xs, xt)
                logits_s = model.head(fs)
                logits_t = model.head(ft) if (entropy_weight or method.startswith("cdan")) else None
                if method == "coral":
                    transfer = coral_loss(fs, ft)
                elif method == "mmd":
                    transfer = mmd_loss(fs, ft)
                else:
                    assert disc is not None
                    grl.lambd = dann_schedule(p) if lambda_schedule else 1.0
                    f = torch.cat([fs, ft])
                    weights = None
                    if method.startswith("cdan"):
                        assert logits_t is not None
                        logits = torch.cat([logits_s, logits_t])
                        probs = F.softmax(logits, dim=1).detach()
                        f = rmap(f, probs) if rmap is not None else multilinear_map(f, probs)
                        if method == "cdan+e":
                            w = 1.0 + torch.exp(-entropy(logits.detach()))
                            weights = w / w.sum() * len(w)  # mean weight 1, as in TLlib
                    d_logits = disc(grl(f))
                    d_labels = torch.cat([torch.ones(len(fs)), torch.zeros(len(ft))])
                    transfer = F.binary_cross_entropy_with_logits(d_logits, d_labels, weight=weights)
                    sums["domain_acc"] += float(((d_logits > 0).float() == d_labels).float().mean()) * len(idx_s)
            cls = F.cross_entropy(logits_s, ys)
            loss = cls + trade_off * transfer if method != "source-only" else cls
            if entropy_weight and method != "source-only":
                assert logits_t is not None
                ent = entropy(logits_t).mean()
                loss = loss + entropy_weight * ent
                sums["target_entropy"] = sums.get("target_entropy", 0.0) + float(ent.detach()) * len(idx_s)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            seen += len(idx_s)
            sums["cls_loss"] += float(cls.detach()) * len(idx_s)
            sums["transfer_loss"] += float(transfer.detach()) * len(idx_s)
            sums["train_acc"] += float((logits_s.argmax(1) == ys).sum())
        rec: dict[str, Any] = {"epoch": epoch, **{k: v / max(seen, 1) for k, v in sums.items()}}
        if not adversarial:
            rec.pop("domain_acc")
        else:
            rec["grl_lambda"] = grl.lambd
        rec["lr"] = opt.param_groups[0]["lr"]
        if source_val is not None:
            ev = evaluate(model, source_val[0], source_val[1], prepare=prepare, batch_size=eval_batch_size)
            rec["source_val_acc"], rec["source_val_loss"] = ev["acc"], ev["loss"]
        if monitor is not None:
            rec.update({f"monitor_{k}": v for k, v in monitor(model).items()})
        rec["seconds"] = round(time.perf_counter() - t0, 3)
        if select == "source_val":
            score = (rec["source_val_acc"], -rec["source_val_loss"], float(epoch))
            if best_score is None or score > best_score:
                best_score, best_epoch = score, epoch
                best_state = copy.deepcopy(model.state_dict()) if epoch < epochs else None
        else:
            best_epoch = epoch
        history.append(rec)
        if log is not None:
            log(rec)
    if best_state is not None:  # an earlier epoch won
        model.load_state_dict(best_state)
    model.eval()
    for rec in history:
        rec["selected"] = rec["epoch"] == best_epoch
    history.meta["selection"] = {"criterion": select, "epoch": best_epoch, "uses_target_labels": False}
    return history

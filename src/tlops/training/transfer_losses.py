"""Domain-adaptation losses: the statistical and adversarial building blocks, and one small
module per adaptation method holding its transfer term (:class:`TransferLoss`:
:class:`SourceOnly`, :class:`CORAL`, :class:`MMD`, :class:`DANN`, :class:`CDAN`; :func:`make_loss`
by name). The training loop that minimises them is :func:`tlops.training.adaptation.adapt_loop`.

* losses between a batch of source features ``fs`` (n_s, d) and target features ``ft`` (n_t, d):
  :func:`coral_loss` (Deep CORAL) and :func:`mmd_loss` (multi-kernel Gaussian MMD, as in DAN);
* adversarial parts: :class:`GradientReversal` (DANN's gradient reversal layer, with
  :func:`dann_schedule` for its coefficient), :class:`DomainDiscriminator` (an MLP giving a
  domain logit) and :func:`multilinear_map` (CDAN's conditioning on the classifier output).

References: Sun & Saenko, "Deep CORAL", ECCV-W 2016; Long et al., "Learning Transferable
Features with Deep Adaptation Networks" (DAN/MK-MMD), ICML 2015; Ganin et al.,
"Domain-Adversarial Training of Neural Networks", JMLR 2016; Long et al., "Conditional
Adversarial Domain Adaptation" (CDAN), NeurIPS 2018.

Source-free / self-training parts: :func:`information_maximisation` and
:func:`cluster_pseudo_labels` (SHOT: Liang et al., "Do We Really Need to Access the Source
Data? Source Hypothesis Transfer for Unsupervised Domain Adaptation", ICML 2020; the
:class:`SHOT` transfer term) and :func:`confident_pseudo_labels` with :class:`PseudoLabels`
(confidence-thresholded self-training, e.g. Lee, "Pseudo-Label", ICML-W 2013).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

METHODS = ("source-only", "coral", "mmd", "dann", "cdan", "cdan+e")
# not in METHODS: SHOT's loop trains on the target alone (tlops.training.adaptation.shot)
SHOT_METHOD = "shot"
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


def information_maximisation(logits: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, dict[str, float]]:
    """SHOT's information-maximisation loss on a batch of target logits: the mean per-sample
    entropy (confident predictions) minus the entropy of the mean prediction (diverse ones: no
    collapse onto a few classes). ``eps`` inside the log of the mean, as in the official code."""
    ent = entropy(logits.float()).mean()
    mean_p = F.softmax(logits.float(), dim=1).mean(0)
    div = -(mean_p * torch.log(mean_p + eps)).sum()
    return ent - div, {"target_entropy": float(ent.detach()), "diversity": float(div.detach())}


def cluster_pseudo_labels(features: np.ndarray, probs: np.ndarray, rounds: int = 1) -> np.ndarray:
    """SHOT's self-supervised pseudo-labels: class centroids in feature space weighted by the
    predicted probabilities, each sample labelled by its nearest centroid (cosine distance),
    then ``rounds`` refinement passes with hard-assignment centroids (1 in the paper). Features
    get a constant 1 appended and are L2-normalised first, as in the official implementation, so
    the labels follow the target's own cluster structure rather than the source classifier's
    boundary alone. ``features`` (N, D), ``probs`` (N, C) softmax outputs; returns (N,) ints."""
    from scipy.spatial.distance import cdist

    f = np.concatenate([np.asarray(features, dtype=np.float64), np.ones((len(features), 1))], axis=1)
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    aff = np.asarray(probs, dtype=np.float64)
    k = aff.shape[1]
    labels = np.zeros(len(f), dtype=np.int64)
    for _ in range(rounds + 1):
        centroids = aff.T @ f / (1e-8 + aff.sum(0)[:, None])
        labels = cdist(f, centroids, "cosine").argmin(1)
        aff = np.eye(k)[labels]
    return labels.astype(np.int64)


def confident_pseudo_labels(probs: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Self-training's pseudo-labels: (indices, labels) of the samples whose top softmax
    probability is at least ``threshold`` (the rest stay unlabelled: wrong labels on uncertain
    samples would be learnt as facts)."""
    conf, labels = probs.max(1)
    keep = torch.nonzero(conf >= threshold).flatten()
    return keep, labels[keep]


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


# --------------------------------------------------------------------------- per-method transfer losses


class TransferLoss(nn.Module):
    """The transfer term of one adaptation method, minimised with ``trade_off`` next to the source
    cross-entropy. Its parameters (a domain discriminator) train with the model; it is moved to
    the runtime's device and checkpointed with it."""

    name = "source-only"
    uses_target = True  # False: target batches are not even forwarded
    needs_target_logits = False  # the target logits are computed for the loss (CDAN)
    adversarial = False

    def forward(
        self,
        fs: torch.Tensor,
        ft: torch.Tensor,
        logits_s: torch.Tensor,
        logits_t: torch.Tensor | None,
        progress: float,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """(transfer loss, per-step statistics to average over the epoch)."""
        raise NotImplementedError

    def epoch_stats(self) -> dict[str, float]:
        return {}

    def describe(self) -> dict[str, Any]:
        return {"discriminator": None, "cdan_map": None}


class SourceOnly(TransferLoss):
    """No transfer term: the adaptation baseline (trained on the labelled source only)."""

    uses_target = False

    def forward(self, fs, ft, logits_s, logits_t, progress):
        return torch.zeros(()), {}


class CORAL(TransferLoss):
    """Deep CORAL: :func:`coral_loss` between source and target features."""

    name = "coral"

    def forward(self, fs, ft, logits_s, logits_t, progress):
        return coral_loss(fs, ft), {}


class MMD(TransferLoss):
    """DAN: multi-kernel :func:`mmd_loss` between source and target features."""

    name = "mmd"

    def forward(self, fs, ft, logits_s, logits_t, progress):
        return mmd_loss(fs, ft), {}


class DANN(TransferLoss):
    """Domain-classification BCE of a :class:`DomainDiscriminator` on the features behind a
    :class:`GradientReversal` whose coefficient follows :func:`dann_schedule` (constant 1 with
    ``lambda_schedule=False``)."""

    name = "dann"
    adversarial = True

    def __init__(self, in_features: int, hidden: int = 1024, lambda_schedule: bool = True):
        super().__init__()
        self.hidden, self.lambda_schedule = hidden, lambda_schedule
        self.grl = GradientReversal(0.0)
        self.disc = DomainDiscriminator(in_features, hidden=hidden)

    def domain_input(self, f: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What the discriminator sees, and per-sample weights (None: uniform)."""
        return f, None

    def forward(self, fs, ft, logits_s, logits_t, progress):
        self.grl.lambd = dann_schedule(progress) if self.lambda_schedule else 1.0
        f = torch.cat([fs, ft])
        logits = torch.cat([logits_s, logits_t]) if logits_t is not None else logits_s
        f, weights = self.domain_input(f, logits)
        d_logits = self.disc(self.grl(f))
        d_labels = torch.cat([torch.ones(len(fs), device=fs.device), torch.zeros(len(ft), device=fs.device)])
        loss = F.binary_cross_entropy_with_logits(d_logits, d_labels, weight=weights)
        return loss, {"domain_acc": float(((d_logits > 0).float() == d_labels).float().mean())}

    def epoch_stats(self) -> dict[str, float]:
        return {"grl_lambda": self.grl.lambd}

    def describe(self) -> dict[str, Any]:
        return {"discriminator": f"{self.hidden} hidden x2", "cdan_map": None}


class CDAN(DANN):
    """DANN whose discriminator sees ``multilinear_map(features, softmax(logits))`` (the softmax
    is detached, as in the paper); ``entropy_conditioning`` (``cdan+e``) weights each sample by
    ``1 + exp(-entropy)``. ``randomized_dim``: ``-1`` follows the paper (the
    :class:`RandomizedMultilinearMap` with 1024 dimensions when ``C*D > 4096``, the exact map
    otherwise); ``None`` always the exact map; ``k > 0`` always the randomized map with ``k``
    dimensions (drawn from ``generator``)."""

    name = "cdan"
    needs_target_logits = True

    def __init__(
        self,
        feature_dim: int,
        num_classes: int,
        hidden: int = 1024,
        lambda_schedule: bool = True,
        randomized_dim: int | None = -1,
        entropy_conditioning: bool = False,
        generator: torch.Generator | None = None,
    ):
        d_in = feature_dim * num_classes
        rdim = (1024 if d_in > 4096 else None) if randomized_dim == -1 else randomized_dim
        rmap = RandomizedMultilinearMap(feature_dim, num_classes, rdim, generator=generator) if rdim else None
        super().__init__(rdim or d_in, hidden, lambda_schedule)  # the discriminator after the map (global RNG)
        self.rmap = rmap
        self.entropy_conditioning = entropy_conditioning
        if entropy_conditioning:
            self.name = "cdan+e"

    def domain_input(self, f, logits):
        probs = F.softmax(logits, dim=1).detach()
        f = self.rmap(f, probs) if self.rmap is not None else multilinear_map(f, probs)
        if not self.entropy_conditioning:
            return f, None
        w = 1.0 + torch.exp(-entropy(logits.detach()))
        return f, w / w.sum() * len(w)  # mean weight 1, as in TLlib

    def describe(self) -> dict[str, Any]:
        cmap = f"randomized {self.rmap.output_dim}" if self.rmap is not None else "exact"
        return {"discriminator": f"{self.hidden} hidden x2", "cdan_map": cmap}


class SHOT(TransferLoss):
    """SHOT's objective on target batches (the source classifier head stays frozen):
    :func:`information_maximisation` of the target logits; the ``beta`` * cross-entropy to
    :func:`cluster_pseudo_labels` is added by the loop that owns the pseudo-labels
    (:func:`tlops.training.adaptation.shot`)."""

    name = SHOT_METHOD
    needs_target_logits = True

    def __init__(self, beta: float = 0.3, im_weight: float = 1.0):
        super().__init__()
        self.beta, self.im_weight = float(beta), float(im_weight)

    def forward(self, fs, ft, logits_s, logits_t, progress):
        if logits_t is None:
            raise ValueError("SHOT needs the target logits")
        loss, stats = information_maximisation(logits_t)
        return self.im_weight * loss, stats

    def describe(self) -> dict[str, Any]:
        return {"discriminator": None, "cdan_map": None, "shot_beta": self.beta, "shot_im_weight": self.im_weight}


class PseudoLabels(TransferLoss):
    """Self-training's term: cross-entropy of the target logits to their pseudo-labels (the loop
    that owns the labels passes each batch's: :func:`tlops.training.adaptation.self_train`)."""

    name = "self-train"
    needs_target_logits = True

    def forward(self, fs, ft, logits_s, logits_t, progress, labels=None):
        if logits_t is None or labels is None:
            raise ValueError("self-training needs the target logits and their pseudo-labels")
        return F.cross_entropy(logits_t, labels), {}


def make_loss(
    method: str,
    feature_dim: int,
    num_classes: int,
    *,
    discriminator_hidden: int = 1024,
    lambda_schedule: bool = True,
    cdan_randomized_dim: int | None = -1,
    generator: torch.Generator | None = None,
) -> TransferLoss:
    """The transfer loss of ``method`` (one of :data:`METHODS`)."""
    method = method.lower()
    if method == "source-only":
        return SourceOnly()
    if method == "coral":
        return CORAL()
    if method == "mmd":
        return MMD()
    if method == "dann":
        return DANN(feature_dim, discriminator_hidden, lambda_schedule)
    if method in ("cdan", "cdan+e"):
        return CDAN(
            feature_dim,
            num_classes,
            discriminator_hidden,
            lambda_schedule,
            cdan_randomized_dim,
            entropy_conditioning=method == "cdan+e",
            generator=generator,
        )
    raise ValueError(f"unknown adaptation method {method!r} (allowed: {', '.join(METHODS)})")

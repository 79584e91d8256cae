"""BatchNorm statistics over the global batch under data parallelism (``train.sync_batchnorm``).

Under DDP each rank normalises its share of every batch with that share's own mean and variance:
with ``train.batch_size: 32`` on 2 ranks, BatchNorm sees 16 images, and training is no longer the
single-process training it replaces. On digits (resnet10t from random init, 5 epochs) two nodes
reached 0.04 lower validation accuracy than one process, 2.5x the seed noise
(``bench/results/multinode.md``). Synchronising the statistics makes every rank normalise with the
global batch's, as the single process does.

On CUDA this is PyTorch's own ``nn.SyncBatchNorm`` (``convert_sync_batchnorm``). PyTorch refuses
it on CPU (gloo), where tlops also trains data-parallel (multi-node CPU jobs, and the tests and
benchmarks on loopback), so there each BatchNorm's training forward is replaced by the same
computation with its per-channel sums all-reduced through ``torch.distributed.nn.functional``
(differentiable: the backward all-reduces the gradients of the sums, as ``nn.SyncBatchNorm``
does). Evaluation, and any process that is not part of a multi-rank group, runs the module's own
forward. Parameters, buffers and state-dict keys are unchanged, so checkpoints and saved models do
not depend on whether the statistics were synchronised.
"""

from __future__ import annotations

import types

import torch
from torch import nn


def apply(module: nn.Module, device: torch.device) -> int:
    """Synchronise every BatchNorm of ``module`` across the process group, in place; the count."""
    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if device.type == "cuda":
        if any(isinstance(m, nn.SyncBatchNorm) for m in bns):
            return len(bns)
        for name, child in list(module.named_children()):
            setattr(module, name, nn.SyncBatchNorm.convert_sync_batchnorm(child))
        return len(bns)
    n = 0
    for bn in bns:
        if "forward" not in vars(bn) and not isinstance(bn, nn.SyncBatchNorm):
            bn.forward = types.MethodType(_synced_forward, bn)
            n += 1
    return n


def _synced_forward(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist
    from torch.distributed.nn.functional import all_reduce

    if not (bn.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return type(bn).forward(bn, x)
    c = x.shape[1]
    dims = [0, *range(2, x.dim())]
    xf = x.float()
    local = torch.cat([xf.sum(dims), (xf * xf).sum(dims), xf.new_tensor([x.numel() / c])])
    total = all_reduce(local)
    count = total[-1]
    mean = total[:c] / count
    var = (total[c : 2 * c] / count - mean * mean).clamp_min(0)
    if bn.track_running_stats and bn.running_mean is not None:
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            momentum = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
            unbiased = var * (count / (count - 1).clamp_min(1))
            bn.running_mean.lerp_(mean.detach().to(bn.running_mean.dtype), momentum)
            bn.running_var.lerp_(unbiased.detach().to(bn.running_var.dtype), momentum)
    shape = [1, c] + [1] * (x.dim() - 2)
    y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + bn.eps)
    if bn.affine:
        y = y * bn.weight.view(shape) + bn.bias.view(shape)
    return y.to(x.dtype)

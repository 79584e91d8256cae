"""The fine-tuning loop's per-epoch batch plan, with and without data parallelism (DDP).

``train.distributed: ddp`` makes the fine-tune step data-parallel. The relaunch under
``torchrun`` is the torchrun runner's (:mod:`tlops.runners.torchrun`); each rank's device,
rank and world are in its :class:`~tlops.training.runtime.Runtime`. Every rank runs the same
step code with the same seed (probe, strategy choice and validation are replicated, so every
rank takes the same decisions); the fine-tuning loop wraps the model in
``DistributedDataParallel`` and each rank trains on its shard of every batch (this module).
``train.batch_size`` is the *global* batch: with N ranks each takes ``batch_size / N`` samples
of every batch and DDP averages the gradients, so the learning rate, the schedule and the
result do not depend on N (up to BatchNorm statistics, which are per rank).

Batch plan (:func:`epoch_batches`, used with and without DDP): a seeded permutation per
epoch. For text, the epoch is sorted by length with a random jitter (``LENGTH_JITTER``), split
into batches, and the batch order is shuffled: batches hold sentences of similar length, so
dynamic padding wastes little compute (``transformers``' ``group_by_length`` sorts within
megabatches of 50 batches), and the jitter keeps them from repeating every epoch. Images keep
plain permutation slices.

Speed of the loop (bench/perf.py measures each against transformers.Trainer / a plain loop):
length-grouped text batches (above); the fused AdamW kernel (``Runtime.adamw_kwargs``); torch
threads = the usable CPUs (affinity, cgroup quota) when ``train.threads`` is unset
(``runtime.auto_threads``); no per-step ``.item()`` (losses are summed on the device, one sync
per epoch); validation under ``torch.inference_mode`` in length-sorted batches.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

# text: the epoch is sorted by length, each length scaled by a random factor in [exp(-j), exp(j)], and
# cut into batches. Sorted exactly, the batches would pad least but be the same every epoch (only their
# order would change); the jitter lets neighbours of similar length trade places, so the batches change
# every epoch while padding stays within a few percent of the exact sort (tests/test_ddp.py measures both).
LENGTH_JITTER = 0.1


def epoch_batches(
    x: Any,
    perm: np.ndarray,
    batch_size: int,
    *,
    bucket: bool,
    generator: torch.Generator | None = None,
    rank: int = 0,
    world: int = 1,
) -> list[np.ndarray]:
    """This rank's index batches for one epoch.

    ``perm`` is the epoch's random permutation; global batches hold ``batch_size`` indices
    (the last one may be short) and there are always ``ceil(len(perm) / batch_size)`` of them.
    ``bucket`` (text): length-grouped batches in shuffled order (needs ``generator``). With
    ``world > 1`` each global batch is split round-robin; a batch with fewer items than ranks
    repeats items so that no rank gets an empty batch (like ``DistributedSampler``'s padding).
    """
    perm = np.asarray(perm)
    if bucket and len(perm) > batch_size:
        lengths = np.fromiter((len(x[i]) for i in perm), dtype=np.float64, count=len(perm))
        u = torch.rand(len(perm), generator=generator, dtype=torch.float64).numpy()
        part = perm[np.argsort(-lengths * np.exp(LENGTH_JITTER * (2 * u - 1)), kind="stable")]
        batches = [part[i : i + batch_size] for i in range(0, len(part), batch_size)]
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).numpy()]
    else:
        batches = [perm[i : i + batch_size] for i in range(0, len(perm), batch_size)]
    if world <= 1:
        return batches
    out = []
    for b in batches:
        if len(b) < world:
            b = np.resize(b, world)  # cycles the items
        out.append(b[rank::world])
    return out

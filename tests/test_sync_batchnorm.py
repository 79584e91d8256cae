"""Synchronised BatchNorm on CPU (``train.sync_batchnorm``): two gloo ranks on loopback, each holding half
of a batch, compute exactly what one process computes on the whole batch (outputs, input and parameter
gradients, running statistics); outside a process group the module's own forward runs."""

from __future__ import annotations

import socket

import pytest
import torch
from torch import nn

from tlops.training import sync_batchnorm


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(8, 3, 5, 5, generator=g) * 2 + 1, torch.randn(8, 3, 5, 5, generator=g)


def _step(bn: nn.BatchNorm2d, x: torch.Tensor, w: torch.Tensor) -> dict[str, torch.Tensor]:
    x = x.clone().requires_grad_(True)
    y = bn(x)
    (y * w).sum().backward()
    return {
        "y": y.detach(),
        "x_grad": x.grad,
        "weight_grad": bn.weight.grad,
        "bias_grad": bn.bias.grad,
        "running_mean": bn.running_mean.clone(),
        "running_var": bn.running_var.clone(),
    }


def _rank(rank: int, port: int, queue) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        bn = nn.BatchNorm2d(3)
        assert sync_batchnorm.apply(bn, torch.device("cpu")) == 1
        x, w = _batch()
        half = slice(4 * rank, 4 * rank + 4)
        out = _step(bn, x[half], w[half])
        for k in ("weight_grad", "bias_grad"):  # what DDP's gradient reduction adds up (before its 1/world)
            dist.all_reduce(out[k])
        queue.put((rank, {k: v.numpy() for k, v in out.items()}))  # by value: no shared-memory handles
    finally:
        dist.destroy_process_group()


def test_two_ranks_with_half_a_batch_each_equal_one_process_with_all_of_it():
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    got = {r: {k: torch.from_numpy(v) for k, v in out.items()} for r, out in (queue.get(timeout=120) for _ in procs)}
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    x, w = _batch()
    ref = _step(nn.BatchNorm2d(3), x, w)
    for k in ("y", "x_grad"):
        torch.testing.assert_close(torch.cat([got[0][k], got[1][k]]), ref[k], atol=1e-5, rtol=1e-5)
    for k in ("weight_grad", "bias_grad", "running_mean", "running_var"):
        for r in (0, 1):
            torch.testing.assert_close(got[r][k], ref[k], atol=1e-5, rtol=1e-5)


def test_without_a_process_group_and_in_eval_it_is_plain_batchnorm():
    x, w = _batch()
    plain, synced = nn.BatchNorm2d(3), nn.BatchNorm2d(3)
    assert sync_batchnorm.apply(synced, torch.device("cpu")) == 1
    assert sync_batchnorm.apply(synced, torch.device("cpu")) == 0  # idempotent
    a, b = _step(plain, x, w), _step(synced, x, w)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    plain.eval(), synced.eval()
    assert torch.equal(plain(x), synced(x))
    assert set(synced.state_dict()) == set(plain.state_dict())


@pytest.mark.parametrize("flag", [True, False])
def test_runtime_synchronises_only_when_distributed_and_asked(flag, monkeypatch):
    from tlops.config import TrainConfig
    from tlops.training.runtime import Runtime

    calls = []
    monkeypatch.setattr(sync_batchnorm, "apply", lambda m, d: calls.append(m) or 0)
    monkeypatch.setattr("torch.nn.parallel.DistributedDataParallel", lambda m, **k: m)
    module = nn.Sequential(nn.BatchNorm1d(2))
    Runtime.from_config(TrainConfig(sync_batchnorm=flag)).wrap(module)  # one process: nothing to synchronise
    assert calls == []
    Runtime.from_config(TrainConfig(sync_batchnorm=flag), rank=0, world=2).wrap(module)
    assert calls == ([module] if flag else [])

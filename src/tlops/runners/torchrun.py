"""The torchrun runner: ``train.distributed: ddp`` runs the fine-tune step data-parallel.

* Launch. When the step runs outside ``torchrun`` (``tlops run``, ``tlops step fine-tune``,
  the KFP / compose container command), :func:`run_step` relaunches it with
  ``python -m torch.distributed.run --standalone --nproc-per-node N -m tlops.runners.torchrun
  ...`` and waits; N = ``train.nproc``, else the number of visible GPUs (``train.device``
  permitting), else 2 on CPU. With N = 1 the step simply runs in-process without DDP. Already
  under ``torchrun`` (e.g. a container command that starts ``torchrun ... tlops step
  fine-tune ...`` itself), the step does not relaunch.
* Several nodes (``train.nodes`` > 1) outside a cluster: one ``torchrun --nnodes M
  --node-rank i --rdzv-backend c10d --rdzv-endpoint 127.0.0.1:PORT`` process per node on this
  machine, the layout a multi-node job has on a cluster (where the KFP fine-tune task submits a
  TrainJob / PyTorchJob instead: ``tlops.kfp.trainjob``). When one node's workers fail, the
  others are stopped and the step fails with the failing node's exit status.
* Inside each worker: the step's :class:`~tlops.training.runtime.Runtime` is built with this
  process's rank, world and local rank (one device per local rank, CPU threads split between
  the local ranks), joins the process group (NCCL on GPU, gloo on CPU), and every rank runs the
  same step; rank 0 writes the artifact (and the checkpoints), the other ranks write to a
  throw-away directory.

This module is the only place that reads torchrun's environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``): :func:`rank_info`. Importing it does not import torch.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, NamedTuple

from tlops.errors import TlopsError

if TYPE_CHECKING:
    from tlops.training.runtime import Runtime

log = logging.getLogger(__name__)

Body = Callable[[Any, dict[str, Any], Path, "Runtime"], Any]


class DistributedError(TlopsError):
    """The data-parallel workers failed (names the command and its exit status)."""


class Ranks(NamedTuple):
    """This process's place in a torchrun job."""

    rank: int
    world: int
    local_rank: int
    local_world: int


def rank_info() -> Ranks | None:
    """This process's place in a torchrun job, or None outside one (torchrun sets these variables)."""
    env = os.environ
    if "LOCAL_RANK" not in env or "WORLD_SIZE" not in env:
        return None
    world = int(env["WORLD_SIZE"])
    return Ranks(int(env.get("RANK", "0")), world, int(env["LOCAL_RANK"]), int(env.get("LOCAL_WORLD_SIZE", str(world))))


def secondary_rank() -> bool:
    """A non-zero rank of a multi-process torchrun job (rank 0 acts for the job: locks, artifacts)."""
    r = rank_info()
    return r is not None and r.world > 1 and r.rank != 0


def resolve_nproc(train_cfg: Any) -> int:
    if getattr(train_cfg, "nproc", None):
        return int(train_cfg.nproc)
    import torch

    if getattr(train_cfg, "device", "auto") != "cpu" and torch.cuda.is_available():
        return torch.cuda.device_count()
    return 2


def run_step(cfg: Any, inputs: dict[str, Any], out: Path, body: Body, *, checkpoint_dir: Path | None = None) -> Any:
    """Run the fine-tune step ``body(cfg, inputs, out, runtime)``: in-process, relaunched under
    ``torchrun`` (``train.distributed: ddp`` outside torchrun), or as one DDP rank (inside)."""
    from tlops.training.runtime import Runtime

    out = Path(out)
    dist = rank_info()
    nodes = getattr(cfg.train, "nodes", 1)
    if cfg.train.distributed != "ddp" or (dist is None and resolve_nproc(cfg.train) * nodes <= 1):
        if cfg.train.distributed == "ddp":
            log.info("train.distributed=ddp with 1 process: training in-process without DDP")
        return body(cfg, inputs, out, Runtime.from_config(cfg.train, checkpoint_dir=checkpoint_dir))
    if dist is None:
        return launch(cfg, inputs, out, resolve_nproc(cfg.train), checkpoint_dir=checkpoint_dir, nodes=nodes)
    rt = Runtime.from_config(cfg.train, checkpoint_dir=checkpoint_dir, **dist._asdict())
    rt.init_process_group()
    try:
        if rt.is_main:
            result = body(cfg, inputs, out, rt)
        else:
            with tempfile.TemporaryDirectory(prefix=f"tlops-rank{rt.rank}-") as tmp:
                body(cfg, inputs, Path(tmp) / out.name, rt)
            result = None
        rt.barrier()
    finally:
        rt.shutdown()
    return result


def launch_command(
    config_file: Path,
    inputs: dict[str, Path],
    out: Path,
    nproc: int,
    *,
    checkpoint_dir: Path | None = None,
    nodes: int = 1,
    node_rank: int = 0,
    rdzv_endpoint: str | None = None,
) -> list[str]:
    """One node's torchrun command: ``--standalone`` for one node, else c10d rendezvous at
    ``rdzv_endpoint`` (rank 0's host:port) as node ``node_rank`` of ``nodes``."""
    if nodes == 1:
        placement = ["--standalone", "--nnodes=1"]
    else:
        placement = [
            f"--nnodes={nodes}",
            f"--node-rank={node_rank}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={rdzv_endpoint}",
            "--rdzv-id=tlops-fine-tune",
            "--max-restarts=0",
        ]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *placement,
        f"--nproc-per-node={nproc}",
        "-m",
        "tlops.runners.torchrun",
        "--config",
        str(config_file),
        "--out",
        str(out),
    ]
    for name, path in inputs.items():
        cmd += ["--in", f"{name}={path}"]
    if checkpoint_dir is not None:
        cmd += ["--checkpoint-dir", str(checkpoint_dir)]
    return cmd


def free_port() -> int:
    """A TCP port free on loopback now (the c10d store of a local multi-node job binds it)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_nodes(cmds: list[list[str]], env: dict[str, str]) -> int:
    """Run one torchrun per node; the first node that fails stops the others (they would wait on
    it in the next collective until the timeout). Returns 0, or the first failure's status."""
    import time

    procs = [subprocess.Popen(c, env=env) for c in cmds]
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [c for c in codes if c not in (None, 0)]
            if failed:
                return failed[0]
            if all(c == 0 for c in codes):
                return 0
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def launch(
    cfg: Any,
    inputs: dict[str, Any],
    out: Path,
    nproc: int,
    *,
    checkpoint_dir: Path | None = None,
    nodes: int = 1,
) -> Any:
    """Relaunch the fine-tune step under ``torchrun`` with ``nproc`` workers on each of ``nodes``
    local node processes; rank 0 writes ``out``."""
    from tlops.artifacts import read_artifact
    from tlops.config import save_config

    with tempfile.TemporaryDirectory(prefix="tlops-ddp-") as tmp:
        config_file = Path(tmp) / "config.yaml"
        save_config(cfg, config_file)
        endpoint = f"127.0.0.1:{free_port()}" if nodes > 1 else None
        cmds = [
            launch_command(
                config_file,
                {k: Path(a.path).resolve() for k, a in inputs.items()},
                out.resolve(),
                nproc,
                checkpoint_dir=Path(checkpoint_dir).resolve() if checkpoint_dir is not None else None,
                nodes=nodes,
                node_rank=i,
                rdzv_endpoint=endpoint,
            )
            for i in range(nodes)
        ]
        cmd = cmds[0]
        env = dict(os.environ)  # the workers' process environment (torchrun adds its own variables)
        if "OMP_NUM_THREADS" not in env and not cfg.train.threads:
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // (nproc * nodes)))
        src = str(Path(__file__).resolve().parents[2])  # the tlops checkout, when not installed
        env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        log.info("fine-tune: train.distributed=ddp, launching %d node(s) x %d workers: %s", nodes, nproc, " ".join(cmd))
        rc = subprocess.run(cmd, env=env).returncode if nodes == 1 else run_nodes(cmds, env)
    if rc != 0:
        raise DistributedError(
            f"fine-tune: the {nodes * nproc} DDP workers failed (exit status {rc}); command: {' '.join(cmd)}"
        )
    return read_artifact(out, "trained-models")


def _worker(argv: list[str] | None = None) -> int:
    """``torchrun ... -m tlops.runners.torchrun --config C --in name=path ... --out O [--checkpoint-dir D]``.

    On a cluster's multi-node job (``tlops.kfp.trainjob``) the pods share no disk: the config
    comes inline (``--config-json``), inputs are ``s3://`` prefixes every process downloads, and
    rank 0 publishes the artifact to an ``s3://`` ``--out`` (manifest last)."""
    ap = argparse.ArgumentParser(prog="python -m tlops.runners.torchrun", description=_worker.__doc__)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="config file")
    src.add_argument("--config-json", help="the resolved config as JSON")
    ap.add_argument("--in", dest="inputs", action="append", default=[], help="name=path of an input artifact")
    ap.add_argument("--out", required=True)
    ap.add_argument("--checkpoint-dir", default=None, help="resumable checkpoints (the runner's, under the workdir)")
    args = ap.parse_args(argv)
    dist = rank_info()
    rank = dist.rank if dist is not None else 0
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    import json

    from tlops import dag
    from tlops.artifacts import read_artifact
    from tlops.config import load_config, validate_config
    from tlops.steps import get_step
    from tlops.storage import S3Storage, is_s3

    cfg = load_config(args.config) if args.config else validate_config(json.loads(args.config_json), "--config-json")
    spec = dag.get("fine-tune")
    ckpt = Path(args.checkpoint_dir) if args.checkpoint_dir else None
    with tempfile.TemporaryDirectory(prefix=f"tlops-rank{rank}-io-") as tmp:
        inputs = {}
        for item in args.inputs:
            name, path = item.split("=", 1)
            if is_s3(path):
                local = Path(tmp) / "in" / name
                S3Storage().download_dir(path, local)
                path = str(local)
            inputs[name] = read_artifact(Path(path), dag.get(spec.inputs[name]).output)
        out = Path(tmp) / "out" if is_s3(args.out) else Path(args.out)
        get_step(spec.name).run(cfg, inputs, out, checkpoint_dir=ckpt)
        if is_s3(args.out) and rank == 0:
            S3Storage().upload_dir(out, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(_worker())

"""Data-parallel fine-tuning (DDP) and the fine-tuning loop's per-epoch batch plan.

``train.distributed: ddp`` makes the fine-tune step data-parallel:

* Launch. When the step runs outside ``torchrun`` (``tlops run``, ``tlops step fine-tune``,
  the KFP / compose container command), :func:`run_step` relaunches it with
  ``python -m torch.distributed.run --standalone --nproc-per-node N -m tlops.training.distributed
  ...`` and waits; N = ``train.nproc``, else env ``TLOPS_NPROC``, else the number of visible
  GPUs, else 2 on CPU. With N = 1 the step simply runs in-process without DDP. Already under
  ``torchrun`` (``LOCAL_RANK`` / ``WORLD_SIZE`` set, e.g. a container command that starts
  ``torchrun ... tlops step fine-tune ...`` itself), the step does not relaunch.
* Inside each worker: ``init_process_group`` (NCCL on GPU, gloo on CPU), one device per
  local rank, CPU threads split between the local ranks; every rank runs the same step code
  with the same seed (probe, strategy choice and validation are replicated, so every rank
  takes the same decisions); the fine-tuning loop wraps the model in
  ``DistributedDataParallel`` and each rank trains on its shard of every batch. Rank 0 writes
  the artifact (and the checkpoints); the other ranks write to a throw-away directory.
* ``train.batch_size`` is the *global* batch: with N ranks each takes ``batch_size / N``
  samples of every batch and DDP averages the gradients, so the learning rate, the schedule
  and the result do not depend on N (up to BatchNorm statistics, which are per rank).

Batch plan (:func:`epoch_batches`, used with and without DDP): a seeded permutation per
epoch (as before). For text, the permutation is cut into chunks of ``MEGABATCH`` batches,
each chunk is sorted by length and split into batches, and the batch order is shuffled:
batches hold sentences of similar length, so dynamic padding wastes little compute
(``transformers``' ``group_by_length`` does the same). Images keep plain permutation slices.

Speed of the loop (bench/perf.py measures each against transformers.Trainer / a plain loop):
length-grouped text batches (above); the fused AdamW kernel (:meth:`Context.adamw_kwargs`);
torch threads = the usable CPUs (affinity, cgroup quota) when ``train.threads`` is unset (:func:`auto_threads`); no
per-step ``.item()`` (losses are summed on the device, one sync per epoch); validation under
``torch.inference_mode`` in length-sorted batches.

Runtime knobs for accelerators (environment, not config: they change speed, not the recipe):
``TLOPS_DEVICE`` (``auto`` = CUDA when available, ``cpu``, ``cuda``), ``TLOPS_AMP=bf16``
(autocast), ``TLOPS_CHANNELS_LAST=1`` (image models), ``TLOPS_COMPILE=1`` (``torch.compile``).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from tlops.errors import TlopsError

log = logging.getLogger(__name__)

# text: sort by length within chunks of this many batches. On UCI sentences (bs 32) padded/real tokens are 2.14
# for random batches, 1.48 with 4, 1.38 with the whole epoch sorted; with 4 the batches still change every
# epoch (with 16, 6 of 10 batches repeated from one epoch to the next, and accuracy suffered).
MEGABATCH = 4


class DistributedError(TlopsError):
    """The data-parallel workers failed (names the command and its exit status)."""


# ------------------------------------------------------------------------------ batch plan


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
        lengths = np.fromiter((len(x[i]) for i in perm), dtype=np.int64, count=len(perm))
        chunk = batch_size * MEGABATCH
        batches = []
        for s in range(0, len(perm), chunk):
            part = perm[s : s + chunk]
            part = part[np.argsort(-lengths[s : s + chunk], kind="stable")]
            batches += [part[i : i + batch_size] for i in range(0, len(part), batch_size)]
        order = (
            torch.randperm(len(batches), generator=generator).numpy() if generator is not None else range(len(batches))
        )
        batches = [batches[i] for i in order]
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


# ------------------------------------------------------------------------------ context


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _device_from_env(local_rank: int) -> torch.device:
    want = os.environ.get("TLOPS_DEVICE", "auto").strip().lower() or "auto"
    if want not in ("auto", "cpu", "cuda"):
        raise TlopsError(f"TLOPS_DEVICE={want!r} is not valid; use auto, cpu or cuda")
    if want == "cuda" and not torch.cuda.is_available():
        raise TlopsError("TLOPS_DEVICE=cuda but torch sees no CUDA device; use TLOPS_DEVICE=auto or cpu")
    if want == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))


@dataclass
class Context:
    """Where and how the fine-tuning loop runs: device, rank/world, accelerator knobs."""

    device: torch.device
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    distributed: bool = False
    amp: str | None = None  # "bf16"
    channels_last: bool = False
    compile: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def prepare(self, clf: nn.Module) -> nn.Module:
        """Move the classifier to the device (in place; returns it)."""
        clf.to(self.device)
        if self.channels_last and getattr(getattr(clf, "backbone", None), "modality", "") == "image":
            clf.to(memory_format=torch.channels_last)
        return clf

    def wrap(self, clf: nn.Module) -> nn.Module:
        """The module the training loop calls: DDP over ``clf`` when distributed (built again
        whenever the set of trainable parameters changes), compiled when asked."""
        model: nn.Module = clf
        if self.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            # find_unused_parameters: e.g. a transformer's pooler is not used by mean pooling
            model = DDP(clf, device_ids=ids, find_unused_parameters=True)
        if self.compile:
            model = torch.compile(model)
        return model

    def to_device(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return to_device(tensors, self.device)

    def set_threads(self, threads: int | None) -> None:
        """``train.threads`` if set, else :func:`auto_threads` (CPU, single process; DDP
        workers split the cores between the local ranks in :func:`init`)."""
        if threads:
            torch.set_num_threads(threads)
        elif self.device.type == "cpu" and not self.distributed:
            torch.set_num_threads(auto_threads())

    def adamw_kwargs(self) -> dict[str, Any]:
        """The fused AdamW kernel (one pass over all parameters) on CPU and CUDA; the
        default per-tensor loop took several times longer per step on CPU for a 22M-parameter model
        (1.1 s vs 10 s for 33M parameters on 2 busy cores; bench/perf.py measures the whole loop)."""
        return {"fused": True} if self.device.type in ("cpu", "cuda") else {}

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def all_reduce_sum(self, *values: torch.Tensor) -> list[float]:
        """Sum scalars over the ranks (one collective); plain floats back."""
        t = torch.stack([v.detach().float().reshape(()) for v in values]).to(self.device)
        if self.distributed:
            import torch.distributed as tdist

            tdist.all_reduce(t)
        return [float(v) for v in t.cpu()]

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as tdist

            tdist.barrier()


def to_device(tensors: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Batch tensors onto ``device`` (pinned host memory + async copy for CUDA; no-op on CPU)."""
    if device.type == "cpu":
        return tensors
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in tensors.items()}


_CURRENT: Context | None = None
_AUTO_THREADS: int | None = None


def usable_cpus() -> tuple[int, bool]:
    """(CPUs this process may use: affinity mask and cgroup v2/v1 CPU quota, whether a quota applies)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count() or 1
    quota = None
    try:
        q, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if q != "max":
            quota = float(q) / float(period)
    except (OSError, ValueError):
        try:
            q = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
            if q > 0:
                quota = q / int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            pass
    if quota:
        return max(1, min(n, int(quota + 0.5))), True
    return n, False


def auto_threads() -> int:
    """torch CPU threads when ``train.threads`` is unset: the CPUs this process may use
    (affinity mask, cgroup CPU quota; never < 1).

    The count never depends on the current load: a different thread count changes the order
    of floating-point reductions, so the same seed would give a different model (and model
    digest) from run to run. On cores shared with other busy processes, torch's threads wait
    on each other at every parallel region (2 threads on 2 busy cores can run 2-5x slower
    than 1): pin ``train.threads: 1`` there (``bench/perf.py`` measures it)."""
    global _AUTO_THREADS
    if _AUTO_THREADS is None:
        n, _quota = usable_cpus()
        _AUTO_THREADS = max(1, n)
        log.info("train.threads unset: using %d torch thread(s) (%d usable CPUs)", n, usable_cpus()[0])
    return _AUTO_THREADS


def current() -> Context:
    """The running context: the DDP worker's, else a single process on ``TLOPS_DEVICE``."""
    if _CURRENT is not None:
        return _CURRENT
    amp = os.environ.get("TLOPS_AMP", "").strip().lower() or None
    if amp not in (None, "bf16", "none"):
        raise TlopsError(f"TLOPS_AMP={amp!r} is not valid; use bf16 (autocast) or leave it unset")
    return Context(
        device=_device_from_env(0),
        amp=None if amp == "none" else amp,
        channels_last=_env_flag("TLOPS_CHANNELS_LAST"),
        compile=_env_flag("TLOPS_COMPILE"),
    )


def under_torchrun() -> bool:
    return all(k in os.environ for k in ("LOCAL_RANK", "WORLD_SIZE"))


def resolve_nproc(train_cfg: Any) -> int:
    n = getattr(train_cfg, "nproc", None) or os.environ.get("TLOPS_NPROC")
    if n:
        return int(n)
    if os.environ.get("TLOPS_DEVICE", "auto") != "cpu" and torch.cuda.is_available():
        return torch.cuda.device_count()
    return 2


def init(train_cfg: Any) -> Context:
    """Join the process group that ``torchrun`` set up (env://); sets :func:`current`."""
    global _CURRENT
    import torch.distributed as tdist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    device = _device_from_env(local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    elif not getattr(train_cfg, "threads", None):
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    if not tdist.is_initialized():
        tdist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    base = current() if _CURRENT is None else _CURRENT
    _CURRENT = Context(
        device=device,
        rank=rank,
        world=world,
        local_rank=local_rank,
        distributed=world > 1,
        amp=base.amp,
        channels_last=base.channels_last,
        compile=base.compile,
    )
    log.info(
        "ddp: rank %d/%d on %s (%s, %d threads)", rank, world, device, tdist.get_backend(), torch.get_num_threads()
    )
    return _CURRENT


def shutdown() -> None:
    global _CURRENT
    import torch.distributed as tdist

    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()
    _CURRENT = None


# ------------------------------------------------------------------------------ the step


def run_step(cfg: Any, inputs: dict[str, Any], out: Path, body: Callable[[Any, dict[str, Any], Path], Any]) -> Any:
    """Run the fine-tune step ``body(cfg, inputs, out)``: in-process, relaunched under
    ``torchrun`` (``train.distributed: ddp`` outside torchrun), or as one DDP rank (inside)."""
    out = Path(out)
    if getattr(cfg.train, "distributed", "none") != "ddp":
        return body(cfg, inputs, out)
    if not under_torchrun():
        n = resolve_nproc(cfg.train)
        if n <= 1:
            log.info("train.distributed=ddp with 1 process: training in-process without DDP")
            return body(cfg, inputs, out)
        return launch(cfg, inputs, out, n)
    ctx = init(cfg.train)
    try:
        if ctx.is_main:
            result = body(cfg, inputs, out)
        else:
            with tempfile.TemporaryDirectory(prefix=f"tlops-rank{ctx.rank}-") as tmp:
                body(cfg, inputs, Path(tmp) / out.name)
            result = None
        ctx.barrier()
    finally:
        shutdown()
    return result


def launch_command(config_file: Path, inputs: dict[str, Path], out: Path, nproc: int) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nnodes=1",
        f"--nproc-per-node={nproc}",
        "-m",
        "tlops.training.distributed",
        "--config",
        str(config_file),
        "--out",
        str(out),
    ]
    for name, path in inputs.items():
        cmd += ["--in", f"{name}={path}"]
    return cmd


def launch(cfg: Any, inputs: dict[str, Any], out: Path, nproc: int) -> Any:
    """Relaunch the fine-tune step under ``torchrun`` with ``nproc`` workers; rank 0 writes ``out``."""
    from tlops.artifacts import read_artifact
    from tlops.config import save_config

    with tempfile.TemporaryDirectory(prefix="tlops-ddp-") as tmp:
        config_file = Path(tmp) / "config.yaml"
        save_config(cfg, config_file)
        cmd = launch_command(config_file, {k: Path(a.path).resolve() for k, a in inputs.items()}, out.resolve(), nproc)
        env = dict(os.environ)
        if "OMP_NUM_THREADS" not in env and not cfg.train.threads:
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
        src = str(Path(__file__).resolve().parents[2])  # the tlops checkout, when not installed
        env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        log.info("fine-tune: train.distributed=ddp, launching %d workers: %s", nproc, " ".join(cmd))
        rc = subprocess.run(cmd, env=env).returncode
    if rc != 0:
        raise DistributedError(
            f"fine-tune: the {nproc} DDP workers failed (exit status {rc}); command: {' '.join(cmd)}"
        )
    return read_artifact(out, "trained-models")


def _worker(argv: list[str] | None = None) -> int:
    """``torchrun ... -m tlops.training.distributed --config C --in name=path ... --out O``."""
    ap = argparse.ArgumentParser(prog="python -m tlops.training.distributed", description=_worker.__doc__)
    ap.add_argument("--config", required=True)
    ap.add_argument("--in", dest="inputs", action="append", default=[], help="name=path of an input artifact")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(
        level=logging.INFO if rank == "0" else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    from tlops import dag
    from tlops.artifacts import read_artifact
    from tlops.config import load_config
    from tlops.steps import fine_tune

    cfg = load_config(args.config)
    spec = dag.get("fine-tune")
    inputs = {}
    for item in args.inputs:
        name, path = item.split("=", 1)
        inputs[name] = read_artifact(Path(path), dag.get(spec.inputs[name]).output)
    fine_tune.run(cfg, inputs, Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(_worker())

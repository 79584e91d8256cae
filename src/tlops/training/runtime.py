"""One training runtime: where and how every training loop runs, passed to each loop explicitly.

A :class:`Runtime` holds the device, the precision (bf16 autocast), channels_last and
``torch.compile`` for image models, the CPU threads, the DDP rank/world, the directory for
resumable checkpoints, an optional progress callback (every epoch record) and the progress
reporter for per-batch bars (``tlops.progress``). The probe, the fine-tuning loop,
domain adaptation, SetFit's pair tuning, the partial-freeze block probe and LoRA (through the
fine-tuning loop) all take one and use it: the model and every batch go to ``runtime.device``.

It is built from the config (``train.device``, ``train.precision``, ``train.channels_last``,
``train.compile``, ``train.threads``) by :meth:`Runtime.from_config`; the DDP rank and world
come from the torchrun runner (``tlops.runners.torchrun``), the only place that reads torchrun's
environment, and the checkpoint dir from the runner that owns the workdir. No environment
variable carries state between tlops modules.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from tlops.errors import TlopsError

log = logging.getLogger(__name__)


def resolve_device(want: str, local_rank: int = 0) -> torch.device:
    """``train.device``: ``auto`` = CUDA when available (one GPU per local rank), else CPU."""
    if want not in ("auto", "cpu", "cuda"):
        raise TlopsError(f"train.device: got {want!r}; allowed: auto, cpu, cuda")
    if want == "cuda" and not torch.cuda.is_available():
        raise TlopsError("train.device: cuda, but torch sees no CUDA device; use train.device: auto or cpu")
    if want == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))


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
    return max(1, usable_cpus()[0])


def to_device(tensors: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Batch tensors onto ``device`` (pinned host memory + async copy for CUDA; no-op on CPU)."""
    if device.type == "cpu":
        return tensors
    if device.type == "cuda":
        return {k: v.pin_memory().to(device, non_blocking=True) for k, v in tensors.items()}
    return {k: v.to(device) for k, v in tensors.items()}


def put(x: Any, device: torch.device) -> Any:
    """A tensor or a dict of tensors (a prepared batch) on ``device``."""
    if isinstance(x, dict):
        return to_device(x, device)
    return to_device({"x": x}, device)["x"]


@dataclass
class Runtime:
    """Where and how a training loop runs (see the module docstring)."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    precision: str = "fp32"  # "bf16": autocast
    channels_last: bool = False  # image models
    compile: bool = False  # torch.compile the module the loop calls
    sync_batchnorm: bool = True  # DDP: BatchNorm statistics over the global batch (tlops.training.sync_batchnorm)
    threads: int | None = None  # torch CPU threads the loops set (None: leave torch's setting)
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    checkpoint_dir: Path | None = None  # resumable checkpoints: <dir>/<loop name>/ (None: in the output dir)
    progress: Callable[[dict[str, Any]], None] | None = None  # called with every epoch record
    reporter: Any = None  # tlops.progress.Reporter for the per-batch bars (None: the process-wide one on rank 0)

    @classmethod
    def from_config(
        cls,
        train_cfg: Any,
        *,
        checkpoint_dir: Path | None = None,
        progress: Callable[[dict[str, Any]], None] | None = None,
        rank: int = 0,
        world: int = 1,
        local_rank: int = 0,
        local_world: int = 1,
    ) -> "Runtime":
        """From ``train.*``; ``rank``, ``world``, ``local_rank``, ``local_world`` place it in a
        torchrun job (the torchrun runner passes them)."""
        device = resolve_device(getattr(train_cfg, "device", "auto"), local_rank)
        threads = getattr(train_cfg, "threads", None)
        if threads is None and device.type == "cpu":
            # DDP on CPU: the local ranks share the cores
            threads = max(1, (os.cpu_count() or 1) // local_world) if world > 1 else auto_threads()
        return cls(
            device=device,
            precision=getattr(train_cfg, "precision", "fp32"),
            channels_last=getattr(train_cfg, "channels_last", False),
            compile=getattr(train_cfg, "compile", False),
            sync_batchnorm=getattr(train_cfg, "sync_batchnorm", True),
            threads=threads,
            rank=rank,
            world=world,
            local_rank=local_rank,
            checkpoint_dir=Path(checkpoint_dir) if checkpoint_dir is not None else None,
            progress=progress,
        )

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------ placement

    def apply_threads(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)

    def prepare(self, module: nn.Module) -> nn.Module:
        """Move a model to the device (in place; returns it); channels_last for image models."""
        module.to(self.device)
        if self.channels_last and getattr(getattr(module, "backbone", None), "modality", "") == "image":
            module.to(memory_format=torch.channels_last)
        return module

    def wrap(self, module: nn.Module) -> nn.Module:
        """The module the training loop calls: DDP over ``module`` when distributed (built again
        whenever the set of trainable parameters changes), compiled when asked."""
        model: nn.Module = module
        if self.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            if self.sync_batchnorm:
                from tlops.training import sync_batchnorm

                sync_batchnorm.apply(module, self.device)  # idempotent: wrap runs again when the trainable set changes

            ids = [self.device.index] if self.device.type == "cuda" else None
            # find_unused_parameters: e.g. a transformer's pooler is not used by mean pooling
            model = DDP(module, device_ids=ids, find_unused_parameters=True)
        if self.compile:
            model = torch.compile(model)
        return model

    def to_device(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return to_device(tensors, self.device)

    def put(self, x: Any) -> Any:
        """A tensor or a dict of tensors (a prepared batch) on the device."""
        return put(x, self.device)

    def adamw_kwargs(self) -> dict[str, Any]:
        """The fused AdamW kernel (one pass over all parameters) on CPU and CUDA; the
        default per-tensor loop took several times longer per step on CPU for a 22M-parameter model
        (1.1 s vs 10 s for 33M parameters on 2 busy cores; bench/perf.py measures the whole loop)."""
        return {"fused": True} if self.device.type in ("cpu", "cuda") else {}

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # ------------------------------------------------------------------ progress and checkpoints

    def task(self, desc: str, total: int | None = None, unit: str = "batch") -> Any:
        """A progress task for one epoch of a loop (``tlops.progress``; silent on DDP ranks but 0)."""
        from tlops import progress

        rep = self.reporter or (progress.reporter() if self.is_main else progress.disabled())
        return rep.task(desc, total, unit)

    def report(self, loop: str, record: dict[str, Any]) -> None:
        """Hand an epoch record to the progress callback (if any)."""
        if self.progress is not None:
            self.progress({"loop": loop, **record})

    def checkpoints(self, out_dir: Path, name: str) -> tuple[Path, bool]:
        """Where loop ``name`` keeps its checkpoints, and whether they survive the step (resumable):
        ``checkpoint_dir/<name>`` when the runner gave one (a stable dir under the workdir), else
        ``out_dir/checkpoints`` (inside the step's temp dir: gone with it)."""
        d = self.checkpoint_dir / name if self.checkpoint_dir is not None else out_dir / "checkpoints"
        d.mkdir(parents=True, exist_ok=True)
        return d, self.checkpoint_dir is not None

    # ------------------------------------------------------------------ DDP

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

    def init_process_group(self) -> None:
        """Join the process group torchrun set up (env://): NCCL on GPU, gloo on CPU."""
        import torch.distributed as tdist

        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.apply_threads()
        if not tdist.is_initialized():
            tdist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        log.info(
            "ddp: rank %d/%d on %s (%s, %d threads)",
            self.rank,
            self.world,
            self.device,
            tdist.get_backend(),
            torch.get_num_threads(),
        )

    @staticmethod
    def shutdown() -> None:
        import torch.distributed as tdist

        if tdist.is_available() and tdist.is_initialized():
            tdist.destroy_process_group()

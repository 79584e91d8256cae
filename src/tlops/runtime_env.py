"""The numerical environment of a step: set once at the step's entry, recorded in its manifest.

"Seeded and deterministic" holds per machine, not across machines: the CPU kernels torch picks
(``torch.backends.cpu.get_cpu_capability()``: AVX2, AVX512, ...), the number of intra-op threads
(``train.threads``, ``OMP_NUM_THREADS``) and, on a GPU, the device, driver and cuDNN flags change
the weights a seeded run produces. So the runner (``tlops.runners.local.execute_step``, the one
entry every runner goes through) calls :func:`apply` before a step does any torch work and writes
:func:`record` into the step's manifest (``environment``, outside the content hash).

A step that never touches torch (ingest, or any step reused from an earlier run) does not import
it here either: :func:`apply` only sets threads for steps in :data:`TORCH_STEPS`, and
:func:`record` reports torch facts only when the step has imported torch.
"""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import sys
from functools import lru_cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tlops.config import PipelineConfig

#: Steps that run torch when they run (a reused step runs nothing and imports nothing).
TORCH_STEPS = frozenset({"pull-model", "extract-features", "fine-tune", "evaluate", "register"})
#: Environment variables that change the thread pools or kernels behind torch/numpy.
THREAD_ENV = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "ATEN_CPU_CAPABILITY",
    "CUBLAS_WORKSPACE_CONFIG",
)


def apply(cfg: PipelineConfig, step: str) -> None:
    """Set torch's intra-op thread count to ``train.threads`` (None: torch's default, i.e.
    ``OMP_NUM_THREADS`` or the usable CPUs) before ``step`` does any torch work. The one place
    tlops sets it; a step outside :data:`TORCH_STEPS` is left torch-free."""
    threads = cfg.train.threads
    if not threads or step not in TORCH_STEPS:
        return
    import torch

    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


@lru_cache(maxsize=1)
def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else what ``platform`` knows)."""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


@lru_cache(maxsize=1)
def _gpu_driver() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip().splitlines()[0] if out.strip() else None


def torch_record() -> dict[str, Any] | None:
    """What torch computes with in this process (None if torch was never imported)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    rec: dict[str, Any] = {
        "version": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "intra_op_threads": torch.get_num_threads(),
        "inter_op_threads": torch.get_num_interop_threads(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "cudnn": {
            "enabled": bool(torch.backends.cudnn.enabled),
            "deterministic": bool(torch.backends.cudnn.deterministic),
            "benchmark": bool(torch.backends.cudnn.benchmark),
        },
        "cuda": None,
    }
    if torch.cuda.is_initialized():  # CUDA was used by this process, not merely present
        dev = torch.cuda.current_device()
        rec["cuda"] = {
            "device": torch.cuda.get_device_name(dev),
            "devices": torch.cuda.device_count(),
            "cuda_version": torch.version.cuda,
            "cudnn_version": torch.backends.cudnn.version(),
            "driver": _gpu_driver(),
        }
    return rec


def record(seed: int | None = None) -> dict[str, Any]:
    """The environment a step ran in: host CPU, thread env, seed and (when the step used torch) the
    ISA, thread counts, determinism flags and GPU. Stored as ``environment`` in the manifest."""
    return {
        "cpu": cpu_model(),
        "machine": platform.machine(),
        "os": platform.platform(terse=True),
        "cpu_count": os.cpu_count(),
        "env": {k: os.environ.get(k) for k in THREAD_ENV},
        "seed": seed,
        "torch": torch_record(),
    }


def describe(env: dict[str, Any] | None) -> str:
    """One line for logs and reports, e.g. ``AVX512, 2 threads, Intel(R) Xeon(R) Processor``."""
    if not env:
        return "not recorded"
    t = env.get("torch") or {}
    parts = [t.get("cpu_capability") or "torch not used"]
    if t:
        parts.append(f"{t['intra_op_threads']} threads")
    parts.append(env.get("cpu") or "?")
    if t.get("cuda"):
        parts.append(f"GPU {t['cuda']['device']} (driver {t['cuda'].get('driver') or '?'})")
    return ", ".join(parts)

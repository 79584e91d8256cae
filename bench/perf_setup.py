"""bench/perf.py's sizes, the interleaved timing protocol (every pass recorded with the load it ran under), the
inputs, and the adapter that runs tlops extraction on a GPU."""

from __future__ import annotations

import contextlib
import os
import statistics
from typing import Any, Callable

import numpy as np
from common import SHARED_DATA, PassLog, interleave, read_uci

SECTIONS = ("extract", "cache", "finetune", "memory", "scaling")

# Sizes: full run / --quick.
SIZES = {
    "full": {
        "uci": 320,
        "blitzer": 64,
        "mnist": 1024,
        "usps": 1024,
        "hymenoptera": 397,
        "ft_train": 320,
        "ft_val": 160,
        "ft_epochs": 2,
        "cnn_train": 1024,
        "cnn_val": 512,
        "cnn_epochs": 2,
        "mem_text": 300,
        "mem_image": 1000,
        "scale_text": 96,
        "scale_image": 256,
        "scale_ft_text": 48,
        "scale_ft_cnn": 128,
        "e2e_epochs": 6,
        "mem_configs": ("demo", "text"),
        "mem_stream": ("text", "image"),
    },
    # --device cuda (bench/gpu.sh): larger, so that a GPU pass takes more than start-up overheads
    "gpu": {
        "uci": 2000,
        "blitzer": 2000,
        "mnist": 10000,
        "usps": 9298,
        "hymenoptera": 397,
        "ft_train": 800,
        "ft_val": 200,
        "ft_epochs": 3,
        "cnn_train": 7000,
        "cnn_val": 2000,
        "cnn_epochs": 2,
        "mem_text": 300,
        "mem_image": 1000,
        "scale_text": 256,
        "scale_image": 1024,
        "scale_ft_text": 128,
        "scale_ft_cnn": 512,
        "e2e_epochs": 6,
        "mem_configs": ("demo", "text"),
        "mem_stream": ("text", "image"),
    },
    "quick": {
        "uci": 128,
        "blitzer": 24,
        "mnist": 256,
        "usps": 256,
        "hymenoptera": 64,
        "ft_train": 96,
        "ft_val": 64,
        "ft_epochs": 1,
        "cnn_train": 256,
        "cnn_val": 128,
        "cnn_epochs": 1,
        "mem_text": 60,
        "mem_image": 200,
        "scale_text": 24,
        "scale_image": 64,
        "scale_ft_text": 16,
        "scale_ft_cnn": 32,
        "e2e_epochs": 1,
        "mem_configs": ("demo",),
        "mem_stream": ("image",),
    },
}
TEXT_BS, IMAGE_BS, MAX_LENGTH = 32, 64, 128
FT_BS, FT_LR, FT_MAXLEN = 32, 1e-4, 64
CNN_BS, CNN_LR = 64, 1e-3
FT_TARGET_ACC = 0.80  # time-to-accuracy threshold (val) for the text fine-tune
CNN_TARGET_ACC = 0.80

PASSES = PassLog()  # every timed pass: series, seconds, CPU seconds, other-process CPU share, load average
_DEFAULT_THREADS = [0]  # torch.get_num_threads() at start (remember_default_threads)


def train_runtime(args) -> dict[str, Any]:
    """train.* runtime fields for --device/--amp/--channels-last/--compile (tlops' loops read them from the config)."""
    return {
        "device": args.device,
        "precision": args.amp or "fp32",
        "channels_last": args.channels_last,
        "compile": args.compile,
    }


def remember_default_threads() -> None:
    import torch

    _DEFAULT_THREADS[0] = torch.get_num_threads()


def reset_threads() -> None:
    """Every timed side starts from torch's default thread count (fine_tune leaves its own choice behind)."""
    import torch

    torch.set_num_threads(_DEFAULT_THREADS[0])


def interleave_sides(
    label: str,
    sides: dict[str, Callable[[], Any]],
    repeats: int,
    n_items: int | None = None,
    warmup: dict[str, Callable[[], Any]] | None = None,
) -> dict[str, Any]:
    """:func:`common.interleave` into :data:`PASSES`, each pass at torch's default thread count."""
    return interleave(PASSES, label, sides, repeats, n_items, warmup, threads=_DEFAULT_THREADS[0])


def interleave_chunked(
    label: str, sides: dict[str, Callable[[Any], Any]], data: Any, chunk: int, repeats: int, warmup: Any = None
) -> dict[str, Any]:
    """Like :func:`interleave`, but the sides alternate chunk by chunk (A,B on chunk 1, B,A on
    chunk 2, ...), so both see the same load at a time scale of seconds; a pass = the sum over
    the chunks. Each side's output is the concatenation of its chunk outputs."""
    import numpy as np

    if warmup is not None:
        for fn in sides.values():
            fn(warmup)
    names = list(sides)
    secs: dict[str, list[float]] = {k: [] for k in sides}
    cpus: dict[str, list[float]] = {k: [] for k in sides}
    outs: dict[str, list[Any]] = {k: [] for k in sides}
    starts = list(range(0, len(data), chunk))
    for r in range(repeats):
        tot = {k: 0.0 for k in names}
        cpu = {k: 0.0 for k in names}
        parts: dict[str, list[Any]] = {k: [] for k in names}
        for ci, s0 in enumerate(starts):
            part = data[s0 : s0 + chunk]
            for name in names if (r + ci) % 2 == 0 else names[::-1]:
                reset_threads()
                dt, out = PASSES.timed(f"{label}/{name}", sides[name], part)
                tot[name] += dt
                cpu[name] += PASSES[-1]["cpu_seconds"]
                parts[name].append(out)
        for name in names:
            secs[name].append(tot[name])
            cpus[name].append(cpu[name])
            outs[name].append(np.concatenate(parts[name]))
            others = [
                p["other_cpu"]
                for p in PASSES[-len(starts) * len(names) :]
                if p["series"].endswith("/" + name) and p["other_cpu"] is not None
            ]
            other = f", other procs {statistics.mean(others):4.0%} CPU" if others else ""
            print(
                f"  {label} | {name:<34} {r + 1}/{repeats}: {tot[name]:7.2f} s, {cpu[name]:6.1f} CPU-s "
                f"({len(data) / tot[name]:8.1f} items/s){other}",
                flush=True,
            )
    return {"secs": secs, "outs": outs, "cpu": cpus}


def med(xs: list[float]) -> float:
    return statistics.median(xs)


# =============================================================================== data


def uci(names=("yelp", "amazon_cells")) -> tuple[list[str], list[int]]:
    """UCI sentences (split on "\\n" only: some lines hold U+0085), mixed with a fixed seed."""
    xs, ys = [], []
    for name in names:
        texts, labels = read_uci(name)
        xs += texts
        ys += labels
    order = np.random.default_rng(0).permutation(len(xs))
    return [xs[i] for i in order], [ys[i] for i in order]


def blitzer() -> list[str]:
    import csv
    import gzip

    import numpy as np

    out = []
    for dom in ("books", "dvd"):
        with gzip.open(SHARED_DATA / "amazon_multidomain_sentiment" / f"{dom}.tsv.gz", "rt", encoding="utf-8") as f:
            out += [r["text"] for r in csv.DictReader(f, delimiter="\t")]
    order = np.random.default_rng(0).permutation(len(out))
    return [out[i] for i in order]


def images(name: str):
    import numpy as np

    if name == "mnist":
        with np.load(SHARED_DATA / "mnist" / "mnist_subset.npz") as z:
            x, y = z["x_test"], z["y_test"]
    elif name == "usps":
        with np.load(SHARED_DATA / "usps" / "usps.npz") as z:
            x, y = np.concatenate([z["x_train"], z["x_test"]]), np.concatenate([z["y_train"], z["y_test"]])
    else:
        with np.load(SHARED_DATA / "hymenoptera" / "hymenoptera_64.npz") as z:
            x, y = np.concatenate([z["x_train"], z["x_val"]]), np.concatenate([z["y_train"], z["y_val"]])
    order = np.random.default_rng(0).permutation(len(x))
    return np.ascontiguousarray(x[order]), y[order]


# =============================================================================== device adapter


class DeviceBackbone:
    """Lets ``tlops.features.extract.extract`` (a CPU loop today) drive a backbone on a GPU:
    ``prepare`` on the host (pinned), forward on the device (autocast, channels_last), features
    back to the host. The batch plan, ordering and inference mode are extract()'s own."""

    def __init__(self, backbone, device: str, amp: str | None, channels_last: bool, compile_: bool):
        import torch

        self.inner = backbone
        self.modality = backbone.modality
        self.feature_dim = backbone.feature_dim
        self.device = torch.device(device)
        self.amp = amp
        backbone.to(self.device)
        if channels_last and backbone.modality == "image":
            backbone.to(memory_format=torch.channels_last)
        self.fwd = torch.compile(backbone, dynamic=True) if compile_ else backbone
        self.channels_last = channels_last

    def eval(self):
        self.inner.eval()
        return self

    def prepare(self, batch):
        return self.inner.prepare(batch)

    def __call__(self, **t):
        import torch

        t = {
            k: v.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" else v
            for k, v in t.items()
        }
        if self.channels_last and "pixel_values" in t:
            t["pixel_values"] = t["pixel_values"].contiguous(memory_format=torch.channels_last)
        ctx = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.amp == "bf16" else contextlib.nullcontext()
        with ctx:
            return self.fwd(**t).float().cpu()


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


ONE = (
    "tlops, 1 thread"  # ablation: extract() with torch.set_num_threads(1) (what train.threads: 1 pins for fine-tuning)
)


def with_one_thread(fn):
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn()
    finally:
        torch.set_num_threads(old)


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    for k in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID"):
        env.pop(k, None)
    env.update(
        {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    )
    return env


def sync_all():
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()

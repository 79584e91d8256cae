"""Performance: tlops vs the obvious code, measured side by side in one process.

Run from the repository root:

    .venv/bin/python bench/perf.py               # full run (~10-15 min on 2 idle cores): bench/results/perf.md + .json
    .venv/bin/python bench/perf.py --quick       # small sizes, 1-2 min (tests/test_perf_bench.py): perf-quick.md/.json
    .venv/bin/python bench/perf.py --only extract,finetune --repeats 5
    .venv/bin/python bench/perf.py --device cuda --amp bf16 --channels-last --compile   # what bench/gpu.sh runs

Sections (``--only``; default all):

* ``extract``: items/s of feature extraction, tlops ``features.extract.extract`` vs the obvious
  loop (file order, text padded to ``max_length=128``, ``torch.no_grad()``, torchvision-style
  contiguous NCHW tensors, default threads) on the same weights: all-MiniLM-L6-v2 over UCI and
  Blitzer sentences; timm resnet10t (the demo's CNN, random init) over MNIST, USPS and the
  64x64 hymenoptera photos. FLOPs from ``torch.utils.flop_counter.FlopCounterMode`` (per item
  and sequence length; eager attention so the attention matmuls count), reported as GFLOP/s
  against a large fp32 ``torch.matmul`` timed in the same process (the machine's peak here).
* ``cache``: the extract-features step on a cache miss vs a hit; and ``tlops run`` (the CLI,
  local runner) twice on the demo source config in a temp workdir.
* ``finetune``: full fine-tuning of all-MiniLM-L6-v2 on UCI yelp, ``tlops.training.finetune.fine_tune``
  vs ``transformers.Trainer`` on the same module, data and recipe (batch, lr, epochs, max length,
  AdamW, cosine schedule without warm-up, no weight decay, no clipping, eval each epoch), with
  the Trainer's default dynamic-padding collator and with the tutorial's pad-to-max_length;
  and resnet10t on USPS, tlops vs a plain PyTorch loop. samples/s and time to a val accuracy.
* ``memory``: peak RSS (``VmHWM`` of a child process) of every step of the demo and text
  configs via ``tlops step``, and of extract-features at 1x and 10x data (repeated rows).
* ``scaling``: extraction and fine-tuning time at 1x, 2x, 4x, 8x data; slope of the log-log fit.
* ``backends`` (only when named: ``--only backends``): ``features.backend`` torch / torch-int8 / onnx /
  onnx-int8 / openvino / openvino-int8 (the last two when the openvino extra is installed) side by side,
  throughput and downstream probe accuracy, GFLOP/s against the fp32 and int8 matmul peaks; its own
  report, bench/results/perf_backends.md (see bench/perf_backends.py).
* ``shards`` (only when named: ``--only shards``): ``features.shards`` 1 vs 2 worker processes on the
  extract-features step (MiniLM, UCI yelp); its own report, bench/results/shards.md (see bench/shards.py).
* ``runners`` (only when named: ``--only runners``): ``tlops run`` on the demo target config with the
  in-process and the kfp-local runner, per-step wall time and the kfp-local tasks' overhead by phase and
  imports; its own report, bench/results/runners.md (see bench/runner_overhead.py).

Timing protocol: the machine is shared, so every comparison runs both sides in the same process,
interleaved (A,B,B,A,...; extraction alternates every chunk of 160 texts / 256 images), and quotes medians;
each timed pass records the share of the machine's CPU used by *other* processes (/proc/stat minus this
process's and its children's CPU time) and the load average, and the report prints them next to the numbers.
"""

from __future__ import annotations

import argparse
import json
import logging
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from common import RESULTS, SHARED_DATA, machine_info  # noqa: E402
from perf_cache import bench_cache  # noqa: E402
from perf_extract import bench_extract  # noqa: E402
from perf_finetune import bench_finetune  # noqa: E402
from perf_memory import bench_memory, bench_scaling  # noqa: E402
from perf_report import cmd_line, markdown  # noqa: E402
from perf_setup import PASSES, SECTIONS, SIZES, remember_default_threads, reset_threads  # noqa: E402


def _series_prefixes(sections: list[str]) -> tuple[str, ...]:
    """Prefixes of the PASSES series names each section writes."""
    names = {
        "cache": ("cache/", "e2e/", "e2e_text/"),
        "extract": ("text:", "image:"),
        "finetune": ("finetune-",),
        "memory": ("memory",),
        "scaling": ("scaling",),
    }
    return tuple(p for s in sections for p in names.get(s, (s,)))


def render(path: Path) -> int:
    """Rewrite ``<path>.md`` from a run's JSON (after a change to the report's wording or criteria)."""
    payload = json.loads(path.read_text())
    PASSES[:] = payload["passes"]
    text = markdown(
        argparse.Namespace(**payload["args"]), payload["machine"], payload["results"], payload["total_seconds"]
    )
    path.with_suffix(".md").write_text(text)
    path.write_text(json.dumps(payload, indent=1, default=str))  # headline recomputed
    print(f"(rewrote {path.with_suffix('.md')} from {path})")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (1-2 min); writes perf-quick.md/.json")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per side (default 3; --quick 2)")
    ap.add_argument(
        "--only",
        default=",".join(SECTIONS),
        help=f"comma-separated sections: {', '.join(SECTIONS)}; also backends, shards, runners (named only)",
    )
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--amp", default=None, choices=["bf16"], help="bf16 autocast on both sides")
    ap.add_argument("--channels-last", action="store_true", help="channels_last CNNs on both sides")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model on both sides")
    ap.add_argument(
        "--ablation",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="fine-tune: also tlops without length grouping / with torch's default threads, and "
        "Trainer group_by_length (default: on, off with --quick)",
    )
    ap.add_argument("--out", default=None, help="results path prefix (default bench/results/perf[-quick|-cuda])")
    ap.add_argument(
        "--render", default=None, metavar="JSON", help="no measuring: rewrite the markdown of an earlier run's .json"
    )
    ap.add_argument(
        "--update",
        default=None,
        metavar="JSON",
        help="merge this run's sections into an earlier full run's .json "
        "(e.g. --only cache after a fix) and rewrite its markdown",
    )
    args = ap.parse_args(argv)
    if args.render:
        return render(Path(args.render))
    args.argv = list(argv if argv is not None else sys.argv[1:])
    args.repeats = args.repeats or (2 if args.quick else 3)
    if args.ablation is None:
        args.ablation = not args.quick
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    if "shards" in only:  # its own report (shards.md, bench/shards.py), never rewrites perf.md
        from shards import main as shards_main

        rc = shards_main([], repeats=args.repeats)
        only.remove("shards")
        if rc or not only:
            return rc
    if "runners" in only:  # its own report (runners.md, bench/runner_overhead.py), never rewrites perf.md
        from runner_overhead import main as runners_main

        rc = runners_main([], repeats=args.repeats)
        only.remove("runners")
        if rc or not only:
            return rc
    if "backends" in only:  # its own report (perf_backends.md), never rewrites perf.md
        from perf_backends import main as backends_main

        rc = backends_main(args, args.quick)
        only.remove("backends")
        if rc or not only:
            return rc
    bad = sorted(set(only) - set(SECTIONS))
    if bad:
        ap.error(f"--only: unknown section(s) {', '.join(bad)}; valid: {', '.join(SECTIONS)}")
    if not SHARED_DATA.is_dir():
        sys.exit(f"shared data not found at {SHARED_DATA} (set TLOPS_SHARED_DATA)")
    import torch
    import transformers

    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench/perf.py: --device cuda but no CUDA device is visible; nothing to do")
        return 0
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    sz = SIZES["quick" if args.quick else ("gpu" if args.device == "cuda" else "full")]
    remember_default_threads()
    t_start = time.perf_counter()
    info = machine_info(args.device)
    print(f"# tlops perf benchmark{' (--quick)' if args.quick else ''}: {json.dumps(info)}", flush=True)
    res: dict[str, Any] = {}
    fns = {
        "extract": bench_extract,
        "cache": bench_cache,
        "finetune": bench_finetune,
        "memory": bench_memory,
        "scaling": bench_scaling,
    }
    for name in SECTIONS:
        if name in only:
            t0 = time.perf_counter()
            print(f"\n== {name}", flush=True)
            reset_threads()  # fine_tune leaves its own choice behind
            res[name] = fns[name](args, sz)
            print(f"== {name}: {time.perf_counter() - t0:.0f} s", flush=True)
    info["load_end"] = list(os.getloadavg())
    total = time.perf_counter() - t_start
    text = markdown(args, info, res, total)
    print("\n" + text)
    suffix = "-quick" if args.quick else ("-cuda" if args.device == "cuda" else "")
    prefix = Path(args.out) if args.out else RESULTS / f"perf{suffix}"
    prefix.parent.mkdir(parents=True, exist_ok=True)
    prefix.with_suffix(".md").write_text(text)
    prefix.with_suffix(".json").write_text(
        json.dumps(
            {
                "machine": info,
                "args": vars(args) | {"argv": args.argv},
                "sizes": sz,
                "results": res,
                "passes": PASSES,
                "total_seconds": total,
            },
            indent=1,
            default=str,
        )
    )
    print(f"(written to {prefix.with_suffix('.md')} and .json)")
    if args.update:
        base = Path(args.update)
        payload = json.loads(base.read_text())
        sections = [n for n in SECTIONS if n in res]
        payload["results"].update({n: res[n] for n in sections})
        payload["passes"] = [
            p for p in payload["passes"] if not p["series"].startswith(_series_prefixes(sections))
        ] + PASSES
        notes = payload["machine"].get("remeasured_by_section") or {}
        notes[", ".join(sections)] = (
            f"on {info['date']} (`{cmd_line(args)}`, {info['cpu']}, CPU capability {info['isa']}, "
            f"load at start {info['load_start'][0]:.2f})"
        )
        payload["machine"]["remeasured_by_section"] = notes  # the latest re-measurement of each section
        payload["machine"]["remeasured"] = "; ".join(f"{k} {v}" for k, v in notes.items())
        base.write_text(json.dumps(payload, indent=1, default=str))
        return render(base)
    return 0


if __name__ == "__main__":
    sys.exit(main())

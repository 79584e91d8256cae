"""``bench/perf.py --only shards`` (or ``bench/shards.py``): 1 vs 2 extraction worker processes (issue 21, item 2).

The extract-features step itself (``tlops.steps.extract_features.run``, feature cache off so every
pass computes) embeds the 1,000 UCI yelp sentences with all-MiniLM-L6-v2
(max length 64, batch 32), three ways, interleaved (A,B,C then C,B,A), median of ``--repeats``:

* ``1 process x 1 thread``: ``features.shards: 1`` at one torch thread;
* ``1 process x 2 threads``: ``features.shards: 1`` at two torch threads (all the cores);
* ``2 processes x 1 thread``: ``features.shards: 2``: two spawned workers at 2 // 2 = 1 thread each,
  their start-up (a fresh interpreter importing torch and loading the model) included, then the merge.

Correctness: the 2-process features against the 1-process ones at the workers' thread count
(``np.array_equal``), and the largest difference to the 2-thread ones.

Writes ``bench/results/shards.md`` and ``.json`` (``--out`` prefix to change; ``--render JSON`` rewrites the
markdown from a run's JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
from common import RESULTS, PassLog, interleave, run_info, run_machine, write_report, yelp_extract_config  # noqa: E402

SIDES = ("1 process x 1 thread", "1 process x 2 threads", "2 processes x 1 thread")


def _setup(work: Path):
    """Ingest yelp and pull MiniLM once; return the inputs and a config maker."""
    from tlops.config import validate_config
    from tlops.steps import ingest, pull_model

    base = yelp_extract_config(work, "bench-shards", work / "cache", batch_size=32, max_length=64)
    ins = {"dataset": ingest.run(base, {}, work / "ingest"), "model": pull_model.run(base, {}, work / "pull")}

    def config(shards: int):
        r = base.to_dict()
        r["features"] = {**r["features"], "cache": False, "shards": shards}
        return validate_config(r)

    return ins, config


def _side(ins: dict[str, Any], cfg, threads: int, work: Path):
    import torch

    from tlops.steps import extract_features

    counter = iter(range(10**6))

    def run() -> dict[str, np.ndarray]:
        torch.set_num_threads(threads)
        art = extract_features.run(cfg, ins, work / f"out-{cfg.features.shards}-{threads}-{next(counter)}")
        with np.load(art.path / "features.npz", allow_pickle=False) as z:
            return {k: z[k] for k in z.files}

    return run


def report(p: dict[str, Any]) -> str:
    """The markdown report from the run's JSON payload (``--render`` rewrites it without rerunning)."""
    info, med, passes = p["info"], p["median_seconds"], PassLog(p["passes"])
    repeats = len(p["seconds"][SIDES[0]])
    cpu = {k: statistics.median(v) for k, v in p["cpu_seconds"].items()}
    diff = p["max_abs_diff_to_1x2"]
    lines = [
        "# Sharded extraction: 1 vs 2 worker processes",
        "",
        f"Command: `{info['command']}`. {run_machine(info)}.",
        "",
        f"all-MiniLM-L6-v2 (max length 64, batch 32) over {p['rows']} UCI yelp sentences ({', '.join(p['splits'])}), "
        f"the extract-features step with the feature cache off, sides interleaved, median of {repeats}.",
        "",
        "| side | median s | speedup vs 1 x 1 | CPU s | other processes' CPU | load avg |",
        "|---|---|---|---|---|---|",
    ]
    for k in SIDES:
        lines.append(
            f"| {k} | {med[k]:.2f} | {med[SIDES[0]] / med[k]:.2f}x | {cpu[k]:.1f} | "
            f"{passes.other_share('extract/' + k)} | {passes.load('extract/' + k)} |"
        )
    lines += [
        "",
        f"2 processes x 1 thread vs 1 process x 2 threads: {med[SIDES[1]] / med[SIDES[2]]:.2f}x.",
        f"Features of 2 processes x 1 thread bit-identical to 1 process x 1 thread: {p['bit_identical_to_1x1']}; "
        f"largest difference to 1 process x 2 threads: {diff:.2e}"
        + (" (torch's CPU kernels split some reductions by thread count)." if diff else "."),
        "",
        "The 2-process side includes spawning both workers (a fresh interpreter each, importing torch and "
        "loading the model) and the merge: a fixed cost per shard that a short pass over the data does "
        "not earn back."
        + (
            " The machine was shared with other jobs during this run (see the other processes' CPU share and "
            "load average): rerun on an idle machine before quoting the speedup."
            if float(info.get("load_start", 0) or 0) > 1.5
            else ""
        ),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None, repeats: int | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=repeats or 3)
    ap.add_argument("--out", default=str(RESULTS / "shards"), help="results path prefix")
    ap.add_argument("--render", metavar="JSON", help="rewrite the markdown from a run's JSON, without running")
    args = ap.parse_args(argv if argv is not None else sys.argv[1:])
    if args.render:
        src = Path(args.render)
        src.with_suffix(".md").write_text(report(json.loads(src.read_text())))
        print(f"wrote {src.with_suffix('.md')}")
        return 0
    info = run_info("bench/shards.py", argv)
    passes = PassLog()
    with tempfile.TemporaryDirectory(prefix="tlops-bench-shards-") as tmp:
        work = Path(tmp)
        ins, config = _setup(work)
        sides = {
            SIDES[0]: _side(ins, config(1), 1, work),
            SIDES[1]: _side(ins, config(1), 2, work),
            SIDES[2]: _side(ins, config(2), 2, work),
        }
        res = interleave(passes, "extract", sides, args.repeats)
    outs = {k: v[0] for k, v in res["outs"].items()}
    splits = sorted(outs[SIDES[0]])
    payload = {
        "info": info,
        "rows": sum(len(outs[SIDES[0]][s]) for s in splits),
        "splits": splits,
        "seconds": res["secs"],
        "cpu_seconds": res["cpu"],
        "median_seconds": {k: statistics.median(v) for k, v in res["secs"].items()},
        "bit_identical_to_1x1": all(np.array_equal(outs[SIDES[2]][s], outs[SIDES[0]][s]) for s in splits),
        "max_abs_diff_to_1x2": max(float(np.abs(outs[SIDES[2]][s] - outs[SIDES[1]][s]).max()) for s in splits),
        "passes": list(passes),
    }
    md = report(payload)
    out = Path(args.out).with_suffix(".md")
    write_report(out, md, payload)
    print(md)
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

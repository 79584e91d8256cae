"""torch.compile on this machine's CPU: extraction (``features.backend: torch-compile``) and fine-tuning
(``train.compile``) against eager PyTorch, compile time included (issue 20, item 2).

For each workload, ``--repeats`` rounds of (order alternating):

* **eager**: one pass of the eager module;
* **compiled, first pass**: a freshly compiled module's first pass, i.e. what one pipeline step pays
  (the compile itself; Inductor's on-disk cache starts empty in a temp dir, so round 1 is what a
  fresh pod pays, and later rounds are warm, as on a machine that has compiled this model before;
  ``--warm-cache`` keeps the user's cache instead);
* **compiled, steady state**: the same compiled module's second pass (what a long job would see).

Extraction goes through the product path (``tlops.features.backends.build(..., "torch-compile")`` and
``tlops.features.extract.extract``), fine-tuning through ``tlops.training.finetune.fine_tune`` with
``train.compile`` on/off. Features of the compiled module are compared with eager's (max abs diff).

Writes ``bench/results/compile.md`` and ``.json``::

    .venv/bin/python bench/perf_compile.py            # 1 round, ~15 min on 2 cores (the compiles dominate)
    .venv/bin/python bench/perf_compile.py --quick    # tiny sizes: the mechanics only
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from common import RESULTS, minilm_dir, run_info, run_machine, write_report  # noqa: E402
from perf_setup import CNN_BS, CNN_LR, FT_BS, FT_LR, FT_MAXLEN, images, uci  # noqa: E402

SIZES = {
    "full": {"text": 500, "image": 2000, "ft_text": 160, "ft_cnn": 1024},
    "quick": {"text": 64, "image": 256, "ft_text": 32, "ft_cnn": 128},
}


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def _workloads(sz: dict[str, int], device: str):
    """(name, eager pass, make-compiled) per workload; a compiled object's ``__call__`` is one pass."""
    import numpy as np
    import torch

    from tlops.config import TrainConfig
    from tlops.data.dataset import Split
    from tlops.features import backends
    from tlops.features.extract import extract
    from tlops.models.backbone import ImageBackbone, TextBackbone
    from tlops.models.bundle import Classifier
    from tlops.training.finetune import fine_tune

    x, y = uci(("yelp",))
    tb = TextBackbone.create(str(minilm_dir()), max_length=FT_MAXLEN, pooling="mean").eval().to(device)
    texts = x[: sz["text"]]
    torch.manual_seed(0)
    ib = ImageBackbone.create("resnet10t", pretrained=False, in_chans=1, image_size=32).eval().to(device)
    xi, yi = images("mnist")
    pix = xi[: sz["image"]]

    def extractor(bb, data, bs):
        def make():
            c = backends.build(bb, "torch-compile", model_digest="bench", store=tempfile.gettempdir())
            return lambda: extract(c, data, bs, desc="compiled")

        return (lambda: extract(bb, data, bs, desc="eager")), make

    n = sz["ft_text"]
    ttrain, tval = Split(x[:n], np.array(y[:n])), Split(x[n : n + 64], np.array(y[n : n + 64]))
    tclf0 = Classifier(tb, 2, ["0", "1"])
    tcfg = TrainConfig(
        strategies=["fine-tune"], epochs=1, batch_size=FT_BS, lr=FT_LR, head_lr=FT_LR, weight_decay=0.0, device=device
    )
    m = sz["ft_cnn"]
    ctrain, cval = Split(xi[:m], yi[:m]), Split(xi[m : m + 256], yi[m : m + 256])
    cclf0 = Classifier(ib, 10)
    ccfg = TrainConfig(
        strategies=["fine-tune"],
        epochs=1,
        batch_size=CNN_BS,
        lr=CNN_LR,
        head_lr=CNN_LR,
        weight_decay=0.0,
        device=device,
    )

    def trainer(clf0, train, val, cfg):
        def one(compiled: bool):
            clf = copy.deepcopy(clf0)
            with tempfile.TemporaryDirectory(prefix="tlops-compile-ft-") as tmp:
                hist = fine_tune(
                    clf, train, val, cfg.model_copy(update={"compile": compiled}), 0, Path(tmp), frozen_k=0, name="c"
                )
            return np.array([hist[-1]["val_acc"]], dtype=np.float32)

        def make():  # fine_tune compiles inside; a "second pass" is a second run with the compile cache warm
            return lambda: one(True)

        return (lambda: one(False)), make

    return {
        f"extract text: MiniLM-L6, {len(texts)} UCI sentences, batch 32": (*extractor(tb, texts, 32), len(texts)),
        f"extract image: resnet10t 32x32, {len(pix)} MNIST images, batch 64": (*extractor(ib, pix, 64), len(pix)),
        f"fine-tune text: MiniLM-L6 yelp {n} train, 1 epoch, bs {FT_BS}": (*trainer(tclf0, ttrain, tval, tcfg), n),
        f"fine-tune CNN: resnet10t USPS->MNIST-size {m} train, 1 epoch, bs {CNN_BS}": (
            *trainer(cclf0, ctrain, cval, ccfg),
            m,
        ),
    }


def run(args) -> dict[str, Any]:
    if not args.warm_cache:  # before torch is imported: Inductor reads it once
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="tlops-inductor-")
    import numpy as np
    import torch

    torch.set_num_threads(args.threads or torch.get_num_threads())
    sz = SIZES["quick" if args.quick else "full"]
    out: dict[str, Any] = {"threads": torch.get_num_threads(), "cold_cache": not args.warm_cache, "workloads": {}}
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench/perf_compile.py: --device cuda but no CUDA device is visible; nothing to do")
        return {}
    out["device"] = args.device
    for name, (eager, make, n) in _workloads(sz, args.device).items():
        if args.only and args.only not in name:
            continue
        print(f"[compile] {name}", flush=True)
        rec: dict[str, list[float]] = {"eager": [], "compiled, first pass": [], "compiled, steady state": []}
        diff = None
        for r in range(args.repeats):
            order = ["eager", "compiled"] if r % 2 == 0 else ["compiled", "eager"]
            for side in order:
                if side == "eager":
                    dt, ref = _timed(eager)
                    rec["eager"].append(dt)
                else:
                    torch._dynamo.reset()  # a fresh compile, as in a new step process (disk cache aside)
                    fn = make()
                    dt1, got = _timed(fn)
                    dt2, got = _timed(fn)
                    rec["compiled, first pass"].append(dt1)
                    rec["compiled, steady state"].append(dt2)
                print(f"  round {r + 1} {side}: {rec['eager'][-1] if side == 'eager' else (dt1, dt2)}", flush=True)
            if name.startswith("extract"):
                diff = float(np.abs(np.asarray(ref) - np.asarray(got)).max())
        med = {k: statistics.median(v) for k, v in rec.items()}
        gain = med["eager"] - med["compiled, steady state"]
        out["workloads"][name] = {
            "items": n,
            "seconds": rec,
            "median": med,
            "speedup_first_pass": med["eager"] / med["compiled, first pass"],
            "speedup_steady": med["eager"] / med["compiled, steady state"],
            "compile_overhead_s": med["compiled, first pass"] - med["compiled, steady state"],
            "break_even_passes": (med["compiled, first pass"] - med["compiled, steady state"]) / gain
            if gain > 0
            else None,
            "max_abs_diff": diff,
        }
    return out


def render(payload: dict[str, Any]) -> str:
    info, res = payload["info"], payload["results"]
    lines = [
        "# torch.compile on the CPU: extraction and fine-tuning, compile time included",
        "",
        f"`{info['command']}`, {info['date']}; {run_machine(info)}; torch threads {res['threads']}; "
        f"device {res.get('device', 'cpu')}.",
        "",
        "Median seconds over the rounds; "
        + (
            "round 1 compiles with an empty Inductor cache (a new temp dir), later rounds warm. "
            if res.get("cold_cache")
            else "the Inductor cache was the user's (warm from earlier runs: `--warm-cache`). "
        )
        + "First pass = what one pipeline step pays (compile + one pass); steady state = the compiled "
        "module's second pass (fine-tuning: a second run, which recompiles for the new module from warm caches). "
        "Break-even = passes over the same shapes before the compile has paid for itself.",
        "",
        "| workload | eager s | compiled: first pass s | compiled: steady s | first pass vs eager | steady vs eager "
        "| compile overhead s | break-even passes | max abs diff (features) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, w in res["workloads"].items():
        m = w["median"]
        if w["compile_overhead_s"] <= 0:
            be = "0 (the first pass already wins)"
        else:
            be = f"{w['break_even_passes']:.0f}" if w["break_even_passes"] else "never (not faster)"
        diff = f"{w['max_abs_diff']:.1e}" if w["max_abs_diff"] is not None else "—"
        lines.append(
            f"| {name} | {m['eager']:.2f} | {m['compiled, first pass']:.2f} | {m['compiled, steady state']:.2f} "
            f"| {w['speedup_first_pass']:.2f}x | {w['speedup_steady']:.2f}x | {w['compile_overhead_s']:.1f} | {be} "
            f"| {diff} |"
        )
    lines += [
        "",
        "Verdict for the defaults: `train.compile` and `features.backend: torch-compile` stay off unless a "
        "workload above wins on its first pass (what a step pays) with a cold Inductor cache, which is what a "
        "fresh pod or CI machine has: a first pass that wins only from a warm cache (an earlier run on this "
        "machine compiled the same graphs) does not count.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the models run (extract follows)")
    ap.add_argument("--only", help="run the workloads whose name contains this text")
    ap.add_argument(
        "--warm-cache", action="store_true", help="use the user's Inductor cache (default: a new, empty one)"
    )
    ap.add_argument("--quick", action="store_true", help="tiny sizes: the mechanics only")
    ap.add_argument("--out", type=Path, default=RESULTS / "compile.md")
    ap.add_argument("--render", metavar="JSON", help="rewrite the markdown from a run's JSON, without running")
    args = ap.parse_args(argv)
    if args.render:
        args.out.write_text(render(json.loads(Path(args.render).read_text())))
        return 0
    res = run(args)
    if not res:
        return 0
    payload = {"info": run_info("bench/perf_compile.py", argv), "results": res}
    write_report(args.out, render(payload), payload)
    print(render(payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())

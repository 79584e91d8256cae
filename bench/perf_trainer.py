"""tlops fine-tuning against ``transformers.Trainer`` at its best settings (issue 20, item 4).

The anchor is the Trainer as a careful user would run it, not its defaults: ``group_by_length``
(its length-grouped sampler), fused AdamW (``optim="adamw_torch_fused"``), the same torch threads,
the same model (all-MiniLM-L6-v2 + mean pooling + a linear head, one ``Classifier`` deep-copied for
each run), data (UCI yelp, bench/perf.py's fine-tune split), hyper-parameters (lr, batch, cosine
without warm-up, no weight decay, no clipping) and epochs. Two interleaved series, median of
``--repeats`` (A,B then B,A):

* **throughput**: validation at epoch ends only; samples/s from the wall time of the whole run
  (tokenisation, training, evaluation, per-epoch checkpoints).
* **time to accuracy**: both sides score the validation split every ``--eval-steps`` optimizer steps
  (tlops ``train.eval_every``, the Trainer's ``eval_strategy="steps"``); the time to the first
  evaluation at or above ``--target`` validation accuracy. The Trainer keeps its per-epoch
  checkpoints and skips the best-model reload there (it can only restore a best model it saved at
  every evaluation); tlops keeps the best evaluation's weights in memory.
* **time to accuracy, as shipped**: the same, but tlops runs what its ``fine-tune`` strategy does:
  LP-FT, the classifier starting from the linear probe's head (frozen features of train and val,
  ``LogisticRegressionCV``), the extraction and the probe's fit counted in its time, the probe's own
  validation accuracy the first point of its curve. The Trainer starts from the random head, as a
  Trainer user would. Not like for like (a different initial head), so reported next to the series
  above, which is.

The throughput series also runs a **bare loop** (``_floor``): the same math and nothing else, the
bound on what any tool can gain over the Trainer here; both sides' checkpoint writes are timed.
**Steps to accuracy** (``--seeds``, default 5): both loops with eval every ``--eval-steps`` per seed,
the optimizer step at which each first reaches ``--target`` (how much of a time-to-accuracy gap is
one seed's data order).

Writes ``bench/results/trainer.md`` and ``.json`` (``--out`` to change; ``--render JSON`` rewrites the
markdown from a run's JSON)::

    .venv/bin/python bench/perf_trainer.py              # 3 repeats + 5 seeds, ~10 min on 2 idle cores
    .venv/bin/python bench/perf_trainer.py --quick      # tiny sizes, 1 repeat: the mechanics only
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from common import RESULTS, minilm_dir, run_info, run_machine, write_report  # noqa: E402
from perf_finetune import _ft_summary, _tlops_ft, trainer_ft  # noqa: E402
from perf_setup import (  # noqa: E402
    FT_BS,
    FT_LR,
    FT_MAXLEN,
    PASSES,
    SIZES,
    interleave_sides,
    remember_default_threads,
    uci,
)

OURS = "tlops fine_tune"
OURS_LPFT = "tlops fine-tune strategy (LP-FT: probe head first, extraction + probe timed)"
TRAINER = "Trainer: group_by_length + fused AdamW"
FLOOR = "bare loop (the same math, nothing else: the floor)"
GOALS = {"throughput": 1.3, "time to accuracy": 1.2}  # the issue's: tlops at least this many times the Trainer


def run(args) -> dict[str, Any]:
    import numpy as np
    import torch

    from tlops.config import TrainConfig
    from tlops.data.dataset import Split
    from tlops.models.backbone import TextBackbone
    from tlops.models.bundle import Classifier

    remember_default_threads()
    sz = SIZES["quick" if args.quick else "full"]
    x, y = uci(("yelp",))
    ntr, nva, epochs = sz["ft_train"], sz["ft_val"], sz["ft_epochs"]
    train, val = Split(x[:ntr], np.array(y[:ntr])), Split(x[ntr : ntr + nva], np.array(y[ntr : ntr + nva]))
    torch.manual_seed(0)
    tb = TextBackbone.create(str(minilm_dir()), max_length=FT_MAXLEN, pooling="mean")
    clf0 = Classifier(tb, 2, ["0", "1"])
    base = TrainConfig(
        strategies=["fine-tune"], epochs=epochs, batch_size=FT_BS, lr=FT_LR, head_lr=FT_LR, weight_decay=0.0
    )
    steps = base.model_copy(update={"eval_every": args.eval_steps})

    def trainer(eval_steps=None, seed=0):
        return trainer_ft(
            args,
            clf0,
            tb.tokenizer,
            train,
            val,
            epochs,
            False,
            "group_by_length",
            "adamw_torch_fused",
            eval_steps,
            seed,
        )

    import transformers

    transformers.utils.logging.set_verbosity_error()
    label = f"MiniLM-L6 yelp {ntr} train / {nva} val, {epochs} epoch(s), bs {FT_BS}, lr {FT_LR}, max_len {FT_MAXLEN}"
    out: dict[str, Any] = {"label": label, "eval_steps": args.eval_steps, "target": args.target, "series": {}}
    series = {
        "throughput": {
            OURS: lambda: _tlops_ft(clf0, train, val, base),
            TRAINER: trainer,
            FLOOR: lambda: _floor(clf0, tb.tokenizer, train, val, epochs),
        },
        "time to accuracy": {
            OURS: lambda: _tlops_ft(clf0, train, val, steps),
            TRAINER: lambda: trainer(args.eval_steps),
        },
        "time to accuracy, as shipped": {
            OURS_LPFT: lambda: _tlops_lpft(clf0, train, val, steps),
            TRAINER: lambda: trainer(args.eval_steps),
        },
    }
    for name, sides in series.items():
        print(f"[trainer] {name}: {label}", flush=True)
        prefix = f"trainer-{name.replace(' ', '-')}"
        r = interleave_sides(prefix, sides, args.repeats, ntr * epochs)
        s = _ft_summary(f"{name}: {label}", r, ntr * epochs, args.target, OURS_LPFT if OURS_LPFT in sides else OURS)
        s["other_cpu"] = f"{PASSES.other_share(prefix)} of the CPUs, load average {PASSES.load(prefix)}"
        out["series"][name] = s
    out["steps_to_target"] = _steps_to_target(args, lambda seed: _tlops_ft(clf0, train, val, steps, seed), trainer)
    return out


def _first_step(steps: list[tuple[int, float | None]], target: float) -> int | None:
    return next((st for st, acc in steps if acc is not None and acc >= target), None)


def _steps_to_target(args, ours, trainer) -> list[dict[str, Any]]:
    """The optimizer step of the first evaluation at or above the target, per seed (the seed sets the
    data order and dropout on both sides): how much of a time-to-accuracy gap is the draw of the
    data order rather than speed. Counted in steps, not seconds: this part is not timed."""
    rows = []
    for seed in range(args.seeds):
        a, b = ours(seed), trainer(args.eval_steps, seed)
        rows.append(
            {"seed": seed, OURS: _first_step(a["steps"], args.target), TRAINER: _first_step(b["steps"], args.target)}
        )
        print(f"[trainer] steps to {args.target:.2f}, seed {seed}: {rows[-1]}", flush=True)
    return rows


def _floor(clf0, tok, train, val, epochs: int) -> dict[str, Any]:
    """What any training loop for this workload must do and nothing more: tokenise once, batches of
    length-sorted rows (the least padding any batching of this size can have, shuffled batch order),
    forward, cross-entropy, backward, fused AdamW with the cosine schedule, and the validation
    forward passes at epoch ends; no checkpoints, logging, metrics or progress. Its time bounds what
    a tool running the same model and hyper-parameters can gain over the Trainer."""
    import copy
    import time

    import numpy as np
    import torch
    import torch.nn.functional as F

    t0 = time.perf_counter()
    clf = copy.deepcopy(clf0)

    def batches(split, bs):
        order = np.argsort([len(t) for t in split.x], kind="stable")
        out = []
        for i in range(0, len(order), bs):
            b = order[i : i + bs]
            enc = tok([split.x[j] for j in b], truncation=True, max_length=FT_MAXLEN, padding=True, return_tensors="pt")
            out.append(
                ({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}, torch.from_numpy(split.y[b]))
            )
        return out

    tr, va = batches(train, FT_BS), batches(val, 2 * FT_BS)
    opt = torch.optim.AdamW(clf.parameters(), lr=FT_LR, weight_decay=0.0, fused=True)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * len(tr))
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    curve = []
    for _ in range(epochs):
        clf.train()
        for j in torch.randperm(len(tr), generator=g).tolist():
            loss = F.cross_entropy(clf(**tr[j][0]).float(), tr[j][1])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        clf.eval()
        with torch.inference_mode():
            correct = sum(int((clf(**x).argmax(1) == y).sum()) for x, y in va)
        curve.append((time.perf_counter() - t0, correct / len(val)))
    return {"curve": curve, "steps": [], "final_acc": curve[-1][1]}


def _tlops_lpft(clf0, train, val, cfg) -> dict[str, Any]:
    """What the fine-tune strategy runs (``strategies/_lpft.py``): features of train and val from the
    frozen backbone, the linear probe on them, its head into the classifier, then ``fine_tune``. The
    curve starts with the probe's validation accuracy at the time it was fitted."""
    import copy
    import time

    from tlops.features.extract import extract
    from tlops.training.probe import train_probe

    t0 = time.perf_counter()
    clf = copy.deepcopy(clf0)
    f_train = extract(clf.backbone, train.x, 64, desc="lp-ft train")
    f_val = extract(clf.backbone, val.x, 64, desc="lp-ft val")
    head, hist = train_probe(f_train, train.y, f_val, val.y, len(clf.classes), cfg, 0)
    clf.head.load_state_dict(head.state_dict())
    t_probe = time.perf_counter() - t0
    res = _tlops_ft(clf, train, val, cfg)
    curve = [(t_probe, hist[0]["val_acc"])] + [(t + t_probe, acc) for t, acc in res["curve"]]
    return {"curve": curve, "final_acc": res["final_acc"]}


def render(payload: dict[str, Any]) -> str:
    info, res = payload["info"], payload["results"]
    lines = [
        "# Fine-tuning: tlops vs transformers.Trainer at its best settings",
        "",
        f"`{info['command']}`, {info['date']}; {run_machine(info)}.",
        "",
        f"Workload: {res['label']}. The Trainer runs with `group_by_length=True` (its length-grouped sampler), "
        '`optim="adamw_torch_fused"`, dynamic padding (`DataCollatorWithPadding`) and the same torch threads; '
        "tlops with its defaults (length-grouped batches, fused AdamW). Same model object (deep-copied), "
        "same initial weights, same lr / batch / cosine schedule / epochs; median of the interleaved repeats.",
        "",
    ]
    for name, s in res["series"].items():
        how = (
            "validation at epoch ends only"
            if name == "throughput"
            else f"validation every {res['eval_steps']} optimizer steps on both sides"
            + ("; tlops from the probe's head, the Trainer from the random head" if "shipped" in name else "")
        )
        lines += [
            f"## {name} ({how})",
            "",
            f"Other processes during the passes: {s['other_cpu']}.",
            "",
            "| side | samples/s | tlops speedup | CPU-s (median) | seconds (per repeat) "
            f"| time to val acc {res['target']:.2f} | evaluations | final val acc |",
            "| --- | ---: | ---: | ---: | --- | ---: | ---: | --- |",
        ]
        for side, v in s["sides"].items():
            tta = f"{v['time_to_target']:.1f} s ({v['reached_target']})" if v["time_to_target"] else "not reached"
            n_evals = len(v["curves"][0]) if v["curves"] else 0
            speedup = "—" if side in (OURS, OURS_LPFT) else f"{v['speedup']:.2f}x"
            lines.append(
                f"| {side} | {v['samples_s']:.1f} | {speedup} "
                f"| {statistics_median(v['cpu_seconds']):.1f} | {', '.join(f'{t:.1f}' for t in v['secs'])} "
                f"| {tta} | {n_evals} | {', '.join(f'{a:.3f}' for a in v['final_acc'] if a is not None)} |"
            )
        lines.append("")
    lines += ["## Goals", ""]
    thr = res["series"]["throughput"]["sides"][TRAINER]["speedup"]
    tta = res["series"]["time to accuracy"]["sides"][TRAINER].get("tta_speedup")
    lines.append(
        f"- samples/s ≥ {GOALS['throughput']}x the best Trainer: {thr:.2f}x — "
        f"{'met' if thr >= GOALS['throughput'] else 'not met'}"
    )
    lines.append(
        f"- time to {res['target']:.2f} validation accuracy ≥ {GOALS['time to accuracy']}x faster: "
        + (
            f"{tta:.2f}x — {'met' if tta >= GOALS['time to accuracy'] else 'not met'}"
            if tta
            else "not measurable (a side never reached the target on every repeat)"
        )
    )
    floor = res["series"]["throughput"]["sides"].get(FLOOR)
    if floor:
        tr = res["series"]["throughput"]["sides"][TRAINER]
        ours = res["series"]["throughput"]["sides"][OURS]
        ceiling = floor["samples_s"] / tr["samples_s"]
        ck, ck_tr = _median_of(ours, "checkpoint_s"), _median_of(tr, "checkpoint_s")
        ours_s, floor_s = statistics_median(ours["secs"]), statistics_median(floor["secs"])
        lines.append(
            f"- why: the bare loop (the same model, batches with the least padding possible, forward, backward, "
            f"fused AdamW, epoch-end validation, nothing else) runs at {floor['samples_s']:.1f} samples/s, "
            f"{ceiling:.2f}x the Trainer's: "
            + (
                f"no loop running this math can be much more than {ceiling:.2f}x the Trainer here, so "
                f"{GOALS['throughput']}x needs different math (precision, frozen parameters), not less overhead"
                if ceiling < GOALS["throughput"]
                else f"a loop with less overhead could reach {GOALS['throughput']}x"
            )
            + f"; tlops runs at {ours['samples_s'] / floor['samples_s']:.0%} of the floor's samples/s"
            + (
                f"; writing the per-epoch checkpoints (model and RNG state, and the optimizer's for resume; "
                "tlops leaves the optimizer out of the last one) took "
                f"{ck:.2f} s of tlops' {ours_s:.2f} s and "
                f"{ck_tr:.2f} s of the Trainer's {statistics_median(tr['secs']):.2f} s (median run); the rest of "
                f"tlops' time over the floor's: {ours_s - ck - floor_s:.2f} s"
                if ck is not None and ck_tr is not None
                else ""
            )
        )
    rows = res.get("steps_to_target") or []
    if rows:
        ours_steps = [r[OURS] for r in rows]
        tr_steps = [r[TRAINER] for r in rows]
        lines.append(
            f"- why, time to {res['target']:.2f}: the optimizer step of the first evaluation at or above it, per seed "
            f"(the seed draws the data order and dropout on both sides): tlops {ours_steps}, Trainer {tr_steps} "
            "(None: not reached); at the same step tlops is as fast as its samples/s ratio says, so the time "
            "ratio above is the step at which each side's data order reaches the target"
        )
    shipped = res["series"].get("time to accuracy, as shipped")
    if shipped:
        t = shipped["sides"][TRAINER].get("tta_speedup")
        lines.append(
            f"- (not like for like, reported) time to {res['target']:.2f} with tlops' fine-tune strategy as shipped "
            "(LP-FT, extraction and probe included) against the Trainer from its random head: "
            + (f"{t:.2f}x" if t else "not measurable")
        )
    lines.append("")
    return "\n".join(lines)


def _median_of(side: dict[str, Any], key: str) -> float | None:
    xs = [v for v in side.get(key) or [] if v is not None]
    return statistics_median(xs) if xs else None


def statistics_median(xs: list[float]) -> float:
    import statistics

    return statistics.median(xs)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--eval-steps", type=int, default=2, help="validation every N optimizer steps (second series)")
    ap.add_argument("--target", type=float, default=0.80, help="validation accuracy for the time to accuracy")
    ap.add_argument("--seeds", type=int, default=5, help="seeds of the steps-to-target comparison")
    ap.add_argument("--quick", action="store_true", help="tiny sizes and 1 repeat: the mechanics only")
    ap.add_argument("--out", type=Path, default=RESULTS / "trainer.md")
    ap.add_argument("--render", metavar="JSON", help="rewrite the markdown from a run's JSON, without running")
    # perf_finetune's Trainer side reads these (CPU fp32 eager here)
    ap.set_defaults(device="cpu", amp=None, channels_last=False, compile=False)
    args = ap.parse_args(argv)
    if args.render:
        payload = json.loads(Path(args.render).read_text())
        args.out.write_text(render(payload))
        return 0
    if args.quick:
        args.repeats, args.seeds = 1, 1
    payload = {"info": run_info("bench/perf_trainer.py", argv), "results": run(args)}
    write_report(args.out, render(payload), payload)
    print(render(payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())

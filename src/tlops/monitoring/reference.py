"""The monitoring reference stored with every registered model (``monitoring/reference/`` in the
version's MLflow run): what ``tlops monitor`` compares new inputs against.

It holds no raw training data, only:

- ``features``: a seeded subsample of at most 2,000 embeddings (float16) in the feature space of
  the registered model's backbone. When the backbone is the source model's (frozen: linear probe,
  head-only strategies) this *is* the source feature space and the rows come from the train
  features the extract-features step cached (same cache key, no backbone pass). When fine-tuning
  changed the backbone, train embeddings are fit to the train split and any held-out data would
  look shifted against them, so the rows are held-out validation + test inputs embedded with the
  tuned backbone (the space the served model sees). With ``data.labels_per_class`` the train and
  validation splits are class-balanced, so the rows come from the test split alone.
- ``ref_pred``: the model's predictions on those rows (the label-shift test's reference: with
  ``data.labels_per_class`` the validation split is class-balanced, the data are not).
- ``val_score`` / ``val_pred`` / ``val_correct``: the selected model's validation confidences
  (log-probability of the predicted class), predictions and hits, and ``confusion``: its
  validation confusion matrix (BBSE).
- ``calib_score`` / ``calib_correct``: confidences and hits on validation + up to 2,000 test rows,
  ATC's calibration set. Validation alone is a few hundred rows in a small dataset, and a split
  that happens to score a few points above or below the data moves ATC's estimate by as much
  (bench/shift.py, books reviews: validation 0.667, in-distribution test rows 0.742). The test
  labels were already used to score the model; the reference only reads them.
- ``reference.json``: where the features come from, the backbone digest and preprocessing (the
  monitor's feature cache key), the classes, how the training data was read, the sizes, and the
  pipeline config that trained the model (``tlops adapt`` builds its adaptation run from it).

Size: 2,000 x feature dim x 2 bytes (512-d resnet: 2.0 MB; 384-d MiniLM: 1.5 MB) plus a few bytes
per validation and calibration row.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

MAX_REFERENCE = 2000
ARTIFACT_PATH = "monitoring/reference"
#: the DataConfig fields that say how a file is read (the monitor reads new files the same way)
READ_OPTIONS = ("format", "text_column", "label_column", "columns", "quoting", "encoding", "image_size")


def backbone_digest(bundle: Path) -> str:
    """The digest of the bundle's backbone alone (its head excluded): the source model's digest
    when fine-tuning left the backbone as it was."""
    from tlops.models.bundle import weights_digest
    from tlops.models.bundle_files import read_spec

    spec = {k: v for k, v in read_spec(bundle).items() if k not in ("head", "classes")}
    return weights_digest(bundle, spec)


def head_logits(clf: Any, features: np.ndarray) -> np.ndarray:
    """Class logits (float64) from backbone features through the classifier's linear head."""
    import torch

    with torch.inference_mode():
        return clf.head(torch.from_numpy(np.asarray(features, np.float32))).double().numpy()


def top_score(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Predicted class and its log-probability, from logits in float64: a confident model's
    softmax saturates at 1.0 in float32 (every confidence ties and ATC's threshold degenerates);
    log p_top = -log(1 + sum_j exp(l_j - l_top)) keeps the order down to ~1e-300."""
    pred = logits.argmax(1)
    rest = np.exp(logits - logits[np.arange(len(logits)), pred][:, None])
    rest[np.arange(len(logits)), pred] = 0.0  # sum over the other classes only: no 1 + tiny - 1
    return pred, -np.log1p(rest.sum(1))


def model_arrays(
    clf: Any,
    feats: np.ndarray,
    val_f: np.ndarray,
    val_y: np.ndarray,
    test_f: np.ndarray | None,
    test_y: np.ndarray,
    num_classes: int,
) -> dict[str, np.ndarray]:
    """What the classifier's head says about the reference rows (``feats``, float16), the validation
    rows and the held-out test rows (``test_f``, or None): the arrays of the reference besides the
    features. ATC's threshold is fitted on validation + held-out test rows: validation alone (a few
    hundred rows) puts it a few points off whenever that split is luckier or unluckier than the data
    (bench/shift.py: books validation 0.667, in-distribution test rows 0.742)."""
    from tlops.monitoring.stats import confusion

    pred, score = top_score(head_logits(clf, val_f))
    calib_pred, calib_score, calib_y = pred, score, val_y
    if test_f is not None:
        tp, ts = top_score(head_logits(clf, test_f))
        calib_pred, calib_score, calib_y = np.r_[pred, tp], np.r_[score, ts], np.r_[val_y, test_y]
    return {
        "features": feats,
        "ref_pred": top_score(head_logits(clf, feats.astype(np.float32)))[0].astype(np.int16),
        "val_score": score,
        "val_pred": pred.astype(np.int16),
        "val_correct": (pred == val_y),
        "confusion": confusion(pred, val_y, num_classes),
        "calib_score": calib_score,
        "calib_correct": (calib_pred == calib_y),
    }


def build(cfg: Any, ds: Any, bundle: Path, clf: Any, *, seed: int | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """The reference arrays and their description for the model in ``bundle`` trained on ``ds``."""
    from tlops.features.cache import FeatureCache, cache_key
    from tlops.features.extract import extract
    from tlops.models.bundle_files import read_spec
    from tlops.steps.extract_features import cache_root

    seed = cfg.seed if seed is None else seed
    spec = read_spec(bundle)
    digest = backbone_digest(bundle)
    cache = FeatureCache(cache_root(cfg))
    key = cache_key(digest, spec["preprocessing"], ds.content_hash)
    splits = ds.splits()
    rng = np.random.default_rng(seed)
    if "val" not in splits:
        raise ValueError(f"the dataset has no validation split (splits: {splits}); the reference needs one")
    # with data.labels_per_class the train and val splits are class-balanced, not what the data
    # (and the inputs the model will get) look like: the reference then comes from the test split
    balanced = cfg.data.labels_per_class is not None and "test" in splits
    val = ds.load("val")
    test = ds.load("test") if "test" in splits else None
    test_f, test_y = None, np.zeros(0, dtype=np.int64)  # held-out labelled rows for ATC's calibration
    if cfg.features.cache and cache.get(key) is not None:
        cached = cache.load(key)  # extract-features wrote it with this very backbone: it is frozen
        part = "test" if balanced else "train"
        space, pool, val_f = (
            f"source (frozen backbone; {part} features from the feature cache)",
            cached[part],
            cached["val"],
        )
        if test is not None:
            pick = np.random.default_rng([seed, 1])  # its own stream: the reference rows stay as they were
            tidx = np.sort(pick.choice(len(test), min(len(test), MAX_REFERENCE), replace=False))
            test_f, test_y = cached["test"][tidx], np.asarray(test.y, dtype=np.int64)[tidx]
    else:
        space = "registered model backbone (fine-tuned: not in the cache under the source key; held-out inputs)"
        val_f = extract(clf.backbone, val.x, cfg.features.batch_size, desc="reference val")
        held = [] if balanced else [val_f]
        if test is not None:
            take = min(len(test), max(0, MAX_REFERENCE - sum(len(h) for h in held)))
            tidx = np.sort(rng.choice(len(test), take, replace=False))
            xs = test.x[tidx] if isinstance(test.x, np.ndarray) else [test.x[i] for i in tidx]
            test_f = extract(clf.backbone, xs, cfg.features.batch_size, desc="reference test")
            test_y = np.asarray(test.y, dtype=np.int64)[tidx]
            held.append(test_f)
        pool = np.concatenate(held)
    idx = np.sort(rng.choice(len(pool), min(len(pool), MAX_REFERENCE), replace=False))
    feats = pool[idx].astype(np.float16)
    y = np.asarray(val.y, dtype=np.int64)
    arrays = model_arrays(clf, feats, val_f, y, test_f, test_y, len(spec["classes"]))
    meta = {
        "feature_space": space,
        "backbone_digest": digest,
        "preprocessing": spec["preprocessing"],
        "classes": spec["classes"],
        "modality": ds.kind,
        "reference_rows": int(len(feats)),
        "feature_dim": int(feats.shape[1]),
        "pool_rows": int(len(pool)),
        "val_rows": int(len(y)),
        "val_accuracy": float(np.mean(arrays["val_correct"])),
        "calibration_rows": int(len(arrays["calib_correct"])),
        "calibration_accuracy": float(np.mean(arrays["calib_correct"])),
        "seed": int(seed),
        "read_options": {f: getattr(cfg.data, f) for f in READ_OPTIONS if getattr(cfg.data, f, None) is not None},
        # the whole config that trained it: `tlops adapt` turns its data into data.adapt_from
        "pipeline_config": cfg.to_dict(),
    }
    return arrays, meta


def log_reference(cfg: Any, ds: Any, bundle: Path, clf: Any) -> dict:
    """Build the reference and log it to the active MLflow run under ``monitoring/reference``."""
    import mlflow

    try:
        arrays, meta = build(cfg, ds, bundle, clf)
    except ValueError as e:  # no validation split: register the model, without a reference
        log.warning("register: no monitoring reference stored (%s); tlops monitor will refuse this version", e)
        return {}
    with tempfile.TemporaryDirectory(prefix="tlops-reference-") as tmp:
        np.savez_compressed(Path(tmp) / "reference.npz", **arrays)
        meta["bytes"] = (Path(tmp) / "reference.npz").stat().st_size
        (Path(tmp) / "reference.json").write_text(json.dumps(meta, indent=2))
        mlflow.log_artifacts(tmp, artifact_path=ARTIFACT_PATH)
    log.info(
        "register: monitoring reference: %d x %d features (%s), %d validation samples, %.1f KB",
        meta["reference_rows"],
        meta["feature_dim"],
        meta["feature_space"].split(" (")[0],
        meta["val_rows"],
        meta["bytes"] / 1024,
    )
    return meta


def load(run_id: str, dst: Path) -> tuple[dict[str, np.ndarray], dict]:
    """The reference logged with the run ``run_id``."""
    import mlflow

    from tlops.errors import ModelError

    try:
        local = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=ARTIFACT_PATH, dst_path=str(dst)))
    except Exception as e:  # noqa: BLE001 - MLflow raises several types for a missing path
        raise ModelError(
            f"run {run_id} holds no monitoring reference ({ARTIFACT_PATH}): the model was registered before "
            f"tlops stored one; register it again to monitor it ({type(e).__name__})"
        ) from None
    meta = json.loads((local / "reference.json").read_text())
    with np.load(local / "reference.npz", allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    return arrays, meta

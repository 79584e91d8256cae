"""extract-features: backbone features for every split, through the content-addressed cache.

With a local cache root, each cache key is computed under the cache's per-key lock (lookup,
compute, publish): two runs started at once on the same data and model compute it once, the
second waits and gets a hit. The artifact lists every cache key it used (``cache_keys``) so
``tlops gc`` knows what kept runs reference.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from tlops.artifacts import Artifact, write_artifact
from tlops.config import PipelineConfig
from tlops.data.dataset import Dataset
from tlops.features import backends
from tlops.features.backends import key_preprocessing
from tlops.features.cache import FeatureCache, cache_key
from tlops.hashing import hash_json
from tlops.storage import is_s3
from tlops.workdir import Workdir

log = logging.getLogger(__name__)


def cache_root(cfg: PipelineConfig) -> Path | str:
    """The feature cache root: a local dir, or an ``s3://bucket/prefix`` URI kept as a string."""
    if cfg.features.cache_dir:
        return cfg.features.cache_dir if is_s3(cfg.features.cache_dir) else Path(cfg.features.cache_dir)
    return Workdir.at(cfg.workdir_path).feature_cache


def _stacking(cfg: PipelineConfig) -> bool:
    return "stacking" in cfg.train.strategies


def run(cfg: PipelineConfig, inputs: dict[str, Artifact], out: Path) -> Artifact:
    ds = Dataset(inputs["dataset"])
    model = inputs["model"]
    cache = FeatureCache(cache_root(cfg))
    chosen = {
        "source": model.meta["source"],
        "path": "model",
        "model_digest": model.meta["model_digest"],
        "preprocessing": model.meta["preprocessing"],
    }
    ranking = None
    if model.meta.get("candidates"):
        ranking = _rank_candidates(cfg, ds, model, cache)
        chosen = ranking[0]
    backend, backend_info = _resolve_backend(cfg, ds, model.path / chosen["path"], chosen)
    key = cache_key(chosen["model_digest"], key_preprocessing(chosen["preprocessing"], backend), ds.content_hash)
    used = [key] + [cache_key(c["model_digest"], c["preprocessing"], ds.content_hash + ":train") for c in ranking or []]
    t0 = time.perf_counter()
    with write_artifact(out, "features", config=cfg.features.model_dump(mode="json"), inputs=inputs) as w:
        # local: hard link into/out of an atomically published entry; S3: features.npz, then manifest.json
        hit = cache.get_or_compute(
            key,
            lambda: _compute(
                ds,
                model.path / chosen["path"],
                cfg.features.batch_size,
                backend=backend,
                model_digest=chosen["model_digest"],
                store=backend_store(cfg),
            ),
            {"model_digest": chosen["model_digest"], "dataset_hash": ds.content_hash, "backend": backend},
            w.path / "features.npz",
            enabled=cfg.features.cache,
        )
        if hit:
            log.info(
                "extract-features: cache hit %s: backbone not run, features loaded from %s", key[:16], cache.entry(key)
            )
        if _stacking(cfg) and model.meta.get("candidates"):
            used += _add_stack(w.path / "features.npz", ds, model, cache, cfg)
        w.content_hash = key if not _stacking(cfg) else hash_json([key, "stack", model.content_hash])
        with np.load(w.path / "features.npz", allow_pickle=False) as z:
            shapes = {k: list(z[k].shape) for k in z.files}
        w.metadata = {
            "cache_key": key,
            "cache": "hit" if hit else ("miss" if cfg.features.cache else "off"),
            "model_digest": chosen["model_digest"],
            "source": chosen["source"],
            "source_bundle": chosen["path"],  # fine-tune trains this bundle of the pull-model artifact
            "dataset_hash": ds.content_hash,
            "backend": backend,
            **({"backend_auto": backend_info} if backend_info else {}),
            **({"source_ranking": ranking, "selection_score": cfg.source.selection_score} if ranking else {}),
            "shapes": shapes,
            "seconds": round(time.perf_counter() - t0, 3),
            "cache_keys": sorted(set(used)) if cfg.features.cache else [],
        }
    return Artifact(Path(out), w.manifest)


def _add_stack(path: Path, ds: Dataset, model: Artifact, cache: FeatureCache, cfg: PipelineConfig) -> list[str]:
    """Add ``stack_<split>``: every candidate's features (each cached under its own key),
    concatenated; return the cache keys used."""
    parts: list[dict[str, np.ndarray]] = []
    keys = []
    for c in model.meta["candidates"]:
        key = cache_key(c["model_digest"], c["preprocessing"], ds.content_hash)
        keys.append(key)
        parts.append(
            cache.get_or_compute_arrays(
                key,
                lambda c=c: _compute(ds, model.path / c["path"], cfg.features.batch_size),
                {"model_digest": c["model_digest"], "dataset_hash": ds.content_hash},
                enabled=cfg.features.cache,
            )
        )
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    for split in parts[0]:
        arrays[f"stack_{split}"] = np.concatenate([p[split] for p in parts], axis=1)
    tmp = path.with_name("stacked.tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)  # a new file: features.npz may be a hard link into the cache, never write through it
    log.info(
        "extract-features: stacked features of %d source models (%d dims)",
        len(parts),
        arrays[f"stack_{next(iter(parts[0]))}"].shape[1],
    )
    return keys


def _rank_candidates(cfg: PipelineConfig, ds: Dataset, model: Artifact, cache: FeatureCache) -> list[dict]:
    """Score every pulled candidate on its train-split features (each cached under its own key)
    with every feature-based transferability score, best first by ``source.selection_score``.
    (LEEP / NCE need a source head, and pull-model keeps backbones only.)"""
    from tlops.features.extract import extract
    from tlops.features.selection import all_scores, rank_sources
    from tlops.models.bundle import load_backbone

    train = ds.load("train")
    name = cfg.source.selection_score
    scored = []
    for c in model.meta["candidates"]:
        key = cache_key(c["model_digest"], c["preprocessing"], ds.content_hash + ":train")
        f = cache.get_or_compute_arrays(
            key,
            lambda c=c: {
                "train": extract(
                    load_backbone(model.path / c["path"]), train.x, cfg.features.batch_size, desc=f"rank {c['source']}"
                )
            },
            {"model_digest": c["model_digest"], "dataset_hash": ds.content_hash, "split": "train"},
            enabled=cfg.features.cache,
        )["train"]
        scores = {k: round(v, 6) for k, v in all_scores(f, train.y).items() if v is not None}
        scored.append({**c, "score": scores[name], "scores": scores})
    return rank_sources(scored, name)


def backend_store(cfg: PipelineConfig) -> Path:
    """Where exported / quantised backbones and ``auto`` decisions are kept (local, next to the feature cache)."""
    return backends.default_store(Workdir.at(cfg.workdir_path).root)


def _calibration(ds: Dataset, n: int = backends.CALIBRATION_ROWS) -> tuple[Any, str]:
    """A seeded sample of train rows (the static int8 CNN's activation ranges) and its identity."""
    x = ds.load("train").x
    idx = np.sort(np.random.default_rng(0).choice(len(x), size=min(n, len(x)), replace=False))
    return (x[idx] if isinstance(x, np.ndarray) else [x[i] for i in idx]), f"{ds.content_hash}:train:{n}:seed0"


def _runner(backbone, backend: str, ds: Dataset, model_digest: str, store: Path):
    calibration, cal_id = (None, None)
    if backend == "onnx-int8" and backbone.modality == "image":
        calibration, cal_id = _calibration(ds)
    return backends.build(
        backbone, backend, model_digest=model_digest, store=store, calibration=calibration, calibration_id=cal_id
    )


def _resolve_backend(cfg: PipelineConfig, ds: Dataset, bundle_dir: Path, chosen: dict) -> tuple[str, dict | None]:
    """``features.backend``, with ``auto`` measured on a sample of this run's data (see backend_choice)."""
    backend = cfg.features.backend
    if backend == "torch":
        return backend, None
    from tlops.models.bundle import load_backbone
    from tlops.models.bundle_files import read_spec

    # checked from the bundle's metadata: a cache hit (or a reused auto decision) never loads the weights
    modality = chosen["preprocessing"].get("modality")
    backends.check(backend, modality, read_spec(bundle_dir).get("kind", "?"))
    if backend != "auto":
        return backend, None
    from tlops.features.backend_choice import choose

    store = backend_store(cfg)
    loaded: list = []

    def make(name: str):
        if not loaded:
            loaded.append(load_backbone(bundle_dir))
        return _runner(loaded[0], name, ds, chosen["model_digest"], store)

    train = ds.load("train")
    val = ds.load("val") if "val" in ds.splits() else None
    info = choose(
        str(modality),
        train=(train.x, train.y),
        val=(val.x, val.y) if val is not None else None,
        make=make,
        batch_size=cfg.features.batch_size,
        decision_key={"model": chosen["model_digest"], "pre": chosen["preprocessing"], "data": ds.content_hash},
        store=store,
    )
    return info["backend"], info


def _compute(
    ds: Dataset,
    bundle_dir: Path,
    batch_size: int,
    *,
    backend: str = "torch",
    model_digest: str = "",
    store: Path | None = None,
) -> dict[str, np.ndarray]:
    from tlops.features.extract import extract
    from tlops.models.bundle import load_backbone

    backbone = load_backbone(bundle_dir)
    if backend != "torch":
        assert store is not None
        backbone = _runner(backbone, backend, ds, model_digest, store)
    arrays = {}
    for split in ds.splits():
        arrays[split] = extract(backbone, ds.load(split).x, batch_size, desc=f"extract {split}")
    return arrays

"""extract-features: backbone features for every split, through the content-addressed cache."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from tlops.artifacts import Artifact, write_artifact
from tlops.config import PipelineConfig
from tlops.data.dataset import Dataset
from tlops.features.cache import FeatureCache, cache_key
from tlops.hashing import hash_json
from tlops.storage import is_s3

log = logging.getLogger(__name__)


def cache_root(cfg: PipelineConfig) -> Path | str:
    """The feature cache root: a local dir, or an ``s3://bucket/prefix`` URI kept as a string."""
    if cfg.features.cache_dir:
        return cfg.features.cache_dir if is_s3(cfg.features.cache_dir) else Path(cfg.features.cache_dir)
    return cfg.workdir_path / "cache" / "features"


def fingerprint(cfg: PipelineConfig, inputs: dict[str, Artifact]) -> str:
    return hash_json([cfg.section_hash("features"), inputs["dataset"].content_hash, inputs["model"].content_hash])


def run(cfg: PipelineConfig, inputs: dict[str, Artifact], out: Path) -> Artifact:
    ds = Dataset(inputs["dataset"])
    model = inputs["model"]
    key = cache_key(model.meta["model_digest"], model.meta["preprocessing"], ds.content_hash)
    cache = FeatureCache(cache_root(cfg))
    t0 = time.perf_counter()
    hit = cfg.features.cache and cache.get(key) is not None
    if hit:
        log.info("extract-features: cache hit %s: backbone not run, features loaded from %s", key[:16], cache.entry(key))
    else:
        arrays = _compute(ds, model.path / "model", cfg.features.batch_size)
    with write_artifact(out, "features", config=cfg.features.model_dump(mode="json"), inputs=inputs) as w:
        if hit:
            cache.fetch(key, w.path / "features.npz")
        else:
            np.savez(w.path / "features.npz", **arrays)
            if cfg.features.cache:
                # local: hard link into an atomically published entry; S3: features.npz, then manifest.json
                meta = {"model_digest": model.meta["model_digest"], "dataset_hash": ds.content_hash}
                cache.put_file(key, w.path / "features.npz", meta)
        w.content_hash = key
        with np.load(w.path / "features.npz", allow_pickle=False) as z:
            shapes = {k: list(z[k].shape) for k in z.files}
        w.metadata = {
            "cache_key": key,
            "cache": "hit" if hit else ("miss" if cfg.features.cache else "off"),
            "model_digest": model.meta["model_digest"],
            "dataset_hash": ds.content_hash,
            "shapes": shapes,
            "seconds": round(time.perf_counter() - t0, 3),
        }
    return Artifact(Path(out), w.manifest)


def _compute(ds: Dataset, bundle_dir: Path, batch_size: int) -> dict[str, np.ndarray]:
    from tlops.features.extract import extract
    from tlops.models.bundle import load_backbone

    backbone = load_backbone(bundle_dir)
    arrays = {}
    for split in ds.splits():
        arrays[split] = extract(backbone, ds.load(split).x, batch_size, desc=f"extract {split}")
    return arrays


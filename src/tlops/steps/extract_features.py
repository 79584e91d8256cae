"""extract-features: backbone features for every split, through the content-addressed cache.

With a local cache root, each cache key is computed under the cache's per-key lock (lookup,
compute, publish): two runs started at once on the same data and model compute it once, the
second waits and gets a hit. The artifact lists every cache key it used (``cache_keys``) so
``tlops gc`` knows what kept runs reference.

``features.shards: N`` (N > 1): each split's rows are cut into N contiguous runs of whole batches
(``tlops.features.extract.shard_rows``); each shard is extracted on its own and cached under its
own key (:func:`shard_key`), then the shards are merged into the normal entry, bit-identical to one
pass. In-process the missing shards run in N spawned worker processes; on KFP a ParallelFor of
shard tasks (:func:`run_shard`) writes them to the shared cache first, and this step only merges.
Shards already in the cache are reused, so a rerun after a failed shard recomputes only that one.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from tlops.artifacts import Artifact, write_artifact
from tlops.config import PipelineConfig
from tlops.data.dataset import Dataset
from tlops.errors import TlopsError
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


def _choose(cfg: PipelineConfig, ds: Dataset, model: Artifact, cache: FeatureCache):
    """The backbone to extract with (the best candidate when several were pulled) and its backend."""
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
    return chosen, ranking, backend, backend_info


def run(cfg: PipelineConfig, inputs: dict[str, Artifact], out: Path) -> Artifact:
    ds = Dataset(inputs["dataset"])
    model = inputs["model"]
    cache = FeatureCache(cache_root(cfg))
    chosen, ranking, backend, backend_info = _choose(cfg, ds, model, cache)
    key = _main_key(chosen, backend, ds)
    used = [key] + [cache_key(c["model_digest"], c["preprocessing"], ds.content_hash + ":train") for c in ranking or []]
    sharding: dict[str, Any] = {}  # shards_reused / shards_computed, for the metadata
    if cfg.features.shards > 1:  # the shard entries are not listed in cache_keys: after the merge gc may drop them

        def compute() -> dict[str, np.ndarray]:
            job = _job(cfg, ds, model.path / chosen["path"], chosen, backend)
            return _compute_sharded(job, cfg.features.shards, cache if cfg.features.cache else None, sharding)
    else:

        def compute() -> dict[str, np.ndarray]:
            return _compute(
                ds,
                model.path / chosen["path"],
                cfg.features.batch_size,
                backend=backend,
                model_digest=chosen["model_digest"],
                store=backend_store(cfg),
            )

    t0 = time.perf_counter()
    with write_artifact(out, "features", config=cfg.features.model_dump(mode="json"), inputs=inputs) as w:
        # local: hard link into/out of an atomically published entry; S3: features.npz, then manifest.json
        hit = cache.get_or_compute(
            key,
            compute,
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
            **({"shards": cfg.features.shards} if cfg.features.shards > 1 else {}),
            **sharding,
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
    return Workdir.at(cfg.workdir_path).backend_models


def _calibration(ds: Dataset) -> tuple[Any, str]:
    """A seeded sample of train rows (the static int8 models' activation ranges) and its identity."""
    from tlops.features.backends import CALIBRATION_ROWS as n

    x = ds.load("train").x
    idx = np.sort(np.random.default_rng(0).choice(len(x), size=min(n, len(x)), replace=False))
    return (x[idx] if isinstance(x, np.ndarray) else [x[i] for i in idx]), f"{ds.content_hash}:train:{n}:seed0"


def _runner(backbone, backend: str, ds: Dataset, model_digest: str, store: Path):
    from tlops.features import backends

    calibration, cal_id = (None, None)
    if backends.needs_calibration(backend, backbone.modality):
        calibration, cal_id = _calibration(ds)
    return backends.build(
        backbone, backend, model_digest=model_digest, store=store, calibration=calibration, calibration_id=cal_id
    )


def _resolve_backend(cfg: PipelineConfig, ds: Dataset, bundle_dir: Path, chosen: dict) -> tuple[str, dict | None]:
    """``features.backend``, with ``auto`` measured on a sample of this run's data (see backend_choice)."""
    backend = cfg.features.backend
    if backend == "torch":
        return backend, None
    from tlops.features import backends
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
    shard: tuple[int, int] | None = None,
) -> dict[str, np.ndarray]:
    """Every split's features; with ``shard=(i, n)`` only shard i's rows of each split, and their
    row numbers as ``rows_<split>`` (for the merge)."""
    from tlops.features.extract import extract, shard_rows
    from tlops.models.bundle import load_backbone

    backbone = load_backbone(bundle_dir)
    if backend != "torch":
        assert store is not None
        backbone = _runner(backbone, backend, ds, model_digest, store)
    arrays = {}
    for split in ds.splits():
        x = ds.load(split).x
        if shard is None:
            arrays[split] = extract(backbone, x, batch_size, desc=f"extract {split}")
            continue
        rows = shard_rows(backbone.modality, x, batch_size, *shard)
        part = x[rows] if isinstance(x, np.ndarray) else [x[i] for i in rows]
        arrays[split] = extract(backbone, part, batch_size, desc=f"extract {split} shard {shard[0]}/{shard[1]}")
        arrays[f"rows_{split}"] = rows
    return arrays


# --- sharded extraction (features.shards > 1) ---


def _job(cfg: PipelineConfig, ds: Dataset, bundle_dir: Path, chosen: dict, backend: str) -> dict[str, Any]:
    """What a shard worker needs, as plain picklable values (it runs in a spawned process)."""
    from tlops.features.backends import key_preprocessing

    return {
        "dataset": str(ds.artifact.path),
        "bundle": str(bundle_dir),
        "batch_size": cfg.features.batch_size,
        "backend": backend,
        "model_digest": chosen["model_digest"],
        "key_pre": key_preprocessing(chosen["preprocessing"], backend),
        "data_hash": ds.content_hash,
        "store": str(backend_store(cfg)),
        "cache_root": str(cache_root(cfg)),
    }


def shard_key(model_digest: str, preprocessing: dict, dataset_hash: str, shard: int, shards: int, batch: int) -> str:
    """The cache key of one shard: the whole run's key inputs plus which shard (and the batch size,
    which decides the shard's rows)."""
    return cache_key(model_digest, preprocessing, f"{dataset_hash}:shard{shard}of{shards}:batch{batch}")


def _shard_job(job: dict[str, Any], shard: int, shards: int) -> dict[str, Any]:
    key = shard_key(job["model_digest"], job["key_pre"], job["data_hash"], shard, shards, job["batch_size"])
    return {**job, "shard": shard, "shards": shards, "key": key}


def compute_shard(job: dict[str, Any], threads: int | None = None) -> bool:
    """Compute one shard's cache entry unless it is there; return whether it was (a hit).
    The worker of the in-process pool and the body of a KFP shard task."""
    if threads:
        import torch

        torch.set_num_threads(threads)
    ds = Dataset.open(job["dataset"])
    with tempfile.TemporaryDirectory(prefix="tlops-shard-") as tmp:
        return FeatureCache(job["cache_root"]).get_or_compute(
            job["key"],
            lambda: _compute(
                ds,
                Path(job["bundle"]),
                job["batch_size"],
                backend=job["backend"],
                model_digest=job["model_digest"],
                store=Path(job["store"]),
                shard=(job["shard"], job["shards"]),
            ),
            {
                "model_digest": job["model_digest"],
                "dataset_hash": job["data_hash"],
                "backend": job["backend"],
                "shard": f"{job['shard']}/{job['shards']}",
            },
            Path(tmp) / "features.npz",
        )


def _compute_sharded(
    job: dict[str, Any], shards: int, cache: FeatureCache | None, info: dict[str, Any]
) -> dict[str, np.ndarray]:
    """Compute the missing shards in worker processes (spawned: a fresh interpreter, no forked
    torch thread pools), each with an equal share of this process's threads, then merge all shards.
    Every worker runs to the end before a failure is raised, so the shards that succeeded are kept
    for the rerun. ``cache=None`` (``features.cache: false``): the shards go to a scratch cache."""
    import torch

    with contextlib.ExitStack() as stack:
        if cache is None:
            root = stack.enter_context(tempfile.TemporaryDirectory(prefix="tlops-shards-"))
            job, cache = {**job, "cache_root": root}, FeatureCache(root)
        jobs = [_shard_job(job, i, shards) for i in range(shards)]
        reused = [j["shard"] for j in jobs if cache.get(j["key"]) is not None]
        todo = [j for j in jobs if j["shard"] not in reused]
        for j in jobs:
            if j["shard"] in reused:
                log.info("extract-features: shard %d/%d reused (cache hit %s)", j["shard"], shards, j["key"][:16])
        if todo:
            threads = max(1, torch.get_num_threads() // shards)
            log.info(
                "extract-features: computing shards %s of %d in %d worker processes (%d threads each)",
                [j["shard"] for j in todo],
                shards,
                len(todo),
                threads,
            )
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=len(todo), mp_context=ctx) as pool:
                futures = {j["shard"]: pool.submit(compute_shard, j, threads) for j in todo}
                errors = {i: f.exception() for i, f in futures.items()}  # waits for every worker
            failed = {i: e for i, e in errors.items() if e is not None}
            if failed:
                i, e = next(iter(failed.items()))
                raise TlopsError(
                    f"extract-features: shard(s) {sorted(failed)} of {shards} failed (the others are cached and "
                    f"will be reused by a rerun); shard {i}: {type(e).__name__}: {e}"
                ) from e
            for j in todo:
                log.info("extract-features: shard %d/%d computed (%s)", j["shard"], shards, j["key"][:16])
        info.update(shards_reused=reused, shards_computed=[j["shard"] for j in todo])
        return merge_shards(cache, [j["key"] for j in jobs])


def merge_shards(cache: FeatureCache, keys: list[str]) -> dict[str, np.ndarray]:
    """The whole splits from the shard entries: each shard's rows put back where they came from."""
    parts = [cache.load(k) for k in keys]
    splits = [k for k in parts[0] if not k.startswith("rows_")]
    out = {}
    for split in splits:
        n = sum(len(p[f"rows_{split}"]) for p in parts)
        dim = parts[0][split].shape[1]
        merged = np.zeros((n, dim), dtype=parts[0][split].dtype)
        seen = np.zeros(n, dtype=bool)
        for p in parts:
            merged[p[f"rows_{split}"]] = p[split]
            seen[p[f"rows_{split}"]] = True
        if not seen.all():
            raise TlopsError(f"extract-features: the shards of split {split} do not cover all its {n} rows")
        out[split] = merged
    return out


def run_shard(cfg: PipelineConfig, inputs: dict[str, Artifact], shard: int) -> bool:
    """One KFP shard task: put shard ``shard`` of ``features.shards`` into the (shared) cache;
    the extract-features task merges them. Returns whether it was already there."""
    shards = cfg.features.shards
    if not 0 <= shard < shards:  # e.g. a run-time config with fewer shards than compiled: the merge does it all
        log.info("extract-features: shard %d: nothing to do (features.shards: %d)", shard, shards)
        return False
    ds = Dataset(inputs["dataset"])
    model = inputs["model"]
    cache = FeatureCache(cache_root(cfg))
    chosen, _, backend, _ = _choose(cfg, ds, model, cache)
    job = _shard_job(_job(cfg, ds, model.path / chosen["path"], chosen, backend), shard, shards)
    if cache.get(_main_key(chosen, backend, ds)) is not None:
        log.info("extract-features: shard %d/%d: the merged features are cached already, nothing to do", shard, shards)
        return True
    hit = compute_shard(job)
    log.info("extract-features: shard %d/%d %s (%s)", shard, shards, "reused" if hit else "computed", job["key"][:16])
    return hit


def _main_key(chosen: dict, backend: str, ds: Dataset) -> str:
    from tlops.features.backends import key_preprocessing  # imports torch: never on a reused run's import path

    return cache_key(chosen["model_digest"], key_preprocessing(chosen["preprocessing"], backend), ds.content_hash)

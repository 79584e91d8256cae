"""ingest: read the data source, validate it, split it and write a dataset artifact."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from tlops.artifacts import Artifact, write_artifact
from tlops.config import PipelineConfig
from tlops.data import loaders
from tlops.data.dataset import write_split
from tlops.data.splits import stratified_split
from tlops.errors import DataError
from tlops.hashing import hash_arrays, hash_json, stat_fingerprint

log = logging.getLogger(__name__)


def fingerprint(cfg: PipelineConfig, inputs: dict[str, Artifact]) -> str:
    """Cheap key for reuse: data config + seed + the source files' names, sizes and mtimes."""
    src = cfg.data.source
    if cfg.data.dvc is not None:
        from tlops.data.dvc_source import resolve

        v = resolve(cfg.data.dvc)  # the exact commit + DVC md5: a moved branch or tag is a new input
        stamp = f"dvc:{v.rev}:{v.md5}"
    elif src.startswith("sklearn:"):
        stamp = src
    elif src.startswith("s3://"):
        from tlops.storage import S3Storage

        stamp = S3Storage().stamp(src)  # object names, sizes and ETags: nothing downloaded
    else:
        stamp = stat_fingerprint(src) if Path(src).exists() else "missing"
    return hash_json([cfg.section_hash("data"), stamp])


def _class_order(labels: list[str], wanted: list | None) -> list[str]:
    present = sorted(set(labels), key=lambda s: (0, int(s), s) if s.lstrip("-").isdigit() else (1, 0, s))
    if wanted is None:
        return present
    names = [str(c) for c in wanted]
    unknown = [n for n in names if n not in set(labels)]
    if unknown:
        raise DataError(
            f"data.classes: label(s) {', '.join(unknown)} not found in the data; labels present: {', '.join(present)}"
        )
    return names


def run(cfg: PipelineConfig, inputs: dict[str, Artifact], out: Path) -> Artifact:
    raw = loaders.load(cfg.data)
    classes = _class_order(raw.y, cfg.data.classes)
    index = {c: i for i, c in enumerate(classes)}
    keep = np.array([label in index for label in raw.y])
    y = np.array([index.get(label, -1) for label in raw.y], dtype=np.int64)[keep]
    x = raw.x[keep] if raw.kind == "image" else [t for t, k in zip(raw.x, keep) if k]
    if raw.kind == "image":
        data_hash = hash_arrays({"x": x, "y": y})
    else:
        data_hash = hash_json([x, y.tolist()])
    data_hash = hash_json([data_hash, classes])
    version = {"data_hash": data_hash}
    dvc = raw.info.get("dvc")
    if dvc:
        version |= {"dvc_repo": dvc["repo"], "git_rev": dvc["rev"], "dvc_path": dvc["path"], "dvc_md5": dvc["md5"]}
        log.info("ingest: DVC data %s @ %s, md5 %s -> data hash %s", dvc["path"], dvc["rev"][:12], dvc["md5"], data_hash[:12])
    parts = stratified_split(y, cfg.data, cfg.seed, classes)
    counts = {s: int(len(ix)) for s, ix in parts.items()}
    log.info("ingest: %d samples, %d classes, splits %s", len(y), len(classes), counts)
    with write_artifact(out, "dataset", config=cfg.data.model_dump(mode="json"), inputs=inputs) as w:
        for split, ix in parts.items():
            xs = x[ix] if raw.kind == "image" else [x[i] for i in ix]
            ys = y[ix] if split != "unlabelled" else np.full(len(ix), -1, dtype=np.int64)
            write_split(w.path, split, raw.kind, xs, ys)
        w.metadata = {
            "modality": raw.kind,
            "format": raw.format,
            "source": cfg.data.describe(),
            "classes": classes,
            "data_hash": data_hash,
            "data_version": version,
            "counts": counts,
            "per_class": {
                s: {classes[c]: int((y[ix] == c).sum()) for c in range(len(classes))} for s, ix in parts.items() if s != "unlabelled"
            },
            "shape": list(x.shape[1:]) if raw.kind == "image" else None,
            "seed": cfg.seed,
            **raw.info,
        }
    return Artifact(Path(out), w.manifest)

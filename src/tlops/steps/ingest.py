"""ingest: read the data source, validate it, split it and write a dataset artifact."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np

from tlops.artifacts import Artifact, write_artifact
from tlops.config import PipelineConfig
from tlops.data import loaders
from tlops.data.dataset import write_split
from tlops.data.splits import stratified_split, val_budget
from tlops.errors import DataError
from tlops.hashing import hash_arrays, hash_json, stat_fingerprint

log = logging.getLogger(__name__)


def _stamp(src: str) -> str:
    """Cheap identity of a data location: names, sizes and mtimes (or ETags); nothing read."""
    if src.startswith("sklearn:"):
        return src
    if src.startswith("s3://"):
        from tlops.storage import S3Storage

        return S3Storage().stamp(src)  # object names, sizes and ETags: nothing downloaded
    return stat_fingerprint(src) if Path(src).exists() else "missing"


def stamp(cfg: PipelineConfig, inputs: dict[str, Artifact]) -> list:
    """The data's identity outside the config: the exact commit + DVC md5 of a DVC ref (a moved
    branch or tag is new data), else the source files' names, sizes and mtimes (or S3 ETags)."""
    if cfg.data.dvc is not None:
        from tlops.data.dvc_source import resolve

        v = resolve(cfg.data.dvc)
        data = f"dvc:{v.rev}:{v.md5}"
    else:
        data = _stamp(cfg.data.source)
    domain = _stamp(cfg.data.adapt_from.source) if cfg.data.adapt_from else None
    return [data, domain]


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
    x = raw.x[keep] if raw.kind == "image" else [t for t, k in zip(raw.x, keep, strict=True) if k]
    if raw.kind == "image":
        data_hash = hash_arrays({"x": x, "y": y})
    else:
        data_hash = hash_json([x, y.tolist()])
    data_hash = hash_json([data_hash, classes])
    version = {"data_hash": data_hash}
    dvc = raw.info.get("dvc")
    if dvc:
        version |= {"dvc_repo": dvc["repo"], "git_rev": dvc["rev"], "dvc_path": dvc["path"], "dvc_md5": dvc["md5"]}
        log.info(
            "ingest: DVC data %s @ %s, md5 %s -> data hash %s", dvc["path"], dvc["rev"][:12], dvc["md5"], data_hash[:12]
        )
    parts = stratified_split(y, cfg.data, cfg.seed, classes)
    counts = {s: int(len(ix)) for s, ix in parts.items()}
    duplicates = cross_split_duplicates(x, raw.kind, parts)
    if any(duplicates.values()):
        log.warning(
            "ingest: leakage: the same input occurs in more than one split (%s); evaluation on inputs seen in "
            "training is optimistic. Deduplicate %s (the counts are in the dataset manifest: duplicates_across_splits)",
            ", ".join(f"{k}: {v}" for k, v in duplicates.items() if v),
            cfg.data.describe(),
        )
    domain = _source_domain(cfg, raw.kind, index, classes) if cfg.data.adapt_from else None
    if domain is not None:
        data_hash = hash_json([data_hash, domain["hash"]])
        counts |= {name: int(len(sy)) for name, (_, sy) in domain["splits"].items()}
    log.info("ingest: %d samples, %d classes, splits %s", len(y), len(classes), counts)
    val_cap, val_rule = val_budget(cfg.data)
    if val_rule:
        log.info("ingest: %s", val_rule)
    with write_artifact(out, "dataset", config=cfg.data.model_dump(mode="json"), inputs=inputs) as w:
        for split, ix in parts.items():
            xs = x[ix] if raw.kind == "image" else [x[i] for i in ix]
            ys = y[ix] if split != "unlabelled" else np.full(len(ix), -1, dtype=np.int64)
            write_split(w.path, split, raw.kind, xs, ys)
        for split, (sx, sy) in domain["splits"].items() if domain else ():
            write_split(w.path, split, raw.kind, sx, sy)
        w.metadata = {
            "modality": raw.kind,
            "format": raw.format,
            "source": cfg.data.describe(),
            "classes": classes,
            "data_hash": data_hash,
            "data_version": version,
            "counts": counts,
            "duplicates_across_splits": duplicates,
            "per_class": {
                s: {classes[c]: int((y[ix] == c).sum()) for c in range(len(classes))}
                for s, ix in parts.items()
                if s != "unlabelled"
            },
            "shape": list(x.shape[1:]) if raw.kind == "image" else None,
            "seed": cfg.seed,
            "label_budget": {
                "labels_per_class": cfg.data.labels_per_class,
                "val_labels_per_class": val_cap,
                "rule": val_rule,
            },
            **(
                {"adapt_from": {"source": cfg.data.adapt_from.source, "hash": domain["hash"], **domain["info"]}}
                if domain
                else {}
            ),
            **raw.info,
        }
    return Artifact(Path(out), w.manifest)


def _sample_keys(x, kind: str, ix: np.ndarray) -> list:
    if kind == "image":
        return [hashlib.blake2b(np.ascontiguousarray(x[i]).tobytes(), digest_size=16).digest() for i in ix]
    return [x[i] for i in ix]


def cross_split_duplicates(x, kind: str, parts) -> dict[str, int]:
    """For each pair of splits ``a/b``: how many samples of ``b`` have an exact copy in ``a``."""
    keys = {s: _sample_keys(x, kind, ix) for s, ix in parts.items() if len(ix)}
    names = [s for s in ("train", "val", "test", "unlabelled") if s in keys]
    sets = {s: set(keys[s]) for s in names}
    out = {}
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            out[f"{a}/{b}"] = int(sum(k in sets[a] for k in keys[b]))
    return out


def _source_domain(cfg: PipelineConfig, kind: str, index: dict[str, int], classes: list[str]) -> dict:
    """Load ``data.adapt_from`` (labelled source-domain data), keep the target's classes and
    split it into ``source_train`` / ``source_val`` (stratified, seeded)."""
    from tlops.config import DataConfig

    sd = cfg.data.adapt_from
    dcfg = DataConfig(
        source=sd.source,
        format=sd.format,
        text_column=sd.text_column,
        label_column=sd.label_column,
        columns=sd.columns,
        quoting=sd.quoting,
        encoding=sd.encoding,
    )
    raw = loaders.load(dcfg)
    if raw.kind != kind:
        raise DataError(f"data.adapt_from: {sd.source} holds {raw.kind} data but data.source holds {kind} data")
    keep = np.array([label in index for label in raw.y])
    if not keep.any():
        raise DataError(
            f"data.adapt_from: none of the labels in {sd.source} ({', '.join(sorted(set(raw.y))[:10])}) "
            f"is a target class ({', '.join(classes)})"
        )
    y = np.array([index.get(label, -1) for label in raw.y], dtype=np.int64)[keep]
    absent = [classes[c] for c in range(len(classes)) if not (y == c).any()]
    if absent:
        raise DataError(
            f"data.adapt_from: {sd.source} has no sample of target class(es) {', '.join(absent)}: the adapted model "
            "would be tested on labels it never saw in training. Add source-domain samples for them, or drop them "
            "from the target with data.classes"
        )
    x = raw.x[keep] if kind == "image" else [t for t, k in zip(raw.x, keep, strict=True) if k]
    rng = np.random.default_rng(cfg.seed + 1)
    order = rng.permutation(len(y))
    if sd.max_samples is not None:
        order = order[: sd.max_samples]
    val_ix, train_ix = [], []
    for c in range(len(classes)):
        ix = order[y[order] == c]
        n_val = int(round(sd.val * len(ix)))
        val_ix.append(ix[:n_val])
        train_ix.append(ix[n_val:])
    splits = {}
    for name, ix in (
        ("source_train", np.sort(np.concatenate(train_ix))),
        ("source_val", np.sort(np.concatenate(val_ix))),
    ):
        splits[name] = (x[ix] if kind == "image" else [x[i] for i in ix], y[ix])
    h = hash_arrays({"x": x, "y": y}) if kind == "image" else hash_json([x, y.tolist()])
    log.info(
        "ingest: source domain %s: %d samples kept (%d dropped: not target classes), source_train %d, source_val %d",
        sd.source,
        len(y),
        int((~keep).sum()),
        len(splits["source_train"][1]),
        len(splits["source_val"][1]),
    )
    return {
        "splits": splits,
        "hash": hash_json([h, sd.max_samples, sd.val, cfg.seed]),
        "info": {"kept": int(len(y)), "dropped": int((~keep).sum()), "format": raw.format},
    }

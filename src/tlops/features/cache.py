"""Content-addressed feature cache.

Key = sha256(source-model digest, preprocessing, pooling, dataset content hash). An entry is
a directory ``<root>/<key[:2]>/<key>/`` with ``features.npz`` and ``manifest.json``; it is
published by an atomic rename, so a reader never sees a half-written entry.
"""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path

import numpy as np

from tlops.artifacts import is_finished, publish_dir, read_artifact, write_artifact
from tlops.hashing import hash_json

log = logging.getLogger(__name__)
CACHE_VERSION = 1


def cache_key(model_digest: str, preprocessing: dict, dataset_hash: str) -> str:
    return hash_json({"v": CACHE_VERSION, "model": model_digest, "pre": preprocessing, "data": dataset_hash})


class FeatureCache:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def entry(self, key: str) -> Path:
        return self.root / key[:2] / key

    def get(self, key: str) -> Path | None:
        p = self.entry(key)
        return p if is_finished(p) else None

    def put(self, key: str, arrays: dict[str, np.ndarray], meta: dict) -> Path:
        dst = self.entry(key)
        if is_finished(dst):
            return dst
        staging = dst.parent / f".{key}.{uuid.uuid4().hex[:8]}"
        with write_artifact(staging, "feature-cache-entry", config={"key": key}) as w:
            np.savez(w.path / "features.npz", **arrays)
            w.metadata = dict(meta, cache_key=key)
        publish_dir(staging, dst)
        log.info("feature cache: stored %s", key[:16])
        return dst

    def load(self, key: str) -> dict[str, np.ndarray]:
        p = self.get(key)
        assert p is not None
        read_artifact(p, "feature-cache-entry")
        with np.load(p / "features.npz", allow_pickle=False) as z:
            return {k: z[k] for k in z.files}

"""Content-addressed feature cache, on local disk or on S3.

Key = sha256(source-model digest, preprocessing, pooling, dataset content hash). An entry is
``<root>/<key[:2]>/<key>/`` holding ``features.npz`` and ``manifest.json``.

- Local root: the entry is published by an atomic rename, so a reader never sees a
  half-written entry. Writers of one key coordinate through ``<root>/.locks/<key>.lock``
  (:meth:`FeatureCache.lock`): the extract-features step holds it from the lookup to the
  publish, so of two concurrent runs one computes and the other waits and gets a hit. A
  killed writer leaves at most a hidden staging dir (``.<key>.<random>``, never trusted;
  ``tlops gc`` removes it) and its lock is released by the kernel.
- ``s3://bucket/prefix`` root: ``features.npz`` is uploaded first and ``manifest.json`` last;
  an entry is a hit only if its manifest exists, so an interrupted upload is never trusted.
  S3 has no locks: two concurrent writers of a key both compute it and upload the same
  arrays (plain PUTs, each atomic, no delete in between), and every manifest names the key
  as its content hash, so any manifest/data pair a reader sees is consistent.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from tlops.artifacts import MANIFEST, is_finished, link_or_copy, publish_dir, read_artifact, write_artifact
from tlops.hashing import hash_json
from tlops.storage import S3Storage, file_lock, is_s3, join

log = logging.getLogger(__name__)
CACHE_VERSION = 1
FEATURES = "features.npz"
KIND = "feature-cache-entry"


def cache_key(model_digest: str, preprocessing: dict, dataset_hash: str) -> str:
    return hash_json({"v": CACHE_VERSION, "model": model_digest, "pre": preprocessing, "data": dataset_hash})


class FeatureCache:
    def __init__(self, root: str | os.PathLike):
        self.remote = is_s3(root)
        self.root: str | Path = str(root).rstrip("/") if self.remote else Path(root)
        self._storage: S3Storage | None = None

    @property
    def storage(self) -> S3Storage:
        if self._storage is None:
            self._storage = S3Storage()
        return self._storage

    def entry(self, key: str) -> Path | str:
        return join(self.root, key[:2], key)

    def lock_path(self, key: str) -> Path | None:
        return None if self.remote else Path(self.root) / ".locks" / f"{key}.lock"

    @contextlib.contextmanager
    def lock(self, key: str) -> Iterator[None]:
        """Hold the writer lock of ``key`` (local roots; a no-op on S3, see the module doc)."""
        path = self.lock_path(key)
        if path is None:
            yield
            return
        with file_lock(path, what=f"feature cache entry {key[:16]} (another run is computing it)"):
            yield

    def get(self, key: str) -> Path | str | None:
        p = self.entry(key)
        if self.remote:
            return p if self.storage.exists(str(join(p, MANIFEST))) else None
        return p if is_finished(p) else None

    def put(self, key: str, arrays: dict[str, np.ndarray], meta: dict) -> Path | str:
        if not self.remote and is_finished(self.entry(key)):
            return self.entry(key)
        with tempfile.TemporaryDirectory(prefix="tlops-features-") as tmp:
            f = Path(tmp) / FEATURES
            np.savez(f, **arrays)
            return self.put_file(key, f, meta)

    def put_file(self, key: str, features: str | os.PathLike, meta: dict) -> Path | str:
        """Store an existing ``features.npz`` (hard-linked locally, uploaded to S3)."""
        dst = self.entry(key)
        if self.remote:
            if self.get(key) is not None:
                log.info("feature cache: %s already stored by another writer", key[:16])
                return dst
            with tempfile.TemporaryDirectory(prefix="tlops-cache-entry-") as tmp:
                staged = Path(tmp) / "entry"
                with write_artifact(staged, KIND, config={"key": key}) as w:
                    link_or_copy(features, w.path / FEATURES)
                    w.metadata = dict(meta, cache_key=key)
                    w.content_hash = key  # the same in every writer's manifest
                # features.npz first, manifest.json last; plain PUTs (no delete of a concurrent
                # writer's objects): any manifest/data pair is a consistent entry
                self.storage.upload_file(staged / FEATURES, str(join(dst, FEATURES)))
                self.storage.upload_file(staged / MANIFEST, str(join(dst, MANIFEST)))
            log.info("feature cache: stored %s at %s", key[:16], dst)
            return dst
        with self.lock(key):  # re-entrant: the extract step already holds it
            if is_finished(dst):
                return dst
            staging = dst.parent / f".{key}.{uuid.uuid4().hex[:8]}"
            with write_artifact(staging, KIND, config={"key": key}) as w:
                link_or_copy(features, w.path / FEATURES)
                w.metadata = dict(meta, cache_key=key)
                w.content_hash = key
            publish_dir(staging, dst)
        log.info("feature cache: stored %s", key[:16])
        return dst

    def get_or_compute(
        self,
        key: str,
        compute: Callable[[], dict[str, np.ndarray]],
        meta: dict,
        dst: str | os.PathLike,
        *,
        enabled: bool = True,
    ) -> bool:
        """Place the features of ``key`` at ``dst`` (a ``features.npz``); return whether it was a hit.

        A hit is fetched (a hard link locally); a miss runs ``compute()``, saves the arrays at
        ``dst`` and publishes them as the entry. The key's writer lock is held from the lookup
        to the publish, so of two runs needing one key, one computes and the other gets a hit.
        ``enabled=False`` (``features.cache: false``) only computes."""
        dst = Path(dst)
        if not enabled:
            np.savez(dst, **compute())
            return False
        with self.lock(key):
            if self.get(key) is not None:
                self.fetch(key, dst)
                return True
            np.savez(dst, **compute())
            self.put_file(key, dst, meta)
            return False

    def get_or_compute_arrays(
        self, key: str, compute: Callable[[], dict[str, np.ndarray]], meta: dict, *, enabled: bool = True
    ) -> dict[str, np.ndarray]:
        """:meth:`get_or_compute`, returning the arrays instead of a file."""
        with tempfile.TemporaryDirectory(prefix="tlops-features-") as tmp:
            f = Path(tmp) / FEATURES
            self.get_or_compute(key, compute, meta, f, enabled=enabled)
            with np.load(f, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}

    def fetch(self, key: str, dst: str | os.PathLike) -> None:
        """Place the entry's ``features.npz`` at ``dst`` (hard link locally, download from S3)."""
        if not self.remote:
            p = self.get(key)
            assert p is not None
            read_artifact(p, KIND)
            link_or_copy(Path(p) / FEATURES, dst)
            return
        dst = Path(dst)
        tmp = Path(tempfile.mkdtemp(prefix=".cache-entry-", dir=dst.parent))
        try:
            self.storage.download_dir(str(self.entry(key)), tmp / "entry")  # refuses without a manifest
            read_artifact(tmp / "entry", KIND)
            os.replace(tmp / "entry" / FEATURES, dst)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def load(self, key: str) -> dict[str, np.ndarray]:
        with tempfile.TemporaryDirectory(prefix="tlops-features-") as tmp:
            f = Path(tmp) / FEATURES
            self.fetch(key, f)
            with np.load(f, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}

"""Tamper-evident registered models: a sha256 manifest of every logged model file, checked by every loader.

Why: the artifact store (S3 bucket, MinIO, a file share) is written by other parties than the
registry database, and a loader that trusts whatever the store holds turns write access to the
bucket into control over every consumer's predictions. The registry database is the root of
trust: at registration tlops hashes every file of the logged model (as the store holds it, read
back after the upload), writes the manifest (relative path -> sha256 and size) to the version's
run artifacts as ``integrity/<sha256>.json`` (content-addressed: versions sharing a run keep
their own), and records that sha256 as the version's tag ``tlops.manifest_sha256``. The tag is
64 characters whatever the number of files, far below any server's cap on a model-version tag
value (5,000 characters on older MLflow servers); the manifest itself (about 130 characters a
file, tens of files for a Hugging Face bundle with its tokenizer) would not fit one reliably.

Every loader of a registry model (``tlops serve``, ``predict``, ``monitor``, ``pull-model``'s
``mlflow:`` sources and evaluate's champion comparison) goes through :func:`verified_download`:
one download into a private temporary directory, the manifest checked against the tag, every
file against the manifest (a changed byte, a missing file, an extra file), and only then the
caller loads from that same local copy, so nothing can change between check and load.

Versions without the tag (registered before tlops recorded one, or created by hand) are refused
unless ``TLOPS_ALLOW_UNVERIFIED_MODELS=1``: an unverified model is exactly what this guards
against, so loading one must be a decision someone made for the environment, not a default.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from tlops.errors import ModelError

log = logging.getLogger(__name__)

MANIFEST_TAG = "tlops.manifest_sha256"
#: the manifests' folder among the version's run artifacts (outside the model's own files)
MANIFEST_DIR = "integrity"
ALLOW_ENV = "TLOPS_ALLOW_UNVERIFIED_MODELS"
FORMAT = "tlops-model-manifest"
_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


# MLflow's own bookkeeping: a ``models:/`` download writes this file (name and version, YAML) into the
# model directory, and with a local artifact store that directory IS the store. tlops never reads it.
_MLFLOW_WRITES = {"registered_model_meta"}


def build_manifest(root: Path) -> dict[str, Any]:
    """Every file under ``root`` (a downloaded model directory): relative POSIX path -> sha256, size."""
    files = {}
    for p in sorted(root.rglob("*")):
        if p.relative_to(root).as_posix() in _MLFLOW_WRITES:
            continue
        if p.is_symlink():  # a download never makes one; a store that serves one is not trusted
            raise ModelError(f"{root}: {p.relative_to(root).as_posix()} is a symbolic link; a model holds files only")
        if p.is_file():
            files[p.relative_to(root).as_posix()] = {"sha256": sha256_file(p), "size": p.stat().st_size}
    return {"format": FORMAT, "version": 1, "algorithm": "sha256", "files": files}


def manifest_bytes(manifest: dict[str, Any]) -> bytes:
    """The canonical encoding (sorted keys, no whitespace): what the tag's digest is taken of."""
    return json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()


def manifest_path(digest: str) -> str:
    """The run artifact path of the manifest whose sha256 is ``digest``."""
    return f"{MANIFEST_DIR}/{digest}.json"


def _download_model(name: str, version: str, dst: Path) -> Path:
    """The version's model files exactly as stored (the version's own location, so MLflow adds no
    ``registered_model_meta`` file as it does for a ``models:/`` download)."""
    import mlflow

    from tlops.tracking import registry

    uri = registry.client().get_model_version_download_uri(name, str(version))
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst)))


def record(name: str, version: str, run_id: str, expect: dict[str, str] | None = None) -> str:
    """Hash the registered ``name`` v``version`` as the store holds it, log the manifest to
    ``run_id``'s artifacts and return the manifest's sha256 (the value of :data:`MANIFEST_TAG`).

    ``expect`` (relative path -> sha256 of the files register uploaded, e.g. the bundle's) must
    match what the store returns: the manifest records the store's copy, so this is what ties it
    to the model that was trained rather than to whatever the store held a moment later."""
    from tlops.tracking import registry

    with tempfile.TemporaryDirectory(prefix="tlops-manifest-") as tmp:
        local = _download_model(name, version, Path(tmp) / "model")
        manifest = build_manifest(local)
        files = manifest["files"]
        bad = [
            f"{rel} (uploaded sha256 {h[:12]}, stored {files[rel]['sha256'][:12] if rel in files else 'missing'})"
            for rel, h in sorted((expect or {}).items())
            if files.get(rel, {}).get("sha256") != h
        ]
        if bad:
            raise ModelError(
                f"register: {name} v{version}: the artifact store does not hold the files just uploaded: "
                + "; ".join(bad)
            )
        data = manifest_bytes(manifest)
        digest = hashlib.sha256(data).hexdigest()
        path = Path(tmp) / Path(manifest_path(digest)).name
        path.write_bytes(data)
        registry.client().log_artifact(run_id, str(path), artifact_path=MANIFEST_DIR)
    n = len(json.loads(data)["files"])
    log.info("register: %s v%s: integrity manifest of %d files, sha256 %s", name, version, n, digest[:12])
    return digest


def tree_digests(root: Path, rels: list[str], prefix: str) -> dict[str, str]:
    """sha256 of the files ``rels`` (files or folders) under ``root``, keyed ``prefix/rel``."""
    out = {}
    for rel in rels:
        p = root / rel
        for f in sorted(p.rglob("*")) if p.is_dir() else [p]:
            if f.is_file():
                out[f"{prefix}/{f.relative_to(root).as_posix()}"] = sha256_file(f)
    return out


def _differences(local: Path, manifest: dict[str, Any]) -> list[str]:
    """One line per file that differs: changed bytes, missing, or not in the manifest."""
    want = manifest["files"]
    have = build_manifest(local)["files"]
    out = []
    for rel in sorted(want.keys() | have.keys()):
        exp, got = want.get(rel), have.get(rel)
        if got is None:
            out.append(f"{rel} is missing (expected sha256 {exp['sha256'][:12]})")
        elif exp is None:
            out.append(f"{rel} is not in the manifest (sha256 {got['sha256'][:12]})")
        elif got["sha256"] != exp["sha256"]:
            out.append(f"{rel} changed (expected sha256 {exp['sha256'][:12]}, got {got['sha256'][:12]})")
    return out


def _manifest(name: str, version: str, run_id: str | None, digest: str, tmp: Path) -> dict[str, Any]:
    """The version's manifest, checked against the digest its tag recorded."""
    import mlflow

    label, where = f"{name} v{version}", manifest_path(digest)
    try:
        path = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=where, dst_path=str(tmp)))
        data = path.read_bytes()
    except Exception as e:  # noqa: BLE001 - MLflow raises several types for a missing artifact
        raise ModelError(
            f"refusing to load {label}: its integrity manifest ({where} in run {run_id}) cannot be read "
            f"({type(e).__name__}); the artifact store lost or moved it"
        ) from None
    got = hashlib.sha256(data).hexdigest()
    if got != digest:
        raise ModelError(
            f"refusing to load {label}: its integrity manifest ({where} in run {run_id}) was changed "
            f"(expected sha256 {digest[:12]}, got {got[:12]}); the artifact store copy is not what was registered"
        )
    return json.loads(data)


def allow_unverified() -> bool:
    return os.environ.get(ALLOW_ENV, "").strip().lower() in ("1", "true", "yes")


@contextmanager
def verified_download(name: str, version: str) -> Iterator[Path]:
    """Download ``name`` v``version`` into a private temporary directory, verify every file against
    the manifest recorded at registration, and yield the directory (removed on exit). Load from it
    before leaving the block: the check covers this copy only."""
    from tlops.tracking import registry

    label = f"{name} v{version}"
    mv = registry.client().get_model_version(name, str(version))
    digest = (mv.tags or {}).get(MANIFEST_TAG)
    with tempfile.TemporaryDirectory(prefix="tlops-model-") as tmp:
        if not digest:
            if not allow_unverified():
                raise ModelError(
                    f"refusing to load {label}: it has no integrity manifest (tag {MANIFEST_TAG}): it was registered "
                    f"before tlops recorded one, or not by tlops; register the model again, or set {ALLOW_ENV}=1 to "
                    "load versions without one"
                )
            log.warning(
                "loading %s without an integrity check (%s=1): it has no %s tag", label, ALLOW_ENV, MANIFEST_TAG
            )
            yield _download_model(name, version, Path(tmp) / "model")
            return
        manifest = _manifest(name, version, mv.run_id, digest, Path(tmp) / "manifest")
        local = _download_model(name, version, Path(tmp) / "model")
        bad = _differences(local, manifest)
        if bad:
            raise ModelError(
                f"refusing to load {label}: its files differ from the integrity manifest recorded at registration: "
                + "; ".join(bad)
            )
        log.debug("%s: %d files match the integrity manifest %s", label, len(manifest["files"]), digest[:12])
        yield local


@contextmanager
def champion_bundle(name: str) -> Iterator[tuple[Any, Path] | None]:
    """Yield (model version, local bundle dir) of the current champion, or None; the files are checked
    against the manifest recorded at registration before anything is read."""
    from tlops.tracking import registry

    mv = registry.get_alias(name, registry.CHAMPION)
    if mv is None:
        yield None
        return
    with verified_download(name, str(mv.version)) as local:
        bundles = [p.parent for p in local.rglob("bundle.json")]
        yield (mv, bundles[0]) if bundles else None
